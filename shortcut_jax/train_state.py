"""Train state: step, parameters, EMA parameters (one tree per decay), optimiser state, rng.

The EMA trees sit beside the online parameters; the first decay's tree is the teacher of
objectives that use one and the default weights for evaluation. EMA updates are float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar
    params: Any
    ema_params: tuple  # one tree per decay in ``ema_decays``
    opt_state: Any
    rng: jax.Array  # raw uint32 key; the step's key is fold_in(rng, step)
    ema_decays: tuple = flax.struct.field(pytree_node=False, default=(0.999,))

    @property
    def teacher_params(self):
        return self.ema_params[0] if self.ema_params else self.params


def create(params, tx: optax.GradientTransformation, rng: jax.Array, ema_decays: Sequence[float]) -> TrainState:
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in ema_decays),
        opt_state=tx.init(params),
        rng=rng,
        ema_decays=tuple(float(d) for d in ema_decays),
    )


def update_ema(ema_params: tuple, params, decays: Sequence[float]) -> tuple:
    return tuple(
        jax.tree.map(lambda e, p, d=d: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)), ema, params)
        for ema, d in zip(ema_params, decays)
    )
