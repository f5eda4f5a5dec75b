"""Tests for shortcut_jax.infra.checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shortcut_jax.infra.checkpoint import Checkpointer, check_compatible


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        tree,
    )


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if not hasattr(x, "dtype"):  # Python scalars, e.g. TrainState.step
            assert type(x) is type(y) and x == y
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _state(seed=0):
    k = jax.random.PRNGKey(seed)
    w = jax.random.normal(k, (4, 3), jnp.float32)
    # Values whose bit patterns a lossy round trip would change.
    w = w.at[0, 0].set(jnp.nan).at[0, 1].set(-0.0).at[0, 2].set(jnp.inf).at[1, 0].set(1e-45)
    return {
        "params": {"w": w, "b": (jnp.arange(8, dtype=jnp.float32) / 3).astype(jnp.bfloat16)},
        "step": jnp.asarray(12345, jnp.int32),
        "rng": jax.random.PRNGKey(seed + 7),
        "opt": (jnp.full((2,), seed, jnp.float32),),
    }


def _save(ckpt, step, state, **kw):
    return ckpt.save(step, state, data_state={"step": step}, meta={"model": {"width": 64}}, **kw)


def test_roundtrip_bitwise_with_data_and_meta(tmp_path):
    state = _state()
    state["typed_rng"] = jax.random.key(3)
    state["typed_rbg"] = jax.random.key(4, impl="rbg")
    data_state = {"epoch": np.int64(2), "position": 17, "shard_order": [3, 1, 2]}
    meta = {"model": {"width": 64, "mult": (1, 2)}, "objective": "shortcut", "lr": np.float32(0.5)}
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        assert ckpt.save(10, state, data_state=data_state, meta=meta)
        restored, d, m = ckpt.restore(None, _abstract(state))
    _assert_bitwise_equal(state, restored)
    assert restored["typed_rbg"].dtype == state["typed_rbg"].dtype
    assert restored["rng"].dtype == jnp.uint32
    # The restored typed key must behave as the original one.
    np.testing.assert_array_equal(
        jax.random.uniform(restored["typed_rng"], (3,)), jax.random.uniform(state["typed_rng"], (3,))
    )
    assert d == {"epoch": 2, "position": 17, "shard_order": [3, 1, 2]}
    assert m == {"model": {"width": 64, "mult": [1, 2]}, "objective": "shortcut", "lr": 0.5}


def test_keep_latest_and_persistence(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, keep=2, async_save=False)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
        assert _save(ckpt, step, _state(step))
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(directory)) == ["2", "3"]
    ckpt.close()

    again = Checkpointer(directory, keep=2, async_save=False)
    assert again.latest_step() == 3
    restored, d, _ = again.restore(2, _abstract(_state()))
    _assert_bitwise_equal(restored, _state(2))
    assert d == {"step": 2}
    again.close()


def test_existing_step_is_never_overwritten(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        assert _save(ckpt, 5, _state(1))
        assert not _save(ckpt, 5, _state(2))
        assert not _save(ckpt, 5, _state(2), force=True)
        # Steps before the latest are skipped unless forced.
        assert not _save(ckpt, 4, _state(2))
        assert ckpt.all_steps() == [5]
        assert _save(ckpt, 4, _state(3), force=True)
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
        restored, _, _ = ckpt.restore(None, _abstract(_state()))
        _assert_bitwise_equal(restored, _state(1))
        restored, _, _ = ckpt.restore(4, _abstract(_state()))
    _assert_bitwise_equal(restored, _state(3))


def test_save_interval(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False, save_interval_steps=10) as ckpt:
        assert _save(ckpt, 10, _state())
        assert not _save(ckpt, 15, _state())
        assert _save(ckpt, 17, _state(), force=True)
        assert _save(ckpt, 20, _state())
        assert ckpt.all_steps() == [10, 17, 20]


def test_restore_onto_sharded_abstract_state(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    state = {
        "x": jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3),
        "rng": jax.random.PRNGKey(1),
        "key": jax.random.key(2),
        "keys": jax.random.split(jax.random.key(3), 8),
    }
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        assert ckpt.save(1, state, data_state={}, meta={})
        target = {
            "x": jax.ShapeDtypeStruct((16, 3), jnp.float32, sharding=sharded),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
            "key": jax.ShapeDtypeStruct((), state["key"].dtype, sharding=replicated),
            "keys": jax.ShapeDtypeStruct((8,), state["keys"].dtype, sharding=sharded),
        }
        restored, _, _ = ckpt.restore(1, target)
        for name, t in target.items():
            assert restored[name].sharding.is_equivalent_to(t.sharding, restored[name].ndim), name
        assert len(restored["x"].addressable_shards) == 8
        assert restored["x"].addressable_shards[0].data.shape == (2, 3)
        _assert_bitwise_equal(restored, state)
        # Saving the sharded arrays and restoring them onto another layout.
        assert ckpt.save(2, restored, data_state={}, meta={})
        moved = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=replicated), target)
        again, _, _ = ckpt.restore(2, moved)
    assert again["x"].sharding.is_fully_replicated
    _assert_bitwise_equal(again, state)


def test_restore_requires_sharding(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        _save(ckpt, 1, {"x": jnp.ones(3)})
        with pytest.raises(ValueError, match="sharding"):
            ckpt.restore(1, {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_async_save_then_wait(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, keep=2, async_save=True)
    for step in (1, 2, 3):
        assert _save(ckpt, step, _state(step))
    ckpt.wait()
    assert sorted(os.listdir(directory)) == ["2", "3"]
    ckpt.close()
    # A fresh reader sees only committed steps, with complete contents.
    reader = Checkpointer(directory, async_save=False)
    restored, d, m = reader.restore(None, _abstract(_state()))
    _assert_bitwise_equal(restored, _state(3))
    assert d == {"step": 3} and m == {"model": {"width": 64}}
    reader.close()


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, async_save=False) as ckpt:
        _save(ckpt, 1, _state(1))
    # What a crash in the middle of writing step 2 leaves behind.
    partial = os.path.join(directory, "2.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "junk"), "w") as f:
        f.write("half written")
    with Checkpointer(directory, async_save=False) as ckpt:
        assert ckpt.latest_step() == 1
        restored, _, _ = ckpt.restore(None, _abstract(_state()))
        _assert_bitwise_equal(restored, _state(1))
        assert _save(ckpt, 2, _state(2))
        restored, _, _ = ckpt.restore(None, _abstract(_state()))
        _assert_bitwise_equal(restored, _state(2))


def test_read_meta(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=True) as ckpt:
        assert ckpt.read_meta() is None
        ckpt.save(3, _state(), data_state={}, meta={"model": {"width": 64}, "objective": "flow"})
        ckpt.save(4, _state(), data_state={}, meta={"model": {"width": 64}, "objective": "shortcut"})
        assert ckpt.read_meta() == {"model": {"width": 64}, "objective": "shortcut"}
        assert ckpt.read_meta(3)["objective"] == "flow"
        with pytest.raises(FileNotFoundError, match="available steps"):
            ckpt.read_meta(99)


def test_restore_without_checkpoint_raises(tmp_path):
    directory = str(tmp_path / "empty")
    with Checkpointer(directory) as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint found"):
            ckpt.restore(None, _abstract(_state()))
        with pytest.raises(FileNotFoundError):
            ckpt.restore(5, _abstract(_state()))


def test_check_compatible():
    saved = {"model": {"width": 64, "depth": 2, "mult": [1, 2]}, "objective": "shortcut", "seed": 0}
    # Equal after JSON normalisation; keys not listed are ignored.
    check_compatible(
        saved,
        {"model": {"width": 64, "depth": 2, "mult": (1, 2)}, "objective": "shortcut", "seed": 1},
        ["model", "objective"],
    )
    with pytest.raises(ValueError) as err:
        check_compatible(
            saved,
            {"model": {"width": 128, "depth": 2, "mult": [1, 2]}, "objective": "shortcut"},
            ["model", "objective"],
        )
    msg = str(err.value)
    assert "model.width" in msg and "64" in msg and "128" in msg
    assert "depth" not in msg and "objective" not in msg
    assert "--workdir" in msg
    with pytest.raises(ValueError, match="objective: saved 'shortcut', current 'flow'"):
        check_compatible(saved, {"objective": "flow"}, ["objective"])
    with pytest.raises(ValueError, match=r"model\.heads: saved <missing>, current 4"):
        check_compatible(saved, {"model": {"width": 64, "depth": 2, "mult": [1, 2], "heads": 4}}, ["model"])
    check_compatible(saved, {"model": {"width": 64}}, ["model.width"])
    with pytest.raises(ValueError, match="model.depth"):
        check_compatible(saved, {"model": {"depth": 3}}, ["model.depth"])


def test_typed_and_raw_keys_are_interchangeable(tmp_path):
    key = jax.random.key(5)
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        ckpt.save(1, {"rng": key}, data_state={}, meta={})
        raw = jax.random.key_data(key)
        restored, _, _ = ckpt.restore(1, {"rng": jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=raw.sharding)})
    assert restored["rng"].dtype == jnp.uint32
    np.testing.assert_array_equal(restored["rng"], raw)


def test_flax_train_state_with_optax_roundtrip(tmp_path):
    import optax
    from flax.training import train_state

    params = {"dense": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "bias": jnp.zeros(3)}}
    tx = optax.adam(1e-2)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    grads = jax.tree.map(jnp.ones_like, params)
    state = state.apply_gradients(grads=grads)
    with Checkpointer(str(tmp_path / "ckpt"), async_save=True) as ckpt:
        ckpt.save(int(state.step), state, data_state={}, meta={})
        fresh = train_state.TrainState.create(apply_fn=None, params=jax.tree.map(jnp.zeros_like, params), tx=tx)
        restored, _, _ = ckpt.restore(None, _abstract(fresh))
    assert isinstance(restored, train_state.TrainState) and int(restored.step) == 1
    _assert_bitwise_equal(restored, state)
    # The restored optimiser state continues exactly like the original.
    a, b = state.apply_gradients(grads=grads), restored.apply_gradients(grads=grads)
    _assert_bitwise_equal(a.params, b.params)
