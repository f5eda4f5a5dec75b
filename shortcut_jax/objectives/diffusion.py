"""Diffusion baseline: noise (epsilon) prediction on a variance-preserving path, DDIM sampling.

Time. Diffusion time ``s`` runs from 0 (data) to 1 (noise); the network's input is the project's
``t = 1 - s`` (0 = noise, 1 = data), so every objective feeds the network the same direction of
time and the same sinusoidal embedding range. The level input is the constant finest level
(the network may ignore it, ``Needs.level_input=False``).

Forward process. ``x_s = sqrt(a(s)) x1 + sqrt(1 - a(s)) eps`` with ``a = alpha_bar``:
- ``'cosine'`` (default; Nichol & Dhariwal 2021): ``a(s) = f(s) / f(0)``,
  ``f(s) = cos^2(pi/2 (s + 0.008) / 1.008)``;
- ``'linear'`` (Ho et al. 2020, in continuous time): betas rising linearly from 1e-4 to 0.02 over
  1000 steps, ``a(s) = exp(-1000 (1e-4 s + (0.02 - 1e-4) s^2 / 2))``.
Both are floored at ``diffusion_min_alpha_bar`` (default 1e-4): the cosine schedule reaches
``a = 0`` at ``s = 1``, where the data estimate ``(x - sqrt(1 - a) eps) / sqrt(a)`` of an epsilon
model is undefined. With the floor the sampler's start (pure noise) differs from the forward
process at ``s = 1`` by 1% of the signal; the floor binds only for ``s > 0.9936`` (cosine), i.e.
at ``t = 0`` on the 128-step grid.

Loss: ``|eps_hat(x_s, 1 - s) - eps|^2`` with ``t`` drawn as the flow rows draw theirs
(``objective.flow_t``) and labels dropped to the null class with ``label_dropout`` (CFG).
Sampling: ``sampling.ddim_sample`` (deterministic DDIM, eta = 0) at any step count, with the
data estimate clipped to ``objective.clip`` (default 4, the shortcut targets' bound), as image
samplers clip theirs to the pixel range. Unclipped, the estimate near pure noise divides the
network's error by ``sqrt(alpha_bar)`` = 0.01 and throws a few samples far outside the data,
which then dominate any distance to it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import common

COSINE_OFFSET = 0.008
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_NUM_STEPS = 1000
SCHEDULES = ("cosine", "linear")


def alpha_bar(s: jax.Array, schedule: str = "cosine", min_alpha_bar: float = 1e-4) -> jax.Array:
    """Signal fraction ``a(s)`` of the variance-preserving path at diffusion time ``s`` in [0, 1]."""
    s = jnp.asarray(s, jnp.float32)
    if schedule == "cosine":

        def f(u):
            return jnp.square(jnp.cos(0.5 * math.pi * (u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET)))

        a = f(s) / f(jnp.zeros_like(s))
    elif schedule == "linear":
        slope = LINEAR_BETA_END - LINEAR_BETA_START
        a = jnp.exp(-LINEAR_NUM_STEPS * (LINEAR_BETA_START * s + 0.5 * slope * jnp.square(s)))
    else:
        raise ValueError(f"objective.diffusion_schedule must be one of {SCHEDULES}, got {schedule!r}")
    return jnp.clip(a, min_alpha_bar, 1.0)


def alpha_bar_fn(cfg: common.ObjectiveConfig):
    """``s -> a(s)`` with the config's schedule, for the DDIM sampler."""
    schedule, floor = cfg.diffusion_schedule, cfg.diffusion_min_alpha_bar
    return lambda s: alpha_bar(s, schedule, floor)


def noisy(x1: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
    a = a.reshape(a.shape + (1,) * (x1.ndim - 1))
    return jnp.sqrt(a) * x1 + jnp.sqrt(1.0 - a) * eps


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # no teacher
    x1 = batch["x"]
    b = x1.shape[0]
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    eps = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    t = common.sample_flow_t(rng_t, b, cfg)  # network time; diffusion time s = 1 - t
    a = alpha_bar(1.0 - t, cfg.diffusion_schedule, cfg.diffusion_min_alpha_bar)
    pred = cfg.apply_fn(
        params,
        noisy(x1, eps, a),
        t,
        jnp.full((b,), cfg.num_levels, jnp.int32),
        common.drop_labels(rng_drop, batch["label"], cfg),
    )
    loss = jnp.mean(common.per_row_mse(pred, eps))
    return loss, {"loss": loss, "eps_loss": loss}


def check_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """The schedule's keys (``ValueError`` naming the key)."""
    if objective_cfg.diffusion_schedule not in SCHEDULES:
        raise ValueError(
            f"objective.diffusion_schedule={objective_cfg.diffusion_schedule!r}: use one of {list(SCHEDULES)}"
        )
    if not 0.0 < objective_cfg.diffusion_min_alpha_bar < 1.0:
        raise ValueError(f"objective.diffusion_min_alpha_bar={objective_cfg.diffusion_min_alpha_bar} must be in (0, 1)")
