"""Classifier-free guidance in every sampler: one guided step of the Euler sampler, DDIM and the
consistency sampler equals the step computed by hand with ``uncond + w (cond - uncond)``."""

import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax.objectives import diffusion, sampling
from shortcut_jax.objectives.common import ObjectiveConfig

K = 7
NUM_CLASSES = 3
EMBED = np.asarray([[0.8, -0.5], [-0.6, 0.9], [0.3, 0.7], [-0.2, -0.4]])  # rows 0..2: classes, 3: null


def field(params, x, t, level, label):
    """A class-conditional network output (nonlinear in x and t)."""
    del params, level
    return jnp.tanh(x) * (1.0 + t[:, None]) + jnp.asarray(EMBED, jnp.float32)[label]


def field_np(x, t, label):
    return np.tanh(x) * (1.0 + t) + EMBED[label]


def guided_np(x, t, labels, scale):
    cond, uncond = field_np(x, t, labels), field_np(x, t, np.full_like(labels, NUM_CLASSES))
    return uncond + scale * (cond - uncond)


NOISE = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
LABELS = np.asarray([0, 1, 2, 2, 1, 0], np.int32)
SCALES = [3.0, 0.0, -1.5]  # 0: the null class's output alone


@pytest.mark.parametrize("scale", SCALES)
def test_guided_euler_step_is_uncond_plus_scale_times_the_difference(scale):
    """Rules out the Euler sampler flipping the guidance direction (``cond + w (uncond - cond)``)
    or dropping guidance."""
    sampler = sampling.Sampler(field, num_levels=K, num_classes=NUM_CLASSES)
    got = np.asarray(sampler(None, NOISE, LABELS, num_steps=1, cfg_scale=scale))
    np.testing.assert_allclose(
        got, NOISE + guided_np(NOISE.astype(np.float64), 0.0, LABELS, scale), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("scale", SCALES)
def test_guided_consistency_step_is_uncond_plus_scale_times_the_difference(scale):
    """Rules out the consistency sampler (``_prediction_fn``) flipping the guidance direction or
    dropping guidance: one step is ``x0 + (1 - 0) v_guided(x0, 0)``."""
    sampler = sampling.ConsistencySampler(field, num_levels=K, num_classes=NUM_CLASSES)
    got = np.asarray(sampler(None, NOISE, LABELS, num_steps=1, cfg_scale=scale))
    np.testing.assert_allclose(
        got, NOISE + guided_np(NOISE.astype(np.float64), 0.0, LABELS, scale), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("scale", SCALES)
def test_guided_ddim_steps_use_the_guided_noise_estimate(scale):
    """Rules out DDIM (``_prediction_fn``) flipping the guidance direction or dropping guidance:
    two DDIM steps computed by hand with the guided noise estimate."""
    alpha_bar = diffusion.alpha_bar_fn(ObjectiveConfig(apply_fn=field, num_classes=NUM_CLASSES))
    sampler = sampling.DDIMSampler(field, alpha_bar, num_levels=K, num_classes=NUM_CLASSES)
    steps = 2
    got = np.asarray(sampler(None, NOISE, LABELS, num_steps=steps, cfg_scale=scale))
    x = NOISE.astype(np.float64)
    for i in range(steps):
        t, t_next = i / steps, (i + 1) / steps
        a, a_next = (float(alpha_bar(np.float32(1.0 - s))) for s in (t, t_next))
        eps = guided_np(x, t, LABELS, scale)
        x1 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_next) * x1 + np.sqrt(1 - a_next) * eps
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_the_guided_steps_are_not_vacuous():
    """Guidance changes the step: the unguided and the flipped step differ from the guided one."""
    x = NOISE.astype(np.float64)
    guided = guided_np(x, 0.0, LABELS, 3.0)
    assert np.abs(guided - field_np(x, 0.0, LABELS)).min() > 1e-2
    flipped = field_np(x, 0.0, LABELS) + 3.0 * (
        field_np(x, 0.0, np.full_like(LABELS, NUM_CLASSES)) - field_np(x, 0.0, LABELS)
    )
    assert np.abs(guided - flipped).min() > 1e-2
