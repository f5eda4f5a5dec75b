"""Evaluation at several step budgets: one entry point for training-time and offline evaluation.

``evaluate_budgets`` draws samples at each budget of ``config.eval`` (1, 2, 4, ..., 128) from one
set of noise and labels, spread over the mesh's devices (each draws its own share), and scores
them with the run's metric (``evaluation.metrics``: sliced Wasserstein distance for 2-D points,
the classifier Frechet distance ``cfd`` for CIFAR-10 images). It writes a table
(``.md``/``.json``/``.csv``), a plot of the metric against the budget, a grid or scatter per
budget, and last ``evaluation.json`` (step, sample count, metric), whose presence marks the
evaluation as finished.

The path of a checkpoint to a grid::

    evaluate_checkpoint(config, workdir)
      -> Experiment(config, workdir)             (checks, model, mesh, sampler, metric)
      -> Checkpointer.restore(step, abstract_state)
      -> evaluate_state: params = EMA or online tree
           for each budget n: draw_samples -> Sampler (jit, noise split over the mesh)
                              -> metric scorer, grid PNG
      -> table, plot, evaluation.json, metrics.jsonl

Command line (evaluates the latest checkpoint of a run)::

    python -m shortcut_jax.evaluate --config=experiments/toy2d.py --workdir=/tmp/toy

Without ``--out_dir`` the results go to ``<workdir>/eval/<step>/`` and into the run's
``metrics.jsonl`` when that step has no finished evaluation (a run stopped during its final
evaluation is completed as the training loop would have done it); otherwise to the first free
``eval/<step>_offline<k>/``, and the run's own results are left as they are.

In a job of several processes every process samples its share and scores the gathered samples;
only process 0 writes files. A remote ``out_dir`` (``gs://...``) is filled from a local temporary
folder once the evaluation is done, ``evaluation.json`` last.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import jax
import numpy as np
from etils import epath

from shortcut_jax import checkpoint, plots, writers
from shortcut_jax.evaluation import report
from shortcut_jax.experiment import Experiment

log = logging.getLogger(__name__)

# Written last by every evaluation: its presence means the folder holds a finished evaluation.
FINISHED = "evaluation.json"
# The per-budget table (TABLE + .md/.json/.csv) and its plot (TABLE + .png).
TABLE = "distance_by_budget"


def draw_samples(sampler, params, *, shape, num_classes: int, num_samples: int, batch_size: int,
                 num_steps: int, seed: int, cfg_scale: float = 1.0) -> np.ndarray:
    """``num_samples`` samples at one budget; noise and labels depend only on ``seed``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((num_samples, *shape)).astype(np.float32)
    if num_classes > 0:
        labels = rng.integers(0, num_classes, num_samples).astype(np.int32)
    else:
        labels = np.zeros(num_samples, np.int32)
    out = []
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        n = stop - start
        # pad the last chunk so every call has one shape (one compilation for every budget)
        chunk_noise = np.zeros((batch_size, *shape), np.float32)
        chunk_noise[:n] = noise[start:stop]
        chunk_labels = np.full(batch_size, num_classes, np.int32)
        chunk_labels[:n] = labels[start:stop] if num_classes > 0 else num_classes
        x = sampler(params, chunk_noise, chunk_labels, num_steps=num_steps, cfg_scale=cfg_scale)
        out.append(sampler.to_host(x)[:n])
    return np.concatenate(out)


@contextlib.contextmanager
def _local_folder(out_dir: str):
    """``out_dir`` where it is local; for a remote one a temporary local folder (tables and plots
    are written with local file functions) copied to ``out_dir`` on success, ``FINISHED`` last."""
    if not writers.is_remote(out_dir):
        if writers.primary_process():
            os.makedirs(out_dir, exist_ok=True)
        yield out_dir
        return
    local = tempfile.mkdtemp(prefix="eval-")
    try:
        yield local
        if writers.primary_process():
            target = epath.Path(out_dir)
            target.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(local), key=lambda n: n == FINISHED):
                (target / name).write_bytes(epath.Path(os.path.join(local, name)).read_bytes())
    finally:
        shutil.rmtree(local, ignore_errors=True)


def evaluate_budgets(eval_cfg, sampler, params, source, spec, metric, *, out_dir: str, step: int,
                     final: bool = False, writer=None, label: str = "") -> dict[int, float]:
    """Samples at each budget of ``eval_cfg``, ``metric`` per budget (None: grids only), and the
    files that show them. A ``final`` evaluation draws ``eval.final_num_samples`` where set."""
    with _local_folder(out_dir) as local_dir:
        return _evaluate_budgets(eval_cfg, sampler, params, source, spec, metric, out_dir=local_dir, step=step,
                                 final=final, writer=writer, label=label)


def _evaluate_budgets(eval_cfg, sampler, params, source, spec, metric, *, out_dir: str, step: int,
                      final: bool, writer, label: str) -> dict[int, float]:
    shape, kind = tuple(spec.shape), spec.kind
    num_samples = (final and eval_cfg.final_num_samples) or eval_cfg.num_samples
    budgets, grid_budgets, grid_size = tuple(eval_cfg.budgets), tuple(eval_cfg.grid_budgets), eval_cfg.grid_size
    scorer = metric.against(source, num_samples, eval_cfg.seed) if metric is not None else None
    results: dict[int, float] = {}
    images = {}
    for n in sorted(set(budgets) | set(grid_budgets)):
        count = num_samples if n in budgets and scorer is not None else grid_size
        samples = draw_samples(sampler, params, shape=shape, num_classes=spec.num_classes, num_samples=count,
                               batch_size=min(eval_cfg.batch_size, count), num_steps=n, seed=eval_cfg.seed,
                               cfg_scale=eval_cfg.cfg_scale)
        if n in budgets and scorer is not None:
            results[n] = scorer(samples)
        if n in grid_budgets:
            path = os.path.join(out_dir, f"samples_{n}step.png")
            if kind == "points":
                reference = None if scorer is None or scorer.reference is None else scorer.reference[:2000]
                images[f"samples_{n}step"] = plots.save_scatter(
                    samples[:grid_size * 40], path, reference=reference, title=f"{n} step(s), step {step}")
            else:
                images[f"samples_{n}step"] = plots.save_grid(samples[:grid_size], path)

    metric_key = metric.name if metric is not None else "none"
    floor = scorer.floor if scorer is not None else None
    primary = writers.primary_process()  # every process holds the same results; one writes them
    if results and primary:
        report.write_budget_table(results, os.path.join(out_dir, TABLE), metric_name=metric.display_name,
                                  floor=floor)
        report.plot_budget_curve({label or "model": results}, os.path.join(out_dir, TABLE + ".png"),
                                 metric_name=metric.display_name, floor=floor, title=f"step {step}")
    if primary:
        with open(os.path.join(out_dir, FINISHED), "w") as f:
            json.dump({"step": step, "num_samples": num_samples, "metric": metric_key, "label": label}, f,
                      indent=1)
    if writer is not None:
        scalars = {f"eval/{metric_key}_{n}step": v for n, v in results.items()}
        if floor is not None:
            scalars[f"eval/{metric_key}_floor"] = floor
        if results:
            scalars["eval/num_samples"] = num_samples
        if scalars:
            writer.write_scalars(step, scalars)
        if images:
            writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
    return results


def evaluate_state(exp: Experiment, state, step: int, *, out_dir: Optional[str] = None, writer=None,
                   final: bool = False) -> dict[int, float]:
    """Every budget of the experiment's ``config.eval`` for one train state."""
    return evaluate_budgets(
        exp.config.eval, exp.sampler, exp.eval_params(state), exp.source, exp.spec, exp.metric,
        out_dir=out_dir or os.path.join(exp.workdir, "eval", f"{step:08d}"), step=step, final=final,
        writer=writer, label=exp.config.objective.name)


def offline_out_dir(workdir: str, step: int) -> tuple[str, bool]:
    """(folder, whether it is the run's own ``eval/<step>``) for an offline evaluation: the
    run's own folder unless a finished evaluation is there, else the first free
    ``eval/<step>_offline<k>``, so that nothing already written is replaced."""
    own = os.path.join(workdir, "eval", f"{step:08d}")
    # A table without the marker is a finished evaluation written before the marker existed.
    if not any(epath.Path(own, name).exists() for name in (FINISHED, TABLE + ".json")):
        return own, True
    k = 1
    while epath.Path(f"{own}_offline{k}").exists():
        k += 1
    return f"{own}_offline{k}", False


def evaluate_checkpoint(config, workdir: str, *, step: Optional[int] = None,
                        out_dir: Optional[str] = None) -> dict[int, float]:
    """Evaluate a saved run at every budget of ``config.eval`` (final sample count)."""
    exp = Experiment(config, workdir)
    try:
        if not epath.Path(exp.ckpt_dir).is_dir():
            raise FileNotFoundError(f"no checkpoints under {exp.ckpt_dir}: train first or fix --workdir")
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            state, _, _ = ckpt.restore(step, exp.abstract_state)
        step = int(jax.device_get(state.step))
        writer = None
        if out_dir is None:
            out_dir, own = offline_out_dir(exp.workdir, step)
            if own:  # completes the run's evaluation at this step, so it joins the run's metrics too
                writer = writers.MetricWriter(exp.workdir, use_tensorboard=False)
            log.info("offline evaluation of step %d: writing to %s%s", step, out_dir,
                     " and metrics.jsonl" if writer else "")
        try:
            return evaluate_state(exp, state, step, out_dir=out_dir, writer=writer, final=True)
        finally:
            if writer is not None:
                writer.close()
    finally:
        exp.close()


def main(argv):
    del argv
    from absl import flags

    evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir, out_dir=flags.FLAGS.out_dir or None)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (python, get_config(arg)).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints.")
    flags.DEFINE_string("out_dir", "", "Where to write tables and plots (default <workdir>/eval/<step>).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
