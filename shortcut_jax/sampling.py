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

from shortcut_jax import distributed, sharding


def check_budget(num_steps: int, num_levels: int) -> int:
    """Level k for an N-step budget; raises with the valid budgets otherwise."""
    valid = [2**k for k in range(num_levels + 1)]
    if not isinstance(num_steps, (int,)) or num_steps not in valid:
        hint = ""
        if isinstance(num_steps, int) and num_steps > valid[-1]:
            hint = f" (the model was trained with objective.num_levels={num_levels}, so at most {valid[-1]} steps)"
        raise ValueError(f"num_steps={num_steps!r} is not a valid budget{hint}; use one of {valid}")
    return int(math.log2(num_steps))


def euler_sample(apply_fn, params, noise, labels, *, num_steps: int, num_levels: int,
                 cfg_scale=None, null_class: int = 0) -> jax.Array:
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


class Sampler:
    """Jit-compiled samplers for one network: one program per (input shape, guided).

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
        self._executables: dict = {}  # several processes: (guided, argument signature) -> compiled

    def _fn(self, guided: bool):
        if guided not in self._compiled:

            def run(params, noise, labels, cfg_scale, num_steps, level):
                return _euler(self.apply_fn, params, noise, labels, num_steps, level,
                              cfg_scale if guided else None, self.num_classes)

            out = None if self.mesh is None else sharding.batch_sharding(self.mesh)
            self._compiled[guided] = jax.jit(run, out_shardings=out)
        return self._compiled[guided]

    def _arguments(self, noise, labels, num_steps: int, cfg_scale: float):
        """(guided, arguments of the jitted sampler, number of real rows)."""
        level = check_budget(num_steps, self.num_levels)
        n = noise.shape[0]
        if labels is None:
            labels = np.full((n,), self.num_classes, np.int32)
        guided = self.num_classes > 0 and float(cfg_scale) != 1.0
        if self.mesh is not None:
            noise, labels = (sharding.shard_rows(np.asarray(a), self.mesh) for a in (noise, labels))
        return guided, (noise, labels, jnp.float32(cfg_scale), jnp.int32(num_steps), jnp.int32(level)), n

    def __call__(self, params, noise, labels=None, *, num_steps: int, cfg_scale: float = 1.0) -> jax.Array:
        guided, args, n = self._arguments(noise, labels, num_steps, cfg_scale)
        run = self._fn(guided) if jax.process_count() == 1 else self._executable(guided, params, args)
        out = run(params, *args)
        return out if out.shape[0] == n else out[:n]

    def _executable(self, guided: bool, params, args):
        leaves = jax.tree.leaves((params, args))
        signature = (guided, jax.tree.structure((params, args)),
                     tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
        if signature not in self._executables:
            self._executables[signature] = self._fn(guided).lower(params, *args).compile()
            distributed.sync("sampler_compiled")
        return self._executables[signature]

    def lower(self, params, noise, labels=None, *, num_steps: int, cfg_scale: float = 1.0):
        """The lowered program ``__call__`` runs (for inspecting per-device shapes and costs)."""
        guided, args, _ = self._arguments(noise, labels, num_steps, cfg_scale)
        return self._fn(guided).lower(params, *args)

    @staticmethod
    def to_host(x: jax.Array) -> np.ndarray:
        return sharding.to_host(x)
