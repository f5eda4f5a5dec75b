"""``python -m shortcut_jax.sample`` on a latent run: decoded RGB images (by the VAE the run
records), not raw latents."""

import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from shortcut_jax import sample
from shortcut_jax.infra import checkpoint
from shortcut_jax.training import loop
from test_latent_run import IMAGE_SIZE, encoded, latent_run_config  # noqa: F401 - the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "digits.py")


@pytest.fixture(scope="module")
def latent_run(encoded, tmp_path_factory):  # noqa: F811
    root, vae_folder = encoded
    workdir = str(tmp_path_factory.mktemp("latent_sample") / "run")
    loop.train_and_evaluate(latent_run_config(str(root / "latents")), workdir)
    return workdir, str(root / "latents"), vae_folder


def run_cli(argv):
    argv = ["sample", *argv]
    fv = sample.define_flags(flags.FlagValues(), argv)
    fv(argv)
    return sample.run(fv)


def test_checkpoint_records_the_vae_that_decodes_the_samples(latent_run):
    workdir, _, vae_folder = latent_run
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        assert ckpt.read_meta()["vae"]["folder"] == vae_folder


@pytest.mark.parametrize("data_flags", [True, False], ids=["data flags", "recorded config"])
def test_sample_writes_decoded_rgb_images(latent_run, tmp_path, data_flags):
    workdir, latents, _ = latent_run
    out_dir = tmp_path / "pngs"
    flags_given = [
        "--config.data.name=latents",
        f"--config.data.path={latents}",
        f"--config.data.image_size={IMAGE_SIZE}",
        "--config.eval.decode_batch_size=4",
    ]
    paths = run_cli(
        [
            f"--config={DIGITS}:runlocal=True",
            *(flags_given if data_flags else []),
            f"--workdir={workdir}",
            "--num_images=3",
            f"--out_dir={out_dir}",
        ]
    )
    assert len(paths) == 3
    for path in paths:  # 16x16 RGB images, not 8x8x4 latents
        assert np.asarray(Image.open(path)).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
