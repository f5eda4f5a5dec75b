"""Levers measured against a baseline in the same call: a table of train-step variants.

Each variant is a name, extra XLA flags and extra ``train_step`` arguments, written
``NAME|XLA_FLAGS|ARGS``; every variant runs the chosen rows in fresh processes (``train_step``
runs each row in its own child), one after the other, ``--repeats`` times round-robin, so that
a drift of the card's clock shows as a spread rather than as a lever's effect. The first
variant is the baseline the others are compared with:

    python -m benchmarks.lever_sweep --rows=B2-shortcut --out=levers.json \\
        --variants "base||" "triton_gemm|--xla_gpu_triton_gemm_any=true|" \\
        "cuda_graphs_off|--xla_gpu_enable_command_buffer=|" "host_init||--init_on=host"

Prints, per row and variant, the median images/s over the repeats, the spread, the change
against the baseline, peak memory, compile and initialisation time. A variant whose flags the
installed XLA does not know fails alone (its error is kept in the JSON) and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import train_step


def parse_variant(spec: str) -> dict:
    parts = spec.split("|")
    if len(parts) != 3 or not parts[0].strip():
        raise ValueError(
            f"--variants entry {spec!r}: write NAME|XLA_FLAGS|TRAIN_STEP_ARGS (either part may be"
            " empty, the name may not), e.g. 'triton|--xla_gpu_triton_gemm_any=true|'"
        )
    name, flags, args = (p.strip() for p in parts)
    return {"name": name, "xla_flags": flags, "args": shlex.split(args)}


def run_variant(variant: dict, rows: str, common: list[str]) -> dict:
    """One ``train_step`` call for a variant; its report (or the error that stopped it)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), variant["xla_flags"]) if f)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            f"--rows={rows}",
            "--sections=train",
            "--quiet",
            f"--out={out}",
            *common,
            *variant["args"],
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        report = None
        if os.path.exists(out):
            with open(out) as f:
                report = json.load(f)
    errors = list(report["errors"]) if report else []
    if proc.returncode != 0 and not errors:
        errors.append(f"train_step exited with {proc.returncode}: " + "\n".join(proc.stderr.strip().splitlines()[-10:]))
    return {"rows": report["rows"] if report else [], "errors": errors, "seconds": seconds}


def sweep(variants: list[dict], rows: str, common: list[str], repeats: int, log=print) -> dict:
    runs = {v["name"]: [] for v in variants}
    for r in range(repeats):
        for v in variants:
            result = run_variant(v, rows, common)
            runs[v["name"]].append(result)
            done = (
                ", ".join(
                    f"{x['name']} {x['images_per_s']:.0f} img/s" for x in result["rows"] if x.get("status") == "ok"
                )
                or "no row ran: " + "; ".join(result["errors"])[:300]
            )
            log(f"  [{r + 1}/{repeats}] {v['name']}: {done} ({result['seconds']:.0f} s)")
    table = []
    base = variants[0]["name"]
    for v in variants:
        by_row: dict[str, list[dict]] = {}
        for result in runs[v["name"]]:
            for row in result["rows"]:
                by_row.setdefault(row["name"], []).append(row)
        for row_name, results in by_row.items():
            ok = [x for x in results if x.get("status") == "ok"]
            line = {
                "variant": v["name"],
                "row": row_name,
                "runs": len(results),
                "ok": len(ok),
                "status": "ok" if ok else results[-1].get("status", "failed"),
            }
            if ok:
                rates = [x["images_per_s"] for x in ok]
                line.update(
                    images_per_s=statistics.median(rates),
                    min=min(rates),
                    max=max(rates),
                    step_ms=statistics.median(x["step_ms"] for x in ok),
                    peak_gib=max(x["peak_gib"] or 0.0 for x in ok),
                    compile_s=statistics.median(x["compile_s"] for x in ok),
                    init_s=statistics.median(x["init_s"] for x in ok),
                    final_loss=ok[-1]["final_loss"],
                )
            table.append(line)
    for line in table:
        ref = next((x for x in table if x["variant"] == base and x["row"] == line["row"]), None)
        if ref and "images_per_s" in ref and "images_per_s" in line:
            line["vs_base"] = line["images_per_s"] / ref["images_per_s"] - 1.0
    return {"variants": variants, "rows": rows, "common_args": common, "repeats": repeats, "table": table, "runs": runs}


def print_table(result: dict) -> None:
    header = ["variant", "row", "img/s", "min-max", "vs base", "step ms", "peak GiB", "compile s", "init s", "ok"]
    lines = []
    for x in result["table"]:
        if "images_per_s" not in x:
            lines.append([x["variant"], x["row"], x["status"], "", "", "", "", "", "", f"{x['ok']}/{x['runs']}"])
            continue
        vs = "base" if x["variant"] == result["variants"][0]["name"] else f"{x.get('vs_base', float('nan')):+.1%}"
        lines.append(
            [
                x["variant"],
                x["row"],
                f"{x['images_per_s']:.0f}",
                f"{x['min']:.0f}-{x['max']:.0f}",
                vs,
                f"{x['step_ms']:.2f}",
                f"{x['peak_gib']:.2f}",
                f"{x['compile_s']:.1f}",
                f"{x['init_s']:.1f}",
                f"{x['ok']}/{x['runs']}",
            ]
        )
    train_step.print_table(header, lines, text_columns=2)
    for v in result["variants"]:
        errors = [e for run in result["runs"][v["name"]] for e in run["errors"]]
        if errors:
            print(f"\n{v['name']}: {errors[-1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="B2-shortcut", help="train_step rows, comma-separated")
    p.add_argument(
        "--variants", nargs="+", required=True, help="NAME|XLA_FLAGS|TRAIN_STEP_ARGS; the first is the baseline"
    )
    p.add_argument("--repeats", type=int, default=1, help="round-robin passes over the variants")
    p.add_argument(
        "--common", default="", help="train_step arguments every variant gets, e.g. '--steps=10 --remat=dots'"
    )
    p.add_argument("--out", default="", help="write the table and every run as JSON here")
    opts = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in opts.variants]
    except ValueError as err:
        p.error(str(err))
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        p.error(f"--variants: names must differ, got {names}")
    if opts.repeats < 1:
        p.error("--repeats must be >= 1")
    train_step.select_rows(opts.rows)  # a misspelt row fails here, before any variant runs
    result = sweep(variants, opts.rows, shlex.split(opts.common), opts.repeats)
    print()
    print_table(result)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if any("images_per_s" in x for x in result["table"]) else 1


if __name__ == "__main__":
    sys.exit(main())
