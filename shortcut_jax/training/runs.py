"""Another run's weights: its folder and checkpoint, a warm start, a frozen teacher.

Three things read another run (a folder: its workdir or its ``checkpoints`` folder): a warm start
(``train.init_from``), a frozen teacher (``objective.teacher_checkpoint``) and stage one of reflow
(``reflow_pairs --workdir``). They share one reader and one level rule, so they live together.

## Run folders
Each reader needs the other run's metadata and recorded config, to check that its parameters
fit before anything is compiled, and then one parameter tree (online or an EMA tree), but not
the rest of its train state: the optimiser moments are twice the parameters' size and their
structure depends on the source's optimiser settings, which the reader should not have to
rebuild. ``checkpoint_dir`` resolves the folder, ``open_run`` picks a step and reads its
metadata and the run's manifest into a ``SavedRun``, and ``restore_weights`` reads one tree of
it. The checkpoint format itself (where a tree sits in the saved state, orbax's partial
restore, the shape check against the array metadata) is ``checkpoint.Checkpointer``'s.

Errors are ``FileNotFoundError`` (folder, checkpoint or step missing), ``KeyError`` (a tree the
run did not keep) and ``ValueError`` (shapes that do not fit), each naming the setting given as
``what``/``step_what`` so that a caller can re-raise it as its own ``ConfigError``.

## The level rule (warm starts and teachers)
A user with a trained flow-matching or diffusion model can start a shortcut run from it instead
of from scratch; distillation methods load their teacher the same way. Every parameter is
loaded (patch/point embedding, time, level and label embeddings, blocks, output layer); the
shapes must match, i.e. the same architecture, data shape and class count. The optimiser state
starts fresh and the EMA trees start at the loaded parameters.

The level input. A flow-matching run built with ``model.ignore_level`` fed the level embedder a
constant 0; a shortcut run feeds it ``k`` in ``0..K``, with ``K`` (the finest step, ``2^-K``) for
its flow-matching rows. Loaded as they are, the parameters would give at level ``K`` (and at
every other level) an embedding the source model never saw. ``constant_level_embedding(params,
level)`` rewrites the level embedder so that it returns, for every input, the embedding the
source gave ``level`` (0 for a source that ignored its level; ``K`` for one that fed its flow
rows ``K``): its first layer's weights are zeroed and their contribution at ``level`` is moved
into the bias. The warm-started network then computes the source's function at every level: every
step size starts at the finest level, i.e. as the flow's instantaneous velocity, which is the
average velocity of a vanishing step; training then separates the levels (the zeroed weights get
gradients as usual). Loading into a network that itself ignores the level input uses ``level``
the same way (it feeds 0, so the embedding of 0 must be the source's embedding of ``level``).

A diffusion (noise-prediction) source computes a different quantity on a different path (see
``objectives.diffusion``), so no rewrite makes its function a velocity; its parameters are a
starting point only, and the first steps of the new run re-learn the output.

## Warm starts (``train.init_from``)
``open_source`` runs when the experiment is built, before anything is compiled or written: it
finds the source's checkpoint, checks that its parameters fit this run (architecture, data shape,
class count, from the source's metadata; a ``ConfigError`` names each difference) and fixes the
level the source's velocity is read at (``source_level``). ``warm_started`` then replaces the
random initial parameters of the fresh state by the source's (``constant_level_embedding``, below): the
optimiser state stays the fresh one, every EMA tree starts at the loaded parameters, and the
step at 0. A run that resumes from its own checkpoint never reads the source (the resume wins).

The level rule (``source_level``): a source whose objective ignored its level input (flow
matching, diffusion, consistency: ``Method.level_input`` is False) fed its level embedder
a constant 0, so its function is read at level 0; a source that used the input (a shortcut
model, live reflow) is read at its own finest level ``K = objective.num_levels``, the level of
its flow-matching rows. The warm-started network computes that function at every level.

## Frozen teachers (``objective.teacher_checkpoint``)
``consistency_distillation`` and ``progressive_distillation`` (``Method.frozen_teacher``)
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

The level input (``constant_level_embedding``, below). A teacher and a student may differ in whether their
network reads the level input. Where the teacher ignored it (flow matching: it always saw 0) and
the student reads it (progressive distillation), the teacher's level embedder is made constant
at 0; where the teacher read it (a shortcut run, whose flow-matching rows were at its finest level
``K``) and the student ignores it (consistency distillation, which feeds 0), it is made constant at
``K``. Either way the restored network computes, at every level the student feeds it, the
teacher's own velocity field. Where both read it or both ignore it the weights are kept as saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from etils import epath

from shortcut_jax import config_lib
from shortcut_jax.config_lib import ConfigError
from shortcut_jax.infra import checkpoint
from shortcut_jax.models import layers
from shortcut_jax.objectives import METHODS

log = logging.getLogger(__name__)

# ------------------------------------------------------------ run folders
WEIGHTS = checkpoint.WEIGHTS


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One checkpoint step of a run: where it is, its metadata and the run's recorded config.

    ``config`` is the config of the run's last launch (``<workdir>/manifest.json``), or None when
    the run has no manifest (an imported checkpoint, or a bare checkpoints folder)."""

    workdir: str
    ckpt_dir: str
    step: int
    meta: dict
    config: Optional[dict]

    def param_shapes(self, weights: str = "ema", ema_index: int = 0) -> dict[str, tuple]:
        """``{keystr(path): shape}`` of one saved tree, from the metadata files alone."""
        with checkpoint.Checkpointer(self.ckpt_dir, keep=None, async_save=False) as ckpt:
            return ckpt.param_shapes(self.step, weights, ema_index)


def has_steps(folder) -> bool:
    """Whether ``folder`` (local or ``gs://``) holds at least one step folder of a checkpoint."""
    folder = epath.Path(folder)
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def checkpoint_dir(path: str, *, what: str = "workdir") -> str:
    """The folder holding the step folders of ``path``: a run's workdir (``<workdir>/checkpoints``)
    or that checkpoints folder itself. Raises ``FileNotFoundError`` naming ``what`` (the flag or
    config key that gave ``path``) when ``path`` is not a folder or neither holds a checkpoint."""
    path = os.fspath(path).rstrip("/")
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(
            f"{what}={path!r} is not a directory: give a trained run's workdir or its checkpoints folder"
        )
    for candidate in (os.path.join(path, "checkpoints"), path):
        if has_steps(candidate):
            return candidate if "://" in candidate else os.path.abspath(candidate)
    raise FileNotFoundError(
        f"{what}={path!r} holds no checkpoint (neither it nor {path}/checkpoints has a step"
        " folder): give a trained run's workdir or its checkpoints folder"
    )


def _recorded_config(workdir: str) -> Optional[dict]:
    path = epath.Path(workdir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("config")


def open_run(path: str, *, step: int = -1, what: str = "workdir", step_what: str = "step") -> SavedRun:
    """The checkpoint ``step`` (-1: the latest) of the run at ``path`` (workdir or checkpoints
    folder), with its metadata; no array is read. ``what`` and ``step_what`` name the settings
    that gave ``path`` and ``step`` in the errors."""
    ckpt_dir = checkpoint_dir(path, what=what)
    with checkpoint.Checkpointer(ckpt_dir, keep=None, async_save=False) as ckpt:
        steps = ckpt.all_steps()
        if step != -1 and step not in steps:
            raise FileNotFoundError(
                f"{what}={path!r} has no checkpoint of step {step}: {step_what}={step} is not"
                f" saved (saved steps: {steps}); pick one of them, or -1 for the latest"
            )
        chosen = steps[-1] if step == -1 else int(step)
        meta = ckpt.read_meta(chosen) or {}
    workdir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir
    return SavedRun(workdir=workdir, ckpt_dir=ckpt_dir, step=chosen, meta=meta, config=_recorded_config(workdir))


def restore_weights(saved: SavedRun, *, weights: str = "ema", ema_index: int = 0, abstract: Any = None) -> Any:
    """One parameter tree of ``saved``: its online parameters (``weights='params'``) or its EMA
    tree ``ema_index`` (``'ema'``), read alone (``checkpoint.Checkpointer.restore_params``).

    ``abstract``: the tree expected (``jax.ShapeDtypeStruct`` leaves, or arrays); leaves with a
    ``sharding`` are restored onto it (every process of a job calls this), others as host numpy
    arrays; ``None`` restores the saved tree as it is, as numpy arrays. Paths and shapes are
    checked against the checkpoint's metadata first: ``ValueError`` names what differs, and
    ``KeyError`` a tree the run did not keep.
    """
    with checkpoint.Checkpointer(saved.ckpt_dir, keep=None, async_save=False) as ckpt:
        return ckpt.restore_params(saved.step, weights, abstract, ema_index=ema_index)


# ------------------------------------------------------------ the level rule
LEVEL_EMBED = "level_embed"


def constant_level_embedding(params: dict, level: int) -> dict:
    """Params whose level embedder returns, at every input, what ``params`` gave at ``level``."""
    if LEVEL_EMBED not in params or "hidden" not in params[LEVEL_EMBED]:
        raise KeyError(
            f"no '{LEVEL_EMBED}/hidden' layer in the parameters (top-level keys: {sorted(params)});"
            " constant_level_embedding expects a DiT or MLPNet parameter tree"
        )
    hidden = params[LEVEL_EMBED]["hidden"]
    kernel, bias = hidden["kernel"], hidden["bias"]  # [frequencies, width], [width]
    sinusoid = layers.sinusoidal_embedding(jnp.asarray([level], jnp.float32), kernel.shape[0])[0]
    new_hidden = {
        **hidden,
        "kernel": jnp.zeros_like(kernel),
        "bias": (bias.astype(jnp.float32) + sinusoid @ kernel.astype(jnp.float32)).astype(bias.dtype),
    }
    return {**params, LEVEL_EMBED: {**params[LEVEL_EMBED], "hidden": new_hidden}}


def warm_start_params(source_params: Any, init_params: Any, *, source_level: Optional[int] = None) -> Any:
    """``source_params`` checked against the new run's ``init_params`` (or their abstract shapes)
    and cast to their dtypes; with ``source_level``, the level embedder made constant at it.

    Raises ``ValueError`` naming the differing parameters when the trees do not match.
    """
    diffs = checkpoint.shape_differences(source_params, init_params, limit=6)
    if diffs:
        raise ValueError(
            "the warm-start parameters do not fit this model (a parameter missing, unexpected or its shape differs: "
            + "; ".join(diffs)
            + "): use a checkpoint of the same architecture, data shape and class count"
        )
    params = jax.tree.map(lambda s, i: jnp.asarray(s, dtype=i.dtype), source_params, init_params)
    return params if source_level is None else constant_level_embedding(params, source_level)


# ------------------------------------------------------------ warm starts
# What another run's metadata must share with this run for its parameters to fit (warm start, teacher).
SOURCE_KEYS = ("architecture", "data_shape", "num_classes")


@dataclasses.dataclass(frozen=True)
class WarmStart:
    saved: SavedRun
    weights: str  # 'ema' or 'params'
    source_level: int

    def provenance(self) -> dict:
        return {
            "checkpoints": self.saved.ckpt_dir,
            "step": self.saved.step,
            "weights": self.weights,
            "objective": (self.saved.meta.get("objective") or {}).get("name"),
            "source_level": self.source_level,
        }

    def describe(self) -> str:
        p = self.provenance()
        return (
            f"{p['checkpoints']} step {p['step']} ({p['weights']}, a {p['objective']} run read at level"
            f" {p['source_level']})"
        )


def source_level(meta: dict) -> int:
    """The level at which the source computed its velocity (see the module docstring)."""
    objective = meta.get("objective") or {}
    name = objective.get("name")
    if name not in METHODS:
        raise ConfigError(
            f"train.init_from: the source's metadata names objective {name!r}, not one of"
            f" {sorted(METHODS)}; warm-start from a run of this project"
        )
    return int(objective["num_levels"]) if METHODS[name].level_input else 0


def open_source(train_cfg, meta: dict) -> WarmStart:
    """The checked source of ``train.init_from`` for a run whose metadata is ``meta``."""
    try:
        saved = open_run(
            train_cfg.init_from, step=train_cfg.init_from_step, what="train.init_from", step_what="train.init_from_step"
        )
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    try:
        checkpoint.check_compatible(saved.meta, meta, SOURCE_KEYS)
    except ValueError as err:
        differences = [line.strip() for line in str(err).splitlines() if line.startswith("  ")]
        raise ConfigError(
            f"train.init_from={train_cfg.init_from!r} (step {saved.step}) holds parameters of another shape than"
            " this run's: "
            + "; ".join(differences).replace("current", "this run")
            + ". Warm-start from a run of the same architecture, data shape and class count"
        ) from None
    weights = train_cfg.init_from_weights
    if weights == "ema" and not saved.meta.get("ema_decays"):
        raise ConfigError(
            f"train.init_from={train_cfg.init_from!r} was trained without EMA trees"
            " (train.ema_decays=()): set train.init_from_weights='params'"
        )
    return WarmStart(saved=saved, weights=weights, source_level=source_level(saved.meta))


def warm_started(exp, state, warm: WarmStart):
    """``state`` (a fresh train state of ``exp``) with the source's parameters in ``params`` and
    in every EMA tree; the optimiser state, rng and step are kept."""
    shardings = exp.state_shardings.params
    loaded = restore_weights(warm.saved, weights=warm.weights, abstract=exp.abstract_state.params)
    params = jax.device_put(warm_start_params(loaded, state.params, source_level=warm.source_level), shardings)
    # separate buffers: the train step donates the state, and a buffer may be donated only once
    ema = tuple(jax.device_put(jax.tree.map(jnp.copy, params), shardings) for _ in state.ema_params)
    log.info("warm start from %s", warm.describe())
    return state.replace(params=params, ema_params=ema)


# ------------------------------------------------------------ frozen teachers


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
    teacher_reads = METHODS[teacher_objective].level_input
    student_reads = METHODS[student_objective].level_input
    if teacher_reads == student_reads:
        return None
    return num_levels if teacher_reads else 0


def find_teacher(objective_cfg, meta: dict, abstract_params: Any) -> TeacherSource:
    """The teacher named by ``objective_cfg``, checked against this run's ``meta`` (as
    ``Experiment.meta``) and parameter shapes; reads metadata only."""
    name = objective_cfg.name
    path = objective_cfg.teacher_checkpoint
    where = f"objective.teacher_checkpoint={path!r}"
    weights = objective_cfg.teacher_weights  # one of WEIGHTS, checked by config_lib.validate
    try:
        saved_run = open_run(
            path,
            step=int(objective_cfg.teacher_step),
            what="objective.teacher_checkpoint",
            step_what="objective.teacher_step",
        )
    except FileNotFoundError as err:
        raise config_lib.ConfigError(str(err)) from None
    step, saved = saved_run.step, saved_run.meta
    teacher_objective = (saved.get("objective") or {}).get("name")
    if teacher_objective not in METHODS:
        raise config_lib.ConfigError(
            f"{where}: step {step} records no known objective ({teacher_objective!r}); distil a run trained"
            " by this project"
        )
    if not METHODS[teacher_objective].velocity_field:
        velocity = sorted(n for n, record in METHODS.items() if record.velocity_field)
        raise config_lib.ConfigError(
            f"{where} is a {teacher_objective!r} run, whose network is not the velocity field"
            f" {name!r} distils: point objective.teacher_checkpoint at a run of one of {velocity}"
        )
    diffs = checkpoint.differences(saved, meta, SOURCE_KEYS)
    teacher_levels = (saved.get("objective") or {}).get("num_levels")
    if METHODS[teacher_objective].level_input and teacher_levels != objective_cfg.num_levels:
        # the teacher's levels mean its step sizes; the student calls it at its own
        diffs.append(f"objective.num_levels: saved {teacher_levels!r}, current {objective_cfg.num_levels!r}")
    if diffs:
        raise config_lib.ConfigError(
            f"{where} (step {step}) was trained with another model or data:\n  "
            + "\n  ".join(diffs)
            + "\nPoint objective.teacher_checkpoint at a run of this architecture, data shape and class"
            " count, or set model.* (and the data) to the teacher's"
        )
    if weights == "ema" and not saved.get("ema_decays"):
        raise config_lib.ConfigError(
            f"objective.teacher_weights='ema' but {where} kept no EMA weights (train.ema_decays=()):"
            " set objective.teacher_weights='params'"
        )
    try:
        saved_shapes = saved_run.param_shapes(weights)
    except KeyError as err:
        raise config_lib.ConfigError(
            f"{where}: {err.args[0]}; set objective.teacher_weights to the other tree"
        ) from None
    shown = checkpoint.shape_differences(saved_shapes, abstract_params, limit=6)
    if shown:
        raise config_lib.ConfigError(
            f"{where} (step {step}): the teacher's parameters do not fit this model:\n  "
            + "\n  ".join(shown)
            + "\nPoint objective.teacher_checkpoint at a run of the same model (model.*) and data"
        )
    return TeacherSource(
        directory=saved_run.ckpt_dir,
        step=step,
        weights=weights,
        objective=teacher_objective,
        source_level=level_rule(teacher_objective, name, objective_cfg.num_levels),
    )


def restore_teacher(source: TeacherSource, abstract_params: Any) -> Any:
    """The teacher's parameter tree in the shardings of ``abstract_params`` (sharded
    ``ShapeDtypeStruct`` leaves), cast to their dtypes, with the level rule applied."""
    with checkpoint.Checkpointer(source.directory, keep=None, async_save=False) as ckpt:
        params = ckpt.restore_params(source.step, source.weights, abstract_params)
    log.info(
        "frozen teacher: %s weights of step %d of %s (a %s run)%s",
        source.weights,
        source.step,
        source.directory,
        source.objective,
        "" if source.source_level is None else f", level embedder made constant at {source.source_level}",
    )
    return warm_start_params(params, abstract_params, source_level=source.source_level)
