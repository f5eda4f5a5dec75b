"""Reflow (two stages) and live reflow.

Reflow straightens a flow by training flow matching on the couplings a trained model makes:
- stage one (``data.pairs.generate_pairs``, the ``reflow_pairs`` command): a teacher and its
  sampler turn seeded noise into samples, stored as the pairs reader's shards;
- stage two, ``loss_fn``: flow matching with ``x0 = batch['noise']`` and ``x1 = batch['x']`` of
  the stored pairs (instead of fresh noise and data), level ``K``, labels dropped for CFG.

Live reflow (``live_loss_fn``) makes the pairs during training: ``round(B * reflow_fraction)``
rows (interleaved through the batch by ``common.RowSplit``) get fresh noise carried to a sample
by the current model itself (``reflow_steps`` Euler steps at the flow-matching level ``K``, guided with
``reflow_cfg_scale`` when it is not 1, no gradient) and are trained as one-step pairs at level
0 (``t`` drawn like the flow rows, target ``sample - (1 - floor) noise``); the other rows are
ordinary flow-matching rows at level ``K``. As in the published code the data of the generated
rows is not used.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from shortcut_jax.objectives import sampling
from shortcut_jax.objectives import common


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # the teacher's work is in the pairs
    if "noise" not in batch:
        raise KeyError(
            "objective 'reflow' trains on stored (noise, sample) pairs: batch['noise'] is missing;"
            " read the pairs written by reflow.generate_pairs"
        )
    x1, x0 = batch["x"], batch["noise"].astype(batch["x"].dtype)
    b = x1.shape[0]
    rng_t, rng_drop = jax.random.split(rng)
    t = common.sample_flow_t(rng_t, b, cfg)
    pred = cfg.apply_fn(
        params,
        common.interpolate(x0, x1, t, cfg.noise_floor),
        t,
        jnp.full((b,), cfg.num_levels, jnp.int32),
        common.drop_labels(rng_drop, batch["label"], cfg),
    )
    loss = jnp.mean(common.per_row_mse(pred, common.flow_velocity(x0, x1, cfg.noise_floor)))
    return loss, {"loss": loss, "flow_loss": loss}


# ------------------------------------------------------------------------------ live reflow


def num_reflow_rows(batch_size: int, fraction: float) -> int:
    return int(round(batch_size * fraction))


def generate_live(params, noise, labels, cfg: common.ObjectiveConfig) -> jax.Array:
    """Samples of the current model from ``noise`` (no gradient): ``reflow_steps`` Euler steps at level K."""
    guided = cfg.num_classes > 0 and cfg.reflow_cfg_scale != 1.0
    out = sampling.euler_sample_at_level(
        cfg.apply_fn,
        jax.lax.stop_gradient(params),
        noise,
        labels,
        num_steps=cfg.reflow_steps,
        level=cfg.num_levels,
        cfg_scale=cfg.reflow_cfg_scale if guided else None,
        null_class=cfg.null_class,
    )
    return jax.lax.stop_gradient(out.astype(noise.dtype))


def live_loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # pairs come from the current model
    x1 = batch["x"]
    b = x1.shape[0]
    n = num_reflow_rows(b, cfg.reflow_fraction)
    if not 0 < n < b:
        raise ValueError(
            f"objective.reflow_fraction={cfg.reflow_fraction} gives {n} of {b} rows to live reflow;"
            " it must leave at least one row to each group"
        )
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    rows = common.RowSplit(b, n)  # the generated pairs first, interleaved through the batch
    labels_pair = common.conditional_labels(rows.first(batch["label"]), cfg)
    generated = generate_live(params, rows.first(x0), labels_pair, cfg)
    x1_rows = rows.join(generated, rows.rest(x1))
    t = common.sample_flow_t(rng_t, b, cfg)
    level = rows.join(jnp.zeros((n,), jnp.int32), jnp.full((b - n,), cfg.num_levels, jnp.int32))
    labels = rows.join(labels_pair, common.drop_labels(rng_drop, rows.rest(batch["label"]), cfg))
    pred = cfg.apply_fn(params, common.interpolate(x0, x1_rows, t, cfg.noise_floor), t, level, labels)
    mse = common.per_row_mse(pred, common.flow_velocity(x0, x1_rows, cfg.noise_floor))
    loss = jnp.mean(mse)
    return loss, {"loss": loss, "reflow_loss": jnp.mean(rows.first(mse)), "flow_loss": jnp.mean(rows.rest(mse))}


def check_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """Live reflow's share of the batch and its generating steps (``ValueError`` naming the key)."""
    n = num_reflow_rows(batch_size, objective_cfg.reflow_fraction)
    if not 0 < n < batch_size:
        raise ValueError(
            f"objective.reflow_fraction={objective_cfg.reflow_fraction} gives {n} of the {batch_size}"
            " rows of train.batch_size to live reflow: it must leave at least one row to each group"
        )
    if objective_cfg.reflow_steps < 1:
        raise ValueError(f"objective.reflow_steps={objective_cfg.reflow_steps} must be >= 1")
