"""Run records: metric writers, sample pictures, the manifest, JSON conversion."""

import glob
import json
import math
import os
import sys
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from shortcut_jax.infra import manifest, plots, writers
from shortcut_jax.infra.jsonable import jsonable


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_appends_across_writers_and_converts_scalars(tmp_path):
    workdir = str(tmp_path / "run")
    w = writers.MetricWriter(workdir)
    w.write_scalars(1, {"loss": np.float32(0.25), "lr": jnp.asarray(1e-3), "epoch": np.int64(2)})
    w.write_scalars(2, {"loss": jnp.asarray(0.5, jnp.bfloat16), "ok": np.bool_(True), "nan": float("nan")})
    w.close()
    # A resumed run opens a new writer on the same workdir.
    with writers.MetricWriter(workdir) as w2:
        w2.write_scalars(np.int64(3), {"loss": 0.125, "grad_norm": np.array([2.0], np.float64)})
    rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "loss": 0.25, "lr": pytest.approx(1e-3), "epoch": 2}
    assert type(rows[0]["loss"]) is float and type(rows[0]["epoch"]) is int
    assert rows[1]["loss"] == 0.5 and rows[1]["ok"] == 1 and math.isnan(rows[1]["nan"])
    assert rows[2] == {"step": 3, "loss": 0.125, "grad_norm": 2.0}
    # One TensorBoard event file per launch.
    assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))) == 2


def test_write_scalars_rejects_arrays_and_reserved_name(tmp_path):
    with writers.MetricWriter(str(tmp_path), use_tensorboard=False) as w:
        with pytest.raises(ValueError, match="single numbers"):
            w.write_scalars(0, {"v": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(0, {"step": 1})


def test_non_primary_writer_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    with writers.MetricWriter(workdir, is_primary=False, use_wandb=True) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    assert not os.path.exists(workdir)


def test_write_images_goes_to_tensorboard_without_a_second_png_copy(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (4, 4, 1), dtype=np.uint8)
    with writers.MetricWriter(str(tmp_path)) as w:
        w.write_images(7, {"samples/euler 1": rgb, "gray": gray})
        with pytest.raises(ValueError, match="uint8"):
            w.write_images(7, {"bad": rgb.astype(np.float32)})
    assert not (tmp_path / "images").exists()  # the evaluation folder holds the PNGs
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_wandb_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb"):
        writers.MetricWriter(str(tmp_path), use_wandb=True)


def test_wandb_logging_and_resume_id(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        util=types.SimpleNamespace(generate_id=lambda: "abc123"),
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda values, step: calls.append(("log", values, step)),
        Image=lambda x: ("image", x.shape),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = ml_collections.ConfigDict({"model": {"width": 64}})
    for _ in range(2):
        with writers.MetricWriter(
            str(tmp_path), use_wandb=True, wandb_project="p", config=config, use_tensorboard=False
        ) as w:
            w.write_scalars(5, {"loss": np.float32(1.5)})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"]
    assert inits[0]["config"] == {"model": {"width": 64}} and inits[0]["project"] == "p"
    assert ("log", {"loss": 1.5}, 5) in calls
    assert calls[-1] == ("finish",)


def test_save_image_grid_layout_and_png(tmp_path):
    n, h, w = 5, 4, 3
    images = np.stack([np.full((h, w, 3), v, np.float32) for v in np.linspace(-1, 1, n)])
    images[0, 0, 0] = 7.0  # out of range: clipped
    images[1, 0, 0] = np.nan
    path = str(tmp_path / "sub" / "grid.png")
    grid = plots.save_image_grid(images, path, nrow=3)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (h + 2) + 2, 3 * (w + 2) + 2, 3)
    # Borders and gaps are padding; the unused last cell stays empty.
    assert not grid[:2].any() and not grid[:, :2].any() and not grid[6:8].any() and not grid[:, 5:7].any()
    assert not grid[8:12, 12:15].any()
    assert grid[2, 2, 0] == 255 and grid[2, 3, 0] == 0  # clipped 7.0; value -1
    assert grid[2, 7, 0] == 0  # NaN
    assert grid[2, 8, 0] == 64  # -0.5 -> 63.75 -> 64
    assert grid[8, 9, 0] == 255  # last image, value 1
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_save_image_grid_gray_and_value_range(tmp_path):
    images = np.linspace(0, 1, 2 * 3 * 3).reshape(2, 3, 3, 1)
    path = str(tmp_path / "g.png")
    grid = plots.save_image_grid(images, path, value_range=(0, 1))
    assert grid.shape == (3 + 4, 2 * 3 + 6, 1)
    assert grid[2, 2, 0] == 0 and grid[4, 12 - 3, 0] == 255
    loaded = Image.open(path)
    assert loaded.mode == "L"
    np.testing.assert_array_equal(np.asarray(loaded), grid[..., 0])
    with pytest.raises(ValueError):
        plots.save_image_grid(np.zeros((2, 3, 3, 2)), None)


def test_save_scatter(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "s" / "scatter.png")
    image = plots.save_scatter(rng.normal(size=(200, 2)), path, reference=rng.normal(size=(100, 2)), lim=4)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert Image.open(path).size == (image.shape[1], image.shape[0])
    # Both colours are present: generated in blue, reference in orange.
    assert (image[..., 2].astype(int) - image[..., 0] > 80).any()
    assert (image[..., 0].astype(int) - image[..., 2] > 80).any()
    with pytest.raises(ValueError):
        plots.save_scatter(np.zeros((3, 3)), None)


def test_write_manifest(tmp_path, monkeypatch):
    config = ml_collections.ConfigDict({"model": {"width": 64, "mult": (1, 2)}, "act": np.tanh, "lr": np.float32(0.5)})
    monkeypatch.setattr(sys, "argv", ["train.py", "--workdir", str(tmp_path)])
    path = manifest.write_manifest(str(tmp_path), config, extra={"resumed_from": 10})
    assert path == str(tmp_path / "manifest.json")
    with open(path) as f:
        m = json.load(f)
    for key in ("time_utc", "command", "host", "git", "versions", "devices", "config", "extra"):
        assert key in m, key
    assert m["config"]["model"] == {"width": 64, "mult": [1, 2]} and m["config"]["lr"] == 0.5
    assert isinstance(m["config"]["act"], str)
    assert m["command"] == ["train.py", "--workdir", str(tmp_path)]
    assert m["extra"] == {"resumed_from": 10}
    assert set(m["git"]) >= {"commit", "dirty"} and isinstance(m["git"]["commit"], str)
    for pkg in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections"):
        assert m["versions"][pkg], pkg
    assert m["devices"]["platform"] == "cpu" and m["devices"]["device_count"] == 8
    assert m["devices"]["process_count"] == 1
    # A second launch keeps the first manifest and updates manifest.json.
    manifest.write_manifest(str(tmp_path), {"model": {"width": 128}})
    dated = sorted(glob.glob(str(tmp_path / "manifest-*.json")))
    assert len(dated) == 2
    with open(path) as f:
        assert json.load(f)["config"] == {"model": {"width": 128}}
    with open(dated[0]) as f:
        assert json.load(f)["config"]["model"]["width"] == 64


def test_git_info_outside_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_git", lambda args, cwd: None)
    info = manifest._git_info()
    assert info["commit"] == "unknown" and info["dirty"] is None


def test_jsonable_is_strict_only_when_asked():
    record = {"t": (1, np.int64(2)), "a": np.arange(2.0), "s": {3}, "cfg": ml_collections.ConfigDict({"k": 1})}
    assert jsonable(record, strict=True) == {"t": [1, 2], "a": [0.0, 1.0], "s": [3], "cfg": {"k": 1}}
    assert isinstance(jsonable({"f": np.tanh})["f"], str)  # a manifest keeps what it can
    with pytest.raises(TypeError, match="ufunc"):
        jsonable({"f": np.tanh}, strict=True)  # a checkpoint refuses what would not come back equal


def test_read_metrics_returns_the_written_rows_and_skips_a_cut_last_line(tmp_path):
    writer = writers.MetricWriter(str(tmp_path), use_tensorboard=False)
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_scalars(2, {"eval/cfd_1step": 3.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a run killed mid-line
    assert writers.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 0.5}, {"step": 2, "eval/cfd_1step": 3.0}]
    assert writers.read_metrics(str(tmp_path / "missing")) == []


def test_a_resumed_writer_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    """Rows past the step a run resumes from were logged before it was stopped and will be
    logged again: they go, with a line cut off by the kill; rows up to the step stay as written."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"note": "no step"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    writer = writers.MetricWriter(str(tmp_path), use_tensorboard=False, resume_step=5)
    writer.write_scalars(6, {"loss": 0.5})
    writer.close()
    steps = [r.get("step") for r in writers.read_metrics(str(tmp_path))]
    assert steps == [1, 2, 3, 4, 5, None, 6]


def test_a_killed_and_resumed_run_logs_every_step_once(tmp_path):
    """A run stopped after logging steps past its last checkpoint, then started again: each step
    is in metrics.jsonl once (the state resumes at the checkpoint, and so does the log)."""
    import shutil

    from conftest import toy2d_config
    from shortcut_jax.training import loop

    config = toy2d_config(
        "runlocal=True",
        **{
            "model.width": 32,
            "model.depth": 2,
            "train.steps": 20,
            "train.log_every": 5,
            "train.ckpt_every": 10,
            "train.eval_every": 1000,
        },
    )
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    # as if killed after logging steps 15 and 20 but before step 20's checkpoint was written
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    loop.train_and_evaluate(config, workdir)
    steps = [r["step"] for r in writers.read_metrics(workdir) if "loss" in r]
    assert steps == [5, 10, 15, 20]


def test_scatter_plots_of_one_reference_share_their_axes_whatever_the_samples():
    """The axes come from the data, not from the samples: two plots whose samples both fall outside
    the data's frame show the same picture (fitted to the samples, they would differ)."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(-2, 2, size=(500, 2))
    assert plots.scatter_limits(reference)[0] < reference.min() and plots.scatter_limits(reference)[1] > reference.max()
    far = plots.save_scatter(rng.normal(50, 1, size=(100, 2)), None, reference=reference)
    farther = plots.save_scatter(rng.normal(-90, 5, size=(100, 2)), None, reference=reference)
    np.testing.assert_array_equal(far, farther)


def test_atomic_files_appear_whole_or_not_at_all(tmp_path):
    from shortcut_jax.infra import files

    path = tmp_path / "sub" / "x.npz"
    files.atomic_savez(path, a=np.arange(3))
    with np.load(path) as f:
        assert f["a"].tolist() == [0, 1, 2]
    files.atomic_write_text(tmp_path / "t.json", "{}\n")
    assert (tmp_path / "t.json").read_text() == "{}\n"
    with pytest.raises(RuntimeError):
        with files.AtomicFile(tmp_path / "t.json") as partial:
            with open(partial, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert (tmp_path / "t.json").read_text() == "{}\n"  # the old file stays, the partial one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.json"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.npz"]


def test_one_quantisation_for_pictures_and_metrics():
    from shortcut_jax.evaluation import pixels
    from shortcut_jax.infra import images

    x = np.random.default_rng(0).uniform(-1.2, 1.2, size=(4, 5, 5, 3)).astype(np.float32)
    x[0, 0, 0] = np.linspace(-1, 1, 256, dtype=np.float32)[[0, 1, 2]]
    want = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(images.to_uint8(x), want)
    np.testing.assert_array_equal(pixels.to_uint8(x), want)
    np.testing.assert_array_equal(plots.save_image_grid(x, None, padding=0, nrow=4)[:5, :5], want[0])


def test_metrics_by_step_merges_the_training_and_evaluation_rows_of_a_step(tmp_path):
    with writers.MetricWriter(str(tmp_path), use_tensorboard=False) as w:
        w.write_scalars(10, {"loss": 0.5})
        w.write_scalars(20, {"loss": 0.25})
        w.write_scalars(20, {"eval/sliced_wasserstein_1step": 0.1})
    merged = writers.metrics_by_step(str(tmp_path))
    assert sorted(merged) == [10, 20]
    assert merged[20]["loss"] == 0.25 and merged[20]["eval/sliced_wasserstein_1step"] == 0.1
