"""``sample`` and ``evaluate`` start from the run's recorded config (its manifest.json): only
``--config`` and ``--workdir`` are needed, ``--config.<key>`` flags still win, and a flag the
checkpoint cannot take is refused by name."""

import os
import subprocess
import sys

import pytest
from absl import flags
from PIL import Image

from shortcut_jax import config_lib, sample
from shortcut_jax.training import loop, offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "digits.py")
TRAINED_WITH = {"model.width": 48, "objective.num_levels": 5, "train.steps": 3, "eval.batch_size": 250}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A digits runlocal run trained with flags the sample command is not given again."""
    path = str(tmp_path_factory.mktemp("recorded") / "digits")
    base = {"train.progress_bar": False, "train.use_tensorboard": False, "train.async_ckpt": False}
    loop.train_and_evaluate(sample.load_config(f"{DIGITS}:runlocal=True", {**base, **TRAINED_WITH}), path)
    return path


def command(module, *args):
    env = {
        **{k: v for k, v in os.environ.items() if k != "SHORTCUT_JAX_DEBUG"},
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def run_cli(argv):
    argv = ["sample", f"--config={DIGITS}:runlocal=True", *argv]
    fv = sample.define_flags(flags.FlagValues(), argv)
    fv(argv)
    return sample.run(fv)


def test_sample_needs_only_config_and_workdir(workdir):
    result = command("shortcut_jax.sample", "--config=experiments/digits.py:runlocal=True", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = os.path.join(workdir, "samples", "step3_1step.png")
    assert result.stdout.strip() == (f"wrote 1 file(s): {out} (64 samples at 1 step(s), checkpoint step 3)")
    assert Image.open(out).size == (8 * 10 + 2, 8 * 10 + 2)  # 8x8 grid of 8x8 digits, 2-pixel padding


def test_run_settings_are_used_and_flags_still_win(workdir):
    given = sample.load_config(f"{DIGITS}:runlocal=True", {"mesh.data": -1})
    config = offline.from_recorded_config(given, workdir, {"eval.batch_size": 7})
    assert config.model.width == 48 and config.objective.num_levels == 5  # the run's
    assert config.eval.batch_size == 7  # the flag's, not the run's 250
    assert config.mesh.data == -1  # the machine's
    assert given.model.width == 32  # the given config is left alone


def test_a_flag_the_checkpoint_cannot_take_is_named(workdir, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"architecture\.width: saved 48, current 32"):
        run_cli([f"--workdir={workdir}", "--config.model.width=32", f"--out={tmp_path / 'g.png'}"])
    with pytest.raises(config_lib.ConfigError, match="objective.num_levels=5; the config gives objective.num_levels=7"):
        run_cli([f"--workdir={workdir}", "--config.objective.num_levels=7", f"--out={tmp_path / 'g.png'}"])
    assert not (tmp_path / "g.png").exists()
