"""Tests for the CIFAR classifier, the classifier Frechet distance (CFD) and their scripts."""

import json
import math
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from benchmarks import feature_ladder
from shortcut_jax.evaluation import train_classifier
from shortcut_jax import config_lib
from shortcut_jax.evaluation import classifier, feature_distance, metrics

# Small enough that every compilation takes a second or two on a CPU.
TINY = {"widths": [8, 8, 16, 16]}


def _synthetic(n, num_classes=4, seed=0, size=32):
    """uint8 images whose class sets the mean colour: learnable in a couple of steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = rng.uniform(30, 225, (num_classes, 3))
    x = palette[labels][:, None, None, :] + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8), labels.astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
    model = classifier.build_model(TINY)
    variables = classifier.init_variables(model, 0)
    return classifier.normalize_config(TINY), model, variables


@pytest.fixture(scope="module")
def extractor(tiny):
    config, _, variables = tiny
    return feature_distance.FeatureExtractor.from_variables(config, variables, batch_size=64)


# ---------------------------------------------------------------- network


def test_default_network_shapes():
    for dtype in (jnp.float32, jnp.bfloat16):
        model = classifier.build_model(None, dtype=dtype)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
        out, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False), variables)
        assert out.shape == (2, 10) and feats.shape == (2, 512)
        assert out.dtype == jnp.float32 and feats.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    assert 6_000_000 < count < 7_000_000


def test_tiny_network_outputs(tiny):
    _, model, variables = tiny
    x = classifier.images_to_float(_synthetic(3)[0])
    out = classifier.logits(model, variables, x)
    feats = classifier.features(model, variables, x)
    assert out.shape == (3, 10) and feats.shape == (3, 16)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(feats) >= 0)  # pooled after a ReLU


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown"):
        classifier.normalize_config({"depth": 3})
    with pytest.raises(ValueError, match="pool"):
        classifier.normalize_config({"pool": "median"})


def test_augment_is_a_translation_and_flip_of_each_image():
    x, _ = _synthetic(4, seed=1)
    x[:, :, :, 0] = np.arange(32, dtype=np.uint8)[None, None, :] * 7  # asymmetric, so flips show
    out = np.asarray(classifier.augment_batch(classifier.prng_key(3), x))
    padded = np.pad(classifier.images_to_float(x), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    for i in range(len(x)):
        candidates = [
            c
            for dy in range(9)
            for dx in range(9)
            for c in (padded[i, dy : dy + 32, dx : dx + 32], padded[i, dy : dy + 32, dx : dx + 32][:, ::-1])
        ]
        assert any(np.array_equal(out[i], c) for c in candidates)


def test_two_training_steps_decrease_loss(tiny):
    config, model, variables = tiny
    x, y = _synthetic(64, seed=2)
    tx = classifier.make_optimizer(0.05)
    state = classifier.create_train_state(variables, tx)
    step = classifier.make_train_step(model, tx, label_smoothing=0.1)

    def loss(state):
        return float(
            classifier._loss(
                model, state.params, state.batch_stats, classifier.images_to_float(x), jnp.asarray(y), 0.1
            )[0]
        )

    before = loss(state)
    for i in range(2):
        idx = jnp.arange(32 * i, 32 * (i + 1))
        state, metrics = step(state, jnp.asarray(x), jnp.asarray(y), idx, classifier.prng_key(i))
        assert math.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2
    assert loss(state) < before
    # BatchNorm running statistics moved away from their initial values.
    assert not np.allclose(jax.tree.leaves(state.batch_stats)[0], jax.tree.leaves(variables["batch_stats"])[0])


def test_one_cycle_schedule():
    schedule = classifier.one_cycle_schedule(0.4, 100, 0.2)
    assert float(schedule(0)) == 0.0
    assert float(schedule(20)) == pytest.approx(0.4)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(schedule(10)) == pytest.approx(0.2)


# ---------------------------------------------------------------- saving, features, CFD


def test_save_load_roundtrip_gives_identical_features(tiny, extractor, tmp_path):
    config, _, variables = tiny
    path = str(tmp_path / "clf")
    classifier.save_classifier(path, config, variables, {"test_accuracy": 0.5})
    loaded_config, loaded, meta = feature_distance.load_classifier(path)
    assert loaded_config == config and meta["info"]["test_accuracy"] == 0.5
    flat_a = jax.tree_util.tree_leaves_with_path(variables)
    flat_b = jax.tree_util.tree_leaves_with_path(loaded)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    from_disk = feature_distance.FeatureExtractor(path, batch_size=64)
    assert from_disk.fingerprint == extractor.fingerprint and from_disk.dim == 16
    x, _ = _synthetic(70, seed=3)  # more than one batch, the last one padded
    assert np.array_equal(from_disk(x), extractor(x))
    # Floats in [-1, 1] that are exactly the 8-bit images give the same features.
    assert np.array_equal(extractor(x.astype(np.float32) / 127.5 - 1), extractor(x))

    with np.load(os.path.join(path, classifier.WEIGHTS_FILE)) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["params/head/kernel"] = arrays["params/head/kernel"][:-1]
    np.savez(os.path.join(path, classifier.WEIGHTS_FILE), **arrays)
    with pytest.raises(ValueError, match="does not match"):
        feature_distance.load_classifier(path)


def test_features_do_not_depend_on_batch_padding(extractor):
    x, _ = _synthetic(10, seed=4)
    np.testing.assert_allclose(extractor(x[:3]), extractor(x)[:3], rtol=1e-5, atol=1e-6)


def test_cfd_of_a_set_against_itself_is_zero_and_noise_raises_it(extractor, tmp_path):
    x, _ = _synthetic(200, seed=5)
    cache = str(tmp_path / "stats.npz")
    stats = feature_distance.reference_stats(extractor, x, cache_path=cache)
    assert stats[0].dtype == np.float64 and stats[1].shape == (16, 16)
    self_cfd = feature_distance.classifier_frechet_distance(extractor, x, stats)
    scale = float(np.trace(stats[1]))
    assert 0.0 <= self_cfd < 1e-6 * scale
    noisy = feature_ladder.add_noise(x, 0.3, seed=1)
    noisy_cfd = feature_distance.classifier_frechet_distance(extractor, noisy, cache)  # stats from the file
    assert noisy_cfd > 1e-3 * scale

    # The cache is reused for the same images and replaced for other ones.
    mtime = os.stat(cache).st_mtime_ns
    again = feature_distance.reference_stats(extractor, x, cache_path=cache)
    assert os.stat(cache).st_mtime_ns == mtime and np.array_equal(again[1], stats[1])
    other = feature_distance.reference_stats(extractor, x[:100], cache_path=cache)
    assert not np.array_equal(other[0], stats[0])
    assert np.array_equal(feature_distance.load_stats(cache)[0], other[0])


def test_images_are_checked(extractor):
    with pytest.raises(ValueError, match="32x32"):
        extractor(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        extractor(np.full((2, 32, 32, 3), np.nan, np.float32))
    # Out-of-range values are clipped as a saved image would be.
    assert np.array_equal(
        feature_distance.to_uint8(np.full((1, 32, 32, 3), 3.0)), np.full((1, 32, 32, 3), 255, np.uint8)
    )


def independent_cfd(extractor, images, reference_stats) -> float:
    """The Frechet distance of the extractor's features written out here, not through the module
    under test: tr((s1 s2)^1/2) is the sum of the square roots of the eigenvalues of s1 s2 (real
    and non-negative for covariance matrices, up to rounding)."""
    f = extractor(images).astype(np.float64)
    mu1, s1 = f.mean(axis=0), np.cov(f, rowvar=False)
    mu2, s2 = reference_stats
    root_trace = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * root_trace)


def assert_ladder_values(result, extractor, train_images, test_images=None, test_stats=None):
    """Rows over the whole training set (clean, blurred) equal the distance computed here; the
    monotone flags say what the rows' values say."""
    rows = result["rows"]
    full = max(r["n"] for r in rows)
    assert full == len(train_images)
    if test_stats is None:
        g = extractor(test_images).astype(np.float64)
        test_stats = (g.mean(axis=0), np.cov(g, rowvar=False))
    scale = float(np.trace(test_stats[1]))
    checked = 0
    for r in rows:
        if r["n"] != full or r["condition"] == "noise":  # subsets and noise draws are the ladder's own
            continue
        images = train_images if r["condition"] == "clean" else feature_ladder.blur(train_images, r["param"])
        want = independent_cfd(extractor, images, reference_stats=test_stats)
        assert r["cfd"] == pytest.approx(want, rel=1e-4, abs=1e-6 * scale), r
        checked += 1
    assert checked >= 2  # the clean row and at least one blur row
    clean = next(r["cfd"] for r in rows if r["condition"] == "clean" and r["n"] == full)
    for condition in ("noise", "blur"):
        values = [clean] + [r["cfd"] for r in rows if r["condition"] == condition]
        assert result["monotone"][condition] == all(b > a for a, b in zip(values, values[1:]))


def test_ladder_rows_on_random_data(extractor, tmp_path):
    rng = np.random.default_rng(6)
    train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    result = feature_ladder.run_ladder(
        extractor, train, test, sizes=(20, 40), noise_sigmas=(0.1, 0.4), blur_radii=(1.0, 2.0)
    )
    assert [(r["condition"], r["param"], r["n"]) for r in result["rows"]] == [
        ("clean", None, 20),
        ("clean", None, 40),
        ("noise", 0.1, 40),
        ("noise", 0.4, 40),
        ("blur", 1.0, 40),
        ("blur", 2.0, 40),
    ]
    assert all(math.isfinite(r["cfd"]) and r["cfd"] >= 0 for r in result["rows"])
    assert set(result["monotone"]) == {"noise", "blur"}
    assert result["reference_size"] == 30
    assert_ladder_values(result, extractor, train, test_images=test)
    md, js = feature_ladder.write_ladder(result, str(tmp_path / "ladder"))
    text = open(md, encoding="utf-8").read()
    assert "CFD" in text and "FID" not in text
    assert json.load(open(js, encoding="utf-8"))["rows"][0]["n"] == 20
    with pytest.raises(ValueError, match="exceeds"):
        feature_ladder.run_ladder(extractor, train, test, sizes=(50,))


def test_blur_and_noise_helpers():
    x, _ = _synthetic(2, seed=7)
    assert np.allclose(feature_ladder.blur(x, 1e-6), classifier.images_to_float(x), atol=1e-5)
    blurred = feature_ladder.blur(x, 2.0)
    assert blurred.std() < classifier.images_to_float(x).std()
    noisy = feature_ladder.add_noise(x, 0.4)
    assert noisy.min() >= -1 and noisy.max() <= 1


class _ReferenceSource:
    """The one method of a data source that a metric reads: ``reference(n, seed)``."""

    def __init__(self, images):
        self.images = images
        self.calls = []

    def reference(self, n, seed):
        self.calls.append((n, seed))
        return self.images[:n]


def test_cfd_metric_built_from_the_eval_config_scores_against_the_data_or_fixed_statistics(tiny, tmp_path):
    config, _, variables = tiny
    path = str(tmp_path / "clf")
    classifier.save_classifier(path, config, variables)
    x, _ = _synthetic(60, seed=8)
    samples = feature_ladder.add_noise(x, 0.2)
    source = _ReferenceSource(classifier.images_to_float(x))
    eval_cfg = config_lib.default_config().eval
    eval_cfg.metric, eval_cfg.classifier, eval_cfg.seed = "cfd", path, 5

    metric = metrics.build_metric(eval_cfg, "images")
    scorer = metric.against(source, 60, eval_cfg.seed)
    assert source.calls == [(60, 6)]  # the reference draw: eval.seed + 1
    value = scorer(samples)
    assert math.isfinite(value) and value > 0
    assert scorer(source.images) < 1e-6 * value
    assert math.isnan(scorer(np.full_like(samples, np.nan)))

    stats_file = str(tmp_path / "ref.npz")
    extractor = feature_distance.FeatureExtractor(path)
    feature_distance.reference_stats(extractor, x, cache_path=stats_file)
    eval_cfg.reference_stats = stats_file
    fixed = metrics.build_metric(eval_cfg, "images").against(source, 60, 0)
    assert len(source.calls) == 1  # fixed statistics: the data is not read
    assert fixed(samples) == pytest.approx(value, rel=1e-9)
    eval_cfg.classifier = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="eval.classifier"):
        metrics.build_metric(eval_cfg, "images")
    assert metrics.build_metric(config_lib.default_config().eval, "images") is None  # 'auto' on images


# ---------------------------------------------------------------- data and scripts


def _write_archive(tmp_path, split, per_class, seed):
    x, y = _synthetic(3 * per_class, num_classes=3, seed=seed)
    root = tmp_path / "src" / "tiny" / split
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    archive = tmp_path / f"tiny-{split}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "tiny" / split, arcname=f"tiny/{split}")
    return str(archive), x, y


def test_scripts_end_to_end(tmp_path):
    train_archive, _, _ = _write_archive(tmp_path, "train", 8, seed=10)
    test_archive, _, _ = _write_archive(tmp_path, "test", 4, seed=11)
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "clf")
    assert (
        train_classifier.main(
            [
                "--train_archive",
                train_archive,
                "--test_archive",
                test_archive,
                "--out",
                out,
                "--cache_dir",
                cache,
                "--epochs",
                "2",
                "--batch_size",
                "8",
                "--widths",
                "8",
                "8",
                "16",
                "16",
                "--workers",
                "2",
                "--eval_batch",
                "16",
            ]
        )
        == 0
    )
    meta = json.load(open(os.path.join(out, classifier.CONFIG_FILE), encoding="utf-8"))
    assert meta["architecture"]["widths"] == [8, 8, 16, 16] and meta["architecture"]["num_classes"] == 3
    assert meta["info"]["num_train"] == 24 and len(meta["info"]["history"]) == 2
    assert os.path.isfile(os.path.join(out, "test_stats.npz"))
    # The decoded split is cached next to the extracted folder, in the same pixels and labels
    # as the project's image-folder reader gives.
    assert os.path.isfile(os.path.join(cache, "tiny", "train.32px.npz"))
    from shortcut_jax.data import default_data_config, make_dataset
    from shortcut_jax.data.core import uint8_to_float

    data_config = default_data_config()
    data_config.update(name="image_folder", path=os.path.join(cache, "tiny", "test"), shuffle=False, num_workers=2)
    source = make_dataset(data_config, batch_size=12, seed=0)
    batch = source.next_batch()
    source.close()
    images, labels, names = classifier.load_image_folder(os.path.join(cache, "tiny", "test"), num_workers=2)
    assert names == ("class0", "class1", "class2")
    assert np.array_equal(uint8_to_float(images), batch["x"]) and np.array_equal(labels, batch["label"])
    # The recorded accuracy and statistics are those of the saved weights on the test split.
    config, variables, _ = classifier.load_classifier(out)
    eval_model = classifier.build_model(config, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    accuracy = classifier.accuracy(eval_model, variables, images, labels)
    assert meta["info"]["test_accuracy"] == meta["info"]["history"][-1]["test_accuracy"] == accuracy
    saved_extractor = feature_distance.FeatureExtractor(out)
    features = saved_extractor(images).astype(np.float64)
    mu, sigma = feature_distance.load_stats(os.path.join(out, "test_stats.npz"))
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-6)

    ladder_dir = str(tmp_path / "ladder")
    assert (
        feature_ladder.main(
            [
                "--classifier",
                out,
                "--train_archive",
                train_archive,
                "--test_archive",
                test_archive,
                "--out_dir",
                ladder_dir,
                "--cache_dir",
                cache,
                "--sizes",
                "12",
                "24",
                "--noise",
                "0.1",
                "--blur",
                "1.0",
                "--workers",
                "2",
                "--batch_size",
                "16",
            ]
        )
        == 0
    )
    result = json.load(open(os.path.join(ladder_dir, "feature_ladder.json"), encoding="utf-8"))
    assert len(result["rows"]) == 4 and result["reference_size"] == 12
    assert result["classifier"]["fingerprint"] == saved_extractor.fingerprint
    assert result["classifier"]["test_accuracy"] == accuracy
    train_images, _, _ = classifier.load_image_folder(os.path.join(cache, "tiny", "train"), num_workers=2)
    assert_ladder_values(result, saved_extractor, train_images, test_stats=(mu, sigma))
