"""Memory per device of the train state and the step under data parallelism and FSDP.

    python -m benchmarks.memory_per_device                       # B/2 and XL/2, 1-8 devices, B/2 compiled
    python -m benchmarks.memory_per_device --variants=B --compile=B --devices=1,2,4,8 --json=mem.json
    python -m benchmarks.memory_per_device --variants=B --devices=8 --batch_per_device=32 --objective=meanflow

For DiT-B/2 and DiT-XL/2 on ImageNet-256 latents (32x32x4, 1000 classes, the paper's shortcut
recipe from ``experiments/imagenet.py``) with a fixed batch per device, each device count N runs
in a child process of its own with N simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), and for each mesh,

* ``dp``: ``mesh.data=N`` (parameters, EMA and optimiser state replicated), and
* ``fsdp``: ``mesh.fsdp=N`` (each of them split along its largest divisible dimension),

it reports

* the bytes of the train state that one device holds, counted from the shardings the run uses
  (``Experiment.state_shardings``: each leaf's shard shape times its item size), split into
  parameters, EMA parameters and optimiser state; nothing is compiled for these, so they are
  given for every variant;
* for the variants in ``--compile``, the compiled step's own figures (``memory_analysis`` of
  ``Experiment.compile_step``, per device): arguments (state and batch shard), temporaries
  (activations, gradients, collective buffers) and the peak ``arguments + temporaries`` (the
  state is donated, so outputs reuse the arguments' buffers); and the collectives in the
  compiled program, by kind: how many, and the bytes of their results per device
  (``collective_traffic``), printed below the table.

Target: fsdp parameter + optimiser bytes per device at most 1.1 x (the dp bytes / N). What
stays replicated under fsdp is what ``sharding.state_shardings`` leaves whole: arrays under
2^14 elements (biases, norms) and arrays with no dimension divisible by N.

The compiled figures come from XLA's CPU backend: float32 matmuls unless ``--dtype=bfloat16``
(accelerators use bf16 by default, ``model.dtype='auto'``) and the CPU's fusion decisions, so
temporaries on a GPU differ; the state bytes do not depend on the backend. Compiling DiT-XL/2's
step on CPU takes minutes and several GiB per device count, hence ``--compile=B`` by default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENTS = (32, 32, 4)
NUM_CLASSES = 1000
MIB = 2.0**20
TARGET = 1.1  # fsdp state per device <= TARGET * dp state / N


def imagenet_config(variant: str, devices: int, mode: str, batch_per_device: int, dtype: str, objective: str):
    spec = importlib.util.spec_from_file_location("imagenet", os.path.join(ROOT, "experiments", "imagenet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"variant={variant},objective={objective}")
    c.train.batch_size = batch_per_device * devices
    c.mesh.data, c.mesh.fsdp = (devices, 1) if mode == "dp" else (1, devices)
    c.model.dtype = dtype
    return c


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest
    shard where shards differ in size)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEM_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})


def collective_traffic(hlo_text: str) -> dict:
    """``{kind: [count, result bytes]}`` of the collectives in a compiled program's HLO text (an
    asynchronous pair counted once, at its start; a synchronous tuple result's arrays summed)."""
    import re

    op = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
    array = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
    found = {}
    for line in hlo_text.splitlines():
        match = op.search(line)
        if match is None:
            continue
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES.get(dtype, 4)
            for dtype, dims in array.findall(match.group(1))
        ]
        # an asynchronous start's result also holds its operand (and scratch): its largest array
        size = max(sizes, default=0) if match.group(3) else sum(sizes)
        entry = found.setdefault(match.group(2), [0, 0])
        entry[0] += 1
        entry[1] += size
    return found


def measure(variant: str, devices: int, mode: str, opts) -> dict:
    import jax

    from shortcut_jax.data import DataSpec
    from shortcut_jax.training.experiment import Experiment

    config = imagenet_config(variant, devices, mode, opts.batch_per_device, opts.dtype, opts.objective)
    exp = Experiment(config, None, spec=DataSpec(LATENTS, NUM_CLASSES, "images"))
    state = exp.abstract_state
    row = {
        "variant": f"{variant}/2",
        "devices": devices,
        "mode": mode,
        "batch": config.train.batch_size,
        "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "params_bytes": shard_bytes(state.params),
        "ema_bytes": shard_bytes(state.ema_params),
        "opt_bytes": shard_bytes(state.opt_state),
        "state_bytes": shard_bytes(state),
    }
    if variant in opts.compile:
        start = time.perf_counter()
        compiled, info = exp.compile_step()
        row["compile_seconds"] = time.perf_counter() - start
        mem = compiled.memory_analysis()
        row["argument_bytes"] = int(mem.argument_size_in_bytes)
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["output_bytes"] = int(mem.output_size_in_bytes)
        row["alias_bytes"] = int(mem.alias_size_in_bytes)
        row["peak_bytes"] = row["argument_bytes"] + row["temp_bytes"]
        row["collectives"] = collective_traffic(compiled.as_text())
    return row


def child(opts) -> None:
    import jax

    assert jax.device_count() == opts.child_devices, (jax.device_count(), opts.child_devices)
    for variant in opts.variants:
        for mode in ("dp", "fsdp") if opts.child_devices > 1 else ("dp",):
            print("ROW " + json.dumps(measure(variant, opts.child_devices, mode, opts)), flush=True)


def run_device_count(n: int, opts) -> list[dict]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory_per_device",
        f"--child_devices={n}",
        f"--variants={','.join(opts.variants)}",
        f"--compile={','.join(opts.compile)}",
        f"--batch_per_device={opts.batch_per_device}",
        f"--dtype={opts.dtype}",
        f"--objective={opts.objective}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0:
        print(f"[{n} devices] child failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
    return rows


def target_bytes(rows: list[dict], row: dict) -> float:
    """TARGET x the dp run's parameter + optimiser bytes per device / N, for ``row``'s model and N."""
    dp = next(r for r in rows if (r["variant"], r["devices"], r["mode"]) == (row["variant"], row["devices"], "dp"))
    return TARGET * (dp["params_bytes"] + dp["opt_bytes"]) / row["devices"]


def table(rows: list[dict]) -> str:
    """Markdown table; the 1-device run is both meshes' N=1 row."""
    by_key = {(r["variant"], r["devices"], r["mode"]): r for r in rows}
    lines = [
        "| model | N | mesh | params | EMA | optimiser | params + optimiser | target (1.1 x dp / N) | "
        "state | compiled arguments | temporaries | peak (arg + temp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mib(x):
        return "-" if x is None else f"{x / MIB:,.1f}"

    for (variant, n, mode), r in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        target = target_bytes(rows, r)
        po = r["params_bytes"] + r["opt_bytes"]
        verdict = "" if mode == "dp" else (" (met)" if po <= target else " (missed)")
        lines.append(
            f"| DiT-{variant} | {n} | {mode} | {mib(r['params_bytes'])} | {mib(r['ema_bytes'])} | "
            f"{mib(r['opt_bytes'])} | {mib(po)} | {'-' if mode == 'dp' else mib(target) + verdict} | "
            f"{mib(r['state_bytes'])} | {mib(r.get('argument_bytes'))} | {mib(r.get('temp_bytes'))} | "
            f"{mib(r.get('peak_bytes'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="B,XL", type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument(
        "--compile",
        default="B",
        type=lambda s: [v for v in s.split(",") if v],
        help="variants whose step is compiled for temporaries ('' for none)",
    )
    parser.add_argument("--devices", default="1,2,4,8", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument(
        "--batch_per_device",
        type=int,
        default=64,
        help="at 1 device the shortcut recipe needs 56 or more (7 levels at 1/8 self-consistency)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="model.dtype of the compiled step (accelerators default to bfloat16)",
    )
    parser.add_argument(
        "--objective", default="shortcut", choices=["shortcut", "flow_matching", "meanflow", "meanflow_v"]
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per device count")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--child_devices", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child_devices:
        return child(opts)
    rows = []
    for n in opts.devices:
        start = time.perf_counter()
        got = run_device_count(n, opts)
        rows += got
        print(f"[{n} device(s): {len(got)} rows in {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    print(
        f"batch {opts.batch_per_device} per device, {opts.objective}, compiled with model.dtype={opts.dtype};"
        " MiB per device"
    )
    print(table(rows))
    for r in rows:
        if r.get("collectives"):
            kinds = ", ".join(f"{k} {c} ({b / MIB:,.2f} MiB)" for k, (c, b) in sorted(r["collectives"].items()))
            print(f"collectives, DiT-{r['variant']} N={r['devices']} {r['mode']}: {kinds}")
    missed = [r for r in rows if r["mode"] == "fsdp" and r["params_bytes"] + r["opt_bytes"] > target_bytes(rows, r)]
    print(
        "target met for every fsdp row"
        if not missed
        else "target missed: " + ", ".join(f"{r['variant']} N={r['devices']}" for r in missed)
    )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
