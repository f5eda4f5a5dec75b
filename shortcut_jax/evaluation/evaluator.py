"""Evaluation at several step budgets: one entry point for training-time and offline evaluation.

``evaluate_budgets`` draws samples at each budget of ``config.eval`` (1, 2, 4, ..., 128) from one
set of noise and labels (``evaluation.sample_sets``: fixed by ``eval.seed``, class-balanced or
random labels), batch by batch and spread over the mesh's devices (each draws its own share),
decodes them when the experiment has a decoder (latent runs), and scores them with the run's
metric (``evaluation.metrics``: sliced Wasserstein distance for 2-D points, the classifier
Frechet distance ``cfd`` for CIFAR-10, ``fid`` for any images). It writes a table
(``.md``/``.json``/``.csv``), a plot of the metric against the budget, a grid or scatter per
budget, optionally the samples as the ADM evaluator's ``.npz``, and last ``evaluation.json``
(step, sample count, metric, its provenance, timings), whose presence marks the evaluation as
finished.

The path of a checkpoint to a grid (the first two steps are ``training.offline``'s)::

    evaluate_checkpoint(config, workdir)
      -> require_checkpoint(workdir)             (before anything is built)
      -> Experiment(config, workdir)             (checks, model, mesh, sampler, metric)
      -> check_before_sampling                   (metric and export against the samples' shape)
      -> Experiment.restore(ckpt, step)          (either block layout, see model.scan_blocks)
      -> evaluate_state: params = EMA or online tree
           for each budget n: sample_batches -> Sampler (jit, noise split over the mesh) [-> decode]
                              -> metric accumulator, ADM .npz, grid PNG
      -> table, plot, evaluation.json, metrics.jsonl

Without an explicit ``out_dir`` an offline evaluation (``training.offline.evaluate_checkpoint``)
writes to ``<workdir>/eval/<step>/`` and into the run's ``metrics.jsonl`` when that step has no
finished evaluation (a run stopped during its final
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
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from shortcut_jax.infra import plots, writers
from shortcut_jax.evaluation import adm_npz, report
from shortcut_jax.evaluation.pixels import grey_to_rgb

# The sample set (noise, labels, batches over the mesh); draw_samples is also this module's API.
from shortcut_jax.evaluation.sample_sets import device_batches, draw_samples, sample_batches  # noqa: F401
from shortcut_jax.infra.jsonable import jsonable

log = logging.getLogger(__name__)

# Written last by every evaluation: its presence means the folder holds a finished evaluation.
FINISHED = "evaluation.json"
# The per-budget table (TABLE + .md/.json/.csv) and its plot (TABLE + .png).
TABLE = "distance_by_budget"


def sample_shape(spec, decode: Optional[Callable] = None) -> tuple:
    """Shape of one sample as metrics, grids and sample files see it: the data's, or what
    ``decode`` makes of it: found by tracing a JAX decoder, without compiling; a decoder that
    works on host arrays (``LoadedVAE.latent_decoder``) is run once on zeros instead."""
    shape = tuple(spec.shape)
    if decode is None:
        return shape
    # one row per device: a decoder jitted over the mesh may require its batch to divide
    rows = jax.device_count()
    try:
        out = jax.eval_shape(decode, jax.ShapeDtypeStruct((rows, *shape), jnp.float32))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        out = np.asarray(decode(np.zeros((rows, *shape), np.float32)))
    return tuple(out.shape[1:])


def check_exportable(eval_cfg, kind: str, image_shape: tuple) -> None:
    if eval_cfg.export_budgets and (kind != "images" or image_shape[-1] not in (1, 3)):
        raise ValueError(
            f"eval.export_budgets={tuple(eval_cfg.export_budgets)}: the samples are {kind} of shape"
            f" {image_shape}, and the ADM .npz holds RGB images; set eval.export_budgets=()"
        )


def export_path(eval_cfg, out_dir: str, steps: int) -> str:
    """Where the samples of one budget are written (``eval.export_npz``, relative to ``out_dir``)."""
    return os.path.join(out_dir, os.path.expanduser(eval_cfg.export_npz.format(steps=steps)))


@contextlib.contextmanager
def _local_folder(out_dir: str):
    """``out_dir`` where it is local; for a remote one a temporary local folder (tables and plots
    are written with local file functions) copied to ``out_dir`` on success, ``FINISHED`` last."""
    if not writers.is_remote(out_dir):
        yield out_dir
        return
    local = tempfile.mkdtemp(prefix="eval-")
    try:
        yield local
        if writers.primary_process():
            files = sorted(
                (
                    os.path.relpath(os.path.join(root, name), local)
                    for root, _, names in os.walk(local)
                    for name in names
                ),
                key=lambda name: name == FINISHED,
            )
            for name in files:
                target = epath.Path(out_dir) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(epath.Path(os.path.join(local, name)).read_bytes())
    finally:
        shutil.rmtree(local, ignore_errors=True)


def evaluate_budgets(
    eval_cfg,
    sampler,
    params,
    source,
    spec,
    metric,
    *,
    out_dir: str,
    step: int,
    final: bool = False,
    writer=None,
    label: str = "",
    decode: Optional[Callable] = None,
    progress: bool = False,
    cache_dir: Optional[str] = None,
    info: Optional[dict] = None,
) -> dict[int, float]:
    """Samples at each budget of ``eval_cfg``, ``metric`` per budget (None: grids only), and the
    files that show them. A ``final`` evaluation draws ``eval.final_num_samples`` where set.

    Samples are drawn batch by batch (``eval.batch_size``, split over the sampler's mesh) and
    each batch goes to the metric's accumulator, to the ADM sample file of budgets in
    ``eval.export_budgets``, and, for the first ``eval.grid_size``, to the grid; a budget's samples
    are held at once only by metrics that need the whole set (CFD, sliced Wasserstein).
    ``decode`` (latents -> images in [-1, 1]) is applied to every batch first. ``progress``
    shows a bar with images/s. ``cache_dir``: where metrics may keep reference statistics.
    ``info`` joins ``evaluation.json``, which also records the metric's provenance and the time
    spent sampling, decoding and scoring each budget.
    """
    with _local_folder(out_dir) as write_dir:
        return _evaluate_budgets(
            eval_cfg,
            sampler,
            params,
            source,
            spec,
            metric,
            out_dir=out_dir,
            write_dir=write_dir,
            step=step,
            final=final,
            writer=writer,
            label=label,
            decode=decode,
            progress=progress,
            cache_dir=cache_dir,
            info=info,
        )


def _evaluate_budgets(
    eval_cfg,
    sampler,
    params,
    source,
    spec,
    metric,
    *,
    out_dir: str,
    write_dir: str,
    step: int,
    final: bool,
    writer,
    label: str,
    decode: Optional[Callable],
    progress: bool,
    cache_dir: Optional[str],
    info: Optional[dict],
) -> dict[int, float]:
    """``evaluate_budgets`` writing its files into ``write_dir`` (``out_dir``, or a local
    folder standing in for a remote one); ``out_dir`` is where they are recorded to be."""
    shape, kind = tuple(spec.shape), spec.kind
    image_shape = sample_shape(spec, decode)
    # Everything that can be refused is refused before the first sample is drawn.
    check_exportable(eval_cfg, kind, image_shape)
    if metric is not None:
        metric.check(data_shape=shape, image_shape=image_shape)
    primary = writers.primary_process()  # every process holds the same results; one writes them
    if primary:
        os.makedirs(write_dir, exist_ok=True)
    num_samples = (final and eval_cfg.final_num_samples) or eval_cfg.num_samples
    budgets, grid_budgets, grid_size = tuple(eval_cfg.budgets), tuple(eval_cfg.grid_budgets), eval_cfg.grid_size
    exported = set(eval_cfg.export_budgets)
    scorer = metric.against(source, num_samples, eval_cfg.seed, cache_dir=cache_dir) if metric is not None else None
    # a scatter plot shows more points than a grid shows images
    shown_count = grid_size * 40 if kind == "points" else grid_size
    results: dict[int, float] = {}
    images, timings, exports = {}, {}, {}
    drawn = sorted(set(budgets) | set(grid_budgets))
    log.info(
        "evaluating %d budget(s) at step %d: %s step(s)%s, results in %s",
        len(drawn),
        step,
        ",".join(map(str, drawn)),
        f", {metric.name} on {num_samples} samples" if scorer is not None else "",
        out_dir,
    )
    for n in drawn:
        scored = n in budgets and scorer is not None
        count = num_samples if scored or n in exported else grid_size
        if n in exported and primary:
            exports[n] = export_path(eval_cfg, out_dir, n)
        value, shown, timings[n] = _draw_budget(
            eval_cfg,
            sampler,
            params,
            spec,
            n,
            count,
            accumulator=scorer.accumulator() if scored else None,
            export=export_path(eval_cfg, write_dir, n) if n in exports else None,
            image_shape=image_shape,
            shown_count=shown_count,
            decode=decode,
            progress=progress,
        )
        if value is not None:
            results[n] = value
            log.info(
                "%d step(s): %s %.6g (%d samples, %.1f images/s)",
                n,
                metric.display_name,
                value,
                count,
                timings[n]["images_per_s"],
            )
        if n in grid_budgets:
            path = os.path.join(write_dir, f"samples_{n}step.png")
            if kind == "points":
                reference = None if scorer is None or scorer.reference is None else scorer.reference[:2000]
                images[f"samples_{n}step"] = plots.save_scatter(
                    shown, path, reference=reference, title=f"{n} step(s), step {step}"
                )
            else:
                images[f"samples_{n}step"] = plots.save_grid(shown, path)

    metric_key = metric.name if metric is not None else "none"
    floor = scorer.floor if scorer is not None else None
    if results and primary:
        report.write_budget_table(results, os.path.join(write_dir, TABLE), metric_name=metric.display_name, floor=floor)
        report.plot_budget_curve(
            {label or "model": results},
            os.path.join(write_dir, TABLE + ".png"),
            metric_name=metric.display_name,
            floor=floor,
            title=f"step {step}",
        )
    finished = {
        "step": step,
        "num_samples": num_samples,
        "metric": metric_key,
        "label": label,
        "seed": eval_cfg.seed,
        "label_mode": eval_cfg.label_mode,
        "cfg_scale": eval_cfg.cfg_scale,
        "guidance_interval": list(eval_cfg.guidance_interval),
        **(info or {}),
        "metric_info": metric.describe() if metric is not None else None,
        "exports": {str(k): v for k, v in exports.items()},
        "timings": {str(k): v for k, v in timings.items()},
    }
    if primary:
        with open(os.path.join(write_dir, FINISHED), "w") as f:
            json.dump(jsonable(finished), f, indent=1)
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


def _draw_budget(
    eval_cfg,
    sampler,
    params,
    spec,
    num_steps: int,
    count: int,
    *,
    accumulator,
    export,
    image_shape: tuple,
    shown_count: int,
    decode,
    progress: bool,
):
    """``count`` samples at one budget, batch by batch, into the metric's accumulator (or None)
    and the ADM file ``export`` (or None); returns (metric value or None, the first
    ``shown_count`` samples, timings).

    Batches stay on the devices unless something needs them on the host: an accumulator that
    scores device arrays (FID: ``add_on_device``) gets them as they are, and only the sample
    file (every sample), a metric of host arrays (every sample) and the grid (its first
    ``shown_count``) are copied to the host (``host_copy_s``)."""
    timing = {"sample_s": 0.0, "score_s": 0.0, "host_copy_s": 0.0}
    began = time.perf_counter()
    shown: list[np.ndarray] = []
    kept = 0
    on_device = accumulator is not None and hasattr(accumulator, "add_on_device")
    everything_on_host = export is not None or (accumulator is not None and not on_device)
    with contextlib.ExitStack() as stack:
        sample_file = None
        if export is not None:  # removed again if anything fails before the last sample is in
            sample_file = stack.enter_context(
                adm_npz.ADMSampleWriter(
                    export, num_images=count, image_shape=(*image_shape[:2], 3), with_labels=spec.num_classes > 0
                )
            )
        bar = stack.enter_context(
            tqdm(
                total=count,
                unit="img",
                desc=f"{num_steps} step(s)",
                disable=not progress,
                dynamic_ncols=True,
                leave=False,
            )
        )
        for x, rows, labels in device_batches(
            sampler,
            params,
            shape=tuple(spec.shape),
            num_classes=spec.num_classes,
            num_samples=count,
            batch_size=min(eval_cfg.batch_size, count),
            num_steps=num_steps,
            seed=eval_cfg.seed,
            cfg_scale=eval_cfg.cfg_scale,
            guidance_interval=tuple(eval_cfg.guidance_interval),
            label_mode=eval_cfg.label_mode,
            decode=decode,
            timings=timing,
        ):
            copying = time.perf_counter()
            host = np.asarray(sampler.to_host(x))[:rows] if everything_on_host else None
            if kept < shown_count:
                wanted = min(shown_count - kept, rows)
                shown.append(host[:wanted] if host is not None else np.asarray(sampler.to_host(x[:wanted])))
                kept += len(shown[-1])
            timing["host_copy_s"] += time.perf_counter() - copying
            scoring = time.perf_counter()
            if on_device:
                accumulator.add_on_device(x, rows, sampler.to_host)
            elif accumulator is not None:
                accumulator.add(host)
            timing["score_s"] += time.perf_counter() - scoring
            if sample_file is not None:
                sample_file.add(grey_to_rgb(host), labels if spec.num_classes > 0 else None)
            bar.update(rows)
    value = None
    if accumulator is not None:
        scoring = time.perf_counter()
        value = accumulator.result()
        timing["score_s"] += time.perf_counter() - scoring
    total = time.perf_counter() - began
    timing = {
        "samples": count,
        **{k: round(v, 3) for k, v in timing.items()},
        "total_s": round(total, 3),
        "images_per_s": round(count / total, 1),
    }
    return value, (np.concatenate(shown) if shown else None), timing


def fid_stats_dir(workdir: Optional[str]) -> Optional[str]:
    """Where reference statistics computed from the data are cached: ``fid_stats/`` beside the
    workdir, shared by the runs of one folder (the files are keyed by the images and the
    network's weights, so runs on other data never read each other's). None for remote
    workdirs: the statistics are then kept in memory only."""
    if not workdir or "://" in workdir:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(workdir)), "fid_stats")


def evaluated_params(config) -> str:
    """Which weights an evaluation samples with (for evaluation.json)."""
    decays = tuple(config.train.ema_decays)
    if config.eval.use_ema and decays:
        return f"ema {config.eval.ema_index} (decay {decays[config.eval.ema_index]})"
    return "online"


def evaluate_state(
    exp, state, step: int, *, out_dir: Optional[str] = None, writer=None, final: bool = False, progress: bool = False
) -> dict[int, float]:
    """Every budget of the experiment's ``config.eval`` for one train state."""
    return evaluate_budgets(
        exp.config.eval,
        exp.sampler,
        exp.eval_params(state),
        exp.source,
        exp.spec,
        exp.metric,
        out_dir=out_dir or os.path.join(exp.workdir, "eval", f"{step:08d}"),
        step=step,
        final=final,
        writer=writer,
        label=exp.config.objective.name,
        decode=exp.decode,
        progress=progress,
        cache_dir=fid_stats_dir(exp.workdir),
        info={"params": evaluated_params(exp.config)},
    )


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


def check_before_sampling(exp) -> None:
    """The metric's and the sample export's checks against the samples' shape (after any
    decoding), before a checkpoint is restored or anything compiled."""
    image_shape = sample_shape(exp.spec, exp.decode)
    check_exportable(exp.config.eval, exp.spec.kind, image_shape)
    if exp.metric is not None:
        exp.metric.check(data_shape=tuple(exp.spec.shape), image_shape=image_shape)
