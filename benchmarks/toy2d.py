"""Shortcut against flow matching on a 2-D distribution: sliced Wasserstein distance per budget.

Trains the same MLP for the same steps with both objectives and several seeds (the config is
``experiments/toy2d.py``), evaluates each at budgets 1..128 on 10,000 points, and prints the
table with the data-against-data floor and the project's targets:
- the shortcut model's 128-step distance is at most 2x the floor;
- its 1-step distance is at most 1.5x its 128-step distance;
- flow matching's 1-step distance is at least 3x the shortcut model's.

    python -m benchmarks.toy2d --seeds=3 --steps=4000 --out=toy2d_results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg: str, overrides: dict | None = None):
    """``experiments/toy2d.py:arg`` with ``{'section.key': value}`` overrides applied, as the
    ``--config.section.key=value`` flags would."""
    spec = importlib.util.spec_from_file_location("toy2d_config", os.path.join(ROOT, "experiments", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for dotted, value in (overrides or {}).items():
        *path, key = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        node[key] = value
    return config


def parse_overrides(text: str) -> dict:
    """'objective.teacher=ema,train.ema_debias=True' -> {'objective.teacher': 'ema', ...}; values
    are Python literals where they parse as one, strings otherwise."""
    import ast

    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def run_one(arg: str, overrides: dict, workdir: str) -> tuple[dict[int, float], float, float]:
    from shortcut_jax.training import loop

    config = load_config(arg, overrides)
    config.train.progress_bar = False
    config.train.use_tensorboard = False
    start = time.perf_counter()
    state = loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    step = int(state.step)
    with open(os.path.join(workdir, "eval", f"{step:08d}", "distance_by_budget.json")) as f:
        table = json.load(f)
    results = {int(r["steps"]): float(r[table["metric_name"]]) for r in table["rows"]}
    return results, float(table["floor"]), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="checkerboard")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=0, help="seeds are first_seed .. first_seed + seeds - 1")
    parser.add_argument("--extra", default="", help="config overrides for every run, e.g. objective.teacher=ema")
    parser.add_argument(
        "--objectives",
        default="shortcut,flow_matching",
        help="objectives to run; flow matching ignores the shortcut-only --extra keys",
    )
    parser.add_argument("--out", default="", help="directory for the table, plot and JSON")
    args = parser.parse_args()

    from shortcut_jax.infra import writers
    from shortcut_jax.evaluation import report

    writers.quiet_library_logs()

    runs: dict[str, list[dict[int, float]]] = {name: [] for name in args.objectives.split(",")}
    floors = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in runs:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                overrides = {
                    "data.name": args.dataset,
                    "train.steps": args.steps,
                    "seed": seed,
                    **parse_overrides(args.extra),
                }
                res, floor, seconds = run_one(
                    f"objective={objective}", overrides, os.path.join(tmp, f"{objective}_{seed}")
                )
                runs[objective].append(res)
                floors.append(floor)
                print(
                    f"{objective} seed {seed}: {seconds:.0f} s, "
                    + ", ".join(f"{n}: {v:.4f}" for n, v in sorted(res.items())),
                    flush=True,
                )

    budgets = sorted(next(iter(runs.values()))[0])
    floor = float(np.mean(floors))
    stats = {
        name: {n: (float(np.mean([r[n] for r in rs])), float(np.std([r[n] for r in rs]))) for n in budgets}
        for name, rs in runs.items()
    }
    print(
        f"\nsliced Wasserstein distance ({args.dataset}, {args.steps} steps, {args.seeds} seeds, mean ± std);"
        f" data-against-data floor {floor:.4f}"
    )
    print("| steps | " + " | ".join(stats) + " |\n|---|" + "---|" * len(stats))
    for n in budgets:
        print(f"| {n} | " + " | ".join(f"{s[n][0]:.4f} ± {s[n][1]:.4f}" for s in stats.values()) + " |")
    checks = []
    if "shortcut" in stats:
        sc1, sc128 = stats["shortcut"][1][0], stats["shortcut"][128][0]
        checks += [
            (f"shortcut 128-step <= 2x floor: {sc128:.4f} <= {2 * floor:.4f}", sc128 <= 2 * floor),
            (f"shortcut 1-step <= 1.5x its 128-step: {sc1:.4f} <= {1.5 * sc128:.4f}", sc1 <= 1.5 * sc128),
        ]
        if "flow_matching" in stats:
            fm1 = stats["flow_matching"][1][0]
            checks.append((f"flow matching 1-step >= 3x shortcut 1-step: {fm1:.4f} >= {3 * sc1:.4f}", fm1 >= 3 * sc1))
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report.plot_budget_curve(
            {k: {n: v[0] for n, v in s.items()} for k, s in stats.items()},
            os.path.join(args.out, "toy2d_budgets.png"),
            metric_name="sliced Wasserstein",
            floor=floor,
            stds={k: {n: v[1] for n, v in s.items()} for k, s in stats.items()},
            title=f"{args.dataset}, {args.steps} steps",
        )
        with open(os.path.join(args.out, "toy2d_results.json"), "w") as f:
            json.dump(
                {
                    "floor": floor,
                    "stats": stats,
                    "runs": runs,
                    "checks": checks,
                    "steps": args.steps,
                    "seeds": args.seeds,
                    "dataset": args.dataset,
                    "extra": args.extra,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
