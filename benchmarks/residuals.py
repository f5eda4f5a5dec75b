"""What the train step keeps for its backward pass, per DiT block, read from the traced program.

    python -m benchmarks.residuals                                       # DiT-B/2 shortcut, batch 256
    python -m benchmarks.residuals --rows=XL2-shortcut --lean_ops=all --residual_dtype=compute
    python -m benchmarks.residuals --rows=B2-shortcut --remat=dots --json=res.json

The step of ``benchmarks.train_step`` (same rows and model flags) is traced, not compiled or run,
so any model and batch size works on a CPU in seconds. The blocks are traced as one scan
(``model.scan_blocks=True``, whatever the flag says): the per-layer outputs of the forward scan
are exactly what autodiff stores of one block for the backward pass, stacked over the layers.
The unrolled step starts from the same set; there XLA may still drop a stored value it can
recompute inside a backward kernel (a dtype conversion, say), which a scan cannot, so these
figures are what the scanned step stores and an upper bound for the unrolled one.

``--dtype=auto`` traces with bfloat16 matmuls (what accelerators run), not the CPU's float32.
The attention is XLA's (a traced program cannot hold cuDNN's fused kernel on a machine without
it): with cuDNN on a GPU, the ``[heads, tokens, tokens]`` probabilities listed here are replaced
by the kernel's output and per-row statistics.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys

import jax
import jax.numpy as jnp

from benchmarks import train_step as ts

GIB = 2.0**30
MIB = 2.0**20


def _scans(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _scans(inner, out)
    return out


def stored_per_layer(jaxpr) -> list[tuple[int, list[tuple[tuple, str]]]]:
    """``[(layers, [(shape, dtype) of one layer's stored values])]``, one entry per forward scan
    of ``jaxpr``: a scan whose stacked outputs are all read by another scan (the backward pass
    over the same layers)."""
    scans = _scans(jaxpr.jaxpr, [])
    read = {id(v) for eqn in scans for v in eqn.invars}
    found = []
    for eqn in scans:
        ys = eqn.outvars[eqn.params["num_carry"] :]
        if ys and all(id(v) in read for v in ys):
            found.append((eqn.params["length"], [(tuple(v.aval.shape[1:]), str(v.aval.dtype)) for v in ys]))
    return found


def _mib(shape, dtype) -> float:
    return math.prod(shape) * jnp.dtype(dtype).itemsize / MIB


def row_report(row: ts.Row, batch: int, opts) -> dict:
    config = ts.row_config(row, batch, opts)
    config.model.scan_blocks = True
    if config.model.dtype == "auto":
        config.model.dtype = "bfloat16"
    if config.model.attention_impl == "cudnn":
        raise SystemExit("--attention_impl=cudnn cannot be traced here; use auto or xla (see the docstring)")
    exp = ts.experiment_for(config, row, opts)
    found = stored_per_layer(jax.make_jaxpr(exp.train_step_fn())(exp.abstract_state, exp.abstract_batch()))
    if not found:
        raise SystemExit(f"{row.name}: no forward scan over the blocks found in the traced step")
    scans = []
    for layers, values in found:
        counts = collections.Counter(values)
        lines = sorted(
            (
                {"shape": list(shape), "dtype": dtype, "count": n, "mib_per_block": n * _mib(shape, dtype)}
                for (shape, dtype), n in counts.items()
            ),
            key=lambda r: -r["mib_per_block"],
        )
        scans.append(
            {
                "layers": layers,
                "values_per_block": len(values),
                "mib_per_block": sum(r["mib_per_block"] for r in lines),
                "lines": lines,
            }
        )
    model = config.model
    return {
        "row": row.name,
        "batch": batch,
        "depth": exp.model.depth,
        "dtype": model.dtype,
        "residual_dtype": model.residual_dtype,
        "lean_ops": list(model.lean_ops),
        "remat": model.remat,
        "remat_blocks": model.remat_blocks,
        "scans": scans,
        "gib_all_blocks": sum(s["layers"] * s["mib_per_block"] for s in scans) * MIB / GIB,
    }


def print_report(r: dict) -> None:
    print(
        f"{r['row']}, batch {r['batch']}, {r['depth']} blocks: dtype={r['dtype']} residual_dtype="
        f"{r['residual_dtype']} lean_ops={tuple(r['lean_ops'])} remat={r['remat']}"
        + ("" if r["remat_blocks"] < 0 else f" (first {r['remat_blocks']} blocks)")
    )
    for scan in r["scans"]:
        print(f"| stored per block ({scan['layers']} blocks) | dtype | count | MiB per block |")
        print("|---|---|---|---|")
        for line in scan["lines"]:
            print(f"| {line['shape']} | {line['dtype']} | {line['count']} | {line['mib_per_block']:,.1f} |")
        print(f"{scan['values_per_block']} values, {scan['mib_per_block']:,.1f} MiB per block")
    print(f"stored over all {r['depth']} blocks: {r['gib_all_blocks']:,.2f} GiB")


def main(argv=None) -> list[dict]:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--json", default="", help="also write the reports here")
    own.add_argument("--rows", default="B2-shortcut")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    opts = ts.parse_args([f"--rows={mine.rows}", *rest])  # the train_step benchmark's model flags
    json_out = mine.json
    reports = []
    for row in ts.select_rows(opts.rows):
        report = row_report(row, opts.batch or row.batches[0], opts)
        print_report(report)
        reports.append(report)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(reports, f, indent=1)
    return reports


if __name__ == "__main__":
    main()
