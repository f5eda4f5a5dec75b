"""Consistency models: training from scratch and distillation from a flow-matching teacher.

A consistency model maps any point of a path to the path's data end in one jump. Here the
network keeps its velocity output and the jump is ``f(x, t) = x + (1 - t) v(x, t)``, so that
``f(x, 1) = x`` (the boundary condition holds by construction) and the model samples with
``sampling.consistency_sample`` (predict the data, re-noise, repeat). Both objectives train the
student's ``v(x_t, t)`` towards the velocity that reaches the EMA model's jump from a point
``d`` further along the path::

    target = (f_ema(x_next, t + d) - x_t) / (1 - t)      (no gradient)

which is the published code's target. They differ in how ``x_next`` is made:
- consistency training: ``x_next`` is the same noise/data pair at ``t + d``
  (``interpolate(x0, x1, t + d)``, the flow-matching target's Euler step of size ``d``); ``d``
  follows the published curriculum, halving at equal intervals of training from 1 to
  ``2^-final_level`` (1/64 with 7 levels): stage ``k`` of ``final_level + 1`` uses ``d = 2^-k`` and
  ``t`` on that grid, ``randint(0, 2^k) / 2^k``. At ``d = 1`` the target is the pair's own
  velocity (a one-step regression onto the data); each halving makes the EMA's jump the teacher.
- consistency distillation: ``x_next = clip(x_t + d v_teacher(x_t, t))``, one Euler step of the
  frozen teacher at its finest size ``d = 2^-K``, ``t`` on the finest grid.

The step count for the curriculum comes in as ``batch['step']``; ``teacher_params`` is the EMA
tree for training and ``{'ema': EMA tree, 'teacher': frozen teacher}`` for distillation. Both
feed the network the constant finest level ``K`` (the published distillation does; the published
training feeds the curriculum's level instead, which leaves the level the sampler should use
undefined until training ends), so the model may ignore its level input.
Labels are dropped to the null class with ``label_dropout``, the same labels going to the EMA
target, so the conditional and unconditional jumps are each consistent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import common


def num_stages(cfg: common.ObjectiveConfig) -> int:
    return cfg.final_consistency_level + 1


def jump_target(apply_fn, ema_params, x_t, t, x_next, t_next, level, labels) -> jax.Array:
    """Velocity from ``x_t`` that lands where the EMA model jumps from ``(x_next, t_next)``."""

    def col(a):
        return a.reshape(a.shape + (1,) * (x_t.ndim - 1))

    v_next = apply_fn(ema_params, x_next, t_next, level, labels).astype(jnp.float32)
    x1_hat = x_next + col(1.0 - t_next) * v_next
    return jax.lax.stop_gradient((x1_hat - x_t) / col(1.0 - t))


def _rows(batch, rng, grid, cfg: common.ObjectiveConfig):
    """Noise, ``t`` on a grid of ``grid`` points in [0, 1) and the (dropped) labels of every row."""
    x1 = batch["x"]
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    t = jax.random.randint(rng_t, (x1.shape[0],), 0, grid).astype(jnp.float32) / grid
    return x0, t, common.drop_labels(rng_drop, batch["label"], cfg)


def _loss(params, x_t, t, level, labels, target, cfg, extra: dict):
    pred = cfg.apply_fn(params, x_t, t, level, labels)
    loss = jnp.mean(common.per_row_mse(pred, target))
    return loss, {"loss": loss, "consistency_loss": loss, **extra}


def training_loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    stage = common.stage_of_step(batch, cfg, num_stages(cfg), "consistency_training")
    grid = jnp.left_shift(jnp.int32(1), stage)  # 2^stage points, d = 1 / grid
    x0, t, labels = _rows(batch, rng, grid, cfg)
    t_next = t + 1.0 / grid.astype(jnp.float32)
    x1 = batch["x"]
    level = jnp.full((x1.shape[0],), cfg.num_levels, jnp.int32)
    x_t = common.interpolate(x0, x1, t, cfg.noise_floor)
    x_next = common.interpolate(x0, x1, t_next, cfg.noise_floor)
    target = jump_target(cfg.apply_fn, teacher_params, x_t, t, x_next, t_next, level, labels)
    return _loss(params, x_t, t, level, labels, target, cfg, {"stage": stage.astype(jnp.float32)})


def teacher_euler_step(apply_fn, teacher_params, x_t, t, level, labels, d: float, clip: float) -> jax.Array:
    """One Euler step of size ``d`` with the teacher's velocity, clipped like the shortcut targets."""
    x_next = x_t + d * apply_fn(teacher_params, x_t, t, level, labels).astype(jnp.float32)
    return jnp.clip(x_next, -clip, clip) if clip > 0 else x_next


def distillation_loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    ema, teacher = common.ema_and_frozen_teacher(teacher_params, "consistency_distillation")
    grid = 2**cfg.num_levels
    x0, t, labels = _rows(batch, rng, grid, cfg)
    x1 = batch["x"]
    level = jnp.full((x1.shape[0],), cfg.num_levels, jnp.int32)
    x_t = common.interpolate(x0, x1, t, cfg.noise_floor)
    x_next = teacher_euler_step(cfg.apply_fn, teacher, x_t, t, level, labels, 1.0 / grid, cfg.clip)
    target = jump_target(cfg.apply_fn, ema, x_t, t, x_next, t + 1.0 / grid, level, labels)
    return _loss(params, x_t, t, level, labels, target, cfg, {})


def check_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """The curriculum's last level (``ValueError`` naming the key)."""
    final = objective_cfg.consistency_final_level
    if not -1 <= final <= objective_cfg.num_levels:
        raise ValueError(
            f"objective.consistency_final_level={final} must be -1 (num_levels - 1) or in"
            f" 0..objective.num_levels={objective_cfg.num_levels}"
        )
