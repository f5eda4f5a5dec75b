"""Samples from a saved run at a chosen step budget: a grid PNG, or one PNG per image.

Command line::

    python -m shortcut_jax.sample --config=experiments/digits.py --workdir=workdirs/digits \\
        --num_steps=4 --num_images=64 --labels=1,2,3 --cfg_scale=1.5 --seed=0 --out=grid.png
    python -m shortcut_jax.sample --config=... --workdir=gs://bucket/run --num_steps=1 \\
        --class=207 --num_images=16 --out_dir=pngs/

``--labels`` are given to the images in turn (image ``i`` gets ``labels[i % len(labels)]``),
``--class=K`` gives every image class K, and without either the labels follow
``eval.label_mode`` (class-balanced by default). Points (2-D runs) are drawn as a scatter plot.

In code (and in ``notebooks/shortcut_colab.ipynb``)::

    run = load_run(load_config('experiments/digits.py'), 'workdirs/digits')
    images, labels = sample(run, num_images=16, num_steps=4, seed=0)   # float [-1, 1]

The checkpoint records the data's shape and class count, and they stand in for the data set:
sampling needs only the config file and the workdir (local or ``gs://``), not the data. The path
is ``evaluate_checkpoint``'s: ``Experiment`` -> ``Checkpointer.restore`` -> EMA or online
parameters -> ``Sampler`` (each device draws its share), then the experiment's decoder for
latent runs. A workdir without a checkpoint, a budget that is not a power of two up to the
trained levels and labels the model does not have are refused before anything is restored
or compiled, each naming the flag to change.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from shortcut_jax import checkpoint, plots, sampling
from shortcut_jax.data import DataSpec
from shortcut_jax.evaluate import require_checkpoint, sample_shape
from shortcut_jax.evaluation.pixels import grey_to_rgb, to_uint8
from shortcut_jax.evaluation.sample_sets import class_labels, sample_batches
from shortcut_jax.experiment import COMPATIBILITY_KEYS, Experiment

__all__ = ["LoadedRun", "load_config", "load_run", "resolve_labels", "sample", "saved_spec", "write_images"]


def load_config(path: str, overrides: Optional[dict] = None):
    """``'experiments/x.py'`` or ``'experiments/x.py:arg'`` -> that file's ``get_config(arg)``,
    then ``overrides`` (``{'eval.budgets': (1, 4)}``) set key by key on the locked config: what
    ``--config=...`` and ``--config.key=value`` do on a command line, for notebooks and scripts."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file {file!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0], file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, key = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


@dataclasses.dataclass
class LoadedRun:
    """A restored run ready to sample: the experiment (model, mesh, sampler, decoder), the
    evaluated parameters and the checkpoint's step."""

    exp: Experiment
    params: Any
    step: int

    @property
    def num_classes(self) -> int:
        return self.exp.spec.num_classes

    def close(self) -> None:
        self.exp.close()


def _saved_meta(ckpt_dir: str, step: Optional[int]) -> dict:
    with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
        return ckpt.read_meta(step) or {}


def _spec_from_meta(meta: dict, ckpt_dir: str) -> DataSpec:
    if "data_shape" not in meta or "num_classes" not in meta:
        raise ValueError(f"the checkpoint in {ckpt_dir} records no data shape and class count (run metadata of"
                         " an older version); evaluate it with python -m shortcut_jax.evaluate instead")
    shape = tuple(int(d) for d in meta["data_shape"])
    return DataSpec(shape=shape, num_classes=int(meta["num_classes"]), kind="points" if len(shape) == 1 else "images")


def saved_spec(workdir: str, step: Optional[int] = None) -> tuple[DataSpec, int]:
    """``(data spec, objective.num_levels)`` a run's checkpoint was trained with, read from its
    metadata alone (no arrays); refuses a workdir without a checkpoint."""
    ckpt_dir = require_checkpoint(workdir)
    meta = _saved_meta(ckpt_dir, step)
    return _spec_from_meta(meta, ckpt_dir), int(meta.get("objective", {}).get("num_levels", 0))


def check_guidance(cfg_scale: float, num_classes: int) -> None:
    if cfg_scale != 1.0 and num_classes == 0:
        raise ValueError(f"--cfg_scale={cfg_scale}: guidance needs a class-conditional model; this one is"
                         " unconditional, so leave --cfg_scale=1")


def resolve_labels(num_classes: int, num_images: int, *, labels: Optional[Sequence[int]] = None,
                   class_label: Optional[int] = None, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """int32 ``[num_images]``: ``labels`` in turn, or ``class_label`` for all, or ``mode``'s labels
    (``evaluation.sample_sets.class_labels``). Raises ValueError naming the flag to change."""
    if labels is not None and class_label is not None:
        raise ValueError("give --labels or --class, not both")
    given = [class_label] if class_label is not None else (list(labels) if labels is not None else None)
    if given is None:
        return class_labels(num_images, num_classes, mode=mode, seed=seed)
    flag = "--class" if class_label is not None else "--labels"
    if num_classes == 0:
        raise ValueError(f"{flag}: the model is unconditional (trained without class labels); drop {flag}")
    if not given:
        raise ValueError(f"{flag} is empty: give class numbers, e.g. {flag}=0")
    wrong = [v for v in given if not 0 <= int(v) < num_classes]
    if wrong:
        raise ValueError(f"{flag} holds {wrong}: the model has {num_classes} classes, 0 to {num_classes - 1}")
    return np.resize(np.asarray(given, np.int32), num_images)


def load_run(config, workdir: str, *, step: Optional[int] = None, use_ema: Optional[bool] = None) -> LoadedRun:
    """Restores the evaluated parameters (``eval.use_ema``/``eval.ema_index``, or ``use_ema``) of
    ``workdir``'s checkpoint ``step`` (None: the latest) for sampling, without opening the data."""
    ckpt_dir = require_checkpoint(workdir)
    meta = _saved_meta(ckpt_dir, step)
    spec = _spec_from_meta(meta, ckpt_dir)
    config = copy.deepcopy(config)
    config.eval.metric = "none"  # sampling scores nothing: no metric files are needed
    config.eval.export_budgets = ()
    if use_ema is not None:
        config.eval.use_ema = bool(use_ema)
    exp = Experiment(config, workdir, spec=spec)
    try:
        # Experiment checks a local workdir's checkpoint; this covers gs:// ones as well
        checkpoint.check_compatible(meta, exp.meta, COMPATIBILITY_KEYS)
        with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
            state, _, _ = exp.restore(ckpt, step)
        return LoadedRun(exp, exp.eval_params(state), int(jax.device_get(state.step)))
    except BaseException:
        exp.close()
        raise


def sample(run: LoadedRun, *, num_images: int, num_steps: int, labels=None, class_label: Optional[int] = None,
           cfg_scale: float = 1.0, seed: int = 0, batch_size: Optional[int] = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)``: ``num_images`` samples at ``num_steps`` steps (decoded for latent
    runs), float in [-1, 1] ``[N, H, W, C]`` (points ``[N, D]``), and their int32 labels."""
    exp = run.exp
    if num_images < 1:
        raise ValueError(f"--num_images={num_images} must be >= 1")
    sampling.check_budget(num_steps, exp.config.objective.num_levels)
    check_guidance(cfg_scale, run.num_classes)
    chosen = resolve_labels(run.num_classes, num_images, labels=labels, class_label=class_label,
                            mode=exp.config.eval.label_mode, seed=seed)
    batch = min(batch_size or exp.config.eval.batch_size, num_images)
    parts = list(sample_batches(exp.sampler, run.params, shape=tuple(exp.spec.shape), num_classes=run.num_classes,
                                num_samples=num_images, batch_size=batch, num_steps=num_steps, seed=seed,
                                cfg_scale=cfg_scale, labels=chosen, decode=exp.decode))
    return np.concatenate([x for x, _ in parts]), chosen


def check_outputs(sample_shape: tuple, *, out: str = "", out_dir: str = "") -> None:
    """One output, and ``--out_dir`` only for images (RGB or greyscale)."""
    if bool(out) == bool(out_dir):
        raise ValueError("give --out=FILE.png (one grid) or --out_dir=DIR (one PNG per image)")
    if out_dir and (len(sample_shape) != 3 or sample_shape[-1] not in (1, 3)):
        raise ValueError(f"--out_dir writes images; these samples are {tuple(sample_shape)}: use --out for "
                         + ("a scatter plot" if len(sample_shape) == 1 else "a grid of their first three channels"))


def write_images(samples: np.ndarray, labels: Optional[np.ndarray], *, out: str = "", out_dir: str = "",
                 title: str = "") -> list[str]:
    """A grid (images) or scatter plot (points) at ``out``, or one PNG per image in ``out_dir``
    (``00000_class3.png``, ...; ``00000.png`` without ``labels``); returns the paths written."""
    check_outputs(samples.shape[1:], out=out, out_dir=out_dir)
    if out:
        if samples.ndim == 2:
            plots.save_scatter(samples, out, title=title or None)
        else:
            plots.save_grid(samples, out)
        return [out]
    os.makedirs(out_dir, exist_ok=True)
    pixels = to_uint8(grey_to_rgb(samples))[..., :samples.shape[-1]]
    paths = []
    for i, image in enumerate(pixels):
        name = f"{i:05d}.png" if labels is None else f"{i:05d}_class{int(labels[i])}.png"
        paths.append(os.path.join(out_dir, name))
        plots.write_png(image, paths[-1])
    return paths


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values=None, argv=None):
    """The command's flags (in ``flag_values``, default absl's global ones); ``argv`` stands for
    ``sys.argv`` where ``--config.<key>`` overrides are looked for (for parsing in-process)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "The run's config file (python, get_config(arg)).",
                                    lock_config=True, flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints (local or gs://).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_integer("num_steps", 1, "Sampling budget: a power of two up to 2^objective.num_levels.",
                         flag_values=fv)
    flags.DEFINE_integer("num_images", 64, "How many images.", flag_values=fv)
    flags.DEFINE_list("labels", None, "Class labels, given to the images in turn (e.g. 1,2,3).", flag_values=fv)
    flags.DEFINE_integer("class", None, "One class label for every image.", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1: none).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Noise and label seed.", flag_values=fv)
    flags.DEFINE_bool("use_ema", None, "Sample with the EMA weights (default: eval.use_ema).", flag_values=fv)
    flags.DEFINE_string("out", "", "Grid PNG (scatter plot for points).", flag_values=fv)
    flags.DEFINE_string("out_dir", "", "Folder for one PNG per image.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    return fv


def run(fv) -> list[str]:
    """The command; returns the files written."""
    check_outputs((0, 0, 3), out=fv.out, out_dir=fv.out_dir)  # one of them; the shape is checked below
    if fv.num_images < 1:
        raise ValueError(f"--num_images={fv.num_images} must be >= 1")
    labels = None
    if fv.labels is not None:
        try:
            labels = [int(v) for v in fv.labels]
        except ValueError:
            raise ValueError(f"--labels={','.join(fv.labels)}: give class numbers separated by commas") from None
    class_label = fv["class"].value
    # Everything the request can get wrong is checked against the checkpoint's metadata, before
    # the checkpoint is restored or anything compiled.
    spec, levels = saved_spec(fv.workdir, fv.step)
    sampling.check_budget(fv.num_steps, levels or fv.config.objective.num_levels)
    resolve_labels(spec.num_classes, fv.num_images, labels=labels, class_label=class_label)
    check_guidance(fv.cfg_scale, spec.num_classes)
    if spec.kind == "points":
        check_outputs(spec.shape, out=fv.out, out_dir=fv.out_dir)
    loaded = load_run(fv.config, fv.workdir, step=fv.step, use_ema=fv.use_ema)
    try:
        # latents: what the run's decoder makes of them (traced, not compiled)
        check_outputs(sample_shape(spec, loaded.exp.decode), out=fv.out, out_dir=fv.out_dir)
        samples, chosen = sample(loaded, num_images=fv.num_images, num_steps=fv.num_steps, labels=labels,
                                 class_label=class_label, cfg_scale=fv.cfg_scale, seed=fv.seed)
    finally:
        loaded.close()
    paths = write_images(samples, chosen if spec.num_classes else None, out=fv.out, out_dir=fv.out_dir,
                         title=f"{fv.num_steps} step(s), step {loaded.step}")
    print(f"wrote {len(paths)} file(s): {paths[0]}{' ...' if len(paths) > 1 else ''}"
          f" ({fv.num_images} samples at {fv.num_steps} step(s), checkpoint step {loaded.step})")
    return paths


if __name__ == "__main__":
    from absl import app

    from shortcut_jax import cli

    _FLAGS = define_flags()

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        run(_FLAGS)

    cli.run(_main)
