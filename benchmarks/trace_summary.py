"""Where the time of a profiled step goes: a table from a ``jax.profiler`` trace.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` (what ``train.profile_steps`` and the
train-step benchmark's ``--profile_dir`` write) leaves ``perfetto_trace.json.gz`` under
``dir/plugins/profile/<time>/``: Chrome trace events, one lane (thread) per host thread and, on
an accelerator, per device stream. This reads it and prints, for each device lane (or, where
the trace has none, as on CPU, each host lane), the busy time, the events that take the most
time and a split into kernel categories (matmul, attention, fusion, copy, collective, other),
so that the next lever is chosen by the measured time share:

    python -m benchmarks.trace_summary workdirs/run/profile --steps=3

Event names are whatever the backend records (kernel names on GPU streams, HLO op names on
"XLA Ops" lanes); the categories are matched on them by the patterns in ``CATEGORIES``.

Where the compiled step's HLO text lies beside the trace (``train_step.hlo.txt``, written by
both profiling paths; ``--hlo`` names another), each XLA-generated kernel is also attributed to
the place in the model that produced it, from the ``op_name`` jax records on every HLO
instruction: ``bwd DiT/block_*/mlp`` is the backward pass of every block's MLP, summed over the
blocks. Library kernels (cuBLAS GEMMs, cuDNN attention) carry no such name and are listed by
category. The same HLO gives the bytes each XLA kernel (fusion or copy) reads and writes, so the
listing also shows the memory rate a kernel reached, and each lane how much of its time went to
XLA's own kernels at what average rate: against the card's bandwidth (about 3.35 TB/s on an H100
SXM) this says how much a memory-bound kernel could still gain. Every operand and output counts
whole, once: a kernel that reads only a slice of an operand is credited with more than it moved.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Optional

from shortcut_jax.training.loop import HLO_FILE, write_hlo  # noqa: F401 - re-exported for profiling callers

# First match wins; matched case-insensitively against the event name.
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    # nvjet_*: cuBLAS's Hopper GEMM kernels (what an H100 trace of jax 0.11 shows for most matmuls)
    ("matmul", r"gemm|nvjet|cublas|cutlass|xmma|wgmma|matmul|\bdot\b|dot_general|dot\.|convolution"),
    ("collective", r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|collective|all-to-all"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic-update-slice"),
    ("fusion", r"fusion|loop_|input_|wrapped_|reduce|triton|elementwise|kernel"),
)
DEVICE_PROCESS = re.compile(r"/device:|gpu|tpu", re.IGNORECASE)
_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bmetadata=\{[^}]*?\bop_name="([^"]*)"')
_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
KERNEL_OPCODES = ("fusion", "copy")  # instructions that run as one XLA-generated kernel


def kernel_name(instruction: str) -> str:
    """The name XLA's GPU backend gives the kernel of an HLO instruction ('.' and '-' -> '_')."""
    return re.sub(r"[.\-]", "_", instruction)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Kernel name -> the ``op_name`` jax recorded for the instruction (first one of a name)."""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = _HLO_OP.match(line)
        if m:
            out.setdefault(kernel_name(m.group(1)), m.group(2))
    return out


def shape_bytes(shape: str) -> Optional[int]:
    """Bytes of an HLO shape string ('bf16[256,3072]{1,0}', a tuple of them, 'f32[]'); None if a
    dtype is unknown."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            return None
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * DTYPE_BYTES[dtype]
    return total


def _closing(text: str, start: int) -> Optional[int]:
    """Index of the ')' that closes the '(' at ``text[start]``, or None."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return i
    return None


def _split_definition(rest: str) -> Optional[tuple[str, str, str]]:
    """'SHAPE opcode(operands), attrs' -> (SHAPE, opcode, operands), brackets balanced."""
    if rest.startswith("("):  # a tuple shape
        end = _closing(rest, 0)
        if end is None:
            return None
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    end = _closing(rest, m.end() - 1) if m else None
    return None if end is None else (shape, m.group(1), rest[m.end() : end])


def hlo_kernel_bytes(hlo_text: str) -> dict[str, int]:
    """Kernel name -> bytes its instruction reads and writes (operands and output, each whole and
    once), for fusions and copies whose operand shapes the text defines."""
    shapes: dict[str, Optional[int]] = {}
    kernels: list[tuple[str, str, str]] = []
    for line in hlo_text.splitlines():
        m = _HLO_DEF.match(line)
        if not m:
            continue
        parts = _split_definition(line[m.end() :])
        if parts is None:
            continue
        shape, opcode, operands = parts
        shapes[m.group(1)] = shape_bytes(shape)
        if opcode in KERNEL_OPCODES:
            kernels.append((m.group(1), shape, operands))
    out: dict[str, int] = {}
    for name, shape, operands in kernels:
        sizes = [shape_bytes(shape)] + [shapes.get(op) for op in dict.fromkeys(re.findall(r"%([\w.\-]+)", operands))]
        if all(s is not None for s in sizes):
            out.setdefault(kernel_name(name), sum(sizes))
    return out


def scope(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp(DiT))/block_11/mlp/mul' -> 'bwd DiT/block_*/mlp'.

    The last component (the primitive) is dropped, transformation wrappers are unwrapped and
    numbered module names merged, so that one scope sums a layer over the blocks. 'fwd' and
    'bwd' mark the forward and backward pass of a differentiated function (passes inside the
    loss under stop_gradient, like the teacher's, count as 'fwd'); work outside it (the
    optimizer and EMA updates) has no prefix.
    """
    parts = op_name.split("/")
    if parts and parts[0].startswith("jit("):
        parts = parts[1:]
    direction = (
        "bwd "
        if any(p.startswith("transpose(") for p in parts)
        else "fwd "
        if any(p.startswith("jvp(") for p in parts)
        else ""
    )
    clean = []
    for part in parts[:-1]:
        while (m := re.fullmatch(r"[\w.]+\((.*)\)", part)) is not None:
            part = m.group(1)
        if part:
            clean.append(re.sub(r"_\d+", "_*", part))
    return direction + ("/".join(clean) or "(top level)")


def _newest_below(path: str, name: str) -> Optional[str]:
    """The most recently written file called ``name`` (a glob pattern) anywhere below ``path``."""
    found = glob.glob(os.path.join(path, "**", name), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def find_trace(path: str) -> str:
    """``path`` itself if it is a trace file, else the newest perfetto trace below it."""
    if os.path.isfile(path):
        return path
    found = _newest_below(path, "perfetto_trace.json.gz") or _newest_below(path, "*.trace.json.gz")
    if not found:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz below {path!r}: trace with jax.profiler.trace(dir, create_perfetto_trace=True)"
        )
    return found


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: nested events count once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(
    events: list[dict],
    top: int = 15,
    op_names: Optional[dict[str, str]] = None,
    kernel_bytes: Optional[dict[str, int]] = None,
) -> dict:
    """Lanes with their busy time, top events and category split (times in milliseconds); with
    ``op_names`` (``hlo_op_names``) also the time by model scope; with ``kernel_bytes``
    (``hlo_kernel_bytes``) the memory rate of each XLA kernel and of all of them together."""
    process_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process_names[e.get("pid")] = e.get("args", {}).get("name", str(e.get("pid")))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread_names[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    lanes = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("dur") is not None:
            lanes[(e.get("pid"), e.get("tid"))].append(e)
    device = {k for k in lanes if DEVICE_PROCESS.search(process_names.get(k[0], ""))}
    chosen = device or set(lanes)
    out = []
    for key in sorted(chosen, key=lambda k: (process_names.get(k[0], ""), thread_names.get(k, ""))):
        evs = lanes[key]
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += float(e["dur"])
        by_category = collections.defaultdict(float)
        by_scope = collections.defaultdict(float)
        for name, (_, dur) in by_name.items():  # classified once per distinct name
            kind = category(name)
            by_category[kind] += dur
            if op_names is not None:
                op = op_names.get(kernel_name(name))
                by_scope[scope(op) if op else f"({kind}, no scope)"] += dur
        summed = sum(v[1] for v in by_name.values())

        def shares(totals: dict) -> dict:
            return {
                k: {"ms": v / 1e3, "share": v / summed if summed else 0.0}
                for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
            }

        busy = _busy_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs])
        start = min(float(e["ts"]) for e in evs)
        end = max(float(e["ts"]) + float(e["dur"]) for e in evs)
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
        moved = {}  # name -> bytes over all its calls, for kernels the HLO gives sizes for
        if kernel_bytes is not None:
            for name, (count, _) in by_name.items():
                size = kernel_bytes.get(kernel_name(name))
                if size is not None:
                    moved[name] = size * count
        out.append(
            {
                "process": process_names.get(key[0], str(key[0])),
                "thread": thread_names.get(key, str(key[1])),
                "device": key in device,
                "events": len(evs),
                "span_ms": (end - start) / 1e3,
                "busy_ms": busy / 1e3,
                "summed_ms": summed / 1e3,  # above busy_ms where events nest
                "top": [
                    {
                        "name": n,
                        "count": c,
                        "ms": d / 1e3,
                        "share": d / summed if summed else 0.0,
                        **({"gb": moved[n] / 1e9, "tb_per_s": _rate(moved[n], d)} if n in moved else {}),
                    }
                    for n, (c, d) in ranked
                ],
                "categories": shares(by_category),
            }
        )
        if kernel_bytes is not None:
            dur = sum(by_name[n][1] for n in moved)
            out[-1]["xla_kernels"] = {
                "ms": dur / 1e3,
                "gb": sum(moved.values()) / 1e9,
                "tb_per_s": _rate(sum(moved.values()), dur),
                "kernels": len(moved),
            }
        if op_names is not None:
            out[-1]["scopes"] = shares(by_scope)
    out.sort(key=lambda lane: (not lane["device"], -lane["busy_ms"]))
    return {"device_lanes": bool(device), "lanes": out}


def _rate(num_bytes: float, dur_us: float) -> float:
    """TB/s of ``num_bytes`` moved in ``dur_us`` microseconds."""
    return num_bytes / dur_us / 1e6 if dur_us > 0 else 0.0


def find_hlo(path: str) -> Optional[str]:
    """The newest ``HLO_FILE`` under a trace directory, or None."""
    return _newest_below(path, HLO_FILE) if os.path.isdir(path) else None


def summarize_path(path: str, top: int = 15, hlo: Optional[str] = None) -> dict:
    trace = find_trace(path)
    hlo = hlo or find_hlo(path)
    op_names = kernel_bytes = None
    if hlo:
        with open(hlo) as f:
            text = f.read()
        op_names, kernel_bytes = hlo_op_names(text), hlo_kernel_bytes(text)
    return {
        "trace": trace,
        "hlo": hlo,
        **summarize(load_events(trace), top=top, op_names=op_names, kernel_bytes=kernel_bytes),
    }


def print_summary(summary: dict, steps: int = 1, lanes: Optional[int] = 4, width: int = 90, scopes: int = 20) -> None:
    kind = "device" if summary["device_lanes"] else "host (the trace has no device lanes)"
    print(
        f"trace: {summary.get('trace', '-')}\n{kind} lanes, busiest first; ms per step = ms / {steps};"
        " shares of the lane's summed event time (nested events count in each level); xN: events in the trace"
    )
    for lane in summary["lanes"][:lanes]:
        print(
            f"\n[{lane['process']}] {lane['thread']}: busy {lane['busy_ms'] / steps:.2f} ms/step of a "
            f"{lane['span_ms'] / steps:.2f} ms/step span, {lane['events']} events"
        )
        cats = ", ".join(f"{k} {v['share']:.1%}" for k, v in lane["categories"].items())
        print(f"  categories: {cats}")
        if lane.get("xla_kernels", {}).get("kernels"):
            x = lane["xla_kernels"]
            print(
                f"  XLA's kernels with sizes in the HLO ({x['kernels']}): {x['ms'] / steps:.2f} ms/step moving"
                f" {x['gb'] / steps:.1f} GB/step, {x['tb_per_s']:.2f} TB/s on average (operands and outputs counted"
                " whole)"
            )
        for t in lane["top"]:
            name = t["name"] if len(t["name"]) <= width else t["name"][: width - 3] + "..."
            rate = f"  {t['tb_per_s']:.2f} TB/s" if "tb_per_s" in t else ""
            print(f"  {t['ms'] / steps:9.3f} ms/step {t['share']:6.1%} x{t['count']:<6d} {name}{rate}")
        if "scopes" in lane:
            print(f"  by model scope (op_name of each kernel's HLO instruction, {summary.get('hlo')}):")
            for name, v in list(lane["scopes"].items())[:scopes]:
                print(f"  {v['ms'] / steps:9.3f} ms/step {v['share']:6.1%}  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a trace file, or a directory the profiler wrote (searched recursively)")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds: figures are divided by it")
    p.add_argument("--top", type=int, default=15, help="events listed per lane")
    p.add_argument("--lanes", type=int, default=4, help="lanes printed (busiest device lanes first)")
    p.add_argument("--hlo", default="", help=f"the step's compiled HLO text (default: {HLO_FILE} under the path)")
    p.add_argument("--scopes", type=int, default=20, help="model scopes listed per lane")
    p.add_argument("--out", default="", help="also write the summary as JSON here")
    opts = p.parse_args(argv)
    if opts.steps < 1:
        p.error("--steps must be >= 1")
    if opts.hlo and not os.path.isfile(opts.hlo):
        p.error(f"--hlo {opts.hlo}: no such file")
    summary = summarize_path(opts.path, top=opts.top, hlo=opts.hlo or None)
    print_summary(summary, steps=opts.steps, lanes=opts.lanes, scopes=opts.scopes)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
