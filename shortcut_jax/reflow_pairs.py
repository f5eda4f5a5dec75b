"""Stage one of reflow: a trained run's (noise, sample) pairs, written for ``data.name='reflow_pairs'``.

Command line::

    python -m shortcut_jax.reflow_pairs --workdir=workdirs/teacher --out_dir=pairs/teacher_128 \\
        --num_pairs=100000 [--budget=128 --seed=0 --batch_size=1000 --shard_size=10000 \\
        --cfg_scale=1 --weights=ema --step=-1]

then stage two::

    python -m shortcut_jax.main --config=... --config.objective.name=reflow \\
        --config.data.name=reflow_pairs --config.data.path=pairs/teacher_128 --workdir=workdirs/reflow

The teacher is restored the way ``sample.load_run`` restores any run (its ``Experiment``, the
checkpoint's EMA or online parameters), from the config its last launch recorded in
``<workdir>/manifest.json`` (or ``--config``), without opening its data: the checkpoint records
the data's shape and class count. Its own sampler (``objectives.make_sampler``: Euler, DDIM or
consistency) carries seeded noise to samples in ``--budget`` steps, each batch split over the
devices of the run's mesh as in evaluation, and ``objectives.pairs_io.generate_pairs`` writes the
shards and the manifest: which noise and labels each shard holds is fixed by ``--seed`` alone, a
stopped generation resumes at its first missing shard, and a folder written with other settings
(teacher, step, budget, seed, counts) is refused. The manifest's ``meta`` records the teacher's
workdir, step, weights, objective, budget and data (name, path, shape, classes, and for a latent
run the VAE record of its set). A latent run's pairs are latents, in the model's space; nothing
is decoded.

Several processes (``--multihost``, with ``--coordinator_address --num_processes --process_id``
where no scheduler sets them, as for ``shortcut_jax.main``) share every sampler call over the
devices of all of them; process 0 alone writes the files, and every process returns once they
are written. One process uses every local device.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections

from shortcut_jax.data import pairs as pairs_io
from shortcut_jax import config_lib
from shortcut_jax.training import runs
from shortcut_jax.objectives import sampling
from shortcut_jax.data import latents
from shortcut_jax.training.offline import check_guidance, load_run

__all__ = ["generate", "teacher_config"]


def _set_recorded(node: ml_collections.ConfigDict, recorded: dict) -> None:
    """Recorded values onto the defaults, key by key (keys this version no longer has are skipped;
    keys it added keep their defaults); lists recorded for tuple keys become tuples again."""
    for key, value in recorded.items():
        if key not in node:
            continue
        if isinstance(node[key], ml_collections.ConfigDict):
            _set_recorded(node[key], value or {})
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value


def teacher_config(saved: runs.SavedRun) -> ml_collections.ConfigDict:
    """The config ``saved``'s run was last launched with (its manifest), or for a run without a
    manifest the defaults with the model, objective and EMA decays its checkpoint records."""
    config = config_lib.default_config()
    if saved.config is not None:
        _set_recorded(config, saved.config)
    else:
        _set_recorded(
            config,
            {
                "model": saved.meta.get("model", {}),
                "objective": saved.meta.get("objective", {}),
                "train": {"ema_decays": saved.meta.get("ema_decays", [])},
            },
        )
    # sampling reads neither the teacher's own warm-start source nor its evaluation files
    config.train.init_from, config.train.init_from_step = "", -1
    config.eval.metric, config.eval.export_budgets = "none", ()
    return config


def _latent_vae(data_cfg) -> Optional[dict]:
    """The VAE record of a latent run's set (what decodes the pairs' samples), where the set's
    manifest is readable here; None for pixel runs."""
    if data_cfg.name != "latents":
        return None
    try:
        return latents.read_manifest(data_cfg.path)["vae"]
    except (OSError, ValueError, KeyError):
        return None


def generate(
    workdir: str,
    out_dir: str,
    *,
    num_pairs: int,
    budget: int = 128,
    seed: int = 0,
    batch_size: int = 1000,
    shard_size: int = 10_000,
    cfg_scale: float = 1.0,
    weights: str = "ema",
    step: int = -1,
    config: Optional[ml_collections.ConfigDict] = None,
) -> dict:
    """Writes ``num_pairs`` pairs of the run in ``workdir`` (its workdir or checkpoints folder) to
    ``out_dir``; returns the pairs' manifest. Every request error is raised before the teacher
    is restored or anything compiled."""
    if weights not in runs.WEIGHTS:
        raise ValueError(f"--weights={weights!r}: use 'ema' or 'params'")
    if num_pairs < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"--num_pairs={num_pairs}, --batch_size={batch_size} and --shard_size={shard_size} must be >= 1"
        )
    saved = runs.open_run(
        workdir, step=step, what="--workdir", step_what="--step"
    )  # a missing checkpoint or step is refused here
    num_levels = int(saved.meta.get("objective", {}).get("num_levels", 0))
    try:
        sampling.check_budget(budget, num_levels)
    except ValueError as err:
        raise ValueError(f"--budget: {err}") from None
    num_classes = int(saved.meta.get("num_classes", 0))
    check_guidance(cfg_scale, num_classes)
    config = config if config is not None else teacher_config(saved)
    loaded = load_run(config, saved.workdir, step=saved.step, use_ema=weights == "ema", decode=False)
    try:
        exp = loaded.exp
        sampler = exp.sampler

        def to_host_sampler(params, noise, labels, **kwargs):
            # the samples gathered on the host (several processes hold a global array each)
            return sampler.to_host(sampler(params, noise, labels, **kwargs))

        meta = {
            "teacher_workdir": saved.workdir,
            "teacher_step": loaded.step,
            "weights": weights,
            "teacher_objective": exp.config.objective.name,
            "teacher_num_levels": num_levels,
            "budget": budget,
            "data": {
                "name": exp.config.data.name,
                "path": exp.config.data.path,
                "shape": list(exp.spec.shape),
                "num_classes": exp.spec.num_classes,
                "vae": _latent_vae(exp.config.data),
            },
        }
        return pairs_io.generate_pairs(
            to_host_sampler,
            loaded.params,
            out_dir=out_dir,
            shape=tuple(exp.spec.shape),
            num_classes=exp.spec.num_classes,
            num_pairs=num_pairs,
            num_steps=budget,
            seed=seed,
            shard_size=shard_size,
            batch_size=batch_size,
            cfg_scale=cfg_scale,
            meta=meta,
        )
    finally:
        loaded.close()


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values=None, argv=None):
    """The command's flags (in ``flag_values``, default absl's global ones); ``argv`` stands for
    ``sys.argv`` where ``--config.<key>`` overrides are looked for (for parsing in-process)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The teacher's config file (default: the config its last launch recorded in <workdir>/manifest.json).",
        lock_config=True,
        flag_values=fv,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "The teacher run's workdir or its checkpoints folder.", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Folder for the pair shards and their manifest.json.", flag_values=fv)
    flags.DEFINE_integer("num_pairs", None, "How many (noise, sample) pairs.", flag_values=fv)
    flags.DEFINE_integer(
        "budget", 128, "Sampling steps of the teacher: a power of two up to 2^num_levels.", flag_values=fv
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of the noise and labels (shard i: default_rng([seed, 7, i])).", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 1000, "Pairs per sampler call (split over the devices).", flag_values=fv)
    flags.DEFINE_integer("shard_size", 10_000, "Pairs per .npz shard.", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale of the teacher (1: none).", flag_values=fv)
    flags.DEFINE_enum(
        "weights", "ema", list(runs.WEIGHTS), "The teacher's EMA (eval.ema_index) or online parameters.", flag_values=fv
    )
    flags.DEFINE_integer("step", -1, "Checkpoint step of the teacher (-1: the latest).", flag_values=fv)
    flags.DEFINE_bool(
        "multihost", False, "Join a job of several processes (jax.distributed.initialize).", flag_values=fv
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (--multihost without a scheduler).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (--multihost without a scheduler).", flag_values=fv
    )
    flags.DEFINE_integer("process_id", None, "This process's index (--multihost without a scheduler).", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out_dir", "num_pairs"], flag_values=fv)
    return fv


def run(fv) -> dict:
    """The command; returns the pairs' manifest."""
    manifest = generate(
        fv.workdir,
        fv.out_dir,
        num_pairs=fv.num_pairs,
        budget=fv.budget,
        seed=fv.seed,
        batch_size=fv.batch_size,
        shard_size=fv.shard_size,
        cfg_scale=fv.cfg_scale,
        weights=fv.weights,
        step=fv.step,
        config=fv.config,
    )
    if jax.process_index() == 0:
        print(
            f"{manifest['num_pairs']} pairs of {manifest['meta']['teacher_workdir']} (step"
            f" {manifest['meta']['teacher_step']}, {fv.budget} step(s)) in {os.path.abspath(fv.out_dir)}"
        )
    return manifest


def main(argv) -> None:
    """absl's entry point: the flags were defined on absl's global flag values."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from shortcut_jax.infra import distributed, writers

    fv = flags.FLAGS
    if fv.multihost:
        distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    writers.quiet_library_logs()
    run(fv)


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    define_flags()
    cli.run(main)
