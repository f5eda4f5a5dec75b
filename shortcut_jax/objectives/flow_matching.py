"""Flow matching: empirical-velocity targets on every row; the level input is the finest level.

Sampled with the same Euler sampler as the shortcut model; the presets for it set
``model.ignore_level`` so the step-size input carries no information, as in the paper's baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import common


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # no teacher
    x1 = batch["x"]
    b = x1.shape[0]
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    t = common.sample_flow_t(rng_t, b, cfg)
    pred = cfg.apply_fn(
        params,
        common.interpolate(x0, x1, t, cfg.noise_floor),
        t,
        jnp.full((b,), cfg.num_levels, jnp.int32),
        common.drop_labels(rng_drop, batch["label"], cfg),
    )
    mse = common.per_row_mse(pred, common.flow_velocity(x0, x1, cfg.noise_floor))
    loss = jnp.mean(mse)
    return loss, {"loss": loss, "flow_loss": loss}
