"""Euler sampling with the step-size input, for any power-of-two budget up to the finest level.

For ``N = 2^k`` steps: ``d = 1/N``, ``t_i = i/N``, ``x <- x + d * s(x, t_i, k)``. One step is
``x1 = x0 + s(x0, 0, 0)``. With classifier-free guidance (scale ``w != 1``) the velocity is
``u + w (c - u)`` from a conditional and a null-class pass, batched into one call.

``Sampler`` compiles once per input shape and guided-or-not: the number of steps, the level and
the guidance scale are traced arguments and the loop over steps is a ``lax.fori_loop`` with a
traced trip count, so a sweep over budgets (1 to 128) or over scales does not recompile.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.infra import distributed, sharding


def check_budget(num_steps: int, num_levels: int) -> int:
    """Level k for an N-step budget; raises with the valid budgets otherwise."""
    valid = [2**k for k in range(num_levels + 1)]
    if not isinstance(num_steps, (int,)) or num_steps not in valid:
        hint = ""
        if isinstance(num_steps, int) and num_steps > valid[-1]:
            hint = f" (the model was trained with objective.num_levels={num_levels}, so at most {valid[-1]} steps)"
        raise ValueError(f"num_steps={num_steps!r} is not a valid budget{hint}; use one of {valid}")
    return int(math.log2(num_steps))


def euler_sample(
    apply_fn, params, noise, labels, *, num_steps: int, num_levels: int, cfg_scale=None, null_class: int = 0
) -> jax.Array:
    """Traceable N-step Euler sampler (call inside jit, or through ``Sampler``)."""
    level = check_budget(num_steps, num_levels)
    return _euler(apply_fn, params, noise, labels, num_steps, level, cfg_scale, null_class)


def _euler(apply_fn, params, noise, labels, num_steps, level, cfg_scale, null_class: int) -> jax.Array:
    """The loop of ``euler_sample``; ``num_steps`` and ``level`` may be traced int32 scalars."""
    b = noise.shape[0]
    d = 1.0 / jnp.asarray(num_steps, jnp.float32)  # exact for powers of two
    level = jnp.full((b,), level, jnp.int32)

    def velocity(x, t):
        tt = jnp.full((b,), t, jnp.float32)
        if cfg_scale is None:
            return apply_fn(params, x, tt, level, labels)
        both = apply_fn(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([tt, tt]),
            jnp.concatenate([level, level]),
            jnp.concatenate([labels, jnp.full_like(labels, null_class)]),
        )
        cond, uncond = both[:b], both[b:]
        return uncond + cfg_scale * (cond - uncond)

    def step(i, x):
        t = i.astype(jnp.float32) * d
        return x + d * velocity(x, t).astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))


def _synced(executables: dict, jitted, params, args):
    """``jitted``, or in a job of several processes its program compiled for these arguments
    ahead of the first run, every process waiting for the others in between
    (``distributed.sync``): none starts the program's collectives while another still compiles
    it. ``executables`` keeps the compiled programs by argument signature."""
    if jax.process_count() == 1:
        return jitted
    leaves = jax.tree.leaves((params, args))
    signature = (
        id(jitted),
        jax.tree.structure((params, args)),
        tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
    )
    if signature not in executables:
        executables[signature] = jitted.lower(params, *args).compile()
        distributed.sync("sampler_compiled")
    return executables[signature]


class _MeshSampler:
    """The call every sampler shares: one jitted program per (input shape, guided), the step
    count (and whatever ``_extra_args`` adds) traced, so a sweep over budgets compiles once.

    With a ``mesh`` the noise and labels are split over its batch axes, so each device draws its
    own share of the samples (a batch that does not divide evenly is padded, and the padding
    dropped); the parameters keep the shardings they come with. Results are global arrays:
    ``to_host`` gathers them on every process. In a job of several processes each program is
    compiled ahead of its first run and the processes wait for each other in between
    (``distributed.sync``), so that none starts the program's collectives while another still
    compiles it.
    """

    def __init__(self, apply_fn: Callable, *, num_levels: int, num_classes: int, mesh=None):
        self.apply_fn = apply_fn
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.mesh = mesh
        self._compiled: dict = {}
        self._executables: dict = {}  # several processes: argument signature -> compiled program

    def _extra_args(self, num_steps: int) -> tuple:
        """Checks the budget; traced arguments of ``_loop`` beyond the step count."""
        check_step_count(num_steps)
        return ()

    def _interval_args(self, guidance_interval) -> tuple:
        """Traced arguments of ``_loop`` after ``_extra_args`` for a guidance interval: none here,
        where guidance applies at every step (``IntervalSampler`` of a network that reads it)."""
        if guidance_interval is not None and tuple(guidance_interval) != (0.0, 1.0):
            raise ValueError(
                f"guidance_interval={tuple(guidance_interval)}: this sampler guides every step; only a"
                " network trained with objective.meanflow_interval_input reads an interval"
            )
        return ()

    def _loop(self, params, noise, labels, cfg_scale, num_steps, *extra):
        raise NotImplementedError

    def _fn(self, guided: bool):
        if guided not in self._compiled:
            out = None if self.mesh is None else sharding.batch_sharding(self.mesh)
            self._compiled[guided] = jax.jit(
                lambda params, noise, labels, cfg_scale, num_steps, *extra: self._loop(
                    params, noise, labels, cfg_scale if guided else None, num_steps, *extra
                ),
                out_shardings=out,
            )
        return self._compiled[guided]

    def _arguments(self, noise, labels, num_steps: int, cfg_scale: float, guidance_interval=None):
        """(guided, arguments of the jitted sampler, number of real rows)."""
        extra = self._extra_args(num_steps) + self._interval_args(guidance_interval)
        n = noise.shape[0]
        if labels is None:
            labels = np.full((n,), self.num_classes, np.int32)
        guided = self.num_classes > 0 and float(cfg_scale) != 1.0
        if self.mesh is not None:
            noise, labels = (sharding.shard_rows(np.asarray(a), self.mesh) for a in (noise, labels))
        return guided, (noise, labels, jnp.float32(cfg_scale), jnp.int32(num_steps), *extra), n

    def __call__(
        self, params, noise, labels=None, *, num_steps: int, cfg_scale: float = 1.0, guidance_interval=None
    ) -> jax.Array:
        """``guidance_interval``: the papers' ``t`` range where ``cfg_scale`` applies, for a network
        that reads it (None: everywhere)."""
        guided, args, n = self._arguments(noise, labels, num_steps, cfg_scale, guidance_interval)
        out = _synced(self._executables, self._fn(guided), params, args)(params, *args)
        return out if out.shape[0] == n else out[:n]

    def lower(self, params, noise, labels=None, *, num_steps: int, cfg_scale: float = 1.0, guidance_interval=None):
        """The lowered program ``__call__`` runs (for inspecting per-device shapes and costs)."""
        guided, args, _ = self._arguments(noise, labels, num_steps, cfg_scale, guidance_interval)
        return self._fn(guided).lower(params, *args)

    @staticmethod
    def to_host(x: jax.Array) -> np.ndarray:
        return sharding.to_host(x)


class Sampler(_MeshSampler):
    """The Euler sampler with the level input: budgets are powers of two up to the finest level,
    and the level is a traced argument beside the step count."""

    def _extra_args(self, num_steps: int) -> tuple:
        return (jnp.int32(check_budget(num_steps, self.num_levels)),)

    def _loop(self, params, noise, labels, cfg_scale, num_steps, level):
        return _euler(self.apply_fn, params, noise, labels, num_steps, level, cfg_scale, self.num_classes)


def interval_euler_sample(
    apply_fn,
    params,
    noise,
    labels,
    *,
    num_steps,
    cfg_scale=None,
    null_class: int = 0,
    guidance_input: bool = False,
    guidance_interval=None,
) -> jax.Array:
    """``num_steps`` Euler steps of ``h = 1/num_steps`` through a network of the average velocity
    over an interval, which reads ``h`` as its level input (``objectives.meanflow``); traceable,
    ``num_steps`` may be a traced int32 scalar. ``guidance_input``: the network takes the guidance
    scale as an input (improved MeanFlow), so one pass per step gives the guided velocity;
    ``guidance_interval`` (start, end), possibly traced: it reads the papers' ``t`` range where the
    scale applies too (``guidance`` ``[B, 3]``)."""
    b = noise.shape[0]
    h = 1.0 / jnp.asarray(num_steps, jnp.float32)
    level = jnp.full((b,), h, jnp.float32)
    if guidance_input:
        scale = jnp.full((b,), 1.0 if cfg_scale is None else cfg_scale, jnp.float32)
        if guidance_interval is not None:
            interval = jnp.broadcast_to(jnp.asarray(guidance_interval, jnp.float32), (b, 2))
            scale = jnp.concatenate([scale[:, None], interval], axis=1)

        def predict(x, t):
            tt = jnp.full((b,), t, jnp.float32)
            return apply_fn(params, x, tt, level, labels, guidance=scale).astype(jnp.float32)

    else:
        predict = _prediction_fn(apply_fn, params, labels, level, cfg_scale, null_class, level_dtype=jnp.float32)

    def step(i, x):
        return x + h * predict(x, i.astype(jnp.float32) * h).astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))


def parse_interval(value):
    """``value`` as a ``(start, end)`` tuple of floats with ``0 <= start <= end <= 1`` (a guidance
    interval in the papers' ``t``), or None where it is not one; each caller says what to change."""
    try:
        interval = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return interval if len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0 else None


class IntervalSampler(_MeshSampler):
    """Euler over an even chain of intervals for an average-velocity network (MeanFlow): any
    budget from 1 step up, one compilation for all of them. With ``guidance_input`` the guidance
    scale (``cfg_scale``) is the network's input instead of a second, unconditional pass; with
    ``guidance_interval_input`` the network reads the guidance interval too (a call's
    ``guidance_interval``, traced: a new interval compiles nothing)."""

    def __init__(
        self,
        apply_fn: Callable,
        *,
        num_levels: int,
        num_classes: int,
        guidance_input: bool = False,
        guidance_interval_input: bool = False,
        mesh=None,
    ):
        super().__init__(apply_fn, num_levels=num_levels, num_classes=num_classes, mesh=mesh)
        self.guidance_input = guidance_input
        self.guidance_interval_input = guidance_input and guidance_interval_input

    def _interval_args(self, guidance_interval) -> tuple:
        if not self.guidance_interval_input:
            return super()._interval_args(guidance_interval)
        interval = parse_interval((0.0, 1.0) if guidance_interval is None else guidance_interval)
        if interval is None:
            raise ValueError(f"guidance_interval={guidance_interval} must be (start, end) with 0 <= start <= end <= 1")
        return (jnp.asarray(interval, jnp.float32),)

    def _loop(self, params, noise, labels, cfg_scale, num_steps, *interval):
        return interval_euler_sample(
            self.apply_fn,
            params,
            noise,
            labels,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            null_class=self.num_classes,
            guidance_input=self.guidance_input,
            guidance_interval=interval[0] if interval else None,
        )


# ----------------------------------------------------------------------------------------------
# Samplers of the comparison methods. The Euler sampler above serves shortcut models, flow
# matching, progressive distillation and reflow; diffusion needs DDIM, consistency models their
# predict-then-renoise sampler. All take the same call as ``Sampler`` so that evaluation can use
# any of them, and all compile once per input shape (the step count is traced).


def check_step_count(num_steps) -> int:
    """DDIM and the consistency sampler run any positive number of steps."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive integer")
    return num_steps


def euler_sample_at_level(
    apply_fn, params, noise, labels, *, num_steps: int, level: int, cfg_scale=None, null_class: int = 0
) -> jax.Array:
    """N Euler steps of size 1/N that all read the level input ``level`` (traceable).

    Live reflow generates its pairs with the flow-matching level (8 steps at level K), which the
    budget-to-level rule of ``euler_sample`` would not give.
    """
    return _euler(apply_fn, params, noise, labels, check_step_count(num_steps), level, cfg_scale, null_class)


def _prediction_fn(apply_fn, params, labels, level, cfg_scale, null_class: int, level_dtype=jnp.int32):
    """``(x, t) -> network output`` with the level and labels fixed, guided when ``cfg_scale`` is set."""
    b = labels.shape[0]
    level = jnp.broadcast_to(jnp.asarray(level, level_dtype), (b,))

    def predict(x, t):
        tt = jnp.full((b,), t, jnp.float32)
        if cfg_scale is None:
            return apply_fn(params, x, tt, level, labels).astype(jnp.float32)
        both = apply_fn(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([tt, tt]),
            jnp.concatenate([level, level]),
            jnp.concatenate([labels, jnp.full_like(labels, null_class)]),
        ).astype(jnp.float32)
        cond, uncond = both[:b], both[b:]
        return uncond + cfg_scale * (cond - uncond)

    return predict


def ddim_sample(
    apply_fn,
    params,
    noise,
    labels,
    *,
    num_steps: int,
    alpha_bar_fn,
    level: int,
    cfg_scale=None,
    null_class: int = 0,
    clip: float = 0.0,
) -> jax.Array:
    """Deterministic DDIM (eta = 0) from noise to data in ``num_steps`` equal steps (traceable).

    ``apply_fn`` predicts the noise ``eps`` at network time ``t`` (diffusion time ``s = 1 - t``);
    ``alpha_bar_fn(s)`` is the signal fraction of the path (``objectives.diffusion.alpha_bar``).
    Step ``i`` goes from ``t_i = i/N`` to ``t_{i+1}``: the data estimate
    ``x1 = (x - sqrt(1 - a) eps) / sqrt(a)`` is re-noised with the same ``eps`` to the next level,
    ``x' = sqrt(a') x1 + sqrt(1 - a') eps``; the last step returns the data estimate (``a' = 1``).
    With ``clip > 0`` the data estimate is clipped to ``[-clip, clip]`` (the noise estimate is
    kept), as image diffusion samplers clip theirs to the pixel range: near pure noise the
    estimate divides the network's error by ``sqrt(a)`` (0.01 at the schedule's floor), and
    unclipped it throws a few samples far outside the data.
    """
    return _ddim(
        apply_fn, params, noise, labels, check_step_count(num_steps), level, alpha_bar_fn, cfg_scale, null_class, clip
    )


def _ddim(apply_fn, params, noise, labels, num_steps, level, alpha_bar_fn, cfg_scale, null_class, clip=0.0):
    predict = _prediction_fn(apply_fn, params, labels, level, cfg_scale, null_class)
    n = jnp.asarray(num_steps, jnp.float32)

    def step(i, x):
        t = i.astype(jnp.float32) / n
        t_next = (i + 1).astype(jnp.float32) / n
        a, a_next = alpha_bar_fn(1.0 - t), alpha_bar_fn(1.0 - t_next)
        eps = predict(x, t)
        x1 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        if clip > 0:
            x1 = jnp.clip(x1, -clip, clip)
        return jnp.sqrt(a_next) * x1 + jnp.sqrt(1.0 - a_next) * eps

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))


def row_keys(noise: jax.Array, seed: int) -> jax.Array:
    """One random key per row, a function of that row's values only.

    The consistency sampler re-noises every row with fresh noise drawn from its own key, so a
    sample depends on its starting noise alone, not on its batch or its position in one.
    """
    b = noise.shape[0]
    bits = jax.lax.bitcast_convert_type(noise.reshape(b, -1).astype(jnp.float32), jnp.uint32)
    # position-dependent odd multipliers, sums modulo 2^32: a permutation of values changes the hash
    weights = (2 * jnp.arange(bits.shape[1], dtype=jnp.uint32) + 1) * jnp.uint32(0x9E3779B1)
    digest = jnp.sum(bits * weights, axis=1, dtype=jnp.uint32)
    return jax.vmap(lambda d: jax.random.fold_in(jax.random.key(seed), d))(digest)


def consistency_sample(
    apply_fn,
    params,
    noise,
    labels,
    *,
    num_steps: int,
    level: int,
    noise_floor: float = 1e-5,
    seed: int = 0,
    cfg_scale=None,
    null_class: int = 0,
) -> jax.Array:
    """Multistep consistency sampling: predict the data, re-noise to the next time, repeat (traceable).

    The network's output ``v(x, t)`` is read as the velocity of one jump to the data,
    ``x1 = x + (1 - t) v``. With ``N`` steps and ``t_i = i/N``: predict ``x1`` at ``t_i``, then
    place it on a fresh noise path at ``t_{i+1}``, ``x = (1 - (1 - floor) t_{i+1}) z + t_{i+1} x1``
    with new Gaussian noise ``z`` (from ``row_keys``); the last prediction is the sample.
    One step is ``x0 + v(x0, 0)``.
    """
    return _consistency(
        apply_fn, params, noise, labels, check_step_count(num_steps), level, noise_floor, seed, cfg_scale, null_class
    )


def _consistency(apply_fn, params, noise, labels, num_steps, level, noise_floor, seed, cfg_scale, null_class):
    predict = _prediction_fn(apply_fn, params, labels, level, cfg_scale, null_class)
    n = jnp.asarray(num_steps, jnp.float32)
    keys = row_keys(noise, seed)
    row_shape = noise.shape[1:]

    def step(i, x):
        t = i.astype(jnp.float32) / n
        x1 = x + (1.0 - t) * predict(x, t)
        t_next = (i + 1).astype(jnp.float32) / n
        z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), row_shape))(keys)
        renoised = (1.0 - (1.0 - noise_floor) * t_next) * z + t_next * x1
        return jnp.where(i + 1 >= num_steps, x1, renoised)

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))


class DDIMSampler(_MeshSampler):
    """Jit-compiled DDIM for a noise-prediction network; the level input is the finest level."""

    def __init__(
        self,
        apply_fn: Callable,
        alpha_bar_fn: Callable,
        *,
        num_levels: int,
        num_classes: int,
        clip: float = 0.0,
        mesh=None,
    ):
        super().__init__(apply_fn, num_levels=num_levels, num_classes=num_classes, mesh=mesh)
        self.alpha_bar_fn = alpha_bar_fn
        self.clip = clip

    def _loop(self, params, noise, labels, cfg_scale, num_steps):
        return _ddim(
            self.apply_fn,
            params,
            noise,
            labels,
            num_steps,
            self.num_levels,
            self.alpha_bar_fn,
            cfg_scale,
            self.num_classes,
            self.clip,
        )


class ConsistencySampler(_MeshSampler):
    """Jit-compiled multistep consistency sampler; the level input is the finest level, as in training."""

    def __init__(
        self,
        apply_fn: Callable,
        *,
        num_levels: int,
        num_classes: int,
        noise_floor: float = 1e-5,
        seed: int = 0,
        mesh=None,
    ):
        super().__init__(apply_fn, num_levels=num_levels, num_classes=num_classes, mesh=mesh)
        self.noise_floor = noise_floor
        self.seed = seed

    def _loop(self, params, noise, labels, cfg_scale, num_steps):
        return _consistency(
            self.apply_fn,
            params,
            noise,
            labels,
            num_steps,
            self.num_levels,
            self.noise_floor,
            self.seed,
            cfg_scale,
            self.num_classes,
        )
