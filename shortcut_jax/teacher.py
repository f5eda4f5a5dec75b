"""The frozen teacher of the distillation objectives: found, checked and restored from another run.

``consistency_distillation`` and ``progressive_distillation`` (``objectives.NEEDS[name].frozen_teacher``)
distil a trained run named by ``objective.teacher_checkpoint`` (its ``<workdir>/checkpoints``, or
the workdir itself), at ``objective.teacher_step`` (-1: its latest checkpoint), reading its first
EMA tree (``objective.teacher_weights='ema'``) or its online parameters (``'params'``).

At the start of a fresh run (never on resume: the run's own checkpoints hold its teacher, and a
progressive-distillation phase's snapshot) the student, every EMA tree and the frozen teacher all
start at the teacher's weights; the optimiser state starts fresh. ``find_teacher`` runs while the
``Experiment`` is built, before anything is compiled or written: it reads only the teacher run's
saved metadata and its tree's shapes, and raises ``ConfigError`` naming the key to change for a
missing folder, a folder without checkpoints, a step that is not saved, a teacher of another
architecture, data shape or class count, or one whose network is not a velocity field.
``restore_teacher`` then reads that one parameter tree straight into the run's shardings.

The level input (``objectives.warm_start``). A teacher and a student may differ in whether their
network reads the level input. Where the teacher ignored it (flow matching: it always saw 0) and
the student reads it (progressive distillation), the teacher's level embedder is made constant
at 0; where the teacher read it (a shortcut run, whose flow-matching rows were at its finest level
``K``) and the student ignores it (consistency distillation, which feeds 0), it is made constant at
``K``. Either way the restored network computes, at every level the student feeds it, the
teacher's own velocity field. Where both read it or both ignore it the weights are kept as saved.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from shortcut_jax import checkpoint, config_lib, restore
from shortcut_jax.objectives import NEEDS
from shortcut_jax.objectives.warm_start import warm_start_params

log = logging.getLogger(__name__)

# What fixes the parameter shapes of the teacher's tree (its meta against this run's).
TEACHER_COMPATIBILITY_KEYS = ("architecture", "data_shape", "num_classes")

# objective.teacher_weights -> the saved tree checkpoint.Checkpointer.restore_params reads (EMA: the first)
WEIGHTS = {"ema": "ema", "params": "params"}


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where a frozen teacher comes from, as checked by ``find_teacher``."""

    directory: str  # the teacher run's checkpoint folder
    step: int
    weights: str  # 'ema' (its first EMA tree) or 'params'
    objective: str  # the objective the teacher run trained
    # warm_start_params' level rule: make the level embedder constant at this level (None: keep)
    source_level: Optional[int]

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def level_rule(teacher_objective: str, student_objective: str, num_levels: int) -> Optional[int]:
    """The level at which the teacher's level embedder is made constant (module docstring), or
    None where the teacher's network is kept as saved."""
    teacher_reads = NEEDS[teacher_objective].level_input
    student_reads = NEEDS[student_objective].level_input
    if teacher_reads == student_reads:
        return None
    return num_levels if teacher_reads else 0


def find_teacher(objective_cfg, meta: dict, abstract_params: Any) -> TeacherSource:
    """The teacher named by ``objective_cfg``, checked against this run's ``meta`` (as
    ``Experiment.meta``) and parameter shapes; reads metadata only."""
    name = objective_cfg.name
    path = objective_cfg.teacher_checkpoint
    where = f"objective.teacher_checkpoint={path!r}"
    weights = WEIGHTS[objective_cfg.teacher_weights]  # the value is checked by config_lib.validate
    try:
        saved_run = restore.open_run(path, step=int(objective_cfg.teacher_step), what="objective.teacher_checkpoint",
                                     step_what="objective.teacher_step")
    except FileNotFoundError as err:
        raise config_lib.ConfigError(str(err)) from None
    step, saved = saved_run.step, saved_run.meta
    teacher_objective = (saved.get("objective") or {}).get("name")
    if teacher_objective not in NEEDS:
        raise config_lib.ConfigError(
            f"{where}: step {step} records no known objective ({teacher_objective!r}); distil a run trained"
            " by this project")
    if NEEDS[teacher_objective].sampler != "euler":
        velocity = sorted(n for n, needs in NEEDS.items() if needs.sampler == "euler")
        raise config_lib.ConfigError(
            f"{where} is a {teacher_objective!r} run, whose network is not the velocity field"
            f" {name!r} distils: point objective.teacher_checkpoint at a run of one of {velocity}")
    diffs = checkpoint.differences(saved, meta, TEACHER_COMPATIBILITY_KEYS)
    teacher_levels = (saved.get("objective") or {}).get("num_levels")
    if NEEDS[teacher_objective].level_input and teacher_levels != objective_cfg.num_levels:
        # the teacher's levels mean its step sizes; the student calls it at its own
        diffs.append(f"objective.num_levels: saved {teacher_levels!r}, current {objective_cfg.num_levels!r}")
    if diffs:
        raise config_lib.ConfigError(
            f"{where} (step {step}) was trained with another model or data:\n  " + "\n  ".join(diffs)
            + "\nPoint objective.teacher_checkpoint at a run of this architecture, data shape and class"
            " count, or set model.* (and the data) to the teacher's")
    if weights == "ema" and not saved.get("ema_decays"):
        raise config_lib.ConfigError(
            f"objective.teacher_weights='ema' but {where} kept no EMA weights (train.ema_decays=()):"
            " set objective.teacher_weights='params'")
    try:
        saved_shapes = saved_run.param_shapes(weights)
    except KeyError as err:
        raise config_lib.ConfigError(f"{where}: {err.args[0]}; set objective.teacher_weights to the other"
                                     " tree") from None
    shape_diffs = checkpoint.shape_differences(saved_shapes, checkpoint.tree_shapes(abstract_params))
    if shape_diffs:
        shown = shape_diffs[:6] + ([f"... {len(shape_diffs) - 6} more"] if len(shape_diffs) > 6 else [])
        raise config_lib.ConfigError(
            f"{where} (step {step}): the teacher's parameters do not fit this model:\n  " + "\n  ".join(shown)
            + "\nPoint objective.teacher_checkpoint at a run of the same model (model.*) and data")
    return TeacherSource(directory=saved_run.ckpt_dir, step=step, weights=weights, objective=teacher_objective,
                         source_level=level_rule(teacher_objective, name, objective_cfg.num_levels))


def restore_teacher(source: TeacherSource, abstract_params: Any) -> Any:
    """The teacher's parameter tree in the shardings of ``abstract_params`` (sharded
    ``ShapeDtypeStruct`` leaves), cast to their dtypes, with the level rule applied."""
    with checkpoint.Checkpointer(source.directory, keep=None, async_save=False) as ckpt:
        params = ckpt.restore_params(source.step, source.weights, abstract_params)
    log.info("frozen teacher: %s weights of step %d of %s (a %s run)%s", source.weights, source.step,
             source.directory, source.objective,
             "" if source.source_level is None else f", level embedder made constant at {source.source_level}")
    return warm_start_params(params, abstract_params, source_level=source.source_level)
