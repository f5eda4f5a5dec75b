"""The latent chain end to end on CPU: image folder -> encode -> train on latents -> samples
decoded by the same VAE in the evaluation's grids."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from shortcut_jax import config_lib, encode
from shortcut_jax.evaluation import evaluator
from shortcut_jax.infra import checkpoint, plots
from shortcut_jax.training import loop
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.data.image_source import open_image_folder
from shortcut_jax.models import vae_weights
from shortcut_jax.models.vae import VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16  # the tiny VAE halves it: 8x8x4 latents


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        os.makedirs(root / "images" / label)
        for i in range(8):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((20, 18), Image.Resampling.BILINEAR).save(
                root / "images" / label / f"{i}.png"
            )
    vae_folder = str(root / "tiny-vae")
    config = VAEConfig.tiny()
    vae_weights.write_diffusers_folder(
        vae_folder, config, vae_weights.seeded_state_dict(sorted(vae_weights.expected_state_dict(config).items()), 1)
    )
    source = open_image_folder(str(root / "images"), IMAGE_SIZE, 2)
    encode.encode_images(
        source,
        str(root / "latents"),
        vae_weights.load_vae(vae_folder),
        encode.EncodeSettings(image_size=IMAGE_SIZE, batch_size=8, shard_size=8),
        progress=False,
    )
    source.close()
    return root, vae_folder


def latent_run_config(path):
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "experiments", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("runlocal=True")
    c.data.name, c.data.path, c.data.random_flip, c.data.image_size = "latents", path, True, IMAGE_SIZE
    c.train.steps, c.train.eval_every, c.train.progress_bar, c.train.use_tensorboard = 2, 2, False, False
    c.train.async_ckpt = False
    c.eval.budgets, c.eval.grid_budgets, c.eval.grid_size, c.eval.decode_batch_size = (1,), (1,), 8, 4
    return c


def test_latent_run_trains_and_its_grids_show_decoded_images(encoded, tmp_path):
    root, _ = encoded
    workdir = tmp_path / "run"
    state = loop.train_and_evaluate(latent_run_config(str(root / "latents")), str(workdir))
    assert int(state.step) == 2
    grid = np.asarray(Image.open(workdir / "eval" / "00000002" / "samples_1step.png"))
    # 8 decoded 16x16 RGB images in a 3x3 grid with 2-pixel padding (latents would be 8x8 tiles)
    assert grid.shape == (3 * (IMAGE_SIZE + 2) + 2, 3 * (IMAGE_SIZE + 2) + 2, 3)
    # the tiles are the run's 4-channel latent samples decoded by the VAE: draw the same samples
    # from the final checkpoint without decoding, decode them here and tile them the same way
    cfg = latent_run_config(str(root / "latents"))
    exp = Experiment(cfg, str(workdir))
    try:
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            state, _, _ = exp.restore(ckpt, 2)
        _, latents, _ = evaluator._draw_budget(  # noqa: SLF001
            cfg.eval,
            exp.sampler,
            exp.eval_params(state),
            exp.spec,
            1,
            cfg.eval.grid_size,
            accumulator=None,
            export=None,
            image_shape=None,
            shown_count=cfg.eval.grid_size,
            decode=None,
            progress=False,
        )
        latents = np.asarray(latents)
        assert latents.shape == (8, IMAGE_SIZE // 2, IMAGE_SIZE // 2, 4)
        decoded = np.asarray(exp.decode(latents))
    finally:
        exp.close()
    assert decoded.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    want = plots.save_image_grid(decoded, None)
    assert np.abs(grid.astype(int) - want.astype(int)).max() <= 1


def test_latent_run_with_other_vae_weights_is_refused_before_training(encoded, tmp_path):
    root, vae_folder = encoded
    other = str(tmp_path / "other-vae")
    shutil.copytree(vae_folder, other)
    config = VAEConfig.tiny()
    vae_weights.write_diffusers_folder(
        other, config, vae_weights.seeded_state_dict(sorted(vae_weights.expected_state_dict(config).items()), 2)
    )
    cfg = latent_run_config(str(root / "latents"))
    cfg.eval.vae = other
    workdir = tmp_path / "refused"
    with pytest.raises(config_lib.ConfigError, match="other weights"):
        loop.train_and_evaluate(cfg, str(workdir))
    assert not workdir.exists()


def test_the_latent_chain_runs_offline_with_the_documented_commands(encoded, tmp_path):
    """docs/data.md's offline chain as a user types it: a latent experiment file with
    runlocal=True trains on the set a seeded VAE encoded, and `sample` writes decoded RGB images
    with only --config and --workdir."""
    import subprocess
    import sys

    from conftest import child_env

    root, vae_folder = encoded
    workdir = str(tmp_path / "run")
    env = child_env(PYTHONPATH=ROOT)
    config = "experiments/celebahq.py:runlocal=True"
    train = [
        sys.executable, "-m", "shortcut_jax.main", f"--config={config}", f"--workdir={workdir}",
        f"--config.data.path={root / 'latents'}", f"--config.eval.vae={vae_folder}", "--config.train.progress_bar=False",
    ]  # fmt: skip
    done = subprocess.run(train, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = str(tmp_path / "pngs")
    sample = [
        sys.executable, "-m", "shortcut_jax.sample", f"--config={config}", f"--workdir={workdir}",
        "--num_steps=1", "--num_images=4", f"--out_dir={out_dir}",
    ]  # fmt: skip
    drawn = subprocess.run(sample, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    pictures = sorted(os.listdir(out_dir))
    assert len(pictures) == 4
    assert np.asarray(Image.open(os.path.join(out_dir, pictures[0]))).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
