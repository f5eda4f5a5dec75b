"""Progressive distillation from a flow-matching (or shortcut) teacher.

Training runs ``K = num_levels`` phases of ``stage_steps`` steps (the last one continues to the
end of the run). Phase ``p`` teaches the student steps of size ``2^-(K-1-p)``: 64 steps in the
first phase (from the teacher's 128), 32 in the next, ..., one step in the last. Its target is
the shortcut model's self-consistency target built from the frozen teacher: two half steps at
level ``k + 1`` averaged, with ``t`` on the student's grid ``randint(0, 2^k) / 2^k``
(``shortcut.self_consistency_targets``: half-step state and target clipped; bootstrap CFG on the
first phase's rows when enabled). The network reads the level, so one model carries every
phase's step size; a teacher restored from a flow-matching run that ignored its level input
goes through ``warm_start.constant_level_embedding`` first (see there).

At the first step of every phase after the first, the teacher is re-snapshotted from the
student as it stands (``teacher_for_step``; the train step calls it before the loss), so each
phase distils the previous phase's student. ``teacher_params`` is
``{'ema': EMA tree, 'teacher': frozen teacher}``; the step comes in as ``batch['step']``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import common, shortcut


def num_stages(cfg: common.ObjectiveConfig) -> int:
    return cfg.num_levels


def student_level(phase: jax.Array, cfg: common.ObjectiveConfig) -> jax.Array:
    """Level the student learns in ``phase``: ``K - 1`` (half the teacher's finest step) down to 0."""
    return (cfg.num_levels - 1 - phase).astype(jnp.int32)


def teacher_for_step(step, frozen_teacher, params, cfg: common.ObjectiveConfig):
    """The frozen teacher for the update numbered ``step`` (0-based, before it is applied).

    At the first step of phases 1..K-1 the teacher becomes the current student ``params``;
    otherwise it is kept. Jit-able: a ``lax.cond``, so the steps inside a phase (all but K-1 of
    them) do not touch the teacher's arrays.
    """
    if cfg.stage_steps < 1:
        raise ValueError(
            "progressive distillation needs ObjectiveConfig.stage_steps >= 1; build the config with"
            " make_objective_config(..., total_steps=train.steps)"
        )
    step = jnp.asarray(step, jnp.int32)
    boundary = (step > 0) & (step % cfg.stage_steps == 0) & (step < num_stages(cfg) * cfg.stage_steps)
    return jax.lax.cond(
        boundary,
        lambda: jax.tree.map(lambda old, new: new.astype(old.dtype), frozen_teacher, params),
        lambda: frozen_teacher,
    )


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    _, teacher = common.ema_and_frozen_teacher(teacher_params, "progressive_distillation")
    phase = common.stage_of_step(batch, cfg, num_stages(cfg), "progressive_distillation")
    k = student_level(phase, cfg)
    grid = jnp.left_shift(jnp.int32(1), k)
    x1 = batch["x"]
    b = x1.shape[0]
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    t = jax.random.randint(rng_t, (b,), 0, grid).astype(jnp.float32) / grid.astype(jnp.float32)
    labels = common.drop_labels(rng_drop, batch["label"], cfg)
    level = jnp.full((b,), k, jnp.int32)
    x_t = common.interpolate(x0, x1, t, cfg.noise_floor)
    target = shortcut.self_consistency_targets(cfg.apply_fn, teacher, x_t, t, level, labels, cfg)
    pred = cfg.apply_fn(params, x_t, t, level, labels)
    loss = jnp.mean(common.per_row_mse(pred, target))
    return loss, {"loss": loss, "distill_loss": loss, "phase": phase.astype(jnp.float32)}
