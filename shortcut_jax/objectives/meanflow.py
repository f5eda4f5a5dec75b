"""MeanFlow (Geng, Deng, Bai, Kolter, He, 2025) and improved MeanFlow (Geng, Lu, Wu, Shechtman,
Kolter, He, 2025): the network learns the average velocity over an interval, so one step of the
interval's length lands where the flow would.

Time convention. The project's path runs from noise at ``tau = 0`` to data at ``tau = 1``:
``x_tau = (1 - (1 - floor) tau) x0 + tau x1``, velocity ``v = x1 - (1 - floor) x0``. The papers'
runs from data at ``t = 0`` to noise at ``t = 1`` and average over ``[r, t]``. One mapping, used
throughout: ``tau = 1 - t`` and ``h = t - r``, so the papers' interval ``[r, t]`` is this
project's ``[tau, tau + h]``, and the network ``u(x_tau, tau, h)`` (``apply_fn(params, x, tau,
h, label)``: the level input carries the interval's length ``h`` in ``[0, 1]``) is the average
velocity over it, pointing from noise to data: ``x_{tau + h} = x_tau + h u``.

The identity. ``h u(x_tau, tau, h) = integral of v over [tau, tau + h]``; differentiating in
``tau`` with the end ``tau + h`` fixed gives ``u = v + h D u``, where ``D`` is the derivative
along the flow with the interval's end fixed: tangent ``(v, 1, -1)`` on ``(x, tau, h)``. ``D u``
is one ``jax.jvp`` of the network (forward mode: no extra backward pass).

``meanflow`` (the published loss): target ``stop_gradient(v_g + h D u)`` with ``v_g`` the
(guided) empirical velocity, which is also the jvp's tangent; rows with ``r = t`` (``h = 0``,
``objective.meanflow_flow_fraction`` of them, 0.75 published) are plain flow matching.

Row layout. ``round(meanflow_flow_fraction * batch)`` rows are flow rows, interleaved with the
interval rows by ``common.RowSplit`` (the rows are independent draws, so their place carries no
meaning; the interleaving keeps each device's share and moves no row across a mesh). Their
derivative term is multiplied by ``h = 0``, so the jvp runs on the interval rows only.

Passes. The gradient reaches the network through ``u`` alone (both losses stop the gradient of
``D u``), so each loss is one pass with gradient over every row, through the network as
configured (the cuDNN attention kernel, the hand-written backward passes, FP8), plus passes
without gradient on the interval rows: the jvp (primal and tangent) of the same parameters
through the network built for forward mode (``ObjectiveConfig.jvp_apply_fn``: XLA's attention,
plain ops, bf16), and for ``meanflow_v`` the tangent's own pass before it. One gradient pass
also means one gradient to all-reduce across a mesh.

``meanflow_v`` (improved MeanFlow): the same network, but the loss is a regression on the
instantaneous velocity, re-parameterised through ``u`` by the same identity read the other way,
``v = u - h D u``: ``V = u - h stop_gradient(D u)`` against ``v_g``, so the target no longer
depends on the network. The jvp's tangent is the network's own
instantaneous velocity ``u(x, tau, 0)`` (a function of ``x_tau`` alone, as improved MeanFlow
does), computed without gradient.

Both: ``(t, r)`` from two logit-normal draws (``meanflow_t_mean`` -0.4, ``meanflow_t_std`` 1.0),
``t`` the larger; the per-row error (mean over the row's values) is weighted by
``1 / stop_gradient(error + 0.01)^p`` (``meanflow_norm_p``, 1 published; 0 turns the weight
off). Class-conditional runs drop labels to the null class (``label_dropout``) and fold
classifier-free guidance into the target, as MeanFlow does: inside the guidance interval
(``meanflow_cfg_interval``, in the papers' ``t``) a row with a label gets ``v_g = omega v +
kappa u(x, tau, 0 | c) + (1 - omega - kappa) u(x, tau, 0 | null)``, both network terms without
gradient (``meanflow_cfg_omega`` 1 and ``meanflow_cfg_kappa`` 0 leave ``v`` alone); sampling then
needs no guidance. The two terms take one network call without gradient: ``u(x, tau, 0 | null)``
on every row and ``u(x, tau, 0 | c)`` on the interval rows only, since a flow row's training pass
has those very inputs and gives its conditional term (``guidance_passes``): guidance costs a
forward pass on ``1 +`` the interval share of the rows (1 with ``kappa`` 0), not 2.
``meanflow_v`` on class-conditional data does as improved MeanFlow: the guidance scale ``omega``
is a network input (``guidance=``), drawn per row from ``meanflow_omega_range`` in training
(uniformly, or log-uniformly with ``meanflow_omega_draw``), with
the target ``omega v + (1 - omega) u(x, tau, 0 | null)``, and chosen at sampling time
(``eval.cfg_scale``, ``sample --cfg_scale``) as the input of a single pass per step. With
``meanflow_interval_input`` the guidance interval is an input as well, as improved MeanFlow
conditions on it: each labelled row draws its own (start uniform in ``[0, 1/2]``, end in
``[1/2, 1]``, papers' ``t``), its target is guided only inside it, and sampling picks one
(``eval.guidance_interval``, ``sample --guidance_interval``); without it guidance applies inside
the fixed ``meanflow_cfg_interval``.

Sampling: ``sampling.IntervalSampler``, ``n`` Euler steps of ``h = 1/n`` reading ``h``; one
step is ``x1 = x0 + u(x0, 0, 1)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import common

# config.objective keys this file reads (defaults in config_lib.default_config)
KEYS = (
    "meanflow_flow_fraction",
    "meanflow_t_mean",
    "meanflow_t_std",
    "meanflow_norm_p",
    "meanflow_norm_eps",
    "meanflow_cfg_omega",
    "meanflow_cfg_kappa",
    "meanflow_cfg_interval",
    "meanflow_omega_range",
    "meanflow_omega_draw",
    "meanflow_interval_input",
)


def sample_intervals(rng, n: int, cfg: common.ObjectiveConfig) -> tuple[jax.Array, jax.Array]:
    """``(tau, h)`` of ``n`` rows: the papers' ``(t, r)`` from two logit-normal draws (``t`` the
    larger), ``r = t`` on a ``meanflow_flow_fraction`` share of the rows, mapped to this project's
    time (``tau = 1 - t``, ``h = t - r``)."""
    rng_a, rng_b = jax.random.split(rng)
    mean, std = cfg.option("meanflow_t_mean"), cfg.option("meanflow_t_std")
    a = jax.nn.sigmoid(mean + std * jax.random.normal(rng_a, (n,)))
    b = jax.nn.sigmoid(mean + std * jax.random.normal(rng_b, (n,)))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    # a fixed count of flow rows (as the shortcut objective fixes its self-consistency rows): the
    # share is exact in every batch and the loss skips their jvp
    r = jnp.where(row_split(n, cfg).mask(), r, t)
    return 1.0 - t, t - r


def num_flow_rows(n: int, cfg: common.ObjectiveConfig) -> int:
    """How many of ``n`` rows have ``r = t`` (``h = 0``)."""
    return int(round(cfg.option("meanflow_flow_fraction") * n))


def row_split(n: int, cfg: common.ObjectiveConfig) -> common.RowSplit:
    """The interval rows (the split's first group) and the flow rows (the rest) of ``n`` rows."""
    return common.RowSplit(n, n - num_flow_rows(n, cfg))


def _column(a: jax.Array, like: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (like.ndim - 1))


def in_guidance_interval(tau: jax.Array, cfg: common.ObjectiveConfig, interval=None) -> jax.Array:
    """Bool per row: the papers' ``t = 1 - tau`` inside ``meanflow_cfg_interval``, or inside each
    row's own ``interval`` (``[B, 2]``: start, end) where it is given."""
    low, high = cfg.option("meanflow_cfg_interval") if interval is None else (interval[:, 0], interval[:, 1])
    t = 1.0 - tau
    return (t >= low) & (t <= high)


def guidance_on(cfg: common.ObjectiveConfig) -> bool:
    """Whether the target folds guidance in: a class-conditional run with ``(omega, kappa)`` other
    than ``(1, 0)``."""
    omega, kappa = cfg.option("meanflow_cfg_omega"), cfg.option("meanflow_cfg_kappa")
    return cfg.num_classes > 0 and not (omega == 1.0 and kappa == 0.0)


def guidance_passes(params, x, tau, labels, rows: common.RowSplit, cfg: common.ObjectiveConfig):
    """The network terms of the guided target, without gradient: ``u(x, tau, 0 | null)`` on every
    row and, where ``kappa != 0``, ``u(x, tau, 0 | c)`` on the first group of ``rows`` only (a row
    of the other group is a flow row, whose training pass is that same term: the loss reuses it).
    Both in one network call, the conditional rows interleaved with the others (``RowSplit``) so
    that no row crosses the mesh. Returns ``(uncond [B, ...], cond [rows.count, ...] or None)``."""
    b = x.shape[0]
    null = jnp.full_like(labels, cfg.null_class)
    count = rows.count if cfg.option("meanflow_cfg_kappa") != 0.0 else 0
    call = common.RowSplit(b + count, b)
    both = cfg.apply_fn(
        params,
        call.join(x, rows.first(x)[:count]),
        call.join(tau, rows.first(tau)[:count]),
        jnp.zeros((b + count,), jnp.float32),
        call.join(null, rows.first(labels)[:count]),
    )
    both = jax.lax.stop_gradient(both.astype(jnp.float32))
    return call.first(both), (call.rest(both) if count else None)


def fold_guidance(v, tau, labels, cond, uncond, cfg: common.ObjectiveConfig) -> jax.Array:
    """``omega v + kappa cond + (1 - omega - kappa) uncond`` on rows with a label inside the
    guidance interval, ``v`` elsewhere (``cond`` may be None where ``kappa`` is 0)."""
    omega, kappa = cfg.option("meanflow_cfg_omega"), cfg.option("meanflow_cfg_kappa")
    guided = omega * v + (1.0 - omega - kappa) * uncond
    if kappa != 0.0:
        guided = guided + kappa * cond
    on = (labels != cfg.null_class) & in_guidance_interval(tau, cfg)
    return jnp.where(_column(on, v), guided, v)


def guided_velocity(params, x, tau, v, labels, cfg: common.ObjectiveConfig) -> jax.Array:
    """The empirical velocity with guidance folded in on every row (no gradient through the
    network terms); ``v`` itself where guidance is off, for unlabelled rows and outside the
    guidance interval."""
    if not guidance_on(cfg):
        return v
    every_row = common.RowSplit(x.shape[0], x.shape[0])
    uncond, cond = guidance_passes(params, x, tau, labels, every_row, cfg)
    return fold_guidance(v, tau, labels, cond, uncond, cfg)


def _weighted_loss(error: jax.Array, cfg: common.ObjectiveConfig) -> jax.Array:
    p = cfg.option("meanflow_norm_p")
    if p == 0:
        return jnp.mean(error)
    weight = 1.0 / jnp.power(jax.lax.stop_gradient(error) + cfg.option("meanflow_norm_eps"), p)
    return jnp.mean(weight * error)


def _prepare(batch, rng, cfg: common.ObjectiveConfig):
    x1 = batch["x"]
    b = x1.shape[0]
    rng_noise, rng_t, rng_drop = jax.random.split(rng, 3)
    x0 = jax.random.normal(rng_noise, x1.shape, jnp.float32)
    tau, h = sample_intervals(rng_t, b, cfg)
    x = common.interpolate(x0, x1.astype(jnp.float32), tau, cfg.noise_floor)
    v = common.flow_velocity(x0, x1.astype(jnp.float32), cfg.noise_floor)
    labels = common.drop_labels(rng_drop, batch["label"], cfg)
    return x, tau, h, v, labels


def _interval_derivative(params, x, tau, h, labels, tangent, cfg: common.ObjectiveConfig, **guidance):
    """``(u, D u)``: the network and its derivative along ``(tangent, 1, -1)`` on ``(x, tau, h)``
    (a guidance input, if given, held fixed), one ``jax.jvp`` of the network built for forward
    mode (``ObjectiveConfig.forward_mode_apply``)."""
    apply_fn = cfg.forward_mode_apply()

    def u_fn(x_, tau_, h_):
        return apply_fn(params, x_, tau_, h_, labels, **guidance).astype(jnp.float32)

    ones = jnp.ones_like(tau)
    return jax.jvp(u_fn, (x, tau, h), (tangent, ones, -ones))


def meanflow_target(v, h, du):
    """MeanFlow's regression target ``v + h D u`` (the identity ``u = v + h D u``)."""
    return v + _column(h, du) * du


def compound_velocity(u, h, du):
    """Improved MeanFlow's instantaneous velocity through the average one, ``u - h D u``."""
    return u - _column(h, du) * du


def _metrics(loss, error, rows: common.RowSplit):
    is_flow = 1.0 - rows.mask().astype(jnp.float32)  # the interval rows are the first group
    flow_rows = jnp.sum(is_flow)
    interval_rows = jnp.sum(1.0 - is_flow)
    return {
        "loss": loss,
        "error": jnp.mean(error),
        "flow_error": jnp.sum(error * is_flow) / jnp.maximum(flow_rows, 1.0),
        "flow_error/rows": flow_rows,
        "interval_error": jnp.sum(error * (1.0 - is_flow)) / jnp.maximum(interval_rows, 1.0),
        "interval_error/rows": interval_rows,
    }


def _derivative_without_gradient(params, x, tau, h, labels, tangent, rows, cfg, **guidance) -> jax.Array:
    """``D u`` along ``tangent`` (given for the interval rows, ``rows``' first group) on the
    interval rows, zeros on the flow rows, where it is multiplied by ``h = 0``: one ``jax.jvp`` of
    the forward-mode network on the interval rows, through which no gradient flows (both losses
    stop it)."""
    params, tangent = jax.lax.stop_gradient(params), jax.lax.stop_gradient(tangent)
    first = {key: rows.first(a) for key, a in guidance.items()}
    _, du = _interval_derivative(params, *(rows.first(a) for a in (x, tau, h, labels)), tangent, cfg, **first)
    return rows.join(du, jnp.zeros((rows.size - rows.count,) + du.shape[1:], du.dtype))


def loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    """MeanFlow's loss: ``u`` against ``stop_gradient(v_g + h D u)``. The gradient's one pass
    ``u`` runs on every row through the network as configured; ``D u`` is a jvp without gradient
    on the interval rows only (the flow rows' ``h = 0`` leaves ``v_g``)."""
    del teacher_params  # the target comes from the network itself
    x, tau, h, v, labels = _prepare(batch, rng, cfg)
    rows = row_split(x.shape[0], cfg)
    u = cfg.apply_fn(params, x, tau, h, labels).astype(jnp.float32)
    if guidance_on(cfg):  # a flow row's conditional term is its own training pass (no extra pass for it)
        uncond, cond = guidance_passes(params, x, tau, labels, rows, cfg)
        if cond is not None:
            cond = rows.join(cond, rows.rest(jax.lax.stop_gradient(u)))
        v = fold_guidance(v, tau, labels, cond, uncond, cfg)
    target = v
    if rows.count > 0:
        du = _derivative_without_gradient(params, x, tau, h, labels, rows.first(v), rows, cfg)
        target = meanflow_target(v, h, du)
    error = common.per_row_mse(u, jax.lax.stop_gradient(target))
    loss = _weighted_loss(error, cfg)
    return loss, _metrics(loss, error, rows)


OMEGA_DRAWS = ("uniform", "log_uniform")


def interval_input(cfg: common.ObjectiveConfig) -> bool:
    """Whether the network also reads the guidance interval (``meanflow_interval_input`` on a
    class-conditional run): its ``guidance`` input is then ``[B, 3]``, (scale, start, end)."""
    return cfg.num_classes > 0 and bool(cfg.option("meanflow_interval_input"))


def no_guidance(n: int, cfg: common.ObjectiveConfig) -> jax.Array:
    """The guidance input that asks for none: scale 1 (over the whole interval ``[0, 1]``)."""
    if interval_input(cfg):
        return jnp.tile(jnp.array([[1.0, 0.0, 1.0]], jnp.float32), (n, 1))
    return jnp.ones((n,), jnp.float32)


def sample_guidance(rng, labels, cfg: common.ObjectiveConfig) -> jax.Array:
    """Per-row guidance inputs of a network that takes them: scales drawn in
    ``meanflow_omega_range``, uniformly or (``meanflow_omega_draw='log_uniform'``) uniformly in
    their logarithm, which gives each factor of the range the same share. With
    ``meanflow_interval_input`` each row also draws the papers' ``t`` range where its scale
    applies, start uniform in ``[0, 1/2]`` and end uniform in ``[1/2, 1]`` (``[B, 3]``: scale,
    start, end). Rows without a label get no guidance (``no_guidance``)."""
    rng_omega, rng_start, rng_end = jax.random.split(rng, 3)
    low, high = cfg.option("meanflow_omega_range")
    if cfg.option("meanflow_omega_draw") == "log_uniform":
        omega = jnp.exp(jax.random.uniform(rng_omega, labels.shape, minval=math.log(low), maxval=math.log(high)))
    else:
        omega = jax.random.uniform(rng_omega, labels.shape, minval=low, maxval=high)
    if interval_input(cfg):
        start = jax.random.uniform(rng_start, labels.shape, minval=0.0, maxval=0.5)
        end = jax.random.uniform(rng_end, labels.shape, minval=0.5, maxval=1.0)
        omega = jnp.stack([omega, start, end], axis=-1)
    return jnp.where(_column(labels == cfg.null_class, omega), no_guidance(labels.shape[0], cfg), omega)


def input_guided_velocity(params, x, tau, v, labels, guidance, cfg: common.ObjectiveConfig) -> jax.Array:
    """``omega v + (1 - omega) u(x, tau, 0 | null)`` inside the guidance interval (the network's
    unconditional term without gradient), ``v`` outside it: the target of a network that reads
    the guidance scale ``omega`` (and, with ``meanflow_interval_input``, the interval: then each
    row's own, else ``meanflow_cfg_interval``) as an input."""
    b = x.shape[0]
    null = jnp.full_like(labels, cfg.null_class)
    uncond = cfg.apply_fn(params, x, tau, jnp.zeros((b,), jnp.float32), null, guidance=no_guidance(b, cfg))
    uncond = jax.lax.stop_gradient(uncond.astype(jnp.float32))
    if guidance.ndim == 2:
        omega, inside = guidance[:, 0], in_guidance_interval(tau, cfg, guidance[:, 1:])
    else:
        omega, inside = guidance, in_guidance_interval(tau, cfg)
    w = _column(jnp.where(inside, omega, 1.0), v)
    return w * v + (1.0 - w) * uncond


def v_loss_fn(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    """Improved MeanFlow's loss: ``V = u - h stop_gradient(D u)`` against ``v_g``, the jvp's
    tangent being the network's own instantaneous velocity. A class-conditional network takes
    the guidance scale (and with ``meanflow_interval_input`` the guidance interval) as an input
    (``Method.guidance_input``): each row draws its own (``sample_guidance``), and its target is
    guided by them (``input_guided_velocity``). The gradient's one pass ``u`` runs on every row
    through the network as configured; the tangent ``u(x, tau, 0)`` and ``D u`` are passes
    without gradient on the interval rows only (on the flow rows ``V = u(x, tau, 0)``)."""
    del teacher_params
    x, tau, h, v, labels = _prepare(batch, rng, cfg)
    if cfg.num_classes > 0:
        drawn = sample_guidance(jax.random.fold_in(rng, 1), labels, cfg)
        guidance = {"guidance": drawn}
        v = input_guided_velocity(params, x, tau, v, labels, drawn, cfg)
    else:  # unconditional: no guidance to fold in
        guidance = {}
    rows = row_split(x.shape[0], cfg)
    u = cfg.apply_fn(params, x, tau, h, labels, **guidance).astype(jnp.float32)
    if rows.count > 0:
        first = {key: rows.first(a) for key, a in guidance.items()}
        xi, ti, li = rows.first(x), rows.first(tau), rows.first(labels)
        instantaneous = cfg.apply_fn(jax.lax.stop_gradient(params), xi, ti, jnp.zeros_like(ti), li, **first)
        instantaneous = instantaneous.astype(jnp.float32)
        du = _derivative_without_gradient(params, x, tau, h, labels, instantaneous, rows, cfg, **guidance)
        u = compound_velocity(u, h, du)
    error = common.per_row_mse(u, v)
    loss = _weighted_loss(error, cfg)
    return loss, _metrics(loss, error, rows)


def check_config(objective_cfg, *, batch_size: int, total_steps: int) -> None:
    """The MeanFlow keys (``ValueError`` naming the key)."""
    fraction = objective_cfg.meanflow_flow_fraction
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"objective.meanflow_flow_fraction={fraction} must be in [0, 1): the share of rows with r = t")
    if objective_cfg.meanflow_t_std <= 0:
        raise ValueError(f"objective.meanflow_t_std={objective_cfg.meanflow_t_std} must be > 0")
    if objective_cfg.meanflow_norm_p < 0 or objective_cfg.meanflow_norm_eps <= 0:
        raise ValueError(
            f"objective.meanflow_norm_p={objective_cfg.meanflow_norm_p} must be >= 0 and"
            f" objective.meanflow_norm_eps={objective_cfg.meanflow_norm_eps} > 0"
        )
    low, high = tuple(objective_cfg.meanflow_omega_range)
    if not 1.0 <= low <= high:
        raise ValueError(
            f"objective.meanflow_omega_range={(low, high)} must be (low, high) with 1 <= low <= high: the"
            " guidance scales improved MeanFlow's class-conditional network is trained for"
        )
    if objective_cfg.meanflow_omega_draw not in OMEGA_DRAWS:
        raise ValueError(
            f"objective.meanflow_omega_draw={objective_cfg.meanflow_omega_draw!r} is not one of {list(OMEGA_DRAWS)}"
        )
    interval = tuple(objective_cfg.meanflow_cfg_interval)
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"objective.meanflow_cfg_interval={interval} must be (low, high) with 0 <= low <= high <= 1")
    if objective_cfg.meanflow_interval_input and objective_cfg.name != "meanflow_v":
        raise ValueError(
            f"objective.meanflow_interval_input=True with objective.name={objective_cfg.name!r}: only"
            " meanflow_v takes guidance as a network input; leave it False or use meanflow_v"
        )
