"""What the commands show: a short log (no orbax INFO lines, no note about a missing TPU
runtime), "evaluating N budget(s)" when an evaluation starts and "done: results in <path>" at the
end of train, sample and evaluate."""

import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = [
    "--config=experiments/toy2d.py:runlocal=True",
    "--config.train.steps=3",
    "--config.train.progress_bar=False",
    "--config.train.use_tensorboard=False",
    "--config.eval.budgets=(1,)",
    "--config.eval.grid_budgets=(1,4,128)",
    "--config.eval.num_samples=200",
    "--config.eval.batch_size=200",
]


def command(module, *args):
    # JAX looks for TPUs as on a user's machine (JAX_PLATFORMS unset); one CPU device
    env = {k: v for k, v in os.environ.items() if k not in ("SHORTCUT_JAX_DEBUG", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def log_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("logs") / "toy")
    return workdir, command("shortcut_jax.main", *TOY, f"--workdir={workdir}")


def test_training_log_names_the_evaluation_and_where_the_results_are(trained):
    workdir, result = trained
    lines = log_lines(result)
    assert not [line for line in lines if "orbax" in line or "libtpu" in line or "checkpoint_manager" in line]
    assert any(
        "evaluating 3 budget(s) at step 3: 1,4,128 step(s), sliced_wasserstein on 200 samples" in line for line in lines
    ), lines
    assert lines[-1].endswith(f"done: results in {workdir}")
    assert len(lines) <= 20, "\n".join(lines)  # the parameter table is 12 of them


def test_sample_log_is_short(trained, tmp_path):
    workdir, _ = trained
    out = str(tmp_path / "points.png")
    result = command(
        "shortcut_jax.sample", "--config=experiments/toy2d.py:runlocal=True", f"--workdir={workdir}", f"--out={out}"
    )
    lines = log_lines(result)
    assert len(lines) <= 3, "\n".join(lines)
    assert lines[-1].endswith(f"done: results in {out}")
    assert result.stdout.startswith(f"wrote 1 file(s): {out}")


def test_evaluate_prints_the_metric_by_name_and_draws_only_the_budgets_asked_for(trained, tmp_path):
    workdir, _ = trained
    out_dir = str(tmp_path / "eval")
    result = command(
        "shortcut_jax.evaluate",
        "--config=experiments/toy2d.py:runlocal=True",
        f"--workdir={workdir}",
        "--budgets=1,4",
        f"--out_dir={out_dir}",
    )
    printed = result.stdout.strip().splitlines()
    assert [line.rsplit(":", 1)[0] for line in printed] == [
        "sliced_wasserstein at 1 step(s)",
        "sliced_wasserstein at 4 step(s)",
    ], printed
    pngs = sorted(name for name in os.listdir(out_dir) if name.startswith("samples_"))
    assert pngs == ["samples_1step.png", "samples_4step.png"]  # no 128-step grid
    lines = log_lines(result)
    assert lines[-1].endswith(f"done: results in {out_dir}") and len(lines) <= 10, "\n".join(lines)


def test_manifests_are_readable_by_everyone(trained):
    workdir, _ = trained
    manifests = [name for name in os.listdir(workdir) if name.startswith("manifest")]
    assert len(manifests) == 2
    for name in manifests:
        assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o644, name
