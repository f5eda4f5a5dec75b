"""Tests for shortcut_jax.evaluation.fid: the distance, statistics files and their provenance,
the reference files of others, and the statistics command."""

import types

import numpy as np
import pytest
from PIL import Image

from shortcut_jax.evaluation import distances, fid
from shortcut_jax.evaluation import inception as inc
from shortcut_jax.evaluation.adm_npz import write_adm_npz


def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------------------ the distance


def test_frechet_distance_equals_closed_form_for_commuting_covariances():
    """Covariances with common eigenvectors Q: tr sqrt(S1^1/2 S2 S1^1/2) = sum sqrt(a_i b_i),
    so FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, with no matrix square root at all."""
    rng = np.random.default_rng(0)
    d = 64
    q = _random_rotation(rng, d)
    a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    b[:5] = 0.0  # rank-deficient, like features with fewer samples than dimensions
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert distances.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    got = distances.frechet_distance([1.5], [[0.25]], [-0.5], [[4.0]])
    assert got == pytest.approx(2.0**2 + (0.5 - 2.0) ** 2, rel=1e-12)


def test_feature_moments_equal_two_pass_statistics_far_from_the_origin():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((1000, 12)) * rng.uniform(0.1, 2.0, 12) + 1e4
    moments = fid.FeatureMoments()
    for start, stop in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        moments.add(feats[start:stop].astype(np.float64))
    mu, sigma = moments.mean_and_covariance()
    ref_mu, ref_sigma = distances.gaussian_stats(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-8, atol=1e-10)
    assert moments.count == 1000


# ----------------------------------------------------------------------------- files and checks


def _stats(**provenance):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((50, 8))
    return fid.stats_from_features(feats, **provenance)


def test_statistics_file_keeps_moments_and_provenance(tmp_path):
    stats = _stats(source="celebahq256", resolution=256, extractor="net:abc")
    path = fid.save_stats(stats, str(tmp_path / "s.npz"))
    back = fid.load_stats(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.mu.dtype == np.float64 and back.sigma.dtype == np.float64
    assert (back.count, back.source, back.resolution, back.resize, back.extractor) == (
        50,
        "celebahq256",
        (256, 256),
        fid.RESIZE,
        "net:abc",
    )
    assert back.origin == "shortcut_jax"
    # Other tools read mu/sigma from the same file.
    with np.load(path) as f:
        np.testing.assert_array_equal(f["mu"], stats.mu)


def test_statistics_of_other_resolution_source_or_network_are_refused_naming_both(tmp_path):
    reference = fid.load_stats(
        fid.save_stats(_stats(source="imagenet256", resolution=256, extractor="net:abc"), str(tmp_path / "r.npz"))
    )
    with pytest.raises(fid.StatsMismatchError, match=r"resolution=\(256, 256\).*resolution=\(32, 32\)"):
        fid.check_compatible(reference, resolution=32)
    with pytest.raises(fid.StatsMismatchError, match="source='imagenet256'.*source='cifar10'"):
        fid.check_compatible(reference, resolution=256, source="cifar10")
    with pytest.raises(fid.StatsMismatchError, match="extractor='net:abc'.*extractor='net:xyz'"):
        fid.check_compatible(reference, extractor="net:xyz")
    with pytest.raises(fid.StatsMismatchError, match="8-d features.*2048-d"):
        fid.check_compatible(reference, dim=2048)
    assert (
        fid.check_compatible(reference, resolution=(256, 256), source="imagenet256", extractor="net:abc", dim=8) == []
    )
    samples = _stats(source="cifar10", resolution=256, extractor="net:abc")
    with pytest.raises(fid.StatsMismatchError, match="cifar10"):
        fid.frechet_inception_distance(samples, reference)
    same = _stats(source="imagenet256", resolution=256, extractor="net:abc")
    assert fid.frechet_inception_distance(same, reference) == pytest.approx(0.0, abs=1e-9)


def test_adm_reference_batch_is_read_with_its_resolution(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    mu, sigma = rng.standard_normal(8), np.eye(8)
    np.savez(
        path,
        arr_0=rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8),
        mu=mu,
        sigma=sigma,
        mu_s=rng.standard_normal(4),
        sigma_s=np.eye(4),
    )
    ref = fid.load_stats(str(path))
    assert (ref.origin, ref.resolution, ref.count, ref.resize) == ("adm", (64, 64), 5, fid.ADM_RESIZE)
    np.testing.assert_array_equal(ref.mu, mu)
    with pytest.raises(fid.StatsMismatchError, match=r"\(64, 64\).*\(256, 256\)"):
        fid.check_compatible(ref, resolution=256)
    # Source is not recorded in ADM files: reported as unverified, not silently passed.
    assert fid.check_compatible(ref, resolution=64, source="imagenet64") == ["source"]


def test_bare_mu_sigma_file_is_unverified_until_declared(tmp_path):
    # The official shortcut-models statistics (e.g. celeba256_fidstats_ours.npz) hold mu, sigma.
    path = tmp_path / "celeba256_fidstats_ours.npz"
    np.savez(path, mu=np.zeros(8), sigma=np.eye(8))
    ref = fid.load_stats(str(path))
    assert ref.origin == "mu_sigma" and ref.resolution is None and ref.source is None
    assert fid.check_compatible(ref, resolution=256, source="celebahq256") == ["resolution", "source"]
    declared = fid.load_stats(str(path), resolution=256, source="celebahq256")
    assert fid.check_compatible(declared, resolution=256, source="celebahq256") == []
    with pytest.raises(fid.StatsMismatchError, match="resolution"):
        fid.check_compatible(declared, resolution=128)
    # A file that records its provenance cannot be declared to be something else.
    ours = fid.save_stats(_stats(source="a", resolution=32, extractor="n"), str(tmp_path / "o.npz"))
    with pytest.raises(fid.StatsMismatchError, match="records resolution=\\(32, 32\\)"):
        fid.load_stats(ours, resolution=256)
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="--stats --adm_npz="):
        fid.load_stats(str(tmp_path / "images_only.npz"))


# --------------------------------------------------------------------------------- the command


def _options(**kw):
    values = dict(
        stats=False,
        out="",
        source="",
        adm_npz="",
        num_images=0,
        samples="",
        reference="",
        reference_source="",
        weights="",
        batch_size=2,
    )
    values.update(kw)
    return types.SimpleNamespace(**values)


class ColourFeatures:
    """Stands in for InceptionFeatures (same call and attributes) with 6-d features, so the
    command's data path is tested without a 2048-d eigen-decomposition; the network itself is
    tested in test_fid_inception.py."""

    dim = 6
    extractor_id = "colour-moments:test"

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        x = inc.images_to_uint8(images).astype(np.float32) / 255.0
        self.calls.append(x.shape)
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def test_stats_command_on_an_image_folder_then_fid_of_adm_samples(tmp_path):
    extractor = ColourFeatures()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        folder = tmp_path / "data" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    data = {"name": "image_folder", "path": str(tmp_path / "data"), "num_workers": 1}
    out = str(tmp_path / "ref.npz")
    line = fid.run_command(_options(stats=True, out=out, source="pets24"), data, extractor)
    assert "5 images" in line
    assert extractor.calls == [(2, 24, 24, 3), (2, 24, 24, 3), (1, 24, 24, 3)]  # --batch_size=2
    ref = fid.load_stats(out)
    assert (ref.count, ref.source, ref.resolution, ref.extractor) == (5, "pets24", (24, 24), extractor.extractor_id)
    # Every image once: the same moments as the features of the five images themselves.
    mu, sigma = distances.gaussian_stats(extractor(images))
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-7)

    write_adm_npz(str(tmp_path / "same.npz"), images[::-1])
    line = fid.run_command(_options(samples=str(tmp_path / "same.npz"), reference=out), None, extractor)
    assert line.startswith("FID 0.0000 (5 samples at 24x24")
    write_adm_npz(str(tmp_path / "darker.npz"), images // 2)
    line = fid.run_command(_options(samples=str(tmp_path / "darker.npz"), reference=out), None, extractor)
    assert float(line.split()[1]) > 0.01
    write_adm_npz(str(tmp_path / "small.npz"), images[:, :16, :16])
    with pytest.raises(fid.StatsMismatchError, match=r"\(24, 24\).*\(16, 16\)"):
        fid.run_command(_options(samples=str(tmp_path / "small.npz"), reference=out), None, None)


def test_stats_command_refuses_data_that_are_not_rgb_images_before_loading_weights(tmp_path):
    with pytest.raises(ValueError, match="FID statistics need RGB images"):
        fid.run_command(
            _options(stats=True, out=str(tmp_path / "x.npz"), weights=str(tmp_path / "absent.npz")),
            {"name": "checkerboard"},
        )
    with pytest.raises(ValueError, match="--stats needs --out"):
        fid.run_command(_options(stats=True), {"name": "checkerboard"})
    with pytest.raises(inc.WeightsNotFoundError, match="absent.npz"):
        fid.run_command(
            _options(
                stats=True,
                out=str(tmp_path / "x.npz"),
                adm_npz=str(write_adm_npz(str(tmp_path / "a.npz"), np.zeros((2, 8, 8, 3), np.uint8))),
                weights=str(tmp_path / "absent.npz"),
            ),
            None,
        )
