"""Training objectives: one record per method in ``registry.METHODS`` (loss, what it needs,
sampler, micro-batch planner, teacher snapshots, config check), and the static context every
loss is called with (``make_objective_config``).

The table of methods and how to add one: ``objectives/registry.py``.
"""

from __future__ import annotations

import dataclasses

from shortcut_jax.objectives.common import ObjectiveConfig, check_stage_schedule
from shortcut_jax.objectives.registry import METHODS, Method, method


def make_objective_config(
    objective_cfg, apply_fn, num_classes: int, *, total_steps: int | None = None, jvp_apply_fn=None
) -> ObjectiveConfig:
    """Static objective context from the ``config.objective`` ConfigDict (``jvp_apply_fn``:
    ``ObjectiveConfig.jvp_apply_fn``).

    ``total_steps`` (``train.steps``) sets the curriculum of objectives that follow one when
    ``objective.stage_steps`` is 0; a schedule that does not fit the run raises ``ValueError``.
    """
    weights = tuple(float(w) for w in objective_cfg.level_weights)
    cfg = ObjectiveConfig(
        apply_fn=apply_fn,
        jvp_apply_fn=jvp_apply_fn,
        num_classes=num_classes,
        num_levels=objective_cfg.num_levels,
        sc_fraction=objective_cfg.sc_fraction,
        sc_fraction_start=objective_cfg.sc_fraction_start,
        # 0: the ramp spans the run
        sc_ramp_steps=objective_cfg.sc_ramp_steps or int(total_steps or 0),
        teacher=objective_cfg.teacher,
        level_assignment=objective_cfg.level_assignment,
        clip=objective_cfg.clip,
        label_dropout=objective_cfg.label_dropout,
        bootstrap_cfg=objective_cfg.bootstrap_cfg,
        bootstrap_cfg_scale=objective_cfg.bootstrap_cfg_scale,
        noise_floor=objective_cfg.noise_floor,
        level_weights=weights or None,
        flow_t=objective_cfg.flow_t,
        diffusion_schedule=objective_cfg.diffusion_schedule,
        diffusion_min_alpha_bar=objective_cfg.diffusion_min_alpha_bar,
        stage_steps=objective_cfg.stage_steps,
        consistency_final_level=objective_cfg.consistency_final_level,
        reflow_fraction=objective_cfg.reflow_fraction,
        reflow_steps=objective_cfg.reflow_steps,
        reflow_cfg_scale=objective_cfg.reflow_cfg_scale,
        options=tuple(sorted((k, _frozen(v)) for k, v in objective_cfg.items())),
    )
    return resolve_stages(objective_cfg.name, cfg, total_steps)


def _frozen(value):
    """A config value as a hashable Python value (tuples for sequences)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def resolve_stages(name: str, cfg: ObjectiveConfig, total_steps: int | None) -> ObjectiveConfig:
    """``cfg`` with ``stage_steps`` fixed for an objective that follows a curriculum (checked
    against ``total_steps`` when it is given)."""
    stages_fn = METHODS[name].num_stages if name in METHODS else None
    if stages_fn is None:
        return cfg
    if total_steps is None:
        if cfg.stage_steps < 1:
            raise ValueError(
                f"objective {name!r} follows a curriculum: pass total_steps=train.steps or set objective.stage_steps"
            )
        return cfg
    steps = check_stage_schedule(name, cfg.stage_steps, stages_fn(cfg), total_steps)
    return dataclasses.replace(cfg, stage_steps=steps)


def check_method_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """Checks of a method's keys, to run before anything is compiled.

    Raises ``ValueError`` naming the key to change (``config_lib.validate`` re-raises it as its
    ``ConfigError``): an unknown method, a curriculum that does not fit ``train.steps``, a
    distillation method without an ``objective.teacher_checkpoint``, and whatever the method's
    own ``check`` refuses. Whether the teacher's checkpoint exists and fits the model is checked
    where a fresh run reads it (``training.runs.find_teacher``): a run that resumes, evaluates or
    samples never reads the teacher, which may then be elsewhere.
    """
    record = method(objective_cfg.name)
    if record.num_stages is not None:
        make_objective_config(objective_cfg, None, 0, total_steps=total_steps)
    if record.frozen_teacher and not objective_cfg.teacher_checkpoint:
        raise ValueError(
            f"objective.name={objective_cfg.name!r} distils a trained model: set"
            " objective.teacher_checkpoint to its run's checkpoint directory (<workdir>/checkpoints)"
        )
    if record.check is not None:
        record.check(objective_cfg, batch_size=batch_size, total_steps=total_steps)


def make_sampler(name: str, cfg: ObjectiveConfig, *, seed: int = 0, mesh=None):
    """The sampler a method's model is evaluated with; every one has ``Sampler``'s call and,
    with a ``mesh``, splits the rows over its batch axes."""
    return method(name).sampler(cfg, seed=seed, mesh=mesh)


__all__ = [
    "METHODS",
    "Method",
    "ObjectiveConfig",
    "check_method_config",
    "make_objective_config",
    "make_sampler",
    "method",
    "resolve_stages",
]
