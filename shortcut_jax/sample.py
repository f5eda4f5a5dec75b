"""Samples from a saved run at a chosen step budget: a grid PNG, or one PNG per image.

Command line::

    python -m shortcut_jax.sample --config=experiments/digits.py --workdir=workdirs/digits \\
        --num_steps=4 --num_images=64 --labels=1,2,3 --cfg_scale=1.5 --seed=0 --out=grid.png
    python -m shortcut_jax.sample --config=... --workdir=gs://bucket/run --num_steps=1 \\
        --class=207 --num_images=16 --out_dir=pngs/

``--labels`` are given to the images in turn (image ``i`` gets ``labels[i % len(labels)]``),
``--class=K`` gives every image class K, and without either the labels follow
``eval.label_mode`` (class-balanced by default). Points (2-D runs) are drawn as a scatter plot.

The library half (``load_run``, ``sample``, ``write_images``) is ``training.offline``.
"""

from __future__ import annotations

import logging
import os

from shortcut_jax.evaluation.evaluator import sample_shape
from shortcut_jax.objectives import sampling
from shortcut_jax.training.offline import (  # noqa: F401 - the library's names, reachable from the command
    LoadedRun,
    check_guidance,
    check_guidance_interval,
    check_guidance_scale_input,
    check_outputs,
    from_recorded_config,
    load_config,
    load_run,
    resolve_labels,
    sample,
    saved_spec,
    write_images,
)


# ----------------------------------------------------------------------------- command line

DEFAULT_OUT = os.path.join("samples", "step{step}_{num_steps}step.png")  # under --workdir


def define_flags(flag_values=None, argv=None):
    """The command's flags (in ``flag_values``, default absl's global ones); ``argv`` stands for
    ``sys.argv`` where ``--config.<key>`` overrides are looked for (for parsing in-process)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The run's config file (python, get_config(arg)).",
        lock_config=True,
        flag_values=fv,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints (local or gs://).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_integer(
        "num_steps", 1, "Sampling budget: a power of two up to 2^objective.num_levels.", flag_values=fv
    )
    flags.DEFINE_integer("num_images", 64, "How many images.", flag_values=fv)
    flags.DEFINE_list("labels", None, "Class labels, given to the images in turn (e.g. 1,2,3).", flag_values=fv)
    flags.DEFINE_integer("class", None, "One class label for every image.", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1: none).", flag_values=fv)
    flags.DEFINE_list(
        "guidance_interval",
        None,
        "start,end: the t range (1 = noise) where --cfg_scale applies, for a network trained to read it"
        " (meanflow_v with objective.meanflow_interval_input); default: the run's eval.guidance_interval.",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "Noise and label seed.", flag_values=fv)
    flags.DEFINE_bool("use_ema", None, "Sample with the EMA weights (default: eval.use_ema).", flag_values=fv)
    flags.DEFINE_string(
        "out",
        None,
        "Grid PNG (scatter plot for points); default, without --out_dir:"
        " <workdir>/samples/step<step>_<num_steps>step.png.",
        flag_values=fv,
    )
    flags.DEFINE_string("out_dir", "", "Folder for one PNG per image.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    return fv


def run(fv) -> list[str]:
    """The command; returns the files written."""
    from ml_collections import config_flags

    # neither --out nor --out_dir: a grid beside the run's other outputs, named once the step is known
    default_out = fv.out is None and not fv.out_dir
    out = DEFAULT_OUT if default_out else (fv.out or "")
    check_outputs((0, 0, 3), out=out, out_dir=fv.out_dir)  # one of them; the shape is checked below
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
    config = from_recorded_config(fv.config, fv.workdir, config_flags.get_override_values(fv["config"]))
    sampling.check_budget(fv.num_steps, levels or config.objective.num_levels)
    resolve_labels(spec.num_classes, fv.num_images, labels=labels, class_label=class_label)
    check_guidance(fv.cfg_scale, spec.num_classes)
    check_guidance_scale_input(fv.cfg_scale, config, spec.num_classes)
    interval = check_guidance_interval(
        config.eval.guidance_interval if fv.guidance_interval is None else fv.guidance_interval,
        config,
        spec.num_classes,
    )
    if spec.kind == "points":
        check_outputs(spec.shape, out=out, out_dir=fv.out_dir)
    loaded = load_run(config, fv.workdir, step=fv.step, use_ema=fv.use_ema)
    try:
        # latents: what the run's decoder makes of them (traced, not compiled)
        check_outputs(sample_shape(spec, loaded.exp.decode), out=out, out_dir=fv.out_dir)
        samples, chosen = sample(
            loaded,
            num_images=fv.num_images,
            num_steps=fv.num_steps,
            labels=labels,
            class_label=class_label,
            cfg_scale=fv.cfg_scale,
            guidance_interval=interval,
            seed=fv.seed,
        )
    finally:
        loaded.close()
    if default_out:
        out = os.path.join(fv.workdir, DEFAULT_OUT.format(step=loaded.step, num_steps=fv.num_steps))
        os.makedirs(os.path.dirname(out), exist_ok=True)
    paths = write_images(
        samples,
        chosen if spec.num_classes else None,
        out=out,
        out_dir=fv.out_dir,
        title=f"{fv.num_steps} step(s), step {loaded.step}",
    )
    logging.info("done: results in %s", fv.out_dir or out)
    print(
        f"wrote {len(paths)} file(s): {paths[0]}{' ...' if len(paths) > 1 else ''}"
        f" ({fv.num_images} samples at {fv.num_steps} step(s), checkpoint step {loaded.step})"
    )
    return paths


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    cli.run_flags(define_flags(), run)
