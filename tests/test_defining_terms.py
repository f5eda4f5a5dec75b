"""Each objective's defining term, checked against the loss computed by hand.

The network is a fixed curved field (nonlinear in x and t, and reading its level input), so a
target built another way (one full step instead of two half steps, the student instead of the
EMA network, the data instead of the noise) gives another loss. Each test records the inputs
of every network call, rebuilds the target from the recorded student inputs in float64 and
compares the losses."""

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.objectives import consistency, diffusion, flow_matching, progressive, shortcut
from shortcut_jax.objectives.common import ObjectiveConfig

FLOOR = 1e-5
K = 7
B = 16


def field_np(x, t, level, a):
    t = np.reshape(t, (-1, 1)).astype(np.float64)
    level = np.reshape(level, (-1, 1)).astype(np.float64)
    return a * np.sin(2.0 * x + 3.0 * t) + 0.1 * level * np.cos(x)


def recording_field(calls):
    """apply_fn of ``field_np`` (in float32) whose params are ``{'who': name, 'a': scale}``;
    records (who, x, t, level, label) of every call."""

    def apply_fn(params, x, t, level, label):
        calls.append((params["who"], *(np.asarray(v) for v in (x, t, level, label))))
        tt, lv = t[:, None], level[:, None].astype(jnp.float32)
        return params["a"] * jnp.sin(2.0 * x + 3.0 * tt) + 0.1 * lv * jnp.cos(x)

    return apply_fn


def net(who, a):
    return {"who": who, "a": a}


def data(seed=0):
    return np.random.default_rng(seed).normal(size=(B, 2)).astype(np.float32) * 0.7


def batch_of(x1, step=None):
    batch = {"x": jnp.asarray(x1), "label": jnp.zeros(B, jnp.int32)}
    if step is not None:
        batch["step"] = jnp.int32(step)
    return batch


def noise_of(x_t, t, x1):
    """The noise of the path through ``x_t`` at ``t`` that ends at ``x1`` (float64)."""
    t = t.astype(np.float64)[:, None]
    return (x_t.astype(np.float64) - t * x1) / (1.0 - (1.0 - FLOOR) * t)


def interpolate(x0, x1, t):
    t = np.reshape(t, (-1, 1)).astype(np.float64)
    return (1.0 - (1.0 - FLOOR) * t) * x0 + t * x1


def two_half_steps(x_t, t, level, a, clip):
    """The self-consistency target: the average of two half steps at level ``level + 1``."""
    half_level = level + 1
    half_d = 0.5 ** half_level.astype(np.float64)
    s1 = field_np(x_t, t, half_level, a)
    x_mid = np.clip(x_t + half_d[:, None] * s1, -clip, clip)
    s2 = field_np(x_mid, t + half_d, half_level, a)
    return np.clip((s1 + s2) / 2, -clip, clip)


def mse(pred, target):
    return np.mean((pred - target) ** 2, axis=-1)


def test_shortcut_self_consistency_target_is_the_average_of_two_teacher_half_steps():
    """Rules out the shortcut objective's self-consistency rows training on anything but the
    average of the teacher's two half steps at the next level (e.g. one full step ``s1``, the
    student instead of the EMA teacher, or the flow-matching target)."""
    x1 = data(1)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR, sc_fraction=0.5)
    _, metrics = shortcut.loss_fn(net("student", 0.7), net("ema", 1.3), batch_of(x1), jax.random.key(0), cfg)
    who, x_t, t, level, _ = calls[-1]
    assert who == "student" and {c[0] for c in calls[:-1]} == {"ema"}
    is_sc = level < K  # the self-consistency rows, wherever the batch holds them
    assert is_sc.sum() == shortcut.num_sc_rows(B, cfg.sc_fraction)
    sc, flow = (lambda a: np.asarray(a)[is_sc]), (lambda a: np.asarray(a)[~is_sc])
    assert sorted(set(sc(level))) == list(range(K))
    x_t = x_t.astype(np.float64)
    pred = field_np(x_t, t, level, 0.7)
    target = two_half_steps(sc(x_t), sc(t), sc(level), 1.3, cfg.clip)
    np.testing.assert_allclose(float(metrics["sc_loss"]), np.mean(mse(sc(pred), target)), rtol=1e-5)
    # the flow rows keep the flow-matching target of their own pair
    x0 = noise_of(flow(x_t), flow(t), flow(x1))
    np.testing.assert_allclose(
        float(metrics["flow_loss"]), np.mean(mse(flow(pred), flow(x1) - (1 - FLOOR) * x0)), rtol=1e-5
    )
    # not vacuous: one full step of the teacher, or the pair's velocity, is another target
    full = field_np(sc(x_t), sc(t), sc(level) + 1, 1.3)
    direct = sc(x1) - (1 - FLOOR) * noise_of(sc(x_t), sc(t), sc(x1))
    for other in (full, direct):
        assert abs(np.mean(mse(sc(pred), other)) - float(metrics["sc_loss"])) > 1e-3


def consistency_target(x_t, t, x_next, t_next, a_ema):
    """(f_ema(x_next, t_next) - x_t) / (1 - t), the jump of the EMA network from ``x_next``."""
    jump = x_next + (1.0 - t_next)[:, None] * field_np(x_next, t_next, np.full(len(t), K), a_ema)
    return (jump - x_t) / (1.0 - t)[:, None]


def test_consistency_training_target_is_the_ema_networks_jump():
    """Rules out consistency training building its target without the EMA network (the student's
    own jump, or the pair's velocity instead of the EMA's jump from the next point)."""
    x1 = data(2)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR, stage_steps=10)
    loss, metrics = consistency.training_loss_fn(
        net("student", 0.7), net("ema", 1.3), batch_of(x1, step=25), jax.random.key(1), cfg
    )
    assert float(metrics["stage"]) == 2
    d = 0.25
    who, x_t, t, level, _ = calls[-1]
    assert who == "student" and np.all(level == K)
    x_t = x_t.astype(np.float64)
    x_next = interpolate(noise_of(x_t, t, x1), x1, t + d)
    target = consistency_target(x_t, t, x_next, t + d, 1.3)
    pred = field_np(x_t, t, level, 0.7)
    np.testing.assert_allclose(float(loss), np.mean(mse(pred, target)), rtol=1e-5)
    student_jump = consistency_target(x_t, t, x_next, t + d, 0.7)
    velocity = x1 - (1 - FLOOR) * noise_of(x_t, t, x1)
    for other in (student_jump, velocity):
        assert abs(np.mean(mse(pred, other)) - float(loss)) > 1e-3


def test_consistency_distillation_target_is_the_ema_networks_jump_from_the_teachers_step():
    """Rules out consistency distillation building its target with the frozen teacher or the
    student instead of the EMA network (or without the teacher's Euler step)."""
    x1 = data(3)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR)
    loss, _ = consistency.distillation_loss_fn(
        net("student", 0.7),
        {"ema": net("ema", 1.3), "teacher": net("teacher", -0.9)},
        batch_of(x1),
        jax.random.key(2),
        cfg,
    )
    assert [c[0] for c in calls] == ["teacher", "ema", "student"]
    _, x_t, t, level, _ = calls[-1]
    x_t = x_t.astype(np.float64)
    d = 2.0**-K
    x_next = np.clip(x_t + d * field_np(x_t, t, level, -0.9), -cfg.clip, cfg.clip)
    pred = field_np(x_t, t, level, 0.7)
    want = np.mean(mse(pred, consistency_target(x_t, t, x_next, t + d, 1.3)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    for a in (0.7, -0.9):  # the student's or the teacher's jump
        assert abs(np.mean(mse(pred, consistency_target(x_t, t, x_next, t + d, a))) - want) > 1e-3 * want


def test_progressive_target_is_two_half_steps_of_the_frozen_teacher():
    """Rules out progressive distillation training on one full teacher step (at the student's
    level or the teacher's) instead of the average of two half steps at the teacher's level."""
    x1 = data(4)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR, stage_steps=4)
    loss, metrics = progressive.loss_fn(
        net("student", 0.7),
        {"ema": net("ema", 0.2), "teacher": net("teacher", 1.3)},
        batch_of(x1, step=9),
        jax.random.key(3),
        cfg,
    )
    assert float(metrics["phase"]) == 2
    k = K - 1 - 2
    assert [c[0] for c in calls] == ["teacher", "teacher", "student"]
    _, x_t, t, level, _ = calls[-1]
    assert np.all(level == k)
    x_t = x_t.astype(np.float64)
    pred = field_np(x_t, t, level, 0.7)
    want = np.mean(mse(pred, two_half_steps(x_t, t, level, 1.3, cfg.clip)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for lv in (level, level + 1):
        assert abs(np.mean(mse(pred, field_np(x_t, t, lv, 1.3))) - want) > 1e-3


def test_diffusion_target_is_the_noise_of_the_noisy_input():
    """Rules out the diffusion (DDIM) objective regressing onto anything but the noise ``eps``
    mixed into its input (e.g. the data, or the flow velocity)."""
    x1 = data(5).astype(np.float64)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR)
    loss, _ = diffusion.loss_fn(net("student", 0.7), None, batch_of(x1), jax.random.key(4), cfg)
    ((_, x_s, t, level, _),) = calls
    a = np.asarray(
        diffusion.alpha_bar(1.0 - jnp.asarray(t), cfg.diffusion_schedule, cfg.diffusion_min_alpha_bar), np.float64
    )[:, None]
    eps = (x_s - np.sqrt(a) * x1) / np.sqrt(1.0 - a)  # the noise that made x_s
    assert abs(eps.std() - 1) < 0.4  # it is noise, not a multiple of the data
    pred = field_np(x_s.astype(np.float64), t, level, 0.7)
    want = np.mean(mse(pred, eps))
    np.testing.assert_allclose(float(loss), want, rtol=1e-3)
    for other in (x1, eps - x1):  # data prediction, a velocity
        assert abs(np.mean(mse(pred, other)) - want) > 1e-2


def test_flow_matching_target_is_the_velocity_of_the_pair():
    """Rules out flow matching regressing onto anything but ``x1 - (1 - floor) x0`` of its pair."""
    x1 = data(6)
    calls = []
    cfg = ObjectiveConfig(apply_fn=recording_field(calls), num_classes=0, noise_floor=FLOOR)
    loss, _ = flow_matching.loss_fn(net("student", 0.7), None, batch_of(x1), jax.random.key(5), cfg)
    ((_, x_t, t, level, _),) = calls
    x0 = noise_of(x_t, t, x1)
    pred = field_np(x_t.astype(np.float64), t, level, 0.7)
    np.testing.assert_allclose(float(loss), np.mean(mse(pred, x1 - (1 - FLOOR) * x0)), rtol=1e-5)
    assert abs(np.mean(mse(pred, x1 - x0 * 0.5)) - float(loss)) > 1e-3
