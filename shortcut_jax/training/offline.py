"""A finished run opened again: sampled, evaluated offline, read by reflow's stage one.

``require_checkpoint`` refuses a workdir without a checkpoint before anything is built;
``load_run`` builds the run's ``Experiment`` and restores its weights; ``sample`` draws images at
one budget; ``evaluate_checkpoint`` evaluates a saved step at every budget of ``config.eval``
(``evaluation.evaluator`` does the sampling and scoring). The commands ``sample`` and
``evaluate`` are their flags around these functions. In code (and in ``notebooks/shortcut_colab.ipynb``)::

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
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from shortcut_jax import config_lib
from shortcut_jax.data import PAIRS_DATA, DataSpec, latents
from shortcut_jax.evaluation.evaluator import check_before_sampling, evaluate_state, offline_out_dir
from shortcut_jax.evaluation.pixels import grey_to_rgb, to_uint8
from shortcut_jax.evaluation.sample_sets import class_labels, sample_batches
from shortcut_jax.infra import checkpoint, plots, writers
from shortcut_jax.objectives import sampling
from shortcut_jax.training import runs
from shortcut_jax.training.experiment import Experiment, check_workdir_matches

log = logging.getLogger(__name__)

__all__ = [
    "LoadedRun",
    "evaluate_checkpoint",
    "from_recorded_config",
    "require_checkpoint",
    "load_config",
    "load_run",
    "resolve_labels",
    "sample",
    "saved_spec",
    "write_images",
]


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


# Settings of the machine a run is sampled on, not of the run: taken from the given config.
MACHINE_KEYS = (
    "mesh",
    "model.attention_impl",
    "model.dtype",
    "train.progress_bar",
    "train.use_tensorboard",
    "train.use_wandb",
    "train.async_ckpt",
    "train.init_on",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_config_value(current, value):
    """A recorded (JSON) value in the type of the config's field: lists as tuples, ints as floats."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(_as_config_value((), v) if isinstance(v, list) else v for v in value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def from_recorded_config(config, workdir: str, overrides: Optional[dict] = None):
    """``config`` with the settings the run in ``workdir`` was trained with (its
    ``manifest.json``), so that sampling and evaluation need only ``--config`` and ``--workdir``;
    the machine's settings (``MACHINE_KEYS``) stay the given ones, and ``overrides`` (the command
    line's ``--config.<key>`` flags: ``{dotted key: value}``) win over the run's. Where the given
    config file differs from the run, the run's settings are used and the keys are logged; an
    override the checkpoint cannot take (another model or objective) is refused by name when the
    run is built. A run without a manifest (an imported checkpoint) keeps ``config``."""
    recorded = runs.open_run(workdir, what="--workdir").config
    if not recorded:
        return config
    config = copy.deepcopy(config)
    overrides = dict(overrides or {})
    differing = []
    for key, value in sorted(_flatten(recorded).items()):
        if any(key == m or key.startswith(m + ".") for m in MACHINE_KEYS) or key in overrides:
            continue
        current = _get(config, key)
        if current is _MISSING or hasattr(current, "keys"):
            continue  # a key of another version of the config
        value = _as_config_value(current, value)
        if value == current:
            continue
        parent, _, leaf = key.rpartition(".")
        node = _get(config, parent) if parent else config
        try:
            node[leaf] = value
        except (TypeError, ValueError, AttributeError) as err:
            log.warning("%s=%r of the run in %s is not applied (%s)", key, value, workdir, err)
            continue
        differing.append(f"{key}={value!r}")
    for key, value in overrides.items():  # already set where they came from the command line
        parent, _, leaf = key.rpartition(".")
        (_get(config, parent) if parent else config)[leaf] = value
    if differing:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        log.info(
            "the run in %s was trained with %s (not what --config gives): using the run's settings; a"
            " --config.<key>=value flag overrides one",
            workdir,
            shown,
        )
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
        raise ValueError(
            f"the checkpoint in {ckpt_dir} records no data shape and class count (run metadata of"
            " an older version); evaluate it with python -m shortcut_jax.evaluate instead"
        )
    shape = tuple(int(d) for d in meta["data_shape"])
    return DataSpec(shape=shape, num_classes=int(meta["num_classes"]), kind="points" if len(shape) == 1 else "images")


def saved_spec(workdir: str, step: Optional[int] = None) -> tuple[DataSpec, int]:
    """``(data spec, objective.num_levels)`` a run's checkpoint was trained with, read from its
    metadata alone (no arrays); refuses a workdir without a checkpoint."""
    ckpt_dir = require_checkpoint(workdir)
    meta = _saved_meta(ckpt_dir, step)
    return _spec_from_meta(meta, ckpt_dir), int(meta.get("objective", {}).get("num_levels", 0))


def _latent_run_decoder(config, meta: dict, workdir: str):
    """The decoder of a latent run (or of a reflow run on a latent run's pairs) opened without its
    data: the VAE its checkpoint records (``eval.vae`` on this machine, else the recorded folder),
    else the one its latent set's manifest names where the set is here, else ``eval.vae``
    unchecked."""
    encoded = f"the latent run in {workdir}"
    recorded = meta.get("vae")
    if recorded is None and config.data.name == PAIRS_DATA:
        return None  # pairs of a pixel or point run (or a run that records no VAE): nothing to decode
    if recorded is None and config.data.name == "latents" and config.data.path:
        try:
            recorded = latents.read_manifest(config.data.path)["vae"]
        except (OSError, ValueError, KeyError):
            recorded = None
    if recorded is None and not config.eval.vae:
        raise config_lib.ConfigError(
            f"{encoded} samples latents and records no VAE to decode them: set --config.eval.vae to the folder"
            " of the VAE that encoded its data"
        )
    return Experiment.vae_decoder(config, recorded, encoded)


def check_guidance(cfg_scale: float, num_classes: int) -> None:
    if cfg_scale != 1.0 and num_classes == 0:
        raise ValueError(
            f"--cfg_scale={cfg_scale}: guidance needs a class-conditional model; this one is"
            " unconditional, so leave --cfg_scale=1"
        )


def check_guidance_scale_input(cfg_scale: float, config, num_classes: int) -> None:
    """A network that reads the guidance scale as an input (improved MeanFlow) was trained on
    ``objective.meanflow_omega_range`` only: a scale outside it is refused, not extrapolated."""
    if num_classes == 0 or config.objective.name != "meanflow_v" or cfg_scale == 1.0:
        return
    low, high = tuple(config.objective.meanflow_omega_range)
    if not low <= cfg_scale <= high:
        raise ValueError(
            f"--cfg_scale={cfg_scale}: this run's network was trained for guidance scales {low} to {high}"
            " (objective.meanflow_omega_range); pick one inside them"
        )


def check_guidance_interval(interval, config, num_classes: int) -> tuple:
    """``--guidance_interval`` as a (start, end) tuple, refused unless the run's network reads it
    (improved MeanFlow trained with ``objective.meanflow_interval_input`` on labelled data)."""
    given, interval = interval, sampling.parse_interval(interval)
    if interval is None:
        shown = ",".join(map(str, given)) if isinstance(given, (list, tuple)) else given
        raise ValueError(f"--guidance_interval={shown}: give start,end with 0 <= start <= end <= 1 (e.g. 0.1,0.7)")
    reads = (
        num_classes > 0
        and config.objective.name == "meanflow_v"
        and bool(config.objective.get("meanflow_interval_input", False))
    )
    if interval != (0.0, 1.0) and not reads:
        raise ValueError(
            f"--guidance_interval={','.join(map(str, interval))}: this run's network does not read a"
            " guidance interval (only meanflow_v trained with objective.meanflow_interval_input=True); leave it out"
        )
    return interval


def resolve_labels(
    num_classes: int,
    num_images: int,
    *,
    labels: Optional[Sequence[int]] = None,
    class_label: Optional[int] = None,
    mode: str = "balanced",
    seed: int = 0,
) -> np.ndarray:
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


def load_run(
    config, workdir: str, *, step: Optional[int] = None, use_ema: Optional[bool] = None, decode: bool = True
) -> LoadedRun:
    """Restores the evaluated parameters (``eval.use_ema``/``eval.ema_index``, or ``use_ema``) of
    ``workdir``'s checkpoint ``step`` (None: the latest) for sampling, without opening the data.
    A latent run's ``exp.decode`` is the VAE the run records (``decode=False``: none, the samples
    stay latents)."""
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
        # Experiment checked the latest checkpoint; this is the one read (``step`` may be older)
        check_workdir_matches(workdir, meta, exp.meta)
        if decode and exp.decode is None and config.data.name in ("latents", PAIRS_DATA):
            exp.decode = _latent_run_decoder(config, meta, workdir)
        with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
            state, _, _ = exp.restore(ckpt, step)
        return LoadedRun(exp, exp.eval_params(state), int(jax.device_get(state.step)))
    except BaseException:
        exp.close()
        raise


def sample(
    run: LoadedRun,
    *,
    num_images: int,
    num_steps: int,
    labels=None,
    class_label: Optional[int] = None,
    cfg_scale: float = 1.0,
    guidance_interval=None,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)``: ``num_images`` samples at ``num_steps`` steps (decoded for latent
    runs), float in [-1, 1] ``[N, H, W, C]`` (points ``[N, D]``), and their int32 labels.
    ``guidance_interval``: where ``cfg_scale`` applies, for a network that reads it (None: the
    run's ``eval.guidance_interval``)."""
    exp = run.exp
    if num_images < 1:
        raise ValueError(f"--num_images={num_images} must be >= 1")
    sampling.check_budget(num_steps, exp.config.objective.num_levels)
    check_guidance(cfg_scale, run.num_classes)
    check_guidance_scale_input(cfg_scale, exp.config, run.num_classes)
    interval = check_guidance_interval(
        exp.config.eval.guidance_interval if guidance_interval is None else guidance_interval,
        exp.config,
        run.num_classes,
    )
    chosen = resolve_labels(
        run.num_classes, num_images, labels=labels, class_label=class_label, mode=exp.config.eval.label_mode, seed=seed
    )
    batch = min(batch_size or exp.config.eval.batch_size, num_images)
    parts = list(
        sample_batches(
            exp.sampler,
            run.params,
            shape=tuple(exp.spec.shape),
            num_classes=run.num_classes,
            num_samples=num_images,
            batch_size=batch,
            num_steps=num_steps,
            seed=seed,
            cfg_scale=cfg_scale,
            guidance_interval=interval,
            labels=chosen,
            decode=exp.decode,
        )
    )
    return np.concatenate([x for x, _ in parts]), chosen


def check_outputs(sample_shape: tuple, *, out: str = "", out_dir: str = "") -> None:
    """One output, and ``--out_dir`` only for images (RGB or greyscale)."""
    if bool(out) == bool(out_dir):
        raise ValueError("give --out=FILE.png (one grid) or --out_dir=DIR (one PNG per image)")
    if out_dir and (len(sample_shape) != 3 or sample_shape[-1] not in (1, 3)):
        raise ValueError(
            f"--out_dir writes images; these samples are {tuple(sample_shape)}: use --out for "
            + ("a scatter plot" if len(sample_shape) == 1 else "a grid of their first three channels")
        )


def write_images(
    samples: np.ndarray, labels: Optional[np.ndarray], *, out: str = "", out_dir: str = "", title: str = ""
) -> list[str]:
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
    pixels = to_uint8(grey_to_rgb(samples))[..., : samples.shape[-1]]
    paths = []
    for i, image in enumerate(pixels):
        name = f"{i:05d}.png" if labels is None else f"{i:05d}_class{int(labels[i])}.png"
        paths.append(os.path.join(out_dir, name))
        plots.write_png(image, paths[-1])
    return paths


def require_checkpoint(workdir: str) -> str:
    """The checkpoint folder of ``workdir`` (local or ``gs://``), refused when it holds no
    checkpoint; nothing is created."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not runs.has_steps(ckpt_dir):
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: fix --workdir (the folder a run was trained into), or train first"
            f" (python -m shortcut_jax.main --config=... --workdir={workdir})"
        )
    return ckpt_dir


def evaluate_checkpoint(
    config, workdir: str, *, step: Optional[int] = None, out_dir: Optional[str] = None
) -> dict[int, float]:
    """Evaluate a saved run at every budget of ``config.eval`` (final sample count)."""
    ckpt_dir = require_checkpoint(workdir)
    exp = Experiment(config, workdir)
    try:
        check_before_sampling(exp)
        with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
            state, _, _ = exp.restore(ckpt, step)
        step = int(jax.device_get(state.step))
        writer = None
        if out_dir is None:
            out_dir, own = offline_out_dir(exp.workdir, step)
            if own:  # completes the run's evaluation at this step, so it joins the run's metrics too
                writer = writers.MetricWriter(exp.workdir, use_tensorboard=False)
        log.info(
            "offline evaluation of step %d: writing to %s%s", step, out_dir, " and metrics.jsonl" if writer else ""
        )
        try:
            results = evaluate_state(
                exp,
                state,
                step,
                out_dir=out_dir,
                writer=writer,
                final=True,
                progress=config.train.progress_bar and jax.process_index() == 0,
            )
            log.info("done: results in %s", out_dir)
            return results
        finally:
            if writer is not None:
                writer.close()
    finally:
        exp.close()
