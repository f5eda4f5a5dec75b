"""The paper's comparison in miniature: every method on the embedded 2-D checkerboard.

Each method trains the same residual MLP (the quick start's: width 256, depth 4, batch 512,
AdamW lr 1e-3 with 100 warm-up steps and cosine decay, no weight decay) for ``--steps`` steps
with its own objective from ``shortcut_jax.objectives``, and is sampled with its own sampler
(``objectives.make_sampler``) from the debiased EMA (decay 0.999) at 1, 2, 4, 8 and 128 steps.
The sliced Wasserstein distance (512 projections) against fresh data is printed per method and
budget, mean ± std over seeds, beside the data-against-data floor.

Two-stage methods start from the flow-matching run of the same seed (which is also the
``flow_matching`` row), so they cost ``--steps`` teacher steps + ``--steps`` student steps:
- consistency distillation: student and EMA target initialised from the teacher;
- progressive distillation: student initialised from the teacher; 7 phases of steps/7 steps
  (128 -> 64 -> ... -> 1 step); the teacher's level embedding made constant (warm start);
- reflow: ``--reflow_pairs`` (noise, sample) pairs from the teacher's ``--reflow_teacher_steps``
  -step Euler sampler (stage one, written and read back as pair files), then flow matching on
  them, initialised from the teacher.
One-stage methods train from scratch: shortcut (the quick start's setting: online teacher, half
the batch on self-consistency), flow matching, diffusion (cosine schedule, DDIM with the data
estimate clipped at ±4), consistency
training (d from 1 to 1/64 in 7 stages) and live reflow (1/8 of the batch on pairs generated
by the model itself in 8 Euler steps).

    python -m benchmarks.methods_toy2d --steps=4000 --seeds=3
    python -m benchmarks.methods_toy2d --steps=300 --seeds=1 --eval_samples=2000 --reflow_pairs=4096  # a check

The training loop is this script's own (a ``lax.scan`` over chunks of steps): the step count,
the frozen teacher and the phase snapshots are passed the way ``objectives.METHODS`` says the
train step should pass them.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut_jax.data import pairs as pairs_io
from shortcut_jax import config_lib
from shortcut_jax.training import train_state
from shortcut_jax.data.core import BatchLayout
from shortcut_jax.data.toy import ToySource
from shortcut_jax.evaluation.evaluator import draw_samples
from shortcut_jax.evaluation import distances
from shortcut_jax.models import MLPNet
from shortcut_jax.objectives import METHODS, make_objective_config, make_sampler
from shortcut_jax.training.runs import warm_start_params

NAMES = (
    "shortcut",
    "flow_matching",
    "diffusion",
    "consistency_training",
    "consistency_distillation",
    "progressive_distillation",
    "reflow",
    "live_reflow",
    "meanflow",
    "meanflow_v",
)
TWO_STAGE = ("consistency_distillation", "progressive_distillation", "reflow")
BUDGETS = (1, 2, 4, 8, 128)
BATCH = 512
CHUNK = 50  # training steps per compiled call
EMA_DECAY = 0.999


def objective_config(name: str, apply_fn, steps: int, overrides: dict):
    """The objective's config: the defaults, the toy's shortcut setting, then ``overrides``
    (``--objective KEY=VALUE``, config.objective keys applied to every method)."""
    obj = config_lib.default_config().objective
    obj.name = name
    if name == "shortcut":  # experiments/toy2d.py's setting
        obj.teacher, obj.sc_fraction = "online", 0.5
    for key, value in overrides.items():
        obj[key] = value
    return make_objective_config(obj, apply_fn, 0, total_steps=steps)


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--objective``: the key must exist in config.objective, the value is
    read as a Python literal (a number, a tuple) of the key's type."""
    key, sep, value = text.partition("=")
    defaults = config_lib.default_config().objective
    if not sep or key not in defaults:
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE with KEY one of config.objective's keys")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(defaults[key], float) and isinstance(parsed, int):
        parsed = float(parsed)
    return key, parsed


def make_model(name: str) -> MLPNet:
    # methods that feed a constant level let the network ignore it, as flow matching does
    return MLPNet(width=256, depth=4, mlp_ratio=2.0, num_classes=0, ignore_level=not METHODS[name].level_input)


def train(name: str, steps: int, seed: int, *, overrides=None, init_params=None, teacher=None, pairs=None):
    """EMA parameters after ``steps`` steps of objective ``name``; returns (ema, model, cfg, seconds)."""
    model = make_model(name)
    apply_fn = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731
    cfg = objective_config(name, apply_fn, steps, overrides or {})
    needs = METHODS[name]
    key = jax.random.key(seed)
    if init_params is None:
        init_params = model.init(
            jax.random.fold_in(key, 1),
            jnp.zeros((1, 2)),
            jnp.zeros(1),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.int32),
        )["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, max(steps, 101))
    tx = optax.adamw(schedule, weight_decay=0.0)
    snapshot = needs.teacher_snapshot

    def one_step(state, batch):
        params, ema, frozen, opt_state, step = state
        if snapshot:  # the teacher of each phase is the student at its start
            frozen = snapshot(step, frozen, params, cfg)
        if needs.step:
            batch = dict(batch, step=step)
        teachers = {"ema": ema, "teacher": frozen} if needs.frozen_teacher else ema
        (loss, _), grads = jax.value_and_grad(METHODS[name].loss, has_aux=True)(
            params, teachers, batch, jax.random.fold_in(jax.random.fold_in(key, 2), step), cfg
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = train_state.update_ema((ema,), params, (EMA_DECAY,), count=step + 1)[0]
        return (params, ema, frozen, opt_state, step + 1), loss

    run_chunk = jax.jit(lambda state, batches: jax.lax.scan(one_step, state, batches))
    frozen = teacher if teacher is not None else jax.tree.map(jnp.zeros_like, init_params)
    state = (init_params, init_params, frozen, tx.init(init_params), jnp.int32(0))
    source = ToySource("checkerboard", BatchLayout(BATCH), seed)
    pair_rng = np.random.default_rng([seed, 5])
    start = time.perf_counter()
    done = 0
    while done < steps:
        n = min(CHUNK, steps - done)
        if pairs is not None:
            idx = pair_rng.integers(0, pairs["x"].shape[0], (n, BATCH))
            batches = {"x": pairs["x"][idx], "noise": pairs["noise"][idx], "label": np.zeros((n, BATCH), np.int32)}
        else:
            rows = [source.next_batch() for _ in range(n)]
            batches = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        state, losses = run_chunk(state, batches)
        done += n
    losses = np.asarray(losses)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"{name} seed {seed}: non-finite loss by step {steps}")
    return state[1], model, cfg, time.perf_counter() - start


def evaluate(name, params, cfg, *, num_samples: int, seed: int, reference) -> dict[int, float]:
    sampler = make_sampler(name, cfg, seed=seed)
    out = {}
    for n in BUDGETS:
        samples = draw_samples(
            sampler,
            params,
            shape=(2,),
            num_classes=0,
            num_samples=num_samples,
            batch_size=num_samples,
            num_steps=n,
            seed=seed,
        )
        out[n] = distances.sliced_wasserstein(samples, reference)
    return out


def run_seed(seed: int, args, methods, tmp: str) -> dict[str, dict]:
    reference = ToySource("checkerboard", BatchLayout(BATCH), seed).reference(args.eval_samples, seed=1000 + seed)
    results = {}

    def record(name, params, cfg, seconds):
        res = evaluate(name, params, cfg, num_samples=args.eval_samples, seed=seed, reference=reference)
        results[name] = res
        print(
            f"{name} seed {seed}: {seconds:.0f} s training, " + ", ".join(f"{n}: {v:.4f}" for n, v in res.items()),
            flush=True,
        )

    overrides = dict(args.objective)
    need_teacher = any(m in TWO_STAGE for m in methods)
    if "flow_matching" in methods or need_teacher:
        teacher, teacher_model, teacher_cfg, secs = train("flow_matching", args.steps, seed, overrides=overrides)
        if "flow_matching" in methods:
            record("flow_matching", teacher, teacher_cfg, secs)
    for name in methods:
        if name == "flow_matching":
            continue
        if name == "consistency_distillation":
            params, _, cfg, secs = train(
                name, args.steps, seed, overrides=overrides, init_params=teacher, teacher=teacher
            )
        elif name == "progressive_distillation":
            # the teacher ignored its level input (it saw 0); the student reads levels
            leveled = warm_start_params(teacher, teacher, source_level=0)
            params, _, cfg, secs = train(
                name, args.steps, seed, overrides=overrides, init_params=leveled, teacher=leveled
            )
        elif name == "reflow":
            start = time.perf_counter()
            sampler = make_sampler("flow_matching", teacher_cfg)
            out_dir = os.path.join(tmp, f"pairs_seed{seed}")
            pairs_io.generate_pairs(
                sampler,
                teacher,
                out_dir=out_dir,
                shape=(2,),
                num_classes=0,
                num_pairs=args.reflow_pairs,
                num_steps=args.reflow_teacher_steps,
                seed=seed,
                batch_size=min(args.reflow_pairs, 10_000),
            )
            pairs = pairs_io.load_pairs(out_dir)
            gen_secs = time.perf_counter() - start
            params, _, cfg, secs = train(name, args.steps, seed, overrides=overrides, init_params=teacher, pairs=pairs)
            secs += gen_secs
        else:
            params, _, cfg, secs = train(name, args.steps, seed, overrides=overrides)
        record(name, params, cfg, secs)
    return results


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The flags and the methods to run; an unknown method or objective key exits with one line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="training steps per method (per stage)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(NAMES))
    parser.add_argument("--eval_samples", type=int, default=10_000)
    parser.add_argument("--reflow_pairs", type=int, default=50_000)
    parser.add_argument("--reflow_teacher_steps", type=int, default=128)
    parser.add_argument("--out", default="", help="JSON file for the per-seed results")
    parser.add_argument(
        "--objective",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="a config.objective key for every method (repeatable), e.g. --objective=meanflow_t_mean=-2.0",
    )
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(NAMES))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(NAMES)}")
    return args, methods


def main():
    args, methods = parse_args()

    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            per_seed.append(run_seed(seed, args, methods, tmp))
    sample = lambda n, s: ToySource("checkerboard", BatchLayout(BATCH), 0).reference(n, seed=5000 + s)  # noqa: E731
    floor, floor_std = distances.sliced_wasserstein_floor(sample, args.eval_samples, seeds=range(args.seeds))

    print(
        f"\nsliced Wasserstein distance, checkerboard, {args.steps} steps per method"
        f" (two-stage methods: {args.steps} flow-matching teacher steps + {args.steps} student steps;"
        f" reflow: {args.reflow_pairs} pairs from the teacher's {args.reflow_teacher_steps}-step sampler),"
        f" {args.seeds} seed(s), {args.eval_samples} samples, mean ± std;"
        + (f" objective {dict(args.objective)};" if args.objective else "")
        + f" data-against-data floor {floor:.4f} ± {floor_std:.4f}"
    )
    print("| method | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for name in methods:
        cells = []
        for n in BUDGETS:
            values = [r[name][n] for r in per_seed]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "floor": [floor, floor_std], "per_seed": per_seed}, f, indent=1)


if __name__ == "__main__":
    main()
