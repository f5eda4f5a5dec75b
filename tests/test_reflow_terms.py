"""Reflow's pairs: stage two trains on the stored noise, live reflow generates its pairs with the
configured Euler steps and guidance.

The exact-field tests in test_methods.py give zero loss whatever noise a row is paired with, so
they cannot tell the stored noise from fresh noise; here the network is a fixed linear map (or a
curved, class-conditional field) whose loss is computed by hand from the stored pair."""

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.objectives import reflow
from shortcut_jax.objectives.common import ObjectiveConfig, RowSplit

FLOOR = 1e-5
K = 7


def recording(fn, calls):
    """``fn`` as an apply_fn that records each call's inputs as numpy arrays, in the order the
    calls run (also inside the sampler's compiled loop)."""

    def apply_fn(params, x, t, level, label):
        jax.debug.callback(lambda *a: calls.append(tuple(np.asarray(v) for v in a)), x, t, level, label, ordered=True)
        return fn(params, x, t, level, label)

    return apply_fn


def linear(params, x, t, level, label):
    del level, label
    return x @ params["w"] + t[:, None] * params["b"]


def test_reflow_loss_is_flow_matching_on_the_stored_noise_of_each_pair():
    """Rules out training stage two on fresh noise instead of the pair's ``batch['noise']``."""
    rng = np.random.default_rng(0)
    b = 16
    x1 = rng.normal(size=(b, 2)).astype(np.float32)
    noise = rng.normal(size=(b, 2)).astype(np.float32)
    params = {"w": jnp.asarray([[0.3, -0.2], [0.5, 0.1]]), "b": jnp.asarray([0.4, -0.7])}
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording(linear, calls), num_classes=0, noise_floor=FLOOR, flow_t="uniform")
    batch = {"x": jnp.asarray(x1), "noise": jnp.asarray(noise), "label": jnp.zeros(b, jnp.int32)}
    loss, _ = reflow.loss_fn(params, None, batch, jax.random.key(3), cfg)
    jax.effects_barrier()
    ((_, t, level, _),) = calls
    assert np.all(level == K)
    # by hand, in float64: x_t on the stored pair's path, target its velocity
    t64 = t.astype(np.float64)[:, None]
    x_t = (1 - (1 - FLOOR) * t64) * noise + t64 * x1
    pred = x_t @ np.asarray(params["w"], np.float64) + t64 * np.asarray(params["b"], np.float64)
    want = np.mean((pred - (x1 - (1 - FLOOR) * noise)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # the same key with other stored noise gives another loss (fresh noise would give the same)
    other = dict(batch, noise=jnp.asarray(rng.normal(size=(b, 2)).astype(np.float32)))
    assert abs(float(reflow.loss_fn(params, None, other, jax.random.key(3), cfg)[0]) - float(loss)) > 1e-3


# ------------------------------------------------------------------------------ live reflow

NUM_CLASSES = 3
EMBED = np.asarray([[0.8, -0.5], [-0.6, 0.9], [0.3, 0.7], [-0.2, -0.4]])  # rows 0..2: classes, 3: null


def curved(params, x, t, level, label):
    """A class-conditional field whose Euler path bends: the step count and guidance both matter."""
    del level
    emb = jnp.asarray(EMBED, jnp.float32)[label]
    return params["a"] * jnp.sin(2.0 * x + 3.0 * t[:, None]) + (1.0 + t[:, None]) * emb


def curved_np(x, t, label, a):
    return a * np.sin(2.0 * x + 3.0 * t) + (1.0 + t) * EMBED[label]


def euler_by_hand(noise, labels, *, steps, scale, a):
    x = noise.astype(np.float64)
    for i in range(steps):
        t = i / steps
        cond = curved_np(x, t, labels, a)
        uncond = curved_np(x, t, np.full_like(labels, NUM_CLASSES), a)
        x = x + (uncond + scale * (cond - uncond)) / steps
    return x


def test_live_reflow_pairs_come_from_the_configured_euler_steps_and_guidance():
    """Rules out live reflow generating its pairs with one Euler step and no guidance (or any step
    count or guidance scale other than ``reflow_steps`` and ``reflow_cfg_scale``)."""
    b, steps, scale, a = 16, 4, 2.5, 1.3
    rng = np.random.default_rng(1)
    x1 = jnp.asarray(rng.normal(size=(b, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, b), jnp.int32)
    params = {"a": jnp.float32(a)}
    calls = []
    cfg = ObjectiveConfig(
        apply_fn=recording(curved, calls),
        num_classes=NUM_CLASSES,
        noise_floor=FLOOR,
        reflow_fraction=0.25,
        reflow_steps=steps,
        reflow_cfg_scale=scale,
        label_dropout=0.0,
    )
    n = reflow.num_reflow_rows(b, cfg.reflow_fraction)
    pair = RowSplit(b, n).first  # the generated pairs' rows
    _, metrics = reflow.live_loss_fn(params, None, {"x": x1, "label": labels}, jax.random.key(0), cfg)
    jax.effects_barrier()

    # the first call starts the generation from the rows' noise at t = 0
    noise = calls[0][0][:n]
    assert np.all(calls[0][1] == 0)
    generated = euler_by_hand(noise, np.asarray(pair(labels)), steps=steps, scale=scale, a=a)
    # generation calls: one per step (conditional and null class batched), all at the flow level
    generation, (x_t, t, level, lab) = calls[:-1], calls[-1]
    assert len(generation) == steps
    assert all(np.all(c[2] == K) for c in generation)
    np.testing.assert_array_equal(pair(lab), pair(labels))
    np.testing.assert_array_equal(pair(level), 0)
    # the student sees the generated pair's path, and its target is that pair's velocity
    tt = pair(t)[:, None].astype(np.float64)
    np.testing.assert_allclose(pair(x_t), (1 - (1 - FLOOR) * tt) * noise + tt * generated, rtol=1e-4, atol=1e-4)
    pred = curved_np(pair(x_t).astype(np.float64), tt, pair(lab), a)
    want = np.mean((pred - (generated - (1 - FLOOR) * noise)) ** 2)
    np.testing.assert_allclose(float(metrics["reflow_loss"]), want, rtol=1e-4)

    # not vacuous: one unguided Euler step gives other pairs
    one = euler_by_hand(noise, np.asarray(pair(labels)), steps=1, scale=1.0, a=a)
    assert np.abs(one - generated).max() > 0.1


def test_generate_live_equals_hand_rolled_guided_euler():
    """Rules out ``generate_live`` ignoring ``reflow_steps`` or ``reflow_cfg_scale`` (or flipping the
    guidance direction)."""
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(6, 2)).astype(np.float32)
    labels = np.asarray([0, 1, 2, 0, 1, 2], np.int32)
    for steps, scale in [(8, 1.0), (3, 3.0), (1, 2.0)]:
        cfg = ObjectiveConfig(apply_fn=curved, num_classes=NUM_CLASSES, reflow_steps=steps, reflow_cfg_scale=scale)
        got = reflow.generate_live({"a": jnp.float32(0.9)}, jnp.asarray(noise), jnp.asarray(labels), cfg)
        want = euler_by_hand(noise, labels, steps=steps, scale=scale, a=0.9)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
