"""Where the time of a profiled step goes: a table from a ``jax.profiler`` trace.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` (what ``train.profile_steps`` and the
train-step benchmark's ``--profile_dir`` write) leaves ``perfetto_trace.json.gz`` under
``dir/plugins/profile/<time>/``: Chrome trace events, one lane (thread) per host thread and, on
an accelerator, per device stream. This reads it and prints, for each device lane (or, where
the trace has none, as on CPU, each host lane), the busy time, the events that take the most
time and a split into kernel categories (matmul, attention, fusion, copy, collective, other),
so that the next lever is chosen by the measured time share:

    python -m shortcut_jax.benchmarks.trace_summary workdirs/run/profile --steps=3

Event names are whatever the backend records (kernel names on GPU streams, HLO op names on
"XLA Ops" lanes); the categories are matched on them by the patterns in ``CATEGORIES``.
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


def find_trace(path: str) -> str:
    """``path`` itself if it is a trace file, else the newest perfetto trace below it."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    found = found or glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz below {path!r}: trace with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return max(found, key=os.path.getmtime)


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


def summarize(events: list[dict], top: int = 15) -> dict:
    """Lanes with their busy time, top events and category split (times in milliseconds)."""
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
        by_category = collections.defaultdict(float)
        for e in evs:
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += float(e["dur"])
            by_category[category(e["name"])] += float(e["dur"])
        summed = sum(v[1] for v in by_name.values())
        busy = _busy_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs])
        start = min(float(e["ts"]) for e in evs)
        end = max(float(e["ts"]) + float(e["dur"]) for e in evs)
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
        out.append({
            "process": process_names.get(key[0], str(key[0])),
            "thread": thread_names.get(key, str(key[1])),
            "device": key in device,
            "events": len(evs),
            "span_ms": (end - start) / 1e3,
            "busy_ms": busy / 1e3,
            "summed_ms": summed / 1e3,  # above busy_ms where events nest
            "top": [{"name": n, "count": c, "ms": d / 1e3, "share": d / summed if summed else 0.0}
                    for n, (c, d) in ranked],
            "categories": {k: {"ms": v / 1e3, "share": v / summed if summed else 0.0}
                           for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        })
    out.sort(key=lambda lane: (not lane["device"], -lane["busy_ms"]))
    return {"device_lanes": bool(device), "lanes": out}


def summarize_path(path: str, top: int = 15) -> dict:
    trace = find_trace(path)
    return {"trace": trace, **summarize(load_events(trace), top=top)}


def print_summary(summary: dict, steps: int = 1, lanes: Optional[int] = 4, width: int = 90) -> None:
    kind = "device" if summary["device_lanes"] else "host (the trace has no device lanes)"
    print(f"trace: {summary.get('trace', '-')}\n{kind} lanes, busiest first; ms per step = ms / {steps};"
          " shares of the lane's summed event time (nested events count in each level); xN: events in the trace")
    for lane in summary["lanes"][:lanes]:
        print(f"\n[{lane['process']}] {lane['thread']}: busy {lane['busy_ms'] / steps:.2f} ms/step of a "
              f"{lane['span_ms'] / steps:.2f} ms/step span, {lane['events']} events")
        cats = ", ".join(f"{k} {v['share']:.1%}" for k, v in lane["categories"].items())
        print(f"  categories: {cats}")
        for t in lane["top"]:
            name = t["name"] if len(t["name"]) <= width else t["name"][:width - 3] + "..."
            print(f"  {t['ms'] / steps:9.3f} ms/step {t['share']:6.1%} x{t['count']:<6d} {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a trace file, or a directory the profiler wrote (searched recursively)")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds: figures are divided by it")
    p.add_argument("--top", type=int, default=15, help="events listed per lane")
    p.add_argument("--lanes", type=int, default=4, help="lanes printed (busiest device lanes first)")
    p.add_argument("--out", default="", help="also write the summary as JSON here")
    opts = p.parse_args(argv)
    if opts.steps < 1:
        p.error("--steps must be >= 1")
    summary = summarize_path(opts.path, top=opts.top)
    print_summary(summary, steps=opts.steps, lanes=opts.lanes)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
