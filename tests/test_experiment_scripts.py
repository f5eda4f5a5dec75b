"""The experiment shell scripts run end to end: experiments/cifar10_methods.sh (through
cifar10_study.sh and launch/single_host.sh) on a small class-folder archive with a tiny model."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import COMPILE_CACHE, child_env, write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "cifar10_methods.sh")


def random_png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def run_script(env_extra, *args):
    # the script's children run `python` from PATH: this interpreter's, with the tests' cache
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = child_env(SHORTCUT_JAX_CACHE=COMPILE_CACHE, PATH=path, **env_extra)
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=900)


def events_of(root):
    """ROOT/events without the times: ['start fm', 'end fm rc=0', ...]."""
    with open(os.path.join(root, "events")) as f:
        return [line.split(" ", 1)[1] for line in f.read().splitlines()]


def test_cifar10_methods_trains_the_teacher_then_distils_from_it(tmp_path):
    # laid out like the CIFAR-10 archive: <set>/train/<class>/<n>.png, 32x32 RGB
    archive = str(tmp_path / "tiny-train.tar.gz")
    rng = np.random.default_rng(0)
    write_tar(archive, {f"tiny/train/class{c}/{i:04d}.png": random_png(rng) for c in range(2) for i in range(40)})
    root = str(tmp_path / "runs")
    proc = run_script(
        {"METHODS": "fm pd", "CONFIG_ARG_EXTRA": ",runlocal=True"},
        archive,
        root,
        "--config.train.steps=7",
        "--config.eval.budgets=(1,)",
        "--config.eval.grid_budgets=(1,)",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one lane: the teacher finishes before the student starts; nothing else ran
    assert events_of(root) == ["start fm", "end fm rc=0", "start pd", "end pd rc=0"]
    for name in ("fm", "pd"):
        assert os.path.exists(os.path.join(root, f"{name}.done"))
        table = json.load(open(os.path.join(root, name, "eval", "00000007", "distance_by_budget.json")))
        assert [row["steps"] for row in table["rows"]] == [1] and np.isfinite(table["rows"][0]["cfd"])
        assert f"== {name} (" in proc.stdout  # the summary prints each table
    manifest = json.load(open(os.path.join(root, "pd", "manifest.json")))
    assert manifest["config"]["objective"]["name"] == "progressive_distillation"
    teacher = manifest["extra"]["meta"]["teacher"]
    assert teacher["directory"] == os.path.join(root, "fm", "checkpoints") and teacher["step"] == 7
    assert teacher["objective"] == "flow_matching"

    # started again: finished runs are skipped, not retrained
    again = run_script({"METHODS": "fm pd"}, archive, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events_of(root)[4:] == ["fm already finished", "pd already finished"]


def test_cifar10_methods_refuses_an_unknown_method_before_anything_is_written(tmp_path):
    root = str(tmp_path / "runs")
    proc = run_script({"METHODS": "fm reflow"}, str(tmp_path / "missing.tar.gz"), root)
    assert proc.returncode == 2
    assert "unknown method 'reflow' in METHODS" in proc.stderr
    assert not os.path.exists(root)


def test_cifar10_methods_passes_a_sigterm_to_its_runs_which_checkpoint_and_stop(tmp_path):
    """A SIGTERM to the script (timeout, docker stop) stops the training processes its lanes
    started, each saving a checkpoint, instead of leaving them running; without the script's
    trap the lanes' runs would go on after the script ended."""
    import signal
    import time

    archive = str(tmp_path / "tiny-train.tar.gz")
    rng = np.random.default_rng(1)
    write_tar(archive, {f"tiny/train/class{c}/{i:04d}.png": random_png(rng) for c in range(2) for i in range(40)})
    root = str(tmp_path / "runs")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = child_env(SHORTCUT_JAX_CACHE=COMPILE_CACHE, PATH=path, METHODS="fm ct", CONFIG_ARG_EXTRA=",runlocal=True")
    proc = subprocess.Popen(
        ["bash", SCRIPT, archive, root, "--config.train.steps=1000000", "--config.train.log_every=1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        metrics = [os.path.join(root, name, "metrics.jsonl") for name in ("fm", "ct")]
        while not all(os.path.exists(m) and os.path.getsize(m) > 0 for m in metrics):  # both lanes train
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the runs did not start training"
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    left = subprocess.run(["pgrep", "-f", "--", f"--workdir={root}"], capture_output=True, text=True).stdout.split()
    assert left == [], "training processes outlived the script"
    for name in ("fm", "ct"):
        steps = os.listdir(os.path.join(root, name, "checkpoints"))
        assert any(s.isdigit() and int(s) > 0 for s in steps), (name, steps)  # saved on SIGTERM
        assert not os.path.exists(os.path.join(root, f"{name}.done"))  # stopped, not finished
