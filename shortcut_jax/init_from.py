"""Warm start of a fresh run from another run's parameters (``train.init_from``).

``open_source`` runs when the experiment is built, before anything is compiled or written: it
finds the source's checkpoint, checks that its parameters fit this run (architecture, data shape,
class count, from the source's metadata; a ``ConfigError`` names each difference) and fixes the
level the source's velocity is read at (``source_level``). ``warm_started`` then replaces the
random initial parameters of the fresh state by the source's (``objectives.warm_start``): the
optimiser state stays the fresh one, every EMA tree starts at the loaded parameters, and the
step at 0. A run that resumes from its own checkpoint never reads the source (the resume wins).

The level rule (``source_level``): a source whose objective ignored its level input (flow
matching, diffusion, consistency: ``NEEDS[name].level_input`` is False) fed its level embedder
a constant 0, so its function is read at level 0; a source that used the input (a shortcut
model, live reflow) is read at its own finest level ``K = objective.num_levels``, the level of
its flow-matching rows. The warm-started network computes that function at every level.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from shortcut_jax import checkpoint, restore
from shortcut_jax.config_lib import ConfigError
from shortcut_jax.objectives import NEEDS
from shortcut_jax.objectives.warm_start import warm_start_params

log = logging.getLogger(__name__)

# What the source's metadata must share with this run for its parameters to fit.
SOURCE_KEYS = ("architecture", "data_shape", "num_classes")


@dataclasses.dataclass(frozen=True)
class WarmStart:
    saved: restore.SavedRun
    weights: str  # 'ema' or 'params'
    source_level: int

    def provenance(self) -> dict:
        return {"checkpoints": self.saved.ckpt_dir, "step": self.saved.step, "weights": self.weights,
                "objective": (self.saved.meta.get("objective") or {}).get("name"), "source_level": self.source_level}

    def describe(self) -> str:
        p = self.provenance()
        return (f"{p['checkpoints']} step {p['step']} ({p['weights']}, a {p['objective']} run read at level"
                f" {p['source_level']})")


def source_level(meta: dict) -> int:
    """The level at which the source computed its velocity (see the module docstring)."""
    objective = meta.get("objective") or {}
    name = objective.get("name")
    if name not in NEEDS:
        raise ConfigError(f"train.init_from: the source's metadata names objective {name!r}, not one of"
                          f" {sorted(NEEDS)}; warm-start from a run of this project")
    return int(objective["num_levels"]) if NEEDS[name].level_input else 0


def open_source(train_cfg, meta: dict) -> WarmStart:
    """The checked source of ``train.init_from`` for a run whose metadata is ``meta``."""
    try:
        saved = restore.open_run(train_cfg.init_from, step=train_cfg.init_from_step, what="train.init_from",
                                 step_what="train.init_from_step")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    try:
        checkpoint.check_compatible(saved.meta, meta, SOURCE_KEYS)
    except ValueError as err:
        differences = [line.strip() for line in str(err).splitlines() if line.startswith("  ")]
        raise ConfigError(
            f"train.init_from={train_cfg.init_from!r} (step {saved.step}) holds parameters of another shape than"
            " this run's: " + "; ".join(differences).replace("current", "this run")
            + ". Warm-start from a run of the same architecture, data shape and class count") from None
    weights = train_cfg.init_from_weights
    if weights == "ema" and not saved.meta.get("ema_decays"):
        raise ConfigError(f"train.init_from={train_cfg.init_from!r} was trained without EMA trees"
                          " (train.ema_decays=()): set train.init_from_weights='params'")
    return WarmStart(saved=saved, weights=weights, source_level=source_level(saved.meta))


def warm_started(exp, state, warm: WarmStart):
    """``state`` (a fresh train state of ``exp``) with the source's parameters in ``params`` and
    in every EMA tree; the optimiser state, rng and step are kept."""
    shardings = exp.state_shardings.params
    loaded = restore.restore_weights(warm.saved, weights=warm.weights, abstract=exp.abstract_state.params)
    params = jax.device_put(warm_start_params(loaded, state.params, source_level=warm.source_level), shardings)
    # separate buffers: the train step donates the state, and a buffer may be donated only once
    ema = tuple(jax.device_put(jax.tree.map(jnp.copy, params), shardings) for _ in state.ema_params)
    log.info("warm start from %s", warm.describe())
    return state.replace(params=params, ema_params=ema)
