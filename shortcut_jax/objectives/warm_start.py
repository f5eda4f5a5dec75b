"""Starting a run (or a teacher) from another run's parameters: a warm start.

A user with a trained flow-matching or diffusion model can start a shortcut run from it instead
of from scratch; distillation methods load their teacher the same way. Every parameter is
loaded (patch/point embedding, time, level and label embeddings, blocks, output layer); the
shapes must match, i.e. the same architecture, data shape and class count. The optimiser state
starts fresh and the EMA trees start at the loaded parameters.

The level input. A flow-matching run built with ``model.ignore_level`` fed the level embedder a
constant 0; a shortcut run feeds it ``k`` in ``0..K``, with ``K`` (the finest step, ``2^-K``) for
its flow-matching rows. Loaded as they are, the parameters would give at level ``K`` (and at
every other level) an embedding the source model never saw. ``constant_level_embedding(params,
level)`` rewrites the level embedder so that it returns, for every input, the embedding the
source gave ``level`` (0 for a source that ignored its level; ``K`` for one that fed its flow
rows ``K``): its first layer's weights are zeroed and their contribution at ``level`` is moved
into the bias. The warm-started network then computes the source's function at every level: every
step size starts at the finest level, i.e. as the flow's instantaneous velocity, which is the
average velocity of a vanishing step; training then separates the levels (the zeroed weights get
gradients as usual). Loading into a network that itself ignores the level input uses ``level``
the same way (it feeds 0, so the embedding of 0 must be the source's embedding of ``level``).

A diffusion (noise-prediction) source computes a different quantity on a different path (see
``objectives.diffusion``), so no rewrite makes its function a velocity; its parameters are a
starting point only, and the first steps of the new run re-learn the output.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from shortcut_jax.models import layers

LEVEL_EMBED = "level_embed"


def constant_level_embedding(params: dict, level: int) -> dict:
    """Params whose level embedder returns, at every input, what ``params`` gave at ``level``."""
    if LEVEL_EMBED not in params or "hidden" not in params[LEVEL_EMBED]:
        raise KeyError(f"no '{LEVEL_EMBED}/hidden' layer in the parameters (top-level keys: {sorted(params)});"
                       " constant_level_embedding expects a DiT or MLPNet parameter tree")
    hidden = params[LEVEL_EMBED]["hidden"]
    kernel, bias = hidden["kernel"], hidden["bias"]  # [frequencies, width], [width]
    sinusoid = layers.sinusoidal_embedding(jnp.asarray([level], jnp.float32), kernel.shape[0])[0]
    new_hidden = {**hidden, "kernel": jnp.zeros_like(kernel),
                  "bias": (bias.astype(jnp.float32) + sinusoid @ kernel.astype(jnp.float32)).astype(bias.dtype)}
    return {**params, LEVEL_EMBED: {**params[LEVEL_EMBED], "hidden": new_hidden}}


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def warm_start_params(source_params: Any, init_params: Any, *, source_level: Optional[int] = None) -> Any:
    """``source_params`` checked against the new run's ``init_params`` (or their abstract shapes)
    and cast to their dtypes; with ``source_level``, the level embedder made constant at it.

    Raises ``ValueError`` naming the differing parameters when the trees do not match.
    """
    have, want = _shapes(source_params), _shapes(init_params)
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shape = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        detail = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", extra),
                               ("shape differs", [f"{k} {have[k]} vs {want[k]}" for k in shape])) if keys)
        raise ValueError("the warm-start parameters do not fit this model (" + detail + "): use a checkpoint of"
                         " the same architecture, data shape and class count")
    params = jax.tree.map(lambda s, i: jnp.asarray(s, dtype=i.dtype), source_params, init_params)
    return params if source_level is None else constant_level_embedding(params, source_level)
