"""Reflow (two stages) and live reflow.

Reflow straightens a flow by training flow matching on the couplings a trained model makes:
- stage one, ``generate_pairs``: a teacher and its sampler turn seeded noise into samples, saved
  as ``.npz`` shards of ``noise``, ``x`` and ``label`` with a ``manifest.json``. Shard ``i``
  draws its noise and labels from ``np.random.default_rng([seed, PAIR_STREAM, i])``, so every
  shard can be regenerated alone, a stopped generation resumes at the first missing shard, and
  the same teacher, sampler and seed give the same files;
- stage two, ``loss_fn``: flow matching with ``x0 = batch['noise']`` and ``x1 = batch['x']`` of
  the stored pairs (instead of fresh noise and data), level ``K``, labels dropped for CFG.

Live reflow (``live_loss_fn``) makes the pairs during training: the first
``round(B * reflow_fraction)`` rows get fresh noise carried to a sample by the current model
itself (``reflow_steps`` Euler steps at the flow-matching level ``K``, guided with
``reflow_cfg_scale`` when it is not 1, no gradient) and are trained as one-step pairs at level
0 (``t`` drawn like the flow rows, target ``sample - (1 - floor) noise``); the other rows are
ordinary flow-matching rows at level ``K``. As in the published code the data of the generated
rows is not used.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.infra import distributed
from shortcut_jax.objectives import sampling
from shortcut_jax.objectives import common

MANIFEST = "manifest.json"
# first word after the seed of each shard's random stream (distinct from the data readers' streams)
PAIR_STREAM = 7


# ------------------------------------------------------------------------------ stage one


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"pairs_{index:05d}.npz")


def shard_inputs(index: int, count: int, *, seed: int, shape: Sequence[int], num_classes: int):
    """Noise ``[count, *shape]`` and labels ``[count]`` of shard ``index`` (numpy, deterministic)."""
    rng = np.random.default_rng([seed, PAIR_STREAM, index])
    noise = rng.standard_normal((count, *shape)).astype(np.float32)
    if num_classes > 0:
        labels = rng.integers(0, num_classes, count).astype(np.int32)
    else:
        labels = np.full(count, 0, np.int32)  # unlabelled data: label 0, as the readers give it
    return noise, labels


def generate_pairs(sampler, params, *, out_dir: str, shape: Sequence[int], num_classes: int, num_pairs: int,
                   num_steps: int, seed: int, shard_size: int = 10_000, batch_size: int = 1000,
                   cfg_scale: float = 1.0, meta: Optional[dict] = None) -> dict:
    """Stage one: ``num_pairs`` (noise, sample) pairs from ``sampler(params, noise, labels, ...)``.

    ``sampler`` has the call of ``sampling.Sampler`` (any of the project's samplers). Shards
    already on disk are kept when ``out_dir``'s manifest records the same settings; different
    settings are refused before anything is generated. ``meta`` (e.g. the teacher's checkpoint
    and step) is stored in the manifest. Returns the manifest.

    In a job of several processes every process calls this alike: each takes its part in every
    sampler call (which must return the whole batch on every process, as ``Sampler.to_host``
    gives it), process 0 alone decides from what it finds on disk which shards are missing and
    writes the manifest and the shards, and no process returns before they are written.
    """
    if num_pairs < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"num_pairs={num_pairs}, shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    settings = {"num_pairs": int(num_pairs), "shard_size": int(shard_size), "seed": int(seed),
                "num_steps": int(num_steps), "cfg_scale": float(cfg_scale), "shape": [int(d) for d in shape],
                "num_classes": int(num_classes), "meta": meta or {}}
    num_shards = -(-num_pairs // shard_size)
    manifest_path = os.path.join(out_dir, MANIFEST)
    writer = jax.process_index() == 0
    # what is on disk, as process 0 sees it: [settings differ, shard 0 done, shard 1 done, ...]
    status = np.zeros(1 + num_shards, np.int32)
    differing = ["see process 0"]
    if writer:
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                saved = json.load(f)
            differing = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k])))
            status[0] = bool(differing)
        status[1:] = [os.path.exists(shard_path(out_dir, i)) for i in range(num_shards)]
    if jax.process_count() > 1:
        # every process takes part in every sampler call, so all skip the same shards and all
        # refuse together (another host may not even see the folder)
        from jax.experimental import multihost_utils

        status = np.asarray(multihost_utils.broadcast_one_to_all(status))
    if status[0]:
        raise ValueError(f"{out_dir} holds pairs generated with other settings ({', '.join(differing)}):"
                         " use another output directory or the saved settings")
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(manifest_path, "w") as f:
            json.dump(settings, f, indent=1)

    for index in range(num_shards):
        if status[1 + index]:
            continue
        count = min(shard_size, num_pairs - index * shard_size)
        noise, labels = shard_inputs(index, count, seed=seed, shape=shape, num_classes=num_classes)
        samples = np.empty_like(noise)
        chunk = min(batch_size, count)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            # pad the last chunk to the chunk size: one compilation for every call
            chunk_noise = np.zeros((chunk, *shape), np.float32)
            chunk_labels = np.full(chunk, num_classes, np.int32)
            chunk_noise[:stop - start] = noise[start:stop]
            chunk_labels[:stop - start] = labels[start:stop] if num_classes > 0 else num_classes
            out = sampler(params, chunk_noise, chunk_labels, num_steps=num_steps, cfg_scale=cfg_scale)
            samples[start:stop] = np.asarray(out)[:stop - start]
        if writer:
            path = shard_path(out_dir, index)
            tmp = path + ".tmp.npz"  # written whole, then renamed: a stopped run leaves no partial shard
            np.savez(tmp, noise=noise, x=samples, label=labels)
            os.replace(tmp, path)
    # no process returns before process 0 has written every file
    distributed.sync(f"reflow pairs written to {out_dir}")
    return settings


def load_pairs(out_dir: str) -> dict[str, np.ndarray]:
    """Every shard of a finished stage one, concatenated in shard order: ``noise``, ``x``, ``label``."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: generate the pairs first (reflow.generate_pairs)")
    with open(manifest_path) as f:
        settings = json.load(f)
    num_shards = -(-settings["num_pairs"] // settings["shard_size"])
    missing = [shard_path(out_dir, i) for i in range(num_shards) if not os.path.exists(shard_path(out_dir, i))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_shards} shards are missing in {out_dir} (first:"
                                f" {missing[0]}): run the generation again to complete them")
    parts = []
    for i in range(num_shards):
        with np.load(shard_path(out_dir, i)) as z:
            parts.append({k: z[k] for k in ("noise", "x", "label")})
    return {k: np.concatenate([p[k] for p in parts]) for k in ("noise", "x", "label")}


# ------------------------------------------------------------------------------ stage two


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # the teacher's work is in the pairs
    if "noise" not in batch:
        raise KeyError("objective 'reflow' trains on stored (noise, sample) pairs: batch['noise'] is missing;"
                       " read the pairs written by reflow.generate_pairs")
    x1, x0 = batch["x"], batch["noise"].astype(batch["x"].dtype)
    b = x1.shape[0]
    rng_t, rng_drop = jax.random.split(rng)
    t = common.sample_flow_t(rng_t, b, cfg)
    pred = cfg.apply_fn(params, common.interpolate(x0, x1, t, cfg.noise_floor), t,
                        jnp.full((b,), cfg.num_levels, jnp.int32), common.drop_labels(rng_drop, batch["label"], cfg))
    loss = jnp.mean(common.per_row_mse(pred, common.flow_velocity(x0, x1, cfg.noise_floor)))
    return loss, {"loss": loss, "flow_loss": loss}


# ------------------------------------------------------------------------------ live reflow


def num_reflow_rows(batch_size: int, fraction: float) -> int:
    return int(round(batch_size * fraction))


def generate_live(params, noise, labels, cfg: common.ObjectiveConfig) -> jax.Array:
    """Samples of the current model from ``noise`` (no gradient): ``reflow_steps`` Euler steps at level K."""
    guided = cfg.num_classes > 0 and cfg.reflow_cfg_scale != 1.0
    out = sampling.euler_sample_at_level(cfg.apply_fn, jax.lax.stop_gradient(params), noise, labels,
                                         num_steps=cfg.reflow_steps, level=cfg.num_levels,
                                         cfg_scale=cfg.reflow_cfg_scale if guided else None,
                                         null_class=cfg.null_class)
    return jax.lax.stop_gradient(out.astype(noise.dtype))


def live_loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    del teacher_params  # pairs come from the current model
    x1 = batch["x"]
    b = x1.shape[0]
    n = num_reflow_rows(b, cfg.reflow_fraction)
    if not 0 < n < b:
        raise ValueError(f"objective.reflow_fraction={cfg.reflow_fraction} gives {n} of {b} rows to live reflow;"
                         " it must leave at least one row to each group")
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, x1.dtype)
    labels_pair = common.conditional_labels(batch["label"][:n], cfg)
    generated = generate_live(params, x0[:n], labels_pair, cfg)
    x1_rows = jnp.concatenate([generated, x1[n:]])
    t = common.sample_flow_t(rng_t, b, cfg)
    level = jnp.concatenate([jnp.zeros((n,), jnp.int32), jnp.full((b - n,), cfg.num_levels, jnp.int32)])
    labels = jnp.concatenate([labels_pair, common.drop_labels(rng_drop, batch["label"][n:], cfg)])
    pred = cfg.apply_fn(params, common.interpolate(x0, x1_rows, t, cfg.noise_floor), t, level, labels)
    mse = common.per_row_mse(pred, common.flow_velocity(x0, x1_rows, cfg.noise_floor))
    loss = jnp.mean(mse)
    return loss, {"loss": loss, "reflow_loss": jnp.mean(mse[:n]), "flow_loss": jnp.mean(mse[n:])}
