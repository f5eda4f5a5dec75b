"""Collect evaluation results of several runs into one table and plots.

Reads ``<workdir>/metrics.jsonl`` of each run (the ``eval/<metric>_<n>step`` rows written at
every evaluation) and prints, for the last evaluated step of each run, the metric at every
budget, and writes a plot of the metric at chosen budgets against training steps, for each
shortcut run the self-consistency loss of every level against training steps (which levels learn
late), and one image of the runs' sample grids side by side (a row per run, a column per budget)
at the last step whose grids every run saved:

    python -m benchmarks.budget_study --runs recipe=workdirs/c10_recipe \\
        fm=workdirs/c10_fm online=workdirs/c10_online --metric cfd --out results/cifar10
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import Optional

from PIL import Image, ImageDraw

from shortcut_jax.infra import writers
from shortcut_jax.evaluation import report


def _series(rows: list[dict], pattern: str) -> dict[int, dict[int, float]]:
    """{n: {training step: value}} for every key matching ``pattern`` (one integer group n);
    later rows win (a resumed run repeats steps)."""
    regex = re.compile(pattern)
    out: dict[int, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            m = regex.match(key)
            if m:
                out.setdefault(int(m.group(1)), {})[int(row["step"])] = float(value)
    return out


def read_evals(
    workdir: str, metric: str, samples: Optional[dict[int, int]] = None, rows: Optional[list[dict]] = None
) -> dict[int, dict[int, float]]:
    """{training step: {budget: value}}; later lines win (a resumed run repeats steps).

    ``samples``, if given, receives {training step: number of samples} where the run logged it;
    ``rows``: the run's metrics if already read.
    """
    rows = writers.read_metrics(workdir) if rows is None else rows
    if samples is not None:
        samples.update({int(r["step"]): int(r["eval/num_samples"]) for r in rows if "eval/num_samples" in r})
    out: dict[int, dict[int, float]] = {}
    for budget, curve in _series(rows, rf"^eval/{re.escape(metric)}_(\d+)step$").items():
        for step, value in curve.items():
            out.setdefault(step, {})[budget] = value
    return out


def read_level_losses(workdir: str, rows: Optional[list[dict]] = None) -> dict[str, dict[int, float]]:
    """{'level k': {training step: self-consistency loss of level k}} from the logged metrics."""
    rows = writers.read_metrics(workdir) if rows is None else rows
    levels = _series(rows, r"^sc_loss/level_(\d+)$")
    return {f"level {k} ({2**k} step{'s' if k else ''})": levels[k] for k in sorted(levels)}


def curve_steps(evals: dict[int, dict[int, float]], samples: dict[int, int]) -> list[int]:
    """Steps whose evaluations share the most common sample count (a Frechet distance from fewer
    samples is biased upwards, so points from different counts do not belong on one curve)."""
    if not samples:
        return sorted(evals)
    counts = [samples.get(step) for step in evals]
    common = max(set(counts), key=lambda c: (counts.count(c), c or 0))
    return sorted(step for step in evals if samples.get(step) == common)


def saved_grids(workdir: str) -> dict[int, dict[int, str]]:
    """{training step: {budget: path}} of the sample grids a run saved (``eval/<step>/samples_<n>step.png``)."""
    out: dict[int, dict[int, str]] = {}
    for path in glob.glob(os.path.join(workdir, "eval", "*", "samples_*step.png")):
        step, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
        if step.isdigit():
            out.setdefault(int(step), {})[int(re.match(r"samples_(\d+)step", name).group(1))] = path
    return out


def compose_grids(runs: dict[str, str], step: int, path: str, label_px: int = 24) -> Optional[str]:
    """One image of every run's sample grid at ``step``: a row per run (in the given order), a
    column per budget that every run saved; returns the path, or None when no budget is shared."""
    per_run = {name: saved_grids(workdir).get(step, {}) for name, workdir in runs.items()}
    budgets = sorted(set.intersection(*(set(g) for g in per_run.values()))) if per_run else []
    if not budgets:
        return None
    tiles = {(name, n): Image.open(per_run[name][n]).convert("RGB") for name in runs for n in budgets}
    h = max(t.height for t in tiles.values())
    w = max(t.width for t in tiles.values())
    gap = 4
    canvas = Image.new("RGB", (label_px * 4 + len(budgets) * (w + gap), label_px + len(runs) * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(budgets):
        draw.text((label_px * 4 + j * (w + gap) + w // 2 - 20, 6), f"{n} step{'s' if n > 1 else ''}", fill="black")
    for i, name in enumerate(runs):
        top = label_px + i * (h + gap)
        draw.text((4, top + h // 2), name[:14], fill="black")
        for j, n in enumerate(budgets):
            canvas.paste(tiles[(name, n)], (label_px * 4 + j * (w + gap), top))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="name=workdir pairs")
    parser.add_argument("--metric", default="cfd")
    parser.add_argument("--curve_budgets", default="1,4,128")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    rows = {name: writers.read_metrics(path) for name, path in runs.items()}
    samples = {name: {} for name in runs}
    evals = {name: read_evals(path, args.metric, samples[name], rows[name]) for name, path in runs.items()}
    budgets = sorted({n for ev in evals.values() for per in ev.values() for n in per})
    print(f"{args.metric} at the last evaluated step of each run")
    print("| run | step | samples | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in budgets) + " |")
    print("|---|---|---|" + "---|" * len(budgets))
    final = {}
    for name, ev in evals.items():
        if not ev:
            print(f"| {name} | - | no evaluations |")
            continue
        step = max(ev)
        final[name] = ev[step]
        print(
            f"| {name} | {step} | {samples[name].get(step, '-')} | "
            + " | ".join(f"{ev[step].get(n, float('nan')):.2f}" for n in budgets)
            + " |"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report.plot_budget_curve(
            final, os.path.join(args.out, f"{args.metric}_by_budget.png"), metric_name=args.metric, log_y=True
        )
        for n in (int(b) for b in args.curve_budgets.split(",")):
            curves = {
                name: {s: ev[s][n] for s in curve_steps(ev, samples[name]) if n in ev[s]} for name, ev in evals.items()
            }
            report.plot_metric_vs_training(
                curves,
                os.path.join(args.out, f"{args.metric}_{n}step_vs_training.png"),
                metric_name=f"{args.metric}, {n} step(s)",
                log_y=True,
            )
        for name, path in runs.items():  # which levels learn late: the loss of each level through training
            levels = read_level_losses(path, rows[name])
            if levels:
                report.plot_metric_vs_training(
                    levels,
                    os.path.join(args.out, f"sc_loss_by_level_{name}.png"),
                    metric_name="self-consistency loss",
                    title=name,
                    log_y=True,
                )
        shared = set.intersection(*(set(saved_grids(path)) for path in runs.values()))
        if shared:
            composed = compose_grids(runs, max(shared), os.path.join(args.out, f"samples_step{max(shared)}.png"))
            print(f"sample grids at step {max(shared)}: {composed}")
        with open(os.path.join(args.out, f"{args.metric}_runs.json"), "w") as f:
            json.dump(
                {
                    name: {
                        str(s): {"samples": samples[name].get(s), **{str(n): v for n, v in per.items()}}
                        for s, per in ev.items()
                    }
                    for name, ev in evals.items()
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
