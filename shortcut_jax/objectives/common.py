"""What every objective shares: its static context, the curriculum stages, the noise path and
the loss reductions.

Conventions used by every objective and sampler in the project:
- ``x0`` is Gaussian noise, ``x1`` data; ``x_t = (1 - (1 - floor) t) x0 + t x1`` with a tiny
  noise floor; the flow velocity is ``x1 - (1 - floor) x0``.
- Step sizes are powers of two and travel as the integer level ``k`` (``d = 2^-k``); the finest
  level ``K = num_levels`` is the flow-matching level. Conversion to ``d`` happens only here and
  in the sampler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# apply_fn(params, x, t, level, label) -> prediction shaped like x
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static context of an objective: the network and the method's hyperparameters.

    It is closed over (never passed through jit as an argument), so everything here is Python
    values.
    """

    apply_fn: ApplyFn
    num_classes: int  # 0: unconditional; the null class index is num_classes
    # the same network (same parameters) built for forward-mode differentiation: no hand-written
    # backward passes, XLA's attention, bf16 matmuls (``models.build_model(forward_mode=True)``),
    # for the ``jax.jvp`` of a method that takes one (MeanFlow); None: ``apply_fn`` has a
    # forward-mode rule
    jvp_apply_fn: Optional[ApplyFn] = None
    num_levels: int = 7
    sc_fraction: float = 0.125
    # a growing self-consistency share (shortcut.growing_share): from sc_fraction_start (< 0: off)
    # to sc_fraction over sc_ramp_steps steps (resolved from train.steps when 0)
    sc_fraction_start: float = -1.0
    sc_ramp_steps: int = 0
    teacher: str = "ema"
    level_assignment: str = "official"
    clip: float = 4.0
    label_dropout: float = 0.1
    bootstrap_cfg: bool = False
    bootstrap_cfg_scale: float = 1.5
    noise_floor: float = 1e-5
    level_weights: Optional[tuple[float, ...]] = None
    flow_t: str = "grid"  # 'grid' (t on the finest grid, as published), 'uniform', 'logit_normal'
    # diffusion: 'cosine' (default) or 'linear' alpha-bar schedule, floored at min_alpha_bar
    diffusion_schedule: str = "cosine"
    diffusion_min_alpha_bar: float = 1e-4
    # curricula (consistency training, progressive distillation): training steps per stage,
    # resolved from the run's length by make_objective_config (0 only before resolution)
    stage_steps: int = 0
    # consistency training: the last stage's discretisation is 2^-final_level (-1: num_levels - 1,
    # the published 1/64 for 7 levels); stages run 0..final_level, d = 2^-stage
    consistency_final_level: int = -1
    # live reflow: share of the batch given generated one-step pairs, the Euler steps that
    # generate them and their guidance scale (1.0: conditional output, no guidance)
    reflow_fraction: float = 0.125
    reflow_steps: int = 8
    reflow_cfg_scale: float = 1.0
    # every config.objective key as sorted (key, value) pairs: the keys a method reads that no
    # field above names (``option``), so a new method adds config keys, not fields here
    options: tuple = ()

    def forward_mode_apply(self) -> ApplyFn:
        """The network to give ``jax.jvp``: ``jvp_apply_fn``, or ``apply_fn`` where none is set."""
        return self.jvp_apply_fn or self.apply_fn

    def option(self, key: str) -> Any:
        """``config.objective.<key>``; ``KeyError`` naming the key where the config has none."""
        for k, v in self.options:
            if k == key:
                return v
        raise KeyError(
            f"objective.{key} is not in this run's config.objective: add it to"
            " config_lib.default_config (with its default)"
        )

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def final_consistency_level(self) -> int:
        return self.num_levels - 1 if self.consistency_final_level < 0 else self.consistency_final_level


def check_stage_schedule(name: str, stage_steps: int, num_stages: int, total_steps: int) -> int:
    """Steps per curriculum stage: ``stage_steps`` or, when 0, ``total_steps // num_stages``.

    Every stage must start within the run (the last one continues to the end), or the curriculum
    never reaches the step count it is meant to train; raises ``ValueError`` naming the keys.
    """
    if stage_steps < 0:
        raise ValueError(f"objective.stage_steps={stage_steps} must be >= 0 (0: train.steps / stages)")
    if stage_steps == 0:
        if total_steps < num_stages:
            raise ValueError(
                f"objective.name={name!r} runs {num_stages} stages but train.steps={total_steps} gives them"
                f" fewer than one step each: raise train.steps to at least {num_stages}"
            )
        return total_steps // num_stages
    if stage_steps * (num_stages - 1) >= total_steps:
        raise ValueError(
            f"objective.name={name!r}: {num_stages} stages of objective.stage_steps={stage_steps} need more than"
            f" {stage_steps * (num_stages - 1)} steps to reach the last stage, train.steps={total_steps}:"
            f" lower objective.stage_steps to at most {max((total_steps - 1) // max(num_stages - 1, 1), 0)}"
            " or raise train.steps"
        )
    return stage_steps


def stage_of_step(batch: dict, cfg: ObjectiveConfig, num_stages: int, name: str) -> jax.Array:
    """Curriculum stage (int32 scalar in ``[0, num_stages)``) of the step in ``batch['step']``."""
    if "step" not in batch:
        raise KeyError(
            f"objective {name!r} follows a curriculum and needs batch['step'] (the int32 count of"
            " updates done); the train step adds it"
        )
    if cfg.stage_steps < 1:
        raise ValueError(
            f"objective {name!r} needs ObjectiveConfig.stage_steps >= 1; build the config with"
            " make_objective_config(..., total_steps=train.steps)"
        )
    step = jnp.asarray(batch["step"], jnp.int32)
    return jnp.minimum(step // cfg.stage_steps, num_stages - 1)


def ema_and_frozen_teacher(teacher_params, name: str):
    """(EMA params, frozen teacher params) from the ``{'ema', 'teacher'}`` dict of distillation."""
    if not (isinstance(teacher_params, dict) and set(teacher_params) == {"ema", "teacher"}):
        raise TypeError(
            f"objective {name!r} distils a frozen teacher: teacher_params must be"
            " {'ema': EMA params, 'teacher': teacher params}"
        )
    return teacher_params["ema"], teacher_params["teacher"]


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """A batch of ``size`` rows cut into two groups, ``count`` rows of the first kind (shortcut's
    self-consistency rows, MeanFlow's interval rows, live reflow's generated pairs) and the rest.

    The groups are interleaved with the shortest period that holds the exact share: ``period =
    size / gcd(size, count)`` rows, the first ``count / gcd`` of each period in the first group.
    A batch sharded over devices in contiguous blocks (``infra.sharding.batch_sharding``) whose
    block is a multiple of the period gives every device the same share, and cutting or joining
    the groups moves no row between devices (the first ``count`` rows would sit on the first
    devices and cross the mesh at every step). The layout depends only on ``size`` and
    ``count``, never on the mesh, so a run gives the same step on any mesh; with
    ``gcd(size, count) = 1`` it is the first ``count`` rows and the rest."""

    size: int
    count: int

    @property
    def period(self) -> int:
        return self.size // math.gcd(self.size, self.count)

    @property
    def per_period(self) -> int:
        return self.count // math.gcd(self.size, self.count)

    def _periods(self, a: jax.Array) -> jax.Array:
        if a.shape[0] != self.size:
            raise ValueError(f"RowSplit of {self.size} rows given an array of {a.shape[0]} rows")
        return a.reshape((self.size // self.period, self.period) + a.shape[1:])

    def first(self, a: jax.Array) -> jax.Array:
        """The ``count`` rows of the first group, in batch order."""
        return self._periods(a)[:, : self.per_period].reshape((self.count,) + a.shape[1:])

    def rest(self, a: jax.Array) -> jax.Array:
        """The other ``size - count`` rows, in batch order."""
        return self._periods(a)[:, self.per_period :].reshape((self.size - self.count,) + a.shape[1:])

    def join(self, first: jax.Array, rest: jax.Array) -> jax.Array:
        """The batch-ordered rows of two groups cut by ``first`` and ``rest`` (their inverse)."""
        groups = self.size // self.period
        return jnp.concatenate(
            [
                first.reshape((groups, self.per_period) + first.shape[1:]),
                rest.reshape((groups, self.period - self.per_period) + rest.shape[1:]),
            ],
            axis=1,
        ).reshape((self.size,) + first.shape[1:])

    def mask(self) -> jax.Array:
        """Bool ``[size]``: True on the first group's rows."""
        return jnp.arange(self.size) % self.period < self.per_period


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array, floor: float) -> jax.Array:
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1.0 - (1.0 - floor) * t) * x0 + t * x1


def flow_velocity(x0: jax.Array, x1: jax.Array, floor: float) -> jax.Array:
    return x1 - (1.0 - floor) * x0


def per_row_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def sample_flow_t(rng: jax.Array, n: int, cfg: ObjectiveConfig) -> jax.Array:
    if cfg.flow_t == "grid":
        steps = 2**cfg.num_levels
        return jax.random.randint(rng, (n,), 0, steps).astype(jnp.float32) / steps
    if cfg.flow_t == "uniform":
        return jax.random.uniform(rng, (n,))
    if cfg.flow_t == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, (n,)))
    raise ValueError(f"objective.flow_t must be 'grid', 'uniform' or 'logit_normal', got {cfg.flow_t!r}")


def drop_labels(rng: jax.Array, labels: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    """Replace labels by the null class with probability ``label_dropout`` (all, if unconditional)."""
    if cfg.num_classes == 0:
        return jnp.full_like(labels, cfg.null_class)
    if cfg.label_dropout <= 0:
        return labels
    drop = jax.random.bernoulli(rng, cfg.label_dropout, labels.shape)
    return jnp.where(drop, cfg.null_class, labels)


def conditional_labels(labels: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    return jnp.full_like(labels, cfg.null_class) if cfg.num_classes == 0 else labels
