"""Exact resume under SIGKILL: a run killed at random steps ends bitwise equal to an unbroken one.

Trains the quick-start config (``experiments/toy2d.py``, shortened) once without interruption,
then again in a fresh workdir where the training process is killed with SIGKILL at random
steps (``--kills`` times, default 5) and restarted each time; it resumes from its own latest
checkpoint. At the end every parameter, EMA parameter and optimiser-state array of the two runs
is compared bit for bit. Prints each kill step, the checkpoint each restart resumed from, and
the verdict; exits non-zero on any difference.

    python -m benchmarks.resume_exactness --kills=5 --steps=120
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from shortcut_jax.infra import writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(workdir: str, steps: int, ckpt_every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shortcut_jax.main",
        "--config=experiments/toy2d.py:runlocal=True",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        f"--config.train.ckpt_every={ckpt_every}",
        "--config.train.log_every=1",
        f"--config.train.eval_every={10 * steps}",
        "--config.train.progress_bar=False",
        "--config.train.use_tensorboard=False",
    ]


def logged_steps(workdir: str) -> list[int]:
    return [int(row["step"]) for row in writers.read_metrics(workdir) if "loss" in row]


def run_and_kill(workdir: str, steps: int, ckpt_every: int, kill_at: int, env) -> bool:
    """Start (or resume) the run and SIGKILL it once it has logged ``kill_at``; True if it finished first."""
    proc = subprocess.Popen(
        command(workdir, steps, ckpt_every), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while proc.poll() is None:
            done = logged_steps(workdir)
            if done and done[-1] >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return False
            time.sleep(0.02)
        return proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def final_arrays(workdir: str, steps: int) -> dict[str, np.ndarray]:
    import jax

    from benchmarks.toy2d import load_config
    from shortcut_jax.infra import checkpoint
    from shortcut_jax.training.experiment import Experiment

    config = load_config("runlocal=True")
    config.train.steps = steps
    exp = Experiment(config, workdir)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        state, _, _ = ckpt.restore(steps, exp.abstract_state)
    exp.close()
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get((state.params, state.ema_params, state.opt_state)))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ckpt_every", type=int, default=7)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: random)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    rng = np.random.default_rng(args.seed)
    kill_steps = sorted(rng.choice(np.arange(args.ckpt_every + 1, args.steps - 1), args.kills, replace=False).tolist())

    with tempfile.TemporaryDirectory() as tmp:
        reference, broken = os.path.join(tmp, "reference"), os.path.join(tmp, "killed")
        start = time.perf_counter()
        if not run_and_kill(reference, args.steps, args.ckpt_every, args.steps + 1, env):
            sys.exit("the uninterrupted run failed")
        print(f"uninterrupted run: {time.perf_counter() - start:.0f} s")
        for kill_at in kill_steps:
            finished = run_and_kill(broken, args.steps, args.ckpt_every, kill_at, env)
            saved = [int(d) for d in os.listdir(os.path.join(broken, "checkpoints")) if d.isdigit()]
            print(
                f"killed after step {kill_at}: latest complete checkpoint {max(saved) if saved else None}"
                + (" (run had already finished)" if finished else "")
            )
        if not run_and_kill(broken, args.steps, args.ckpt_every, args.steps + 1, env):
            sys.exit("the final resume failed")
        a, b = final_arrays(reference, args.steps), final_arrays(broken, args.steps)
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    print(
        f"{len(a)} arrays compared (params, EMA, optimizer state) after {args.steps} steps and {args.kills} kills:"
        f" {'all bitwise identical' if not differing else f'{len(differing)} differ, e.g. {differing[:3]}'}"
    )
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
