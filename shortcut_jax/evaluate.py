"""Command: evaluation of a saved run at several step budgets.

The work is ``training.offline.evaluate_checkpoint`` (which builds the run) and
``evaluation.evaluator`` (sampling at every budget, the metric, tables and plots).

Command line (evaluates the latest checkpoint of a run)::

    python -m shortcut_jax.evaluate --config=experiments/toy2d.py --workdir=/tmp/toy
    python -m shortcut_jax.evaluate --config=experiments/imagenet.py:variant=B --workdir=DIR \
        --metric=fid --num_samples=50000 --budgets=1,2,4,8,16,32,64,128 \
        --fid_reference=VIRTUAL_imagenet256_labeled.npz --cfg_scale=1.5 --export_npz=samples_{steps}step.npz

Flags ``--metric --num_samples --budgets --cfg_scale --use_ema --label_mode --fid_reference
--fid_weights --export_npz --export_budgets`` set the ``eval`` keys of the same names
(``--num_samples`` sets ``eval.final_num_samples``) and win over ``--config.eval.<key>``.

Without ``--out_dir`` the results go to ``<workdir>/eval/<step>/`` and into the run's
``metrics.jsonl`` when that step has no finished evaluation (a run stopped during its final
evaluation is completed as the training loop would have done it); otherwise to the first free
``eval/<step>_offline<k>/``, and the run's own results are left as they are.
"""

from __future__ import annotations

from typing import Optional

from shortcut_jax.evaluation.evaluator import (  # noqa: F401 - the library's names, reachable from the command
    FINISHED,
    TABLE,
    check_before_sampling,
    draw_samples,
    evaluate_budgets,
    evaluate_state,
    offline_out_dir,
    sample_shape,
)
from shortcut_jax.evaluation.metrics import build_metric
from shortcut_jax.training.offline import (  # noqa: F401
    evaluate_checkpoint,
    from_recorded_config,
    require_checkpoint,
    saved_spec,
)


# ----------------------------------------------------------------------------- command line


def _ints(values, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{flag}={','.join(values)}: give integers separated by commas, e.g. 1,2,4") from None


def apply_overrides(
    config,
    *,
    metric: Optional[str] = None,
    num_samples: Optional[int] = None,
    budgets=None,
    cfg_scale: Optional[float] = None,
    use_ema: Optional[bool] = None,
    label_mode: Optional[str] = None,
    export_npz: Optional[str] = None,
    export_budgets=None,
    fid_reference: Optional[str] = None,
    fid_weights: Optional[str] = None,
):
    """The command line's flags set onto ``config.eval`` (None: leave the key as it is).

    ``num_samples`` sets ``eval.final_num_samples``: an offline evaluation is a final one.
    ``export_npz`` without ``export_budgets`` exports every evaluated budget.
    """
    ev = config.eval
    if metric is not None:
        ev.metric = metric
    if num_samples is not None:
        ev.final_num_samples = int(num_samples)
    if budgets is not None:
        ev.budgets = _ints(budgets, "budgets")
        # grids only of the budgets asked for (those of the config among them, else all of them)
        ev.grid_budgets = tuple(n for n in ev.grid_budgets if n in ev.budgets) or tuple(ev.budgets)
    if cfg_scale is not None:
        ev.cfg_scale = float(cfg_scale)
    if use_ema is not None:
        ev.use_ema = bool(use_ema)
    if label_mode is not None:
        ev.label_mode = label_mode
    if fid_reference is not None:
        ev.fid_reference = fid_reference
    if fid_weights is not None:
        ev.fid_weights = fid_weights
    if export_budgets is not None:
        ev.export_budgets = _ints(export_budgets, "export_budgets")
    if export_npz is not None:
        ev.export_npz = export_npz
        if not ev.export_budgets:
            ev.export_budgets = tuple(ev.budgets)
    return config


def define_flags(flag_values=None, argv=None):
    """The command's flags (in ``flag_values``, default absl's global ones); ``argv`` stands for
    ``sys.argv`` where ``--config.<key>`` overrides are looked for (for parsing in-process)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file (python, get_config(arg)).",
        lock_config=True,
        flag_values=fv,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints (local or gs://).", flag_values=fv)
    flags.DEFINE_string(
        "out_dir", "", "Where to write tables and plots (default <workdir>/eval/<step>).", flag_values=fv
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).", flag_values=fv)
    flags.DEFINE_string("metric", None, "eval.metric: fid, cfd, sliced_wasserstein, none, auto.", flag_values=fv)
    flags.DEFINE_integer(
        "num_samples", None, "Samples per budget (sets eval.final_num_samples), e.g. 50000.", flag_values=fv
    )
    flags.DEFINE_list("budgets", None, "eval.budgets, e.g. 1,2,4,8,16,32,64,128.", flag_values=fv)
    flags.DEFINE_float("cfg_scale", None, "eval.cfg_scale (1: no guidance).", flag_values=fv)
    flags.DEFINE_bool(
        "use_ema", None, "eval.use_ema: sample with the EMA weights (false: the online ones).", flag_values=fv
    )
    flags.DEFINE_string("label_mode", None, "eval.label_mode: balanced or random.", flag_values=fv)
    flags.DEFINE_string("fid_reference", None, "eval.fid_reference: FID reference statistics (.npz).", flag_values=fv)
    flags.DEFINE_string(
        "fid_weights", None, "eval.fid_weights: FID Inception weights (.pth or converted .npz).", flag_values=fv
    )
    flags.DEFINE_string(
        "export_npz",
        None,
        "eval.export_npz: write the samples as ADM .npz files, a name with"
        " {steps} (relative to the evaluation folder); every budget unless --export_budgets.",
        flag_values=fv,
    )
    flags.DEFINE_list("export_budgets", None, "eval.export_budgets: budgets whose samples are written.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    return fv


def run(fv) -> dict[int, float]:
    """The command: the flags' overrides on the config, then :func:`evaluate_checkpoint`."""
    from ml_collections import config_flags

    require_checkpoint(fv.workdir)
    config = from_recorded_config(fv.config, fv.workdir, config_flags.get_override_values(fv["config"]))
    config = apply_overrides(
        config,
        metric=fv.metric,
        num_samples=fv.num_samples,
        budgets=fv.budgets,
        cfg_scale=fv.cfg_scale,
        use_ema=fv.use_ema,
        label_mode=fv.label_mode,
        export_npz=fv.export_npz,
        export_budgets=fv.export_budgets,
        fid_reference=fv.fid_reference,
        fid_weights=fv.fid_weights,
    )
    results = evaluate_checkpoint(config, fv.workdir, step=fv.step, out_dir=fv.out_dir or None)
    metric = build_metric(config.eval, saved_spec(fv.workdir, fv.step)[0].kind)  # 'auto' resolved
    for n, value in sorted(results.items()):
        print(f"{metric.name if metric else config.eval.metric} at {n} step(s): {value:.6g}")
    return results


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    cli.run_flags(define_flags(), run)
