"""The shortcut objective: flow matching plus self-consistency, in one batch.

A batch of B rows is split into two disjoint groups (different images, independent noise):
- ``n_sc = round(B * sc_fraction)`` self-consistency rows. Row i gets a level ``k_i`` in
  ``0..K-1`` (step ``d = 2^-k``), ``t`` on that level's grid (``randint(0, 2^k) / 2^k``), and
  the target ``(s1 + s2) / 2`` built from two half steps of the teacher at level ``k + 1``:
  ``s1 = s(x_t, t, k+1)``, ``x' = clip(x_t + d/2 s1)``, ``s2 = s(x', t + d/2, k+1)``; the target is
  clipped too and carries no gradient.
- the remaining flow rows: ``t`` on the finest grid, level ``K``, target ``x1 - (1 - floor) x0``,
  labels dropped to the null class with probability ``label_dropout``.
The two groups are interleaved through the batch (``common.RowSplit``: with 1/8 of the rows,
the first of every eight), so a batch sharded over devices keeps them on the devices that hold
them. One student forward pass covers all rows. The published code cuts both groups from the same
first images with the same noise (its last eighth of each batch is never used); here they are
disjoint, so every image in the batch is used once.

Teacher: ``'ema'`` uses ``teacher_params`` (the EMA weights), ``'online'`` the current weights
under stop_gradient. Teacher passes run only on the self-consistency rows.

Bootstrap CFG (class-conditional data): rows at the smallest shortcut level ``K - 1`` build
their target from guided half steps, ``u + w (c - u)``, so larger levels inherit guidance.

Level assignment: ``'official'`` spreads the self-consistency rows evenly over the levels
(``n_sc // K`` each, the remainder to level 0); ``'random'`` draws each row's level uniformly.
A caller that accumulates gradients over micro-batches passes the levels of this micro-batch's
rows as ``batch['sc_level']``, so that levels are spread over the whole global batch.

A growing self-consistency share (``objective.sc_fraction_start >= 0``): the layout above is
laid out for the final share ``sc_fraction`` (shapes are fixed per compiled step), and at step
``s`` only ``round(B * f(s))`` of the ``n_sc`` rows, in random positions, are self-consistency
rows, ``f`` rising linearly from ``sc_fraction_start`` to ``sc_fraction`` over
``sc_ramp_steps`` steps (``batch['step']``); the others are flow rows in every respect (``t``,
level ``K``, target, label dropout). Their teacher passes still run, so the step costs what the
final share costs from the start.

Metrics: ``loss``, ``flow_loss``, ``sc_loss`` (with a growing share, their row counts
``flow_loss/rows`` and ``sc_loss/rows``) and, per level ``i``, ``sc_loss/level_i`` (the mean
over that level's rows, 0 where it has none) with its row count ``sc_loss/level_i/rows``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.infra import sharding
from shortcut_jax.objectives import common


def num_sc_rows(batch_size: int, sc_fraction: float) -> int:
    return int(round(batch_size * sc_fraction))


def assign_levels(rng: jax.Array, n_sc: int, num_levels: int, mode: str) -> jax.Array:
    """Levels of the ``n_sc`` self-consistency rows, int32 ``[n_sc]``."""
    if mode == "official":
        per_level = n_sc // num_levels
        counts = [per_level] * num_levels
        counts[0] += n_sc - per_level * num_levels
        return jnp.asarray(np.repeat(np.arange(num_levels), counts), dtype=jnp.int32)
    if mode == "random":
        return jax.random.randint(rng, (n_sc,), 0, num_levels, dtype=jnp.int32)
    raise ValueError(f"objective.level_assignment must be 'official' or 'random', got {mode!r}")


def plan_micro_batches(rng, batch_size: int, accum: int, cfg: common.ObjectiveConfig) -> dict:
    """Levels for gradient accumulation: assigned over the global batch, then dealt out.

    Micro-batch j gets levels j, j + A, j + 2A, ... of the global assignment, so each level has
    as many rows per optimiser step as without accumulation. Returns ``{'sc_level': [A, n_sc/A]}``.
    """
    n_sc = num_sc_rows(batch_size, cfg.sc_fraction)
    levels = assign_levels(rng, n_sc, cfg.num_levels, cfg.level_assignment)
    return {"sc_level": levels.reshape(n_sc // accum, accum).T}


def self_consistency_targets(
    apply_fn, teacher_params, x_t, t, level, labels, cfg: common.ObjectiveConfig, guided_tail: int | None = None
):
    """Average of two teacher half steps at level ``level + 1``; no gradient flows through it.

    With bootstrap CFG, rows at the smallest level ``K - 1`` use guided half steps. When the
    caller knows those rows are exactly the last ``guided_tail`` ones (the official assignment),
    the null-class passes run on those rows only, batched with the conditional pass; otherwise
    every row gets a null-class pass and the guided rows are selected afterwards.
    """
    half_level = level + 1
    half_d = (0.5 ** half_level.astype(jnp.float32)).reshape((-1,) + (1,) * (x_t.ndim - 1))
    guide = cfg.bootstrap_cfg and cfg.num_classes > 0
    w = cfg.bootstrap_cfg_scale

    def velocity(x, tt):
        if not guide or guided_tail == 0:
            return apply_fn(teacher_params, x, tt, half_level, labels)
        if guided_tail is not None:
            g = slice(x.shape[0] - guided_tail, None)
            # n_sc + guided_tail rows, which the devices seldom divide: held split by rows
            rows = sharding.batch_rows
            both = apply_fn(
                teacher_params,
                rows(jnp.concatenate([x, x[g]])),
                rows(jnp.concatenate([tt, tt[g]])),
                rows(jnp.concatenate([half_level, half_level[g]])),
                rows(jnp.concatenate([labels, jnp.full_like(labels[g], cfg.null_class)])),
            )
            cond, uncond = both[: x.shape[0]], both[x.shape[0] :]
            return cond.at[g].set(uncond + w * (cond[g] - uncond))
        cond = apply_fn(teacher_params, x, tt, half_level, labels)
        uncond = apply_fn(teacher_params, x, tt, half_level, jnp.full_like(labels, cfg.null_class))
        guided = (level == cfg.num_levels - 1).reshape(half_d.shape)
        return jnp.where(guided, uncond + w * (cond - uncond), cond)

    def clip(x):
        return jnp.clip(x, -cfg.clip, cfg.clip) if cfg.clip > 0 else x

    s1 = velocity(x_t, t)
    x_mid = clip(x_t + half_d * s1)
    s2 = velocity(x_mid, t + half_d.reshape(t.shape))
    return jax.lax.stop_gradient(clip((s1 + s2) / 2))


def row_split(batch_size: int, cfg: common.ObjectiveConfig) -> common.RowSplit:
    """The self-consistency rows (the split's first group) and the flow rows of a batch."""
    return common.RowSplit(batch_size, num_sc_rows(batch_size, cfg.sc_fraction))


def sample_rows(x1, labels, rng, cfg: common.ObjectiveConfig, sc_level=None) -> dict:
    """Noise, noise levels, step levels and labels of every row, in batch order; ``rows`` says
    which are self-consistency rows (``rows.first``) and which flow rows (``rows.rest``)."""
    b = x1.shape[0]
    rows = row_split(b, cfg)
    n_sc = rows.count
    rng_noise, rng_level, rng_t_sc, rng_t_flow, rng_drop = jax.random.split(rng, 5)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    if sc_level is None:
        sc_level = assign_levels(rng_level, n_sc, cfg.num_levels, cfg.level_assignment)
    grid = 2**sc_level
    t_sc = jax.random.randint(rng_t_sc, (n_sc,), 0, grid).astype(jnp.float32) / grid
    t_flow = common.sample_flow_t(rng_t_flow, b - n_sc, cfg)
    return {
        "rows": rows,
        "x0": x0,
        "t": rows.join(t_sc, t_flow),
        "level": rows.join(sc_level.astype(jnp.int32), jnp.full((b - n_sc,), cfg.num_levels, jnp.int32)),
        "label": rows.join(
            common.conditional_labels(rows.first(labels), cfg),
            common.drop_labels(rng_drop, rows.rest(labels), cfg),
        ),
    }


def growing_share(step, cfg: common.ObjectiveConfig) -> jax.Array:
    """The self-consistency share of the batch at ``step`` under ``objective.sc_fraction_start``:
    linear from it to ``sc_fraction`` over ``sc_ramp_steps`` steps, then constant."""
    start, ramp = cfg.sc_fraction_start, cfg.sc_ramp_steps
    if ramp < 1:
        raise ValueError(
            "ObjectiveConfig.sc_ramp_steps must be >= 1 for a growing share: build the config with"
            " make_objective_config(..., total_steps=train.steps) or set objective.sc_ramp_steps"
        )
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / ramp, 0.0, 1.0)
    return start + (cfg.sc_fraction - start) * progress


def active_rows(rng, n_sc: int, batch_size: int, step, cfg: common.ObjectiveConfig) -> jax.Array:
    """Which of the ``n_sc`` self-consistency rows are ones at ``step`` (bool ``[n_sc]``): exactly
    ``round(batch_size * growing_share(step))`` of them, in random positions."""
    count = jnp.minimum(jnp.round(batch_size * growing_share(step, cfg)), n_sc)
    rank = jax.random.permutation(rng, n_sc)
    return rank < count


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    x1 = batch["x"]
    b = x1.shape[0]
    k = cfg.num_levels
    rng, rng_grow = jax.random.split(rng) if cfg.sc_fraction_start >= 0 else (rng, None)
    drawn = sample_rows(x1, batch["label"], rng, cfg, batch.get("sc_level"))
    rows, x0, t, level, labels = drawn["rows"], drawn["x0"], drawn["t"], drawn["level"], drawn["label"]
    n_sc, sc_rows = rows.count, rows.first
    x_t = common.interpolate(x0, x1, t, cfg.noise_floor)

    teacher = jax.lax.stop_gradient(params) if cfg.teacher == "online" else teacher_params
    # The official assignment puts the smallest level's rows last: guidance needs only those.
    official = cfg.level_assignment == "official" and "sc_level" not in batch
    guided_tail = n_sc // k if official else None
    target_sc = self_consistency_targets(
        cfg.apply_fn, teacher, sc_rows(x_t), sc_rows(t), sc_rows(level), sc_rows(labels), cfg, guided_tail
    )
    target_flow = common.flow_velocity(rows.rest(x0), rows.rest(x1), cfg.noise_floor)
    level_sc = sc_rows(level)

    if rng_grow is None:
        is_sc = jnp.ones((n_sc,), bool)
    else:  # a growing share: the inactive self-consistency rows become flow rows
        if "step" not in batch:
            raise KeyError("objective.sc_fraction_start >= 0 needs batch['step'] (the train step adds it)")
        rng_active, rng_t, rng_drop = jax.random.split(rng_grow, 3)
        is_sc = active_rows(rng_active, n_sc, b, batch["step"], cfg)
        col = is_sc.reshape((n_sc,) + (1,) * (x1.ndim - 1))
        t_sc = jnp.where(is_sc, sc_rows(t), common.sample_flow_t(rng_t, n_sc, cfg))
        t = rows.join(t_sc, rows.rest(t))
        level = rows.join(jnp.where(is_sc, level_sc, k), rows.rest(level))
        dropped = common.drop_labels(rng_drop, sc_rows(batch["label"]), cfg)
        labels = rows.join(jnp.where(is_sc, sc_rows(labels), dropped), rows.rest(labels))
        x0_sc, x1_sc = sc_rows(x0), sc_rows(x1)
        x_t_sc = jnp.where(col, sc_rows(x_t), common.interpolate(x0_sc, x1_sc, t_sc, cfg.noise_floor))
        x_t = rows.join(x_t_sc, rows.rest(x_t))
        flow_sc = common.flow_velocity(x0_sc, x1_sc, cfg.noise_floor)
        target_sc = jnp.where(col, target_sc, flow_sc.astype(target_sc.dtype))

    # One student pass over all rows.
    pred = cfg.apply_fn(params, x_t, t, level, labels)
    mse = common.per_row_mse(pred, rows.join(target_sc, target_flow))
    mse_sc, mse_flow = sc_rows(mse), rows.rest(mse)
    sc = is_sc.astype(jnp.float32)

    if cfg.level_weights is None:
        row_weight_sc = jnp.ones((n_sc,), jnp.float32)
    else:
        w = jnp.asarray(cfg.level_weights, jnp.float32)
        row_weight_sc = (w * (k / jnp.sum(w)))[level_sc]
    # an inactive self-consistency row is a flow row: weight 1
    loss = (jnp.sum(jnp.where(is_sc, row_weight_sc, 1.0) * mse_sc) + jnp.sum(mse_flow)) / b

    n_active = jnp.sum(sc)
    metrics = {
        "loss": loss,
        "flow_loss": (jnp.sum(mse_flow) + jnp.sum((1.0 - sc) * mse_sc)) / jnp.maximum(b - n_active, 1.0),
        "sc_loss": jnp.sum(sc * mse_sc) / jnp.maximum(n_active, 1.0),
    }
    if rng_grow is not None:  # the rows behind each mean vary with the step
        metrics["sc_loss/rows"] = n_active
        metrics["flow_loss/rows"] = b - n_active
    one_hot = jax.nn.one_hot(level_sc, k, dtype=jnp.float32) * sc[:, None]  # [n_sc, K], active rows
    counts = jnp.sum(one_hot, axis=0)
    per_level = jnp.sum(one_hot * mse_sc[:, None], axis=0) / jnp.maximum(counts, 1.0)  # 0 where a level has no row
    for i in range(k):
        metrics[f"sc_loss/level_{i}"] = per_level[i]
        # The rows behind that mean: a level can be missing from a micro-batch (few rows per
        # level, random assignment), so means over micro-batches are weighted by these counts.
        metrics[f"sc_loss/level_{i}/rows"] = counts[i]
    return loss, metrics


def check_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """The growing share's keys (``ValueError`` naming the key)."""
    start = objective_cfg.sc_fraction_start
    if start >= 0 and start > objective_cfg.sc_fraction:
        raise ValueError(
            f"objective.sc_fraction_start={start} must be at most objective.sc_fraction={objective_cfg.sc_fraction}"
            " (the share it grows to), or -1 for a constant share"
        )
    if objective_cfg.sc_ramp_steps < 0:
        raise ValueError(f"objective.sc_ramp_steps={objective_cfg.sc_ramp_steps} must be >= 0 (0: train.steps)")
