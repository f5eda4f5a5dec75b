"""FID scored where the samples are: decoded images stay on the devices, are quantised and checked
there, and only the features come to the host.

The host path (``pixels.to_uint8``, ``ChunkedFeatures.__call__``, ``_FeatureMomentsOfSamples.add``)
is the reference each device step is compared with. The network is a small stand-in built on the
same ``ChunkedFeatures`` as the FID Inception (which costs seconds per image on a CPU; it is
checked against pytorch-fid in test_fid_inception.py), and the decoder is the tiny VAE.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import config_lib, evaluate
from shortcut_jax.infra import sharding
from shortcut_jax.evaluation import distances, fid, metrics
from shortcut_jax.evaluation.chunked_features import ChunkedFeatures
from shortcut_jax.evaluation.pixels import grey_to_rgb, to_uint8, to_uint8_on_device
from shortcut_jax.evaluation.sample_sets import draw_samples
from shortcut_jax.data import DataSpec
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.models import vae_weights
from shortcut_jax.objectives.sampling import Sampler

DIM = 6


def _pooled_input(images_u8):
    """uint8 [b, H, W, 3] -> float [b, 48]: the mean of each of 4x4 blocks, in [-1, 1]."""
    b, h, w, _ = images_u8.shape
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    return x.reshape(b, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(b, 48)


def _stand_in_network(variables, x):
    return jnp.tanh(3.0 * x @ variables["w1"]) @ variables["w2"]


class StandInFeatures(ChunkedFeatures):
    """6 features of 8-bit images through the FID network's chunking and device handling; records
    which way each batch came in (``('host' or 'device', rows)``)."""

    extractor_id = "stand-in-on-device:6"

    def __init__(self, batch_size=4):
        rng = np.random.default_rng(0)
        variables = {"w1": rng.standard_normal((48, 16)) / math.sqrt(48), "w2": rng.standard_normal((16, DIM))}
        super().__init__(_pooled_input, _stand_in_network, variables, dim=DIM, batch_size=batch_size)
        self.calls = []

    def __call__(self, images):
        self.calls.append(("host", len(images)))
        return super().__call__(images)

    def on_device(self, images, count=None):
        self.calls.append(("device", len(images) if count is None else count))
        return super().on_device(images, count)


@pytest.fixture(scope="module")
def extractor():
    return StandInFeatures()  # 8 devices: chunks of 8


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(config_lib.default_config().mesh)


def _boundary_floats(rng):
    """Random floats in and out of [-1, 1], every .5 boundary of the 8-bit grid and its float32
    neighbours, the grid points themselves, and the clip edges."""
    k = np.arange(-2, 258)
    half = ((k + 0.5) / 127.5 - 1.0).astype(np.float32)
    values = np.concatenate(
        [
            rng.uniform(-1.6, 1.6, 30_000).astype(np.float32),
            half,
            np.nextafter(half, np.float32(2)),
            np.nextafter(half, np.float32(-2)),
            (k / 127.5 - 1.0).astype(np.float32),
            np.float32([-1, 1, -1e30, 1e30, 0, -0.0]),
        ]
    )
    return values[: len(values) // 3 * 3].reshape(-1, 1, 1, 3)


def test_device_quantisation_equals_to_uint8_bit_for_bit():
    x = _boundary_floats(np.random.default_rng(0))
    # the half-way points really are ties after the float32 arithmetic (round half to even decides)
    scaled = (np.clip(x, -1, 1) + np.float32(1)) * np.float32(127.5)
    assert np.sum(scaled == np.floor(scaled) + 0.5) > 100
    host = to_uint8(x)
    device = np.asarray(jax.jit(to_uint8_on_device)(jnp.asarray(x)))
    assert device.dtype == np.uint8
    np.testing.assert_array_equal(device, host)
    assert host.min() == 0 and host.max() == 255


def test_features_on_device_equal_the_host_paths_for_sharded_padded_and_grey_batches(extractor, mesh):
    rng = np.random.default_rng(1)
    batch_sharding = sharding.batch_sharding(mesh)
    rgb = np.tanh(rng.standard_normal((16, 8, 8, 3))).astype(np.float32)
    rgb[13:] = np.nan  # padding rows past count=13 hold anything; they are neither scored nor checked
    features = extractor.on_device(jax.device_put(rgb, batch_sharding), 13)
    assert features.shape == (13, DIM) and features.dtype == np.float32
    np.testing.assert_allclose(features, extractor(to_uint8(rgb[:13])), rtol=1e-6, atol=1e-6)
    assert np.abs(features[0] - features[1]).max() > 1e-3  # different images, different rows

    grey = np.tanh(rng.standard_normal((8, 8, 8, 1))).astype(np.float32)
    on_one_device = extractor.on_device(jnp.asarray(grey))  # not sharded: every row on one device
    np.testing.assert_allclose(on_one_device, extractor(to_uint8(grey_to_rgb(grey))), rtol=1e-6, atol=1e-6)

    pixels = to_uint8(rgb[:8])  # uint8 images go through unchanged
    np.testing.assert_allclose(
        extractor.on_device(jax.device_put(pixels, batch_sharding)), extractor(pixels), rtol=1e-6, atol=1e-6
    )


def test_a_non_finite_sample_on_device_gives_none_and_a_nan_fid_without_stopping(extractor, mesh):
    rng = np.random.default_rng(2)
    images = np.tanh(rng.standard_normal((16, 8, 8, 3))).astype(np.float32)
    images[5, 2, 3, 1] = np.inf
    assert extractor.on_device(jax.device_put(images, sharding.batch_sharding(mesh)), 16) is None

    reference = fid.stats_from_features(rng.standard_normal((40, DIM)), source="x", resolution=(8, 8), extractor=None)
    accumulator = metrics._FeatureMomentsOfSamples(extractor, reference)
    accumulator.add_on_device(jax.device_put(images, sharding.batch_sharding(mesh)), 16)
    accumulator.add_on_device(jnp.asarray(np.zeros_like(images)), 16)  # later batches are skipped
    assert math.isnan(accumulator.result()) and accumulator.moments.count == 0


def test_moments_on_device_equal_the_host_moments_and_wrong_sizes_are_refused(extractor, mesh):
    rng = np.random.default_rng(3)
    batches = [np.tanh(rng.standard_normal((16, 8, 8, 3))).astype(np.float32) for _ in range(3)]
    reference = fid.stats_from_features(rng.standard_normal((40, DIM)), source="x", resolution=(8, 8), extractor=None)
    on_host = metrics._FeatureMomentsOfSamples(extractor, reference)
    on_device = metrics._FeatureMomentsOfSamples(extractor, reference)
    for i, batch in enumerate(batches):
        count = 16 if i < 2 else 11
        on_host.add(batch[:count])
        on_device.add_on_device(jax.device_put(batch, sharding.batch_sharding(mesh)), count)
    assert on_device.moments.count == on_host.moments.count == 43
    for got, want in zip(on_device.moments.mean_and_covariance(), on_host.moments.mean_and_covariance()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert on_device.result() == pytest.approx(on_host.result(), rel=1e-6)

    with pytest.raises(fid.StatsMismatchError, match="eval.fid_reference"):
        on_device.add_on_device(jnp.zeros((4, 16, 16, 3)), 4)
    with pytest.raises(ValueError, match=r"count=5 is not between 0 and the 4 rows"):
        extractor.on_device(jnp.zeros((4, 8, 8, 3)), 5)


@pytest.fixture(scope="module")
def tiny_vae():
    config = vae_lib.VAEConfig.tiny()
    return vae_weights.LoadedVAE(
        config=config,
        params=vae_weights.seeded_params(config, seed=0),
        name="seeded",
        folder="",
        weights_path="",
        weights_sha256="",
    )


def test_latent_decoder_decodes_device_latents_on_their_devices_as_it_decodes_host_ones(tiny_vae, mesh):
    decode = tiny_vae.latent_decoder(dtype=jnp.float32, batch_size=3)
    latents = np.random.default_rng(4).standard_normal((16, 4, 4, tiny_vae.config.latent_channels))
    host = decode(latents.astype(np.float32))
    batch_sharding = sharding.batch_sharding(mesh)
    device = decode(jax.device_put(latents.astype(np.float32), batch_sharding))
    assert isinstance(device, jax.Array) and device.sharding.is_equivalent_to(batch_sharding, 4)
    np.testing.assert_allclose(np.asarray(device), host, rtol=1e-5, atol=1e-5)
    assert np.abs(host).max() <= 1.0 and host.std() > 1e-3


def test_evaluation_of_a_latent_run_scores_decoded_images_on_the_devices(tiny_vae, mesh, tmp_path, monkeypatch):
    stand_in = StandInFeatures()
    monkeypatch.setattr(metrics, "inception_features", lambda weights_path, batch_size: stand_in)
    spec = DataSpec(shape=(4, 4, tiny_vae.config.latent_channels), num_classes=0, kind="images")
    # a latent "model": velocity -x * w, with samples split over the 8 devices
    sampler = Sampler(lambda w, x, t, level, label: -x * w, num_levels=3, num_classes=0, mesh=mesh)
    decode = tiny_vae.latent_decoder(dtype=jnp.float32, batch_size=2)
    side = 4 * tiny_vae.config.downsample_factor
    reference_file = str(tmp_path / "ref.npz")
    reference_features = np.random.default_rng(5).standard_normal((30, DIM))
    fid.save_stats(
        fid.stats_from_features(
            reference_features, source="latent-test", resolution=(side, side), extractor=StandInFeatures.extractor_id
        ),
        reference_file,
    )
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"")  # found by name; the stand-in never reads it
    eval_cfg = config_lib.default_config().eval
    eval_cfg.budgets, eval_cfg.grid_budgets, eval_cfg.grid_size = (1, 4), (), 0
    eval_cfg.num_samples, eval_cfg.batch_size, eval_cfg.export_budgets = 20, 16, ()
    eval_cfg.metric, eval_cfg.fid_reference, eval_cfg.fid_weights = "fid", reference_file, str(weights)
    metric = metrics.build_metric(eval_cfg, "images")

    out = tmp_path / "e"
    results = evaluate.evaluate_budgets(
        eval_cfg, sampler, jnp.float32(0.5), None, spec, metric, out_dir=str(out), step=0, decode=decode
    )
    # every batch (16 samples, then 4 and 12 rows of padding) was scored on the devices
    assert stand_in.calls == [("device", 16), ("device", 4)] * 2
    # The same samples on the host path: drawn, decoded, copied to the host, scored there.
    ref = fid.load_stats(reference_file)
    for n in (1, 4):
        images = draw_samples(
            sampler,
            jnp.float32(0.5),
            shape=spec.shape,
            num_classes=0,
            num_samples=20,
            batch_size=16,
            num_steps=n,
            seed=eval_cfg.seed,
            decode=decode,
        )
        mu, sigma = distances.gaussian_stats(stand_in(images))
        assert results[n] == pytest.approx(distances.frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-6)
    assert results[1] != results[4]
    timings = json.load(open(out / "evaluation.json"))["timings"]["4"]
    assert {"sample_s", "decode_s", "score_s", "host_copy_s"} <= set(timings) and timings["score_s"] > 0

    # A diverged model (NaN samples) scores NaN, and the evaluation still finishes.
    nan_results = evaluate.evaluate_budgets(
        eval_cfg, sampler, jnp.float32(np.nan), None, spec, metric, out_dir=str(tmp_path / "nan"), step=0, decode=decode
    )
    assert all(math.isnan(v) for v in nan_results.values()) and (tmp_path / "nan" / "evaluation.json").exists()
