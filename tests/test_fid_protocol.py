"""The FID protocol of the evaluation layer: fixed, class-balanced sample sets; FID per budget from
feature moments streamed batch by batch; reference statistics from a file or from the data
(cached); the decode hook of latent runs; ADM sample export through the command line; and the
refusals (another resolution or data set, no weights, no checkpoint) before anything compiles.

Inception on CPU costs seconds per image and a 2048-d Frechet distance tens of seconds here, so
the network is replaced by a stand-in: a fixed random map of the pixels to 6 features, computed
in numpy, with the interface of ``inception.InceptionFeatures``. What is tested is everything
around the network; the network itself is tested against pytorch-fid in test_fid_inception.py.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from shortcut_jax import config_lib, evaluate, sample
from shortcut_jax.infra import checkpoint
from shortcut_jax.training import loop
from shortcut_jax.data import DataSpec, make_dataset
from shortcut_jax.evaluation import distances, fid, metrics
from shortcut_jax.evaluation.adm_npz import read_adm_npz
from shortcut_jax.evaluation.inception import WeightsNotFoundError
from shortcut_jax.evaluation.pixels import grey_to_rgb, to_uint8
from shortcut_jax.evaluation.sample_sets import class_labels, draw_samples
from shortcut_jax.objectives.sampling import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "digits.py")
NUM_CLASSES = 10


class StandInFeatures:
    """6 features of 8-bit images: ``tanh`` of a fixed random projection of the pixels, then a
    second one (numpy, no compilation). Records the size of every batch it is given."""

    dim = 6
    extractor_id = "stand-in:6"

    def __init__(self, weights_path=None, batch_size=200):
        del weights_path, batch_size
        rng = np.random.default_rng(0)
        self.w1 = rng.standard_normal((8 * 8 * 3, 16)) / math.sqrt(8 * 8 * 3)
        self.w2 = rng.standard_normal((16, self.dim))
        self.batches = []

    def __call__(self, images):
        x = to_uint8(images).reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0
        self.batches.append(len(images))
        return (np.tanh(3.0 * x @ self.w1) @ self.w2).astype(np.float32)


@pytest.fixture
def stand_in(monkeypatch):
    """Every FID metric built while the test runs gets this extractor."""
    extractor = StandInFeatures()
    monkeypatch.setattr(metrics, "inception_features", lambda weights_path, batch_size: extractor)
    return extractor


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The digits config's small class-conditional DiT (8x8 greyscale, 10 classes) after 6 training
    steps, as the training loop saves it; and a weights file to point at."""
    root = tmp_path_factory.mktemp("fid_run")
    workdir = str(root / "runs" / "digits")
    # a high learning rate moves the zero-initialised output layer, and the debiased EMA (what is
    # evaluated) follows it, so that budgets differ
    loop.train_and_evaluate(config(**{"optim.lr": 1e-2, "train.ema_debias": True}), workdir)
    weights = root / "weights.npz"
    weights.write_bytes(b"")  # found by name; the stand-in never reads it
    return {"workdir": workdir, "weights": str(weights), "root": root}


def config(**overrides):
    return sample.load_config(
        f"{DIGITS}:runlocal=True",
        {"train.progress_bar": False, "train.use_tensorboard": False, "train.async_ckpt": False, **overrides},
    )


def run_cli(module, argv):
    """The module's command line, parsed by absl exactly as ``python -m`` would, in this process."""
    argv = ["prog", *argv]
    fv = module.define_flags(flags.FlagValues(), argv)
    fv(argv)
    return module.run(fv)


def no_compilation(monkeypatch):
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(a))
    return compiled


# ----------------------------------------------------------------------------------- sample sets


def test_balanced_labels_give_every_class_n_over_c_and_the_remainder_to_distinct_classes():
    labels = class_labels(50_000, 1000, mode="balanced", seed=0)
    assert labels.dtype == np.int32 and np.bincount(labels, minlength=1000).tolist() == [50] * 1000
    assert not np.array_equal(labels, np.sort(labels))  # shuffled, not in class order
    odd = class_labels(23, 10, mode="balanced", seed=3)
    counts = np.bincount(odd, minlength=10)
    assert sorted(counts.tolist()) == [2] * 7 + [3] * 3
    assert not np.array_equal(class_labels(23, 10, mode="balanced", seed=4), odd)
    assert np.array_equal(class_labels(23, 10, mode="balanced", seed=3), odd)
    uniform = class_labels(5000, 10, mode="random", seed=3)
    assert uniform.min() == 0 and uniform.max() == 9 and len(set(np.bincount(uniform).tolist())) > 1
    assert np.array_equal(class_labels(7, 0, seed=3), np.zeros(7, np.int32))  # unconditional
    with pytest.raises(ValueError, match="eval.label_mode"):
        class_labels(7, 3, mode="stratified")


# ---------------------------------------------------------------------------------- end to end


def test_fid_per_budget_through_the_cli_equals_the_fid_of_its_exported_samples(run, stand_in, tmp_path):
    out = str(tmp_path / "eval")
    argv = [
        f"--config={DIGITS}:runlocal=True",
        "--config.train.progress_bar=False",
        "--config.eval.batch_size=16",
        f"--workdir={run['workdir']}",
        "--metric=fid",
        "--num_samples=40",
        "--budgets=1,4",
        "--cfg_scale=1.5",
        f"--fid_weights={run['weights']}",
        "--export_npz=exported_{steps}.npz",
        f"--out_dir={out}",
    ]
    results = run_cli(evaluate, argv)

    # The samples, drawn independently of the evaluation: the run's EMA weights, eval.seed, balanced labels.
    cfg = config(**{"eval.cfg_scale": 1.5})
    loaded = sample.load_run(cfg, run["workdir"])
    labels = class_labels(40, NUM_CLASSES, mode="balanced", seed=cfg.eval.seed)
    try:
        # greyscale samples, seen by FID and the sample files as RGB with the channel repeated
        drawn = {
            n: grey_to_rgb(
                draw_samples(
                    loaded.exp.sampler,
                    loaded.params,
                    shape=(8, 8, 1),
                    num_classes=NUM_CLASSES,
                    num_samples=40,
                    batch_size=40,
                    num_steps=n,
                    seed=cfg.eval.seed,
                    cfg_scale=1.5,
                )
            )
            for n in (1, 4)
        }
    finally:
        loaded.close()

    # Exported: the 8-bit samples and their labels, as the ADM evaluator reads them.
    for n in (1, 4):
        images, saved_labels = read_adm_npz(os.path.join(out, f"exported_{n}.npz"))
        assert np.array_equal(images, to_uint8(drawn[n])) and np.array_equal(saved_labels, labels)
    assert np.bincount(labels).tolist() == [4] * NUM_CLASSES

    # Reference statistics: 40 data images drawn with eval.seed + 1, cached beside the workdir.
    info = json.load(open(os.path.join(out, "evaluation.json")))
    cache = info["metric_info"]["reference_cache"]
    assert os.path.dirname(cache) == os.path.join(str(run["root"]), "runs", "fid_stats")  # beside the workdir
    with make_dataset(cfg.data, batch_size=8, seed=cfg.seed) as data_source:
        reference = to_uint8(grey_to_rgb(data_source.reference(40, seed=cfg.eval.seed + 1)))
    mu_r, sigma_r = distances.gaussian_stats(StandInFeatures()(reference))
    cached = fid.load_stats(cache)
    np.testing.assert_allclose(cached.mu, mu_r, rtol=1e-9)
    assert cached.resolution == (8, 8) and cached.extractor == StandInFeatures.extractor_id

    for n in (1, 4):
        # FID of the whole set at once, by the formula...
        mu, sigma = distances.gaussian_stats(StandInFeatures()(drawn[n]))
        assert results[n] == pytest.approx(distances.frechet_distance(mu, sigma, mu_r, sigma_r), rel=1e-6)
        # ...and by the statistics command, reading the exported file against the cached reference.
        options = type(
            "Options",
            (),
            dict(
                stats=False,
                samples=os.path.join(out, f"exported_{n}.npz"),
                reference=cache,
                reference_source="",
                out="",
                adm_npz="",
                num_images=0,
                batch_size=16,
                weights="",
            ),
        )()
        line = fid.run_command(options, None, extractor=StandInFeatures())
        assert float(line.split()[1]) == pytest.approx(results[n], rel=1e-4)
    assert results[1] != results[4]

    # Streamed: after the reference images (eval.fid_batch_size=200 at a time), the network saw each
    # budget's samples in batches of eval.batch_size, never a whole budget at once.
    assert stand_in.batches == [40] + [16, 16, 8] * 2
    table = json.load(open(os.path.join(out, "distance_by_budget.json")))
    assert table["metric_name"] == "FID" and [r["steps"] for r in table["rows"]] == [1, 4]
    assert os.path.isfile(os.path.join(out, "distance_by_budget.png"))
    assert info["label_mode"] == "balanced" and info["params"].startswith("ema")
    assert {"sample_s", "score_s", "images_per_s"} <= set(info["timings"]["4"])

    # A second evaluation reads the cached statistics instead of recomputing them.
    stand_in.batches.clear()
    again = run_cli(evaluate, argv[:-1] + [f"--out_dir={tmp_path / 'again'}"])
    assert again == results and sum(stand_in.batches) == 2 * 40


def test_decoded_latents_are_what_grids_metrics_and_sample_files_see(stand_in, tmp_path):
    spec = DataSpec(shape=(4, 4, 4), num_classes=0, kind="images")
    # a latent "model": velocity -x * w, and a decoder to 8x8 RGB in [-1, 1]
    sampler = Sampler(lambda w, x, t, level, label: -x * w, num_levels=3, num_classes=0)

    def decode(latents):
        up = jax.image.resize(latents[..., :3], (latents.shape[0], 8, 8, 3), "nearest")
        return jnp.tanh(up)

    reference_images = np.random.default_rng(1).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    reference_file = str(tmp_path / "ref.npz")
    fid.save_stats(
        fid.stats_from_features(
            StandInFeatures()(reference_images),
            source="latent-test",
            resolution=(8, 8),
            extractor=StandInFeatures.extractor_id,
        ),
        reference_file,
    )
    eval_cfg = config_lib.default_config().eval
    eval_cfg.budgets, eval_cfg.grid_budgets, eval_cfg.grid_size = (1, 4), (4,), 9
    eval_cfg.num_samples, eval_cfg.batch_size, eval_cfg.export_budgets = 24, 10, (4,)
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"")  # found by name; the stand-in never reads it
    eval_cfg.metric, eval_cfg.fid_reference, eval_cfg.fid_weights = "fid", reference_file, str(weights)
    metric = metrics.build_metric(eval_cfg, "images")
    weight = jnp.float32(0.5)

    results = evaluate.evaluate_budgets(
        eval_cfg, sampler, weight, None, spec, metric, out_dir=str(tmp_path / "e"), step=0, decode=decode
    )
    images = draw_samples(
        sampler,
        weight,
        shape=(4, 4, 4),
        num_classes=0,
        num_samples=24,
        batch_size=24,
        num_steps=4,
        seed=eval_cfg.seed,
        decode=decode,
    )
    assert images.shape == (24, 8, 8, 3)
    exported, saved_labels = read_adm_npz(str(tmp_path / "e" / "samples_4step.npz"))
    assert np.array_equal(exported, to_uint8(images)) and saved_labels is None
    mu, sigma = distances.gaussian_stats(StandInFeatures()(images))
    ref = fid.load_stats(reference_file)
    assert results[4] == pytest.approx(distances.frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-6)
    grid = np.asarray(Image.open(tmp_path / "e" / "samples_4step.png"))
    assert grid.shape == (3 * 10 + 2, 3 * 10 + 2, 3)  # 3x3 decoded 8x8 RGB images, 2-pixel borders

    # A decoder of host arrays (as the VAE's latent_decoder is) is not traceable: run once for the shape.
    assert evaluate.sample_shape(spec, lambda latents: np.asarray(decode(np.asarray(latents)))) == (8, 8, 3)

    # Without the decoder the samples are latents, which FID refuses before sampling.
    eval_cfg.export_budgets = ()
    with pytest.raises(ValueError, match="latent runs decode them first"):
        evaluate.evaluate_budgets(eval_cfg, sampler, weight, None, spec, metric, out_dir=str(tmp_path / "f"), step=0)
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------------------------- refusals


def _reference(path, **provenance):
    rng = np.random.default_rng(2)
    features = rng.standard_normal((50, StandInFeatures.dim))
    fid.save_stats(fid.stats_from_features(features, extractor=StandInFeatures.extractor_id, **provenance), path)
    return path


@pytest.mark.parametrize("case", ["resolution", "source"])
def test_reference_statistics_of_another_resolution_or_data_set_are_refused_before_compiling(
    case, run, stand_in, tmp_path, monkeypatch
):
    if case == "resolution":
        reference = _reference(str(tmp_path / "ref.npz"), source="digits", resolution=(32, 32))
        overrides, message = {}, r"resolution=\(32, 32\).*resolution=\(8, 8\).*eval.fid_reference"
    else:
        reference = _reference(str(tmp_path / "ref.npz"), source="cifar10", resolution=(8, 8))
        overrides, message = {"eval.fid_source": "digits"}, "source='cifar10'.*'digits'.*eval.fid_source"
    cfg = config(
        **{"eval.metric": "fid", "eval.fid_reference": reference, "eval.fid_weights": run["weights"], **overrides}
    )
    restored = []
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", lambda *a, **k: restored.append(a))
    compiled = no_compilation(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate_checkpoint(cfg, run["workdir"], out_dir=str(out))
    assert not compiled and not restored and not out.exists()


def test_missing_weights_or_checkpoint_are_refused_naming_what_to_change(run, tmp_path, monkeypatch):
    compiled = no_compilation(monkeypatch)
    cfg = config(**{"eval.metric": "fid", "eval.fid_weights": str(tmp_path / "nowhere.npz")})
    with pytest.raises(WeightsNotFoundError, match=r"nowhere\.npz.*eval\.fid_weights.*pt_inception-2015-12-05"):
        evaluate.evaluate_checkpoint(cfg, run["workdir"], out_dir=str(tmp_path / "out"))
    empty = tmp_path / "never_trained"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*never_trained.*fix --workdir"):
        evaluate.evaluate_checkpoint(config(), str(empty))
    assert not compiled and os.listdir(empty) == [] and not (tmp_path / "out").exists()
