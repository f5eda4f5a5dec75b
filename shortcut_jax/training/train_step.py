"""The train step: one function of (state, batch) that the loop jits once, with the state donated.

::

    rng = fold_in(state.rng, state.step)
    [frozen_teacher = teacher_for_step(step, frozen_teacher, params)   objectives with snapshots]
    (loss, metrics), grads = value_and_grad(objective)(params, teacher_params, batch, rng)
        [lax.scan over micro-batches when optim.accum_steps > 1]
    params, opt_state = optax update ; ema_params = EMA update
    [FP8 amax histories: written from their observations, never by the optimiser; copied into the EMA trees]

The step reads the method's record (``objectives.registry.Method``) and never learns which
method runs. ``teacher_params`` is the first EMA tree, or ``{'ema': that tree, 'teacher':
state.frozen_teacher}`` for a method that distils a frozen teacher (``Method.frozen_teacher``);
the frozen teacher is never differentiated nor averaged, and is only replaced where the method
re-snapshots it (``Method.teacher_snapshot``: progressive distillation's phase starts), inside
the step, so the new state (and every checkpoint) holds the teacher of the phase it is in.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from shortcut_jax.models import fp8
from shortcut_jax.training import train_state
from shortcut_jax.objectives import Method, method


def make_train_step(
    objective: str | Method,
    obj_cfg,
    tx: optax.GradientTransformation,
    schedule,
    *,
    accum_steps: int = 1,
    ema_debias: bool = False,
) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` for a method, given by name or record."""
    record = method(objective) if isinstance(objective, str) else objective
    loss_fn = record.loss
    planner = record.plan_micro_batches
    # curricula read the number of updates done so far from the batch (every micro-batch of one
    # update is in the same stage); it is added here, never part of the data stream
    with_step = record.step
    with_frozen_teacher = record.frozen_teacher
    snapshot = record.teacher_snapshot

    def train_step(state: train_state.TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        if snapshot is not None:  # the student as it stands before this update, at a phase's first step
            state = state.replace(frozen_teacher=snapshot(state.step, state.frozen_teacher, state.params, obj_cfg))
        if with_frozen_teacher:
            teacher = {"ema": state.teacher_params, "teacher": state.frozen_teacher}
        else:
            teacher = state.teacher_params
        grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, teacher, b, r, obj_cfg), has_aux=True)

        if accum_steps == 1:
            if with_step:
                batch = dict(batch, step=state.step)
            (_, metrics), grads = grad_fn(state.params, batch, rng)
            grads, observed = fp8.split_observations(grads)
        else:
            rng, plan_rng = jax.random.split(rng)
            batch_size = jax.tree.leaves(batch)[0].shape[0]
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, batch_size // accum_steps, *x.shape[1:]), batch)
            if planner is not None:
                micro.update(planner(plan_rng, batch_size, accum_steps, obj_cfg))
            rngs = jax.random.split(rng, accum_steps)

            # A metric reported beside a row count '<name>/rows' is a mean over a subset of rows
            # whose size varies between micro-batches (a level can be missing from one): it is
            # summed weighted by its rows and divided by the rows of the global batch, which are
            # summed. Every other metric is a mean over equal micro-batches and is averaged.
            def row_weighted(m):
                return {k: v * m[k + "/rows"] if k + "/rows" in m else v for k, v in m.items()}

            def body(carry, xs):
                grads_sum, observed_max, metrics_sum = carry
                mb, r = xs
                if with_step:
                    mb = dict(mb, step=state.step)
                (_, m), g = grad_fn(state.params, mb, r)
                g, o = fp8.split_observations(g)  # an update's amax is the largest of its micro-batches'
                return (
                    jax.tree.map(jnp.add, grads_sum, g),
                    fp8.combine_observations(observed_max, o),
                    jax.tree.map(jnp.add, metrics_sum, row_weighted(m)),
                ), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_o = fp8.split_observations(zeros_g)[1]
            first = jax.tree.map(lambda x: x[0], micro)
            if with_step:
                first = dict(first, step=state.step)
            m_shape = jax.eval_shape(lambda: grad_fn(state.params, first, rngs[0])[0][1])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, observed, sums), _ = jax.lax.scan(body, (zeros_g, zeros_o, zeros_m), (micro, rngs))
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = {}
            for k, v in sums.items():
                if k + "/rows" in sums:  # a row-weighted mean (0 where the global batch has no row)
                    metrics[k] = v / jnp.maximum(sums[k + "/rows"], 1.0)
                elif k.endswith("/rows") and k[: -len("/rows")] in sums:  # rows of the global batch
                    metrics[k] = v
                else:
                    metrics[k] = v / accum_steps

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = fp8.record_observations(params, state.params, observed)
        ema = train_state.update_ema(
            state.ema_params, params, state.ema_decays, count=state.step + 1 if ema_debias else None
        )
        ema = tuple(fp8.histories_from(tree, params) for tree in ema)  # copied, not averaged
        metrics = dict(metrics)
        metrics.update(
            grad_norm=optax.global_norm(grads),
            param_norm=optax.global_norm(fp8.without_histories(params)),
            update_norm=optax.global_norm(fp8.without_histories(updates)),
            lr=jnp.asarray(schedule(state.step), jnp.float32),
        )
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return train_step
