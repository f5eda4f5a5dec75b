"""Evaluation at several step budgets: one entry point for training-time and offline evaluation.

``evaluate_budgets`` draws samples at each budget (1, 2, 4, ..., 128) from one set of noise and
labels, and scores them against fresh data with the metric the data calls for:
- 2-D points: sliced Wasserstein distance (512 random projections) against fresh data points,
  with the data-against-data floor;
- images: sample grids, and the metric named by ``eval.metric`` from ``IMAGE_METRICS`` (the
  classifier Frechet distance ``cfd``, FID where Inception weights are available).
It writes a table (``.md``/``.json``/``.csv``), a plot of distance against budget, a grid or
scatter per budget, and last ``evaluation.json`` (step, sample count, metric), whose presence
marks the evaluation as finished.

Command line (evaluates the latest checkpoint of a run)::

    python -m shortcut_jax.evaluate --config=experiments/toy2d.py --workdir=/tmp/toy

Without ``--out_dir`` the results go to ``<workdir>/eval/<step>/`` and into the run's
``metrics.jsonl`` when that step has no finished evaluation (a run stopped during its final
evaluation is completed as the training loop would have done it); otherwise to the first free
``eval/<step>_offline<k>/``, and the run's own results are left as they are.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from shortcut_jax import metric_writers
from shortcut_jax.evaluation import distances, report

# Written last by every evaluation: its presence means the folder holds a finished evaluation.
FINISHED = "evaluation.json"
# The per-budget table (TABLE + .md/.json/.csv) and its plot (TABLE + .png).
TABLE = "distance_by_budget"

# name -> fn(samples [N, ...], reference [M, ...]) -> float; for image data sets.
IMAGE_METRICS: dict[str, Callable] = {}


def save_grid(samples: np.ndarray, path: str) -> np.ndarray:
    """Grid of RGB/grey images; other channel counts (undecoded latents) show their first three
    channels over a unit-variance range."""
    if samples.shape[-1] in (1, 3):
        return metric_writers.save_image_grid(samples, path)
    return metric_writers.save_image_grid(samples[..., :3], path, value_range=(-2.5, 2.5))


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
        out.append(np.asarray(x)[:n])
    return np.concatenate(out)


def evaluate_budgets(sampler, params, source, *, kind: str, shape: Sequence[int], num_classes: int,
                     budgets: Sequence[int], num_samples: int, batch_size: int, seed: int, out_dir: str,
                     step: int, cfg_scale: float = 1.0, grid_budgets: Sequence[int] = (),
                     grid_size: int = 64, metric: str = "auto", writer=None,
                     label: str = "") -> dict[int, float]:
    """Samples at each budget, the metric per budget, and the files that show them."""
    os.makedirs(out_dir, exist_ok=True)
    metric = ("sliced_wasserstein" if kind == "points" else "none") if metric == "auto" else metric
    results: dict[int, float] = {}
    floor: Optional[float] = None
    reference = None
    if metric == "sliced_wasserstein":
        reference = source.reference(num_samples, seed=seed + 1)
        floor = distances.sliced_wasserstein(source.reference(num_samples, seed=seed + 2), reference)
    elif metric != "none":
        if metric not in IMAGE_METRICS:
            raise ValueError(f"eval.metric={metric!r} is unknown; use 'auto', 'none', 'sliced_wasserstein'"
                             f" or one of {sorted(IMAGE_METRICS)}")
        reference = source.reference(num_samples, seed=seed + 1)

    images = {}
    for n in sorted(set(budgets) | set(grid_budgets)):
        count = num_samples if n in budgets and metric != "none" else grid_size
        samples = draw_samples(sampler, params, shape=shape, num_classes=num_classes, num_samples=count,
                               batch_size=min(batch_size, count), num_steps=n, seed=seed, cfg_scale=cfg_scale)
        if n in budgets and metric == "sliced_wasserstein":
            results[n] = distances.sliced_wasserstein(samples, reference)
        elif n in budgets and metric != "none":
            results[n] = float(IMAGE_METRICS[metric](samples, reference))
        if n in grid_budgets:
            path = os.path.join(out_dir, f"samples_{n}step.png")
            if kind == "points":
                images[f"samples_{n}step"] = metric_writers.save_scatter(
                    samples[:grid_size * 40], path, reference=None if reference is None else reference[:2000],
                    title=f"{n} step(s), step {step}")
            else:
                images[f"samples_{n}step"] = save_grid(samples[:grid_size], path)

    if results:
        name = metric.replace("_", " ")
        report.write_budget_table(results, os.path.join(out_dir, TABLE), metric_name=name, floor=floor)
        report.plot_budget_curve({label or "model": results}, os.path.join(out_dir, TABLE + ".png"),
                                 metric_name=name, floor=floor, title=f"step {step}")
    with open(os.path.join(out_dir, FINISHED), "w") as f:
        json.dump({"step": step, "num_samples": num_samples, "metric": metric, "label": label}, f, indent=1)
    if writer is not None:
        scalars = {f"eval/{metric}_{n}step": v for n, v in results.items()}
        if floor is not None:
            scalars[f"eval/{metric}_floor"] = floor
        if results:
            scalars["eval/num_samples"] = num_samples
        if scalars:
            writer.write_scalars(step, scalars)
        if images:
            writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
    return results


def offline_out_dir(workdir: str, step: int) -> tuple[str, bool]:
    """(folder, whether it is the run's own ``eval/<step>``) for an offline evaluation: the
    run's own folder unless a finished evaluation is there, else the first free
    ``eval/<step>_offline<k>``, so that nothing already written is replaced."""
    own = os.path.join(workdir, "eval", f"{step:08d}")
    # A table without the marker is a finished evaluation written before the marker existed.
    if not any(os.path.exists(os.path.join(own, name)) for name in (FINISHED, TABLE + ".json")):
        return own, True
    k = 1
    while os.path.exists(f"{own}_offline{k}"):
        k += 1
    return f"{own}_offline{k}", False


def main(argv):
    del argv
    from absl import flags

    from shortcut_jax import train

    cfg = flags.FLAGS.config
    train.evaluate_checkpoint(cfg, flags.FLAGS.workdir, out_dir=flags.FLAGS.out_dir or None)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (python, get_config(arg)).")
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints.")
    flags.DEFINE_string("out_dir", "", "Where to write tables and plots (default <workdir>/eval/<step>).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
