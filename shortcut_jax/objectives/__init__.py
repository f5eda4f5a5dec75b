"""Training objectives, chosen by name.

Every objective is a pure function with one signature::

    loss_fn(params, teacher_params, batch, rng, cfg: ObjectiveConfig) -> (loss, metrics)

``batch`` holds ``x`` (data, ``[B, ...]``) and ``label`` (``[B]`` int32); ``teacher_params``
are the EMA weights (objectives without a teacher ignore them); ``metrics`` is a flat dict of
scalars. A metric that is a mean over a
subset of rows whose size can vary between batches (a level's rows) comes with that size as
``'<name>/rows'``, so that means over micro-batches or steps can be weighted by it. The train step
never learns which method runs.
"""
from __future__ import annotations

from shortcut_jax.objectives import flow_matching, shortcut
from shortcut_jax.objectives.common import ObjectiveConfig

OBJECTIVES = {
    "shortcut": shortcut.loss_fn,
    "flow_matching": flow_matching.loss_fn,
}

# Objectives whose row layout spans the global batch give each accumulation micro-batch its
# share: name -> fn(rng, global_batch_size, accum_steps, cfg) -> {key: [accum, ...]} merged into
# the micro-batches. Objectives not listed need no plan.
MICRO_BATCH_PLANNERS = {
    "shortcut": shortcut.plan_micro_batches,
}


def make_objective_config(objective_cfg, apply_fn, num_classes: int) -> ObjectiveConfig:
    """Static objective context from the ``config.objective`` ConfigDict."""
    weights = tuple(float(w) for w in objective_cfg.get("level_weights", ()))
    return ObjectiveConfig(
        apply_fn=apply_fn,
        num_classes=num_classes,
        num_levels=objective_cfg.num_levels,
        sc_fraction=objective_cfg.sc_fraction,
        teacher=objective_cfg.teacher,
        level_assignment=objective_cfg.level_assignment,
        clip=objective_cfg.clip,
        label_dropout=objective_cfg.label_dropout,
        bootstrap_cfg=objective_cfg.bootstrap_cfg,
        bootstrap_cfg_scale=objective_cfg.bootstrap_cfg_scale,
        noise_floor=objective_cfg.noise_floor,
        level_weights=weights or None,
        flow_t=objective_cfg.get("flow_t", "grid"),
    )


__all__ = ["MICRO_BATCH_PLANNERS", "OBJECTIVES", "ObjectiveConfig", "make_objective_config"]
