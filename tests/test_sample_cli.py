"""``python -m shortcut_jax.sample``: a grid or one PNG per image from a checkpoint, at a chosen
budget, labels, guidance scale and seed; and its refusals, each naming the flag to change, before
the checkpoint is restored or anything compiled."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from conftest import child_env
from shortcut_jax import sample
from shortcut_jax.infra import checkpoint, plots
from shortcut_jax.training import loop
from shortcut_jax.evaluation.pixels import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "digits.py")


BASE = {"train.progress_bar": False, "train.use_tensorboard": False, "train.async_ckpt": False}


def digits_config(**overrides):
    return sample.load_config(f"{DIGITS}:runlocal=True", {**BASE, **overrides})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The digits config's small class-conditional DiT after 6 training steps (10 classes, 8x8x1);
    a high learning rate moves the zero-initialised output layer, and the debiased EMA (what is
    sampled) follows it, so that labels and budgets change the samples."""
    path = str(tmp_path_factory.mktemp("sample_cli") / "digits")
    loop.train_and_evaluate(digits_config(**{"optim.lr": 1e-2, "train.ema_debias": True}), path)
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    run = sample.load_run(digits_config(), workdir)
    yield run
    run.close()


def run_cli(argv):
    """``python -m shortcut_jax.sample`` parsed by absl as on the command line, in this process."""
    argv = ["sample", f"--config={DIGITS}:runlocal=True", *argv]
    fv = sample.define_flags(flags.FlagValues(), argv)
    fv(argv)
    return sample.run(fv)


def test_grid_holds_the_samples_of_the_requested_budget_labels_scale_and_seed(workdir, loaded, tmp_path):
    out = str(tmp_path / "grid.png")
    assert run_cli(
        [
            f"--workdir={workdir}",
            "--num_steps=4",
            "--num_images=6",
            "--labels=1,2",
            "--cfg_scale=1.5",
            "--seed=3",
            f"--out={out}",
        ]
    ) == [out]
    expected, labels = sample.sample(loaded, num_images=6, num_steps=4, labels=[1, 2], cfg_scale=1.5, seed=3)
    assert labels.tolist() == [1, 2, 1, 2, 1, 2] and expected.shape == (6, 8, 8, 1)
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid, plots.save_image_grid(expected, None)[..., 0])
    # every choice shows in the samples
    for changed in ({"num_steps": 1}, {"labels": [3, 4]}, {"cfg_scale": 1.0}, {"seed": 4}):
        args = {"num_images": 6, "num_steps": 4, "labels": [1, 2], "cfg_scale": 1.5, "seed": 3, **changed}
        assert np.abs(sample.sample(loaded, **args)[0] - expected).max() > 1e-4, changed
    # the run was loaded from its checkpoint's record alone: no data source was opened
    assert loaded.exp.source is None and loaded.step == 6


def test_out_dir_gets_one_png_per_image_named_by_its_class(workdir, loaded, tmp_path):
    folder = tmp_path / "pngs"
    paths = run_cli([f"--workdir={workdir}", "--num_steps=2", "--num_images=3", "--class=7", f"--out_dir={folder}"])
    assert sorted(os.listdir(folder)) == ["00000_class7.png", "00001_class7.png", "00002_class7.png"]
    expected, _ = sample.sample(loaded, num_images=3, num_steps=2, class_label=7, seed=0)
    for path, image in zip(paths, expected):
        assert np.array_equal(np.asarray(Image.open(path)), to_uint8(np.repeat(image[None], 3, -1))[0, ..., 0])


ERRORS = {
    "no checkpoint": ([], "no checkpoint in .*empty/checkpoints: fix --workdir"),
    "budget": (["--num_steps=3"], r"num_steps=3 is not a valid budget; use one of \[1, 2, 4, 8, 16, 32, 64, 128\]"),
    "budget over the levels": (["--num_steps=256"], "objective.num_levels=7, so at most 128"),
    "label": (["--labels=3,10"], r"--labels holds \[10\]: the model has 10 classes, 0 to 9"),
    "class": (["--class=-1"], r"--class holds \[-1\]"),
    "both": (["--labels=1", "--class=2"], "give --labels or --class, not both"),
    "output": (["--out=a.png", "--out_dir=b"], "give --out=FILE.png"),
    "no output": (["--out="], "give --out=FILE.png"),
    "guidance interval the network does not read": (
        ["--guidance_interval=0.1,0.7"],
        "this run's network does not read a guidance interval",
    ),
    "guidance interval out of order": (["--guidance_interval=0.7,0.1"], "give start,end with 0 <= start <= end <= 1"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_requests_are_refused_naming_the_flag_before_restoring_or_compiling(case, workdir, tmp_path, monkeypatch):
    extra, message = ERRORS[case]
    target = str(tmp_path / "empty") if case == "no checkpoint" else workdir
    os.makedirs(tmp_path / "empty")
    if not any(a.startswith("--out") for a in extra):
        extra = extra + [f"--out={tmp_path / 'grid.png'}"]
    compiled, restored = [], []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(a))
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", lambda *a, **k: restored.append(a))
    with pytest.raises(ValueError if case != "no checkpoint" else FileNotFoundError, match=message):
        run_cli([f"--workdir={target}", *extra])
    assert not compiled and not restored
    assert os.listdir(tmp_path / "empty") == [] and not (tmp_path / "grid.png").exists()


def test_command_line_module_writes_the_grid(workdir, tmp_path):
    out = tmp_path / "cli.png"
    env = child_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.sample",
            f"--config={DIGITS}:runlocal=True",
            f"--workdir={workdir}",
            "--num_steps=2",
            "--num_images=4",
            "--class=5",
            f"--out={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 1 file(s)" in proc.stdout and "checkpoint step 6" in proc.stdout
    assert np.asarray(Image.open(out)).shape == (2 * 10 + 2, 2 * 10 + 2)  # 2x2 grid of 8x8 greyscale images


def test_guidance_interval_and_scale_reach_an_improved_meanflow_network_that_reads_them(tmp_path, monkeypatch):
    """The digits config with improved MeanFlow and the guidance interval as a network input (6
    steps): the command's grid equals the library's samples at the same flags, another interval,
    or another scale, gives other samples, and a scale outside the trained range is refused."""
    overrides = {
        "optim.lr": 1e-2,
        "train.ema_debias": True,
        "objective.meanflow_interval_input": True,
        "objective.meanflow_omega_range": (1.0, 4.0),
        "eval.budgets": (1,),
        "eval.grid_budgets": (),
    }
    workdir = str(tmp_path / "mfv")
    argv_config = f"{DIGITS}:runlocal=True,objective=meanflow_v"
    config = sample.load_config(argv_config, {**BASE, **overrides})
    loop.train_and_evaluate(config, workdir)
    out = str(tmp_path / "grid.png")
    argv = ["sample", f"--config={argv_config}", f"--workdir={workdir}", "--num_steps=1", "--num_images=4"]
    argv += ["--labels=1,2", "--cfg_scale=3", "--guidance_interval=0.2,0.6", "--seed=5", f"--out={out}"]
    fv = sample.define_flags(flags.FlagValues(), argv)
    fv(argv)
    assert sample.run(fv) == [out]
    run = sample.load_run(config, workdir)
    try:
        kwargs = {"num_images": 4, "num_steps": 1, "labels": [1, 2], "seed": 5}
        chosen, _ = sample.sample(run, cfg_scale=3.0, guidance_interval=(0.2, 0.6), **kwargs)
        every_t, _ = sample.sample(run, cfg_scale=3.0, guidance_interval=(0.0, 1.0), **kwargs)
        weaker, _ = sample.sample(run, cfg_scale=1.5, guidance_interval=(0.2, 0.6), **kwargs)
    finally:
        run.close()
    assert np.array_equal(np.asarray(Image.open(out)), plots.save_image_grid(chosen, None)[..., 0])
    assert np.abs(chosen - every_t).max() > 1e-4 and np.abs(chosen - weaker).max() > 1e-4
    # a scale outside the trained range is refused before the checkpoint is read
    argv[argv.index("--cfg_scale=3")] = "--cfg_scale=6"
    fv = sample.define_flags(flags.FlagValues(), argv)
    fv(argv)
    restored = []
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", lambda *a, **k: restored.append(a))
    with pytest.raises(ValueError, match="trained for guidance scales 1.0 to 4.0"):
        sample.run(fv)
    assert not restored
