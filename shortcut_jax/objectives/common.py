"""What every objective shares: its static context, the noise path and the loss reductions.

Conventions used by every objective and sampler in the project:
- ``x0`` is Gaussian noise, ``x1`` data; ``x_t = (1 - (1 - floor) t) x0 + t x1`` with a tiny
  noise floor; the flow velocity is ``x1 - (1 - floor) x0``.
- Step sizes are powers of two and travel as the integer level ``k`` (``d = 2^-k``); the finest
  level ``K = num_levels`` is the flow-matching level. Conversion to ``d`` happens only here and
  in the sampler.
"""
from __future__ import annotations

import dataclasses
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
    num_levels: int = 7
    sc_fraction: float = 0.125
    teacher: str = "ema"
    level_assignment: str = "official"
    clip: float = 4.0
    label_dropout: float = 0.1
    bootstrap_cfg: bool = False
    bootstrap_cfg_scale: float = 1.5
    noise_floor: float = 1e-5
    level_weights: Optional[tuple[float, ...]] = None
    flow_t: str = "grid"  # 'grid' (t on the finest grid, as published), 'uniform', 'logit_normal'

    @property
    def null_class(self) -> int:
        return self.num_classes


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
