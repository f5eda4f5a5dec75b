"""A run trained on reflow pairs of a latent run decodes its samples with the VAE of the
teacher's latent set, which the pairs' manifest records (``meta.data.vae``)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest

from shortcut_jax.data import pairs as pairs_io
from shortcut_jax import config_lib
from shortcut_jax.data import pairs
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.models import vae_weights
from shortcut_jax.models.vae import VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT_SHAPE = (8, 8, 4)  # the tiny VAE's latents of 16x16 images


def _write_vae(folder, seed):
    config = VAEConfig.tiny()
    vae_weights.write_diffusers_folder(
        folder, config, vae_weights.seeded_state_dict(sorted(vae_weights.expected_state_dict(config).items()), seed)
    )
    return vae_weights.load_vae(folder)


def _write_pairs(out_dir, vae_record):
    """Pairs as reflow_pairs writes them for a latent teacher (a stand-in sampler: the pairs' values
    do not matter here, their manifest does)."""
    meta = {
        "teacher_workdir": "/runs/latent",
        "data": {
            "name": "latents",
            "path": "/sets/latents",
            "shape": list(LATENT_SHAPE),
            "num_classes": 2,
            "vae": vae_record,
        },
    }
    return pairs_io.generate_pairs(
        lambda params, noise, labels, **kw: noise * 0.5,
        None,
        out_dir=str(out_dir),
        shape=LATENT_SHAPE,
        num_classes=2,
        num_pairs=16,
        num_steps=1,
        seed=0,
        shard_size=16,
        batch_size=16,
        meta=meta,
    )


def _config(path):
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "experiments", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("runlocal=True")
    c.data.name, c.data.path, c.data.random_flip, c.data.image_size = "reflow_pairs", str(path), False, 0
    c.objective.name = "reflow"
    c.eval.decode_batch_size = 4
    return c


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae") / "tiny-vae")
    return folder, _write_vae(folder, 1)


def test_vae_record_is_read_from_the_pairs_manifest(vae, tmp_path):
    _, loaded = vae
    assert pairs.vae_record(_write_pairs(tmp_path / "latent", loaded.describe())) == loaded.describe()
    assert pairs.vae_record(_write_pairs(tmp_path / "pixel", None)) is None
    assert pairs.vae_record({"num_pairs": 1}) is None  # no meta at all


def test_run_on_latent_pairs_decodes_its_samples_with_the_teachers_vae(vae, tmp_path):
    folder, loaded = vae
    _write_pairs(tmp_path / "pairs", loaded.describe())
    exp = Experiment(_config(tmp_path / "pairs"), None)
    try:
        assert exp.decode is not None
        latents = np.random.default_rng(0).standard_normal((3, *LATENT_SHAPE)).astype(np.float32)
        images = exp.decode(latents)
        assert images.shape == (3, 16, 16, 3) and np.isfinite(images).all() and np.abs(images).max() <= 1.0
    finally:
        exp.close()


def test_run_on_latent_pairs_refuses_a_vae_of_other_weights(vae, tmp_path):
    folder, loaded = vae
    _write_pairs(tmp_path / "pairs", loaded.describe())
    other = str(tmp_path / "other-vae")
    shutil.copytree(folder, other)
    _write_vae(other, 2)
    config = _config(tmp_path / "pairs")
    config.eval.vae = other
    with pytest.raises(config_lib.ConfigError, match="other weights .* reflow pairs in"):
        Experiment(config, None)


def test_run_on_pixel_pairs_has_no_decoder(tmp_path):
    _write_pairs(tmp_path / "pairs", None)
    exp = Experiment(_config(tmp_path / "pairs"), None)
    try:
        assert exp.decode is None
    finally:
        exp.close()
