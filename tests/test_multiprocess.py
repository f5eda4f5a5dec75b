"""Training across processes, meshes and preemptions, and into remote workdirs.

The jobs of several processes (marker ``multiprocess``; ``pytest -m multiprocess`` runs them
alone) spawn 2 and 4 CPU processes on this machine that join through ``jax.distributed``
(coordinator on a free local port, Gloo collectives), each with its own simulated CPU devices and
its own slice of every batch. Every spawned process runs under a time-out and is ended by the
test when it passes it, so a job that hangs fails the test instead of the suite.

Run as a script, this file is the worker of the two-process job (``python
tests/test_multiprocess.py dit_job ...``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How long a spawned process may take to join its job, and the whole job to finish.
JOIN_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420

# The DiT of the two-process job: digits 8x8, two heads, one block of width 64 (wide enough that
# fsdp shards its kernels), batch 64; a SIGTERM to process 1 once step SIGNAL_AFTER is logged.
DIT = {
    "model.width": 64,
    "model.depth": 1,
    "train.log_every": 1,
    "train.ckpt_every": 1000,
    "train.eval_every": 1000,
    "train.async_ckpt": False,
    "eval.grid_size": 16,
}
DIT_DP = {"mesh.data": -1, "mesh.fsdp": 1}
DIT_FSDP = {"mesh.data": 2, "mesh.fsdp": 2}
STARTED = 2  # steps of the one-process start
SIGNAL_AFTER = 4
STEPS_AFTER_RESUME = 2


def make_config(name, overrides: dict):
    # imported here: a worker process runs this file as a script and imports JAX only in its job
    from test_train import load_experiment, override

    c = load_experiment(name).get_config("runlocal=True")
    c.train.progress_bar = False
    c.train.use_tensorboard = False
    return override(c, overrides)


def flat_params(params) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


# --------------------------------------------------------------------------- the two-process worker


def _signal_self_after(metrics_path: str, step: int, timeout_s: float = 300) -> None:
    """SIGTERM to this process once process 0 has logged ``step`` (the run is then mid-way)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                logged = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
            if logged and max(logged) >= step:
                os.kill(os.getpid(), signal.SIGTERM)
                return
        time.sleep(0.02)


def dit_job(args) -> None:
    """One process of the two-process job: the run in ``args.workdir`` resumed on the data-parallel
    mesh and stopped by a SIGTERM to process 1 alone, then resumed on the fsdp mesh for a few steps
    and a final evaluation."""
    from jax.experimental import multihost_utils

    from shortcut_jax.infra import distributed
    from shortcut_jax.training import loop

    distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id, timeout_s=JOIN_TIMEOUT_S)
    if args.process_id == 1:
        threading.Thread(
            target=_signal_self_after, daemon=True, args=(os.path.join(args.workdir, "metrics.jsonl"), SIGNAL_AFTER)
        ).start()
    state = loop.train_and_evaluate(make_config("digits", {**DIT, **DIT_DP, "train.steps": 100_000}), args.workdir)
    stopped = int(state.step)
    state = loop.train_and_evaluate(
        make_config("digits", {**DIT, **DIT_FSDP, "train.steps": stopped + STEPS_AFTER_RESUME}), args.workdir
    )
    params = multihost_utils.process_allgather(state.params, tiled=True)
    np.savez(args.out, stopped_at=stopped, final_step=int(state.step), **flat_params(params))


if __name__ == "__main__":
    import faulthandler
    import logging

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a hung job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["dit_job"])
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    dit_job(parser.parse_args())
    sys.exit(0)


# --------------------------------------------------------------------------- test helpers

import jax  # noqa: E402  (after the worker: a spawned process sets its devices in its environment)
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest, also where a job's process imports this file
from conftest import child_env  # noqa: E402
from shortcut_jax import config_lib  # noqa: E402
from shortcut_jax.infra import checkpoint, distributed, sharding, writers
from shortcut_jax.training import loop
from shortcut_jax.training.experiment import Experiment  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(local_devices: int) -> dict:
    """A spawned process's environment: CPU only, its own simulated devices, the test cache."""
    return child_env(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
    )


def run_job(commands: list[list[str]], env: dict, logdir, timeout_s: float = JOB_TIMEOUT_S) -> list[int]:
    """Runs one process per command; returns their exit codes. Past ``timeout_s`` every process
    still running is killed and the test fails with the end of each log."""
    logs = [open(os.path.join(logdir, f"process_{i}.log"), "w") for i in range(len(commands))]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        for cmd, log in zip(commands, logs)
    ]
    deadline = time.time() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:  # Python's stacks into the log where the process registered for it, then the end
            p.send_signal(signal.SIGUSR1)
        time.sleep(1.0 if hung else 0)
        for p in hung:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if hung or any(codes):
        tails = []
        for i in range(len(commands)):
            with open(os.path.join(logdir, f"process_{i}.log")) as f:
                tails.append(f"--- process {i} (exit {codes[i]}):\n" + f.read()[-3000:])
        what = f"passed the {timeout_s} s time-out" if hung else "failed"
        pytest.fail(f"the job {what}:\n" + "\n".join(tails))
    return codes


def relative_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    x = np.concatenate([a[k].ravel() for k in sorted(a)])
    y = np.concatenate([b[k].ravel() for k in sorted(b)])
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# --------------------------------------------------------------------------- two processes, a DiT


@pytest.mark.multiprocess
def test_two_processes_stop_together_resume_on_fsdp_and_match_one_process(tmp_path):
    workdir = str(tmp_path / "run")
    port = free_port()
    outs = [str(tmp_path / f"params_{i}.npz") for i in range(2)]
    commands = [
        [
            sys.executable,
            os.path.abspath(__file__),
            "dit_job",
            f"--process_id={i}",
            "--num_processes=2",
            f"--port={port}",
            f"--workdir={workdir}",
            f"--out={outs[i]}",
        ]
        for i in range(2)
    ]
    # One process starts the run (and compiles the initial state, which the job then need not).
    loop.train_and_evaluate(make_config("digits", {**DIT, "mesh.data": 1, "train.steps": STARTED}), workdir)
    run_job(commands, process_env(local_devices=2), tmp_path)
    results = [dict(np.load(o)) for o in outs]
    stopped = [int(r.pop("stopped_at")) for r in results]
    final = [int(r.pop("final_step")) for r in results]

    # The SIGTERM reached process 1 alone; both stopped after the same step, which was saved.
    assert stopped[0] == stopped[1] > max(SIGNAL_AFTER, STARTED), stopped
    assert final == [stopped[0] + STEPS_AFTER_RESUME] * 2
    logs = [open(tmp_path / f"process_{i}.log").read() for i in range(2)]
    assert all(f"stopped at step {stopped[0]} of 100000 on a preemption notice" in log for log in logs)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        assert ckpt.all_steps() == [STARTED, stopped[0], final[0]]
    # Both processes hold the same parameters after the fsdp steps.
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])

    # One process, one device, the same steps from the start: equal within float tolerance (sums
    # run in another order), and at the same data position.
    one = str(tmp_path / "one")
    reference = loop.train_and_evaluate(make_config("digits", {**DIT, "mesh.data": 1, "train.steps": final[0]}), one)
    assert relative_difference(results[0], flat_params(jax.device_get(reference.params))) < 1e-5

    # The job's checkpoint restores in this process (one process, 8 devices, another mesh):
    # bit for bit what the job's processes held, at the reference run's data position.
    cfg = make_config("digits", {**DIT, "mesh.data": 4, "mesh.fsdp": 2, "train.steps": final[0]})
    exp = Experiment(cfg, workdir)
    try:
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            restored, data_state, meta = ckpt.restore(final[0], exp.abstract_state)
        with checkpoint.Checkpointer(os.path.join(one, "checkpoints"), async_save=False) as ckpt:
            _, reference_data_state, _ = ckpt.restore(final[0], exp.abstract_state)
    finally:
        exp.close()
    got = flat_params(jax.device_get(restored.params))
    for k in results[0]:
        np.testing.assert_array_equal(got[k], results[0][k])
    assert data_state == reference_data_state and data_state["position"] == final[0] * 64
    assert meta["process_count"] == 2 and meta["global_batch"] == 64
    assert "resumed from step 2 (processes 1 -> 2; the data stream continues" in logs[0]

    # The final evaluation ran on both processes; process 0 wrote its grid, which shows the
    # same samples as the one-process run's (pixels within one level of 255).
    grid = os.path.join("eval", f"{final[0]:08d}", "samples_1step.png")
    from PIL import Image

    job_grid = np.asarray(Image.open(os.path.join(workdir, grid)), np.int32)
    one_grid = np.asarray(Image.open(os.path.join(one, grid)), np.int32)
    assert job_grid.shape == one_grid.shape and np.abs(job_grid - one_grid).max() <= 1
    assert os.path.exists(os.path.join(workdir, "eval", f"{final[0]:08d}", "evaluation.json"))


# --------------------------------------------------------------------------- four processes, the CLI

# The 2-D toy with flow matching (the cheapest step to compile; a residual MLP of width 128, whose
# kernels fsdp shards) on a data x fsdp mesh of 2 x 2 whose fsdp pairs span processes; 20 steps,
# the final evaluation on 1000 samples at 1 and 128 steps.
TOY = {"model.width": 128, "model.depth": 2, "objective.name": "flow_matching"}


@pytest.mark.multiprocess
def test_four_cli_processes_train_and_evaluate_as_one_process(tmp_path):
    workdir = str(tmp_path / "run")
    port = free_port()
    flags = [f"--config.{k}={v}" for k, v in TOY.items()] + [
        "--config.train.progress_bar=False",
        "--config.train.use_tensorboard=False",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
    ]
    commands = [
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:runlocal=True",
            f"--workdir={workdir}",
            *flags,
            "--multihost",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=4",
            f"--process_id={i}",
            f"--initialization_timeout={JOIN_TIMEOUT_S}",
        ]
        for i in range(4)
    ]
    assert run_job(commands, process_env(local_devices=1), tmp_path) == [0, 0, 0, 0]

    one = str(tmp_path / "one")
    reference = loop.train_and_evaluate(make_config("toy2d", {**TOY, "mesh.data": 1}), one)
    exp = Experiment(make_config("toy2d", {**TOY, "mesh.data": 1}), workdir)
    try:
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            assert ckpt.all_steps() == [10, 20]
            restored, data_state, meta = ckpt.restore(20, exp.abstract_state)
    finally:
        exp.close()
    assert meta["process_count"] == 4 and data_state == {"step": 20}
    assert (
        relative_difference(flat_params(jax.device_get(restored.params)), flat_params(jax.device_get(reference.params)))
        < 1e-5
    )
    # the evaluation gathered every process's samples: the same distances as one process's
    rows = [r for r in writers.read_metrics(workdir) if "eval/num_samples" in r]
    one_rows = [r for r in writers.read_metrics(one) if "eval/num_samples" in r]
    assert [r["step"] for r in rows] == [20] and rows[0]["eval/num_samples"] == 1000
    for key in ("eval/sliced_wasserstein_1step", "eval/sliced_wasserstein_128step"):
        np.testing.assert_allclose(rows[0][key], one_rows[0][key], rtol=1e-4)


# --------------------------------------------------------------------------- joining a job


def test_a_process_that_cannot_reach_the_coordinator_fails_naming_it_within_the_time_out():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(distributed.CoordinatorUnreachable, match=rf"127\.0\.0\.1:{port} within the 1\.5 s"):
        distributed.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - start < 10
    assert not distributed.is_initialized()  # it never reached jax.distributed.initialize


# --------------------------------------------------------------------------- another mesh

# A checkpoint of a flow-matching DiT (the quickest DiT step to compile) saved on a data x fsdp
# mesh of 4 x 2; kernels of width 64 are sharded by fsdp.
MESH_RUN = {"model.width": 64, "model.depth": 1, "objective.name": "flow_matching"}
SAVED_ON = {"mesh.data": 4, "mesh.fsdp": 2}
OTHER_MESHES = {
    "one device": {"mesh.data": 1, "mesh.fsdp": 1},
    "data=8": {"mesh.data": 8, "mesh.fsdp": 1},
    "fsdp=8": {"mesh.data": 1, "mesh.fsdp": 8},
}


def _save(directory, state, data_state, meta):
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(int(jax.device_get(state.step)), state, data_state=data_state, meta=meta, force=True)


def _restore(directory, exp):
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        return ckpt.restore(None, exp.abstract_state)


def _next_loss(exp, state) -> float:
    compiled, _ = exp.compile_step()
    _, metrics = compiled(state, sharding.global_batch(exp.source.next_batch(), exp.mesh))
    return float(metrics["loss"])


def test_checkpoint_restores_onto_other_meshes_and_back_and_continues_with_the_same_loss(tmp_path):
    saved_exp = Experiment(make_config("digits", {**MESH_RUN, **SAVED_ON}), None)
    try:
        assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(saved_exp.state_shardings))
        state = saved_exp.init_state()
        compiled, _ = saved_exp.compile_step()
        for _ in range(2):
            state, _ = compiled(state, sharding.global_batch(saved_exp.source.next_batch(), saved_exp.mesh))
        saved_dir = str(tmp_path / "saved")
        _save(saved_dir, state, saved_exp.source.get_state(), saved_exp.meta)
        saved = jax.tree.map(np.asarray, jax.device_get(state))
        next_batch = saved_exp.source.next_batch()
        _, metrics = compiled(state, sharding.global_batch(next_batch, saved_exp.mesh))
        saved_next_loss = float(metrics["loss"])
    finally:
        saved_exp.close()

    for name, mesh in OTHER_MESHES.items():
        exp = Experiment(make_config("digits", {**MESH_RUN, **mesh}), None)
        try:
            restored, data_state, _ = _restore(saved_dir, exp)
            # every array in the new mesh's sharding, bit for bit the saved values
            for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(exp.state_shardings)):
                assert leaf.sharding == want, name
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, jax.device_get(restored)), saved)
            # and the reverse: saved from this mesh, restored onto the first one
            back_dir = str(tmp_path / f"from {name}")
            _save(back_dir, restored, data_state, exp.meta)
            back_exp = Experiment(make_config("digits", {**MESH_RUN, **SAVED_ON}), None)
            try:
                back, back_data_state, _ = _restore(back_dir, back_exp)
            finally:
                back_exp.close()
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, jax.device_get(back)), saved)
            assert back_data_state == data_state
            # the same data position and the same next loss (sums in another order: float tolerance)
            exp.source.set_state(data_state)
            np.testing.assert_array_equal(exp.source.next_batch()["x"], next_batch["x"])
            exp.source.set_state(data_state)
            np.testing.assert_allclose(_next_loss(exp, restored), saved_next_loss, rtol=1e-5, err_msg=name)
        finally:
            exp.close()

    # A global batch changed at resume (documented in train.py): the stream continues at the
    # first example not yet seen, so half the batch holds the first half of the saved run's next.
    exp = Experiment(make_config("digits", {**MESH_RUN, **SAVED_ON, "train.batch_size": 32}), None)
    try:
        _, data_state, _ = _restore(saved_dir, exp)
        exp.source.set_state(data_state)
        np.testing.assert_array_equal(exp.source.next_batch()["x"], next_batch["x"][:32])
    finally:
        exp.close()


# --------------------------------------------------------------------------- preemption

# The 2-D toy with a constant learning rate, so that a run's length (train.steps) changes nothing
# about its steps: the SIGTERMed run is given many steps, its resumption and the unbroken run few.
PREEMPTED = {
    "optim.schedule": "constant",
    "train.log_every": 1,
    "train.ckpt_every": 1000,
    "train.eval_every": 1000,
    "train.async_ckpt": True,
    "eval.budgets": (1,),
    "eval.num_samples": 200,
    "eval.batch_size": 200,
}


def test_sigterm_finishes_the_step_saves_it_exits_0_and_the_resumed_run_is_bitwise_unbroken(tmp_path):
    workdir = str(tmp_path / "run")
    flags = [f"--config.{k}={v}" for k, v in PREEMPTED.items() if k != "eval.budgets"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:runlocal=True",
            f"--workdir={workdir}",
            "--config.train.steps=100000",
            "--config.eval.budgets=(1,)",
            "--config.train.progress_bar=False",
            "--config.train.use_tensorboard=False",
            *flags,
        ],
        cwd=ROOT,
        env=child_env(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if [r for r in writers.read_metrics(workdir) if r.get("step", 0) >= 5]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it was signalled"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        saved = ckpt.all_steps()
    assert len(saved) == 1 and 5 <= saved[0] < 1000, saved  # the preemption's save, not a periodic one
    stopped = saved[0]
    assert f"stopped at step {stopped} of 100000 on SIGTERM: checkpoint of step {stopped} saved" in stderr
    assert [r["step"] for r in writers.read_metrics(metrics.rsplit("/", 1)[0])][-1] == stopped

    # The resumed run (a few more steps) equals an unbroken one bit for bit; the loop's SIGTERM
    # handler is in place only while it runs.
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        resumed = loop.train_and_evaluate(make_config("toy2d", {**PREEMPTED, "train.steps": stopped + 3}), workdir)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    unbroken = loop.train_and_evaluate(
        make_config("toy2d", {**PREEMPTED, "train.steps": stopped + 3}), str(tmp_path / "unbroken")
    )
    assert int(resumed.step) == stopped + 3
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(unbroken))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- remote workdirs


def fake_bucket(root):
    """``gs://<path>`` served from ``root/<path>`` through ``etils.epath`` alone: what reaches
    the fake went through epath; a plain ``open``/``os`` call on a gs:// path would write a
    local ``gs:`` folder instead."""
    from etils.epath import testing as epath_testing

    def local(path):
        path = os.fspath(path)
        return os.path.join(root, path[len("gs://") :]) if path.startswith("gs://") else path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, destination, *args, **kwargs):
        return original(local(path), local(destination), *args, **kwargs)

    return epath_testing.mock_epath(
        open=one,
        exists=one,
        isdir=one,
        listdir=one,
        makedirs=one,
        mkdir=one,
        remove=one,
        rmtree=one,
        stat=one,
        rename=two,
        replace=two,
        copy=two,
    )


class _ScaledNoise:
    """A stand-in sampler (no compilation): samples are half the noise."""

    def __call__(self, params, noise, labels, *, num_steps, cfg_scale, guidance_interval=None):
        return 0.5 * np.asarray(noise)

    @staticmethod
    def to_host(x):
        return np.asarray(x)


def test_metrics_manifest_evaluation_and_hlo_reach_a_remote_workdir_through_epath(tmp_path, monkeypatch):
    from shortcut_jax import data, evaluate
    from shortcut_jax.infra import manifest
    from shortcut_jax.evaluation import metrics

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    bucket = tmp_path / "bucket"
    workdir = "gs://bucket-name/run"
    stored = bucket / "bucket-name" / "run"
    cfg = make_config(
        "toy2d", {"eval.budgets": (1, 2), "eval.grid_budgets": (1,), "eval.num_samples": 200, "eval.batch_size": 200}
    )
    with fake_bucket(str(bucket)):
        writer = writers.MetricWriter(workdir, use_tensorboard=False)
        writer.write_scalars(1, {"loss": 0.5})
        writer.close()
        resumed = writers.MetricWriter(workdir, use_tensorboard=False)  # a resumed run continues the log
        resumed.write_scalars(2, {"loss": 0.25})
        source = data.make_dataset(cfg.data, batch_size=64, seed=0)
        results = evaluate.evaluate_budgets(
            cfg.eval,
            _ScaledNoise(),
            None,
            source,
            source.spec,
            metrics.build_metric(cfg.eval, "points"),
            out_dir=f"{workdir}/eval/00000002",
            step=2,
            writer=resumed,
        )
        resumed.close()
        rows = writers.read_metrics(workdir)
        manifest.write_manifest(workdir, cfg)
        loop.write_hlo(type("Compiled", (), {"as_text": lambda self: "HloModule m"})(), f"{workdir}/profile")
        offline = evaluate.offline_out_dir(workdir, 2)

    assert not (cwd / "gs:").exists() and os.listdir(cwd) == []  # nothing took the local path
    assert [r["step"] for r in rows] == [1, 2, 2] and rows[1]["loss"] == 0.25
    assert rows[2]["eval/sliced_wasserstein_1step"] == results[1]
    evaluation = stored / "eval" / "00000002"
    assert json.loads((evaluation / "evaluation.json").read_text())["step"] == 2
    assert {"distance_by_budget.md", "distance_by_budget.json", "distance_by_budget.png", "samples_1step.png"} <= set(
        os.listdir(evaluation)
    )
    assert json.loads((stored / "manifest.json").read_text())["config"]["train"]["steps"] == cfg.train.steps
    assert len(glob.glob(str(stored / "manifest-*.json"))) == 1
    assert (stored / "profile" / loop.HLO_FILE).read_text() == "HloModule m"
    assert offline == (f"{workdir}/eval/00000002_offline1", False)  # the finished evaluation was seen


# --------------------------------------------------------------------------- memory per device


def test_fsdp_state_per_device_is_within_a_tenth_of_an_even_split_for_dit_b2_on_8_devices():
    from benchmarks import memory_per_device as bench

    opts = argparse.Namespace(batch_per_device=64, dtype="float32", objective="shortcut", compile=[])
    dp, fsdp = (bench.measure("B", 8, mode, opts) for mode in ("dp", "fsdp"))
    # the count is what the shardings hold: replicated under dp, split under fsdp
    assert dp["params_bytes"] == 4 * dp["num_params"]  # float32
    assert 0 <= dp["opt_bytes"] - 2 * dp["params_bytes"] <= 64  # Adam's two moments and its step counts
    assert fsdp["params_bytes"] + fsdp["opt_bytes"] <= bench.target_bytes([dp, fsdp], fsdp)
    assert fsdp["params_bytes"] >= dp["params_bytes"] / 8  # nothing is counted twice or dropped


def test_a_mesh_that_leaves_out_devices_of_a_job_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as in a job of two processes of 4 devices
    with pytest.raises(config_lib.ConfigError, match="uses 1 of the 8 devices of the 2 processes.*mesh.data=-1"):
        Experiment(make_config("digits", {"mesh.data": 1}), None)
