"""The CIFAR-10 classifier shipped with the package loads and classifies real test images."""

import os

import numpy as np

from conftest import SHARED_DATA
from shortcut_jax.data import extract_archive
from shortcut_jax.evaluation import classifier, feature_distance

SHIPPED = os.path.join(os.path.dirname(classifier.__file__), "cifar10_classifier")


def test_shipped_classifier_is_accurate_on_cifar10_test_images(tmp_path):
    root = extract_archive(os.path.join(SHARED_DATA, "cifar10-test.tar.gz"), str(tmp_path))
    images, labels, names = classifier.load_image_folder(root, limit=500, cache=False, num_workers=2)
    config, variables, meta = classifier.load_classifier(SHIPPED)
    info = meta["info"]
    # the labels it was trained on are the archive's folders, in the reader's order
    assert tuple(info["class_names"]) == names and info["num_test"] == 10_000
    model = classifier.build_model(config)
    acc = classifier.accuracy(model, variables, images, labels, batch_size=250)
    # The recorded accuracy (10,000 test images) is measured again on 500 of them: the two agree
    # within four binomial standard errors of a 500-image estimate (5.3 points at 90%).
    recorded = info["test_accuracy"]
    assert recorded >= 0.90
    assert abs(acc - recorded) <= 4 * np.sqrt(recorded * (1 - recorded) / len(labels)), (acc, recorded)
    # features against the shipped test-split statistics: a real subset is close, noise is far
    extractor = feature_distance.FeatureExtractor(SHIPPED)
    stats = feature_distance.load_stats(os.path.join(SHIPPED, "test_stats.npz"))
    real = feature_distance.classifier_frechet_distance(extractor, images, stats)
    noise = np.random.default_rng(0).uniform(-1, 1, images.shape).astype(np.float32)
    fake = feature_distance.classifier_frechet_distance(extractor, noise, stats)
    assert real * 10 < fake


def test_training_scores_cfd_at_each_evaluation_loading_the_classifier_once(tmp_path, monkeypatch):
    import importlib.util

    from shortcut_jax.training import loop
    from shortcut_jax.infra import writers

    root = extract_archive(os.path.join(SHARED_DATA, "cifar10-test.tar.gz"), str(tmp_path / "data"))
    experiments = os.path.join(os.path.dirname(__file__), "..", "experiments", "cifar10.py")
    spec = importlib.util.spec_from_file_location("cifar10_config", experiments)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(f"runlocal=True,classifier={SHIPPED}")
    cfg.data.path = root
    cfg.train.eval_every = 2
    cfg.eval.num_samples = 100
    cfg.eval.final_num_samples = 150
    cfg.train.progress_bar = False
    cfg.train.use_tensorboard = False
    built = []
    real_extractor = feature_distance.FeatureExtractor

    def counting_extractor(*args, **kwargs):
        built.append(1)
        return real_extractor(*args, **kwargs)

    monkeypatch.setattr(feature_distance, "FeatureExtractor", counting_extractor)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(cfg, workdir)
    evals = [r for r in writers.read_metrics(workdir) if "eval/cfd_1step" in r]
    assert [(r["step"], r["eval/num_samples"]) for r in evals] == [(2, 100), (4, 150)]
    assert all(np.isfinite(r["eval/cfd_1step"]) for r in evals)
    assert len(built) == 1  # one classifier for the whole run
