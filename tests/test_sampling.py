"""The sampler on a device mesh: each device draws its own share, with the samples of one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.infra import sharding
from shortcut_jax.evaluate import draw_samples
from shortcut_jax.evaluation.sample_sets import class_labels
from shortcut_jax.models import DiT
from shortcut_jax.objectives.sampling import Sampler

BATCH = 16


def _setup():
    model = DiT(patch_size=2, width=32, depth=2, num_heads=2, num_classes=3)
    x = jnp.zeros((1, 8, 8, 3))
    params = model.init(
        jax.random.PRNGKey(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    )["params"]
    # the final layer starts at zero (reference init); random values make the comparison real
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    apply_fn = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((BATCH, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, BATCH).astype(np.int32)
    return apply_fn, params, noise, labels


def _entry_parameter_shapes(hlo: str) -> list[str]:
    """Shapes of the compiled program's entry parameters, e.g. ['f32[2,8,8,3]', 's32[2]', ...]."""
    entry = hlo[hlo.index("ENTRY") :]
    signature = entry[: entry.index("{")]
    return re.findall(r"[a-z0-9]+\[[0-9,]*\]", signature)


def test_sampler_on_8_devices_gives_each_device_its_share_and_the_samples_of_one_device():
    assert jax.device_count() == 8
    apply_fn, params, noise, labels = _setup()
    mesh = sharding.make_mesh(type("M", (), {"data": -1, "fsdp": 1})())
    one = Sampler(apply_fn, num_levels=7, num_classes=3)
    spread = Sampler(apply_fn, num_levels=7, num_classes=3, mesh=mesh)

    # Without a mesh, the program holds the whole batch (on one device); with the mesh, each
    # device's program holds BATCH / 8 rows of noise and labels.
    whole = _entry_parameter_shapes(one.lower(params, noise, labels, num_steps=4).compile().as_text())
    share = _entry_parameter_shapes(spread.lower(params, noise, labels, num_steps=4).compile().as_text())
    assert "f32[16,8,8,3]" in whole and "s32[16]" in whole
    assert "f32[2,8,8,3]" in share and "s32[2]" in share and "f32[16,8,8,3]" not in share

    for steps, scale in ((1, 1.0), (4, 1.5)):
        expected = np.asarray(one(params, noise, labels, num_steps=steps, cfg_scale=scale))
        out = spread(params, noise, labels, num_steps=steps, cfg_scale=scale)
        assert {s.data.shape[0] for s in out.addressable_shards} == {BATCH // 8}
        assert len({s.device for s in out.addressable_shards}) == 8
        np.testing.assert_allclose(spread.to_host(out), expected, rtol=1e-5, atol=1e-5)

    # a batch that does not divide over the devices is padded, and the padding dropped
    odd = spread(params, noise[:5], labels[:5], num_steps=2)
    np.testing.assert_allclose(
        spread.to_host(odd), np.asarray(one(params, noise[:5], labels[:5], num_steps=2)), rtol=1e-5, atol=1e-5
    )


def test_draw_samples_with_balanced_labels_on_8_devices_equal_one_device_and_no_device_repeats_another():
    apply_fn, params, _, _ = _setup()
    mesh_cfg = type("M", (), {"data": -1, "fsdp": 1})()
    one = Sampler(apply_fn, num_levels=7, num_classes=3, mesh=sharding.make_mesh(mesh_cfg, jax.devices()[:1]))
    spread = Sampler(apply_fn, num_levels=7, num_classes=3, mesh=sharding.make_mesh(mesh_cfg))
    # 36 samples in batches of 16: two full batches and a padded one; guided, 2 steps
    kwargs = dict(
        shape=(8, 8, 3),
        num_classes=3,
        num_samples=36,
        batch_size=BATCH,
        num_steps=2,
        seed=5,
        cfg_scale=1.5,
        label_mode="balanced",
    )
    expected = draw_samples(one, params, **kwargs)
    got = draw_samples(spread, params, **kwargs)
    assert got.shape == (36, 8, 8, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    labels = class_labels(36, 3, mode="balanced", seed=5)
    assert np.bincount(labels, minlength=3).tolist() == [12, 12, 12]

    # One batch of that set: each of the 8 devices holds 2 rows of its own, together every row once.
    noise = np.random.default_rng(5).standard_normal((BATCH, 8, 8, 3)).astype(np.float32)
    out = spread(params, noise, labels[:BATCH], num_steps=2, cfg_scale=1.5)
    rows = sorted((s.index[0].start, s.index[0].stop) for s in out.addressable_shards)
    assert rows == [(2 * d, 2 * d + 2) for d in range(8)]
    assert len({s.device for s in out.addressable_shards}) == 8
    for shard in out.addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), expected[shard.index[0]], rtol=1e-5, atol=1e-5)
    shares = [np.asarray(s.data).tobytes() for s in out.addressable_shards]
    assert len(set(shares)) == 8
