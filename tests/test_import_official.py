"""Importing a reference-code checkpoint pickle: parameters, EMA and Adam moments carry over,
and training resumes from it."""
import os
import pickle

import flax
import jax
import numpy as np
import optax
import pytest

from conftest import SHARED_DATA
from shortcut_jax import checkpoint, config_lib, data, import_official, train
from shortcut_jax.experiment import Experiment
from shortcut_jax.models import convert


def small_config(data_path=""):
    c = config_lib.default_config()
    c.model.variant = ""
    c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
    c.model.dtype = "float32"
    c.train.batch_size = 64
    c.train.progress_bar = False
    c.train.use_tensorboard = False
    c.train.async_ckpt = False
    c.train.eval_every = 10_000
    c.mesh.data = 1
    c.data.name = "arrays"
    c.data.path = data_path
    return c


@pytest.fixture(scope="module")
def official_pickle(tmp_path_factory):
    g = np.load(os.path.join(SHARED_DATA, "official_dit_golden.npz"))
    params = convert.from_slash_names({k[len("param/"):]: g[k] for k in g.files if k.startswith("param/")})
    opt_state = optax.adamw(1e-4, weight_decay=0.1).init(params)
    rng = np.random.default_rng(0)
    mu = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    nu = jax.tree.map(lambda p: rng.random(p.shape).astype(np.float32), params)
    opt_state = (optax.ScaleByAdamState(count=np.int32(1234), mu=mu, nu=nu),) + tuple(opt_state[1:])
    ts = {"params": params, "params_ema": jax.tree.map(lambda p: p * 0.5, params),
          "opt_state": flax.serialization.to_state_dict(opt_state), "step": 1234}
    path = tmp_path_factory.mktemp("official") / "ckpt.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train_state": ts}, f)
    return str(path), ts


def test_import_carries_params_ema_and_adam_moments(official_pickle, tmp_path):
    path, ts = official_pickle
    workdir = str(tmp_path / "imported")
    cfg = small_config()
    step = import_official.import_checkpoint(import_official.load_pickle(path), cfg, workdir, image_size=8)
    assert step == 1234
    spec = data.DataSpec(shape=(8, 8, 4), num_classes=10, kind="images")
    exp = Experiment(cfg, workdir, spec=spec)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        state, data_state, _ = ckpt.restore(None, exp.abstract_state)
    assert int(state.step) == 1234 and data_state == {}
    expected = convert.official_to_project(ts["params"])
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    ema = convert.official_to_project(ts["params_ema"])
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(jax.device_get(state.ema_params[0]))):
        np.testing.assert_array_equal(a, b)
    adam = state.opt_state[0]
    assert int(adam.count) == 1234
    mu = convert.official_to_project(ts["opt_state"]["0"]["mu"])
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(jax.device_get(adam.mu))):
        np.testing.assert_array_equal(a, b)


def test_training_resumes_from_an_imported_checkpoint(official_pickle, tmp_path):
    path, _ = official_pickle
    rng = np.random.default_rng(0)
    arrays = tmp_path / "latents.npz"
    np.savez(arrays, x=rng.normal(size=(128, 8, 8, 4)).astype(np.float32), labels=np.arange(128) % 10)
    workdir = str(tmp_path / "resume")
    cfg = small_config(str(arrays))
    import_official.import_checkpoint(import_official.load_pickle(path), cfg, workdir, image_size=8)
    cfg.train.steps = 1236
    cfg.train.log_every = 1
    state = train.train_and_evaluate(cfg, workdir)
    assert int(state.step) == 1236


def test_import_refuses_a_mismatched_config_and_a_used_workdir(official_pickle, tmp_path):
    path, _ = official_pickle
    cfg = small_config()
    cfg.model.width = 128
    with pytest.raises(config_lib.ConfigError, match="shape"):
        import_official.import_checkpoint(import_official.load_pickle(path), cfg, str(tmp_path / "a"), image_size=8)
    good = small_config()
    import_official.import_checkpoint(import_official.load_pickle(path), good, str(tmp_path / "b"), image_size=8)
    with pytest.raises(FileExistsError):
        import_official.import_checkpoint(import_official.load_pickle(path), good, str(tmp_path / "b"), image_size=8)
