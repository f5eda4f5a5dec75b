"""Train state: step, parameters, EMA parameters (one tree per decay), optimiser state, rng, and
the frozen teacher of the distillation objectives.

The EMA trees sit beside the online parameters; the first decay's tree is the teacher of
objectives that use one and the default weights for evaluation. EMA updates are float32.

The frozen teacher. ``state.frozen_teacher`` is None unless the objective distils a trained model
(``objectives.NEEDS[name].frozen_teacher``); then the state is a ``DistillationTrainState``, whose
one extra field holds the teacher's parameter tree (shaped and sharded like ``params``). It is
saved with every checkpoint, so a resumed run continues with the teacher it had, including a
progressive-distillation phase's snapshot; it receives no gradient and no EMA update. It is a
subclass rather than a field that is None elsewhere because orbax records a None field as an
empty node: such a field would change the checkpoint tree of every objective and refuse the
checkpoints written before it existed. The states and checkpoints of the other objectives are
unchanged.
"""

from __future__ import annotations

import math
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

    @property
    def frozen_teacher(self):
        return None  # no frozen teacher: see DistillationTrainState


class DistillationTrainState(TrainState):
    """The train state of an objective that distils a frozen teacher."""

    # the teacher's parameter tree, shaped like params; the default only satisfies the dataclass
    # field order (``create`` always sets it)
    frozen_teacher: Any = None


def create(
    params, tx: optax.GradientTransformation, rng: jax.Array, ema_decays: Sequence[float], frozen_teacher=None
) -> TrainState:
    """A fresh state at ``params`` (every EMA tree starts there); with ``frozen_teacher``, a
    ``DistillationTrainState`` holding a float32 copy of it."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    fields = dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in ema_decays),
        opt_state=tx.init(params),
        rng=rng,
        ema_decays=tuple(float(d) for d in ema_decays),
    )
    if frozen_teacher is None:
        return TrainState(**fields)
    teacher = jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)), frozen_teacher)
    return DistillationTrainState(**fields, frozen_teacher=teacher)


def update_ema(ema_params: tuple, params, decays: Sequence[float], count=None) -> tuple:
    """One EMA update per decay.

    With ``count`` (the number of this update, 1 for the first), the average is debiased: the
    decay used is ``d (1 - d^(n-1)) / (1 - d^n)``, so that after ``n`` updates each tree is the
    exponentially weighted mean of the ``n`` parameter iterates, normalised, with no weight left
    on the initial parameters. Without it (the reference recipe) the initial parameters keep a
    weight of ``d^n``: 37% after 1,000 updates and 14% after 2,000 at ``d = 0.999``.
    """
    out = []
    for ema, d in zip(ema_params, decays):
        if count is None:
            beta = jnp.float32(d)
        else:
            n = jnp.asarray(count, jnp.float32)
            # 1 - d^n computed as -expm1(n log d): exact for d close to 1.
            beta = d * jnp.expm1((n - 1.0) * math.log(d)) / jnp.expm1(n * math.log(d)) if d > 0 else jnp.float32(0.0)
        out.append(
            jax.tree.map(
                lambda e, p, b=beta: b * e.astype(jnp.float32) + (1.0 - b) * p.astype(jnp.float32), ema, params
            )
        )
    return tuple(out)
