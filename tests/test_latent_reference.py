"""The latent set's reference set (the samples latent runs' metrics compare with): the stored
moments of the image as encoded, not its mirror, mapped to the training stream's scale
``(mean + std * eps - shift) * scale``."""

import json
import os

import numpy as np

from shortcut_jax.data import default_data_config, make_dataset
from shortcut_jax.data import latents as latent_format
from shortcut_jax.data.core import draw_reference_indices

SCALE, SHIFT = 0.5, 0.25
N = 10
SHAPE = (2, 3, 2)  # h, w, c: three columns, so that left and right differ


def write_set(root, moments):
    """A set in the encoder's file format from ``moments`` [n, 2 (image, mirror), 2 (mean, std), h, w, c]."""
    os.makedirs(root)
    np.save(latent_format.shard_paths(root, 0)[0], moments.astype(np.float32))
    np.save(latent_format.shard_paths(root, 0)[1], np.zeros(len(moments), np.int32))
    manifest = {
        "format": latent_format.FORMAT,
        "version": latent_format.FORMAT_VERSION,
        "complete": True,
        "count": len(moments),
        "num_classes": 1,
        "image_size": 8 * SHAPE[0],
        "vae": {"name": "test/vae", "weights_sha256": "ab" * 32},
        "scaling_factor": SCALE,
        "shift_factor": SHIFT,
        "latent_shape": list(SHAPE),
        "dtype": "float32",
        "shard_size": len(moments),
        "num_shards": 1,
        "shards": [{"index": 0, "start": 0, "count": len(moments)}],
    }
    with open(os.path.join(root, latent_format.MANIFEST), "w") as f:
        json.dump(manifest, f)


def source_of(root):
    config = default_data_config()
    config.name, config.path = "latents", root
    return make_dataset(config, batch_size=2, seed=0)


def asymmetric_means():
    """Example i's latent rises from left to right; its mirror's falls, and is offset, so a
    mirrored read is neither the stored image nor a plain flip of it."""
    rng = np.random.default_rng(0)
    columns = np.arange(SHAPE[1], dtype=np.float32)[None, None, :, None]
    image = (np.arange(N, dtype=np.float32)[:, None, None, None] + 1) * (1 + columns) + rng.normal(
        size=(N, *SHAPE)
    ).astype(np.float32) * 0.1
    mirror = -np.flip(image, axis=2) - 3.0
    return image, mirror


def test_reference_is_the_stored_image_unmirrored_and_scaled(tmp_path):
    """Rules out a reference set read from the mirrored moments, or returned without the shift and
    scale the training batches get (``(mean - shift) * scale``)."""
    image, mirror = asymmetric_means()
    moments = np.zeros((N, 2, 2, *SHAPE), np.float32)
    moments[:, 0, 0], moments[:, 1, 0] = image, mirror  # std 0: the sample is the mean
    root = str(tmp_path / "set")
    write_set(root, moments)
    source = source_of(root)
    for n, seed in [(6, 1), (6, 2), (N, 3)]:
        indices = draw_reference_indices(N, n, seed)
        got = source.reference(n, seed=seed)
        np.testing.assert_allclose(got, (image[indices] - SHIFT) * SCALE, rtol=1e-6, atol=1e-6)
        # not vacuous: the mirrored or unscaled reading is another set
        assert np.abs(got - (mirror[indices] - SHIFT) * SCALE).min() > 0.1
        assert np.abs(got - np.flip((image[indices] - SHIFT) * SCALE, axis=2)).max() > 0.1
        assert np.abs(got - image[indices]).max() > 0.1
    # on the training stream's scale: the reference matches an unflipped, unshuffled epoch
    config = default_data_config()
    config.name, config.path, config.shuffle, config.random_flip = "latents", root, False, False
    epoch = make_dataset(config, batch_size=N, seed=0).next_batch()["x"]
    np.testing.assert_allclose(source.reference(N, seed=0), epoch, rtol=1e-6, atol=1e-6)
    source.close()


def test_reference_draws_posterior_samples_with_the_stored_std(tmp_path):
    """Rules out a reference set of posterior means only (the std term dropped) or of unscaled
    samples: with std s the scaled samples spread by ``s * scale`` around ``(mean - shift) * scale``."""
    image, mirror = asymmetric_means()
    moments = np.zeros((N, 2, 2, *SHAPE), np.float32)
    moments[:, 0, 0], moments[:, 1, 0] = image, mirror
    moments[:, 0, 1], moments[:, 1, 1] = 0.2, 5.0  # the mirror's std would stand out
    root = str(tmp_path / "set")
    write_set(root, moments)
    source = source_of(root)
    indices = draw_reference_indices(N, N, 4)
    z = (source.reference(N, seed=4) - (image[indices] - SHIFT) * SCALE) / (0.2 * SCALE)
    assert z.size == N * int(np.prod(SHAPE))
    assert abs(z.mean()) < 0.3 and 0.75 < z.std() < 1.25
    source.close()
