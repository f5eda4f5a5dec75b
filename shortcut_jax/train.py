"""Training: ``train_and_evaluate(config, workdir)`` and the jitted, sharded train step.

The path of a batch::

    source.next_batch()  (numpy rows of this process)
      -> sharding.global_batch  (a jax.Array over the mesh's batch axes)
      -> train_step(state, batch)  (one jit, state donated):
           value_and_grad(objective)(params, ema_params[0], batch, fold_in(rng, step))
           [lax.scan over micro-batches when optim.accum_steps > 1]
           -> optax update -> EMA update
      -> metrics kept on device until the next log step

Everything that can be wrong with a config is checked before anything is compiled or written
(``config_lib.validate``, the data checks, the workdir's checkpoint). A run resumes by itself
from the latest checkpoint in ``workdir``, including the data stream's position; checkpoints
are only written after the metrics since the last one were checked to be finite.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from shortcut_jax import checkpoint, config_lib, data, metric_writers, sharding, train_state
from shortcut_jax.benchmarks import trace_summary
from shortcut_jax.evaluate import evaluate_budgets, offline_out_dir
from shortcut_jax.models import build_model
from shortcut_jax.objectives import MICRO_BATCH_PLANNERS, OBJECTIVES, make_objective_config
from shortcut_jax.sampling import Sampler

log = logging.getLogger(__name__)

# Keys whose change makes a saved checkpoint unusable for the current config: what fixes the
# parameter shapes and the meaning of the level input. Execution choices (dtype, remat, attention
# kernel, residual dtype) may change between launches.
COMPATIBILITY_KEYS = ("architecture", "data_shape", "num_classes", "objective.num_levels", "ema_decays")


def architecture(model_cfg) -> dict:
    if model_cfg.name == "dit":
        width, depth, heads = config_lib.model_dims(model_cfg)
        return {"name": "dit", "patch_size": model_cfg.patch_size, "width": width, "depth": depth,
                "num_heads": heads, "mlp_ratio": model_cfg.mlp_ratio}
    return {"name": model_cfg.name, "width": model_cfg.width or 256, "depth": model_cfg.depth or 4,
            "mlp_ratio": model_cfg.mlp_ratio}  # the MLP's defaults, as build_model applies them


# ----------------------------------------------------------------------------- optimiser


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    lr = optim_cfg.lr
    warmup = int(optim_cfg.warmup_steps)
    if optim_cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if optim_cfg.schedule == "warmup":
        return optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup else optax.constant_schedule(lr)
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    raise config_lib.ConfigError(f"optim.schedule={optim_cfg.schedule!r} is unknown")


def weight_decay_mask(kind: str) -> Optional[Callable]:
    if kind == "all":  # the reference recipe decays every parameter
        return None
    return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask(optim_cfg.weight_decay_mask))
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw), schedule
    return adamw, schedule


# ----------------------------------------------------------------------------- train step

def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(objective_name: str, obj_cfg, tx: optax.GradientTransformation, schedule,
                    *, accum_steps: int = 1, ema_debias: bool = False) -> Callable:
    loss_fn = OBJECTIVES[objective_name]
    planner = MICRO_BATCH_PLANNERS.get(objective_name)

    def train_step(state: train_state.TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        teacher = state.teacher_params
        grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, teacher, b, r, obj_cfg), has_aux=True)

        if accum_steps == 1:
            (_, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            rng, plan_rng = jax.random.split(rng)
            batch_size = jax.tree.leaves(batch)[0].shape[0]
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, batch_size // accum_steps, *x.shape[1:]), batch)
            if planner is not None:
                micro.update(planner(plan_rng, batch_size, accum_steps, obj_cfg))
            rngs = jax.random.split(rng, accum_steps)

            def body(carry, xs):
                grads_sum, metrics_sum = carry
                mb, r = xs
                (_, m), g = grad_fn(state.params, mb, r)
                return (jax.tree.map(jnp.add, grads_sum, g), jax.tree.map(jnp.add, metrics_sum, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rngs[0])[0][1])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, rngs))
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(lambda m: m / accum_steps, metrics)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = train_state.update_ema(state.ema_params, params, state.ema_decays,
                                     count=state.step + 1 if ema_debias else None)
        metrics = dict(metrics)
        metrics.update(grad_norm=global_norm(grads), param_norm=global_norm(params),
                       update_norm=global_norm(updates), lr=jnp.asarray(schedule(state.step), jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------- setup


class Experiment:
    """Everything built from a validated config, before anything touches the workdir."""

    def __init__(self, config, workdir: Optional[str], *, spec: Optional[data.DataSpec] = None):
        """``spec`` given: no data source is opened (benchmarks, checkpoint import); ``workdir``
        None: nothing on disk is consulted."""
        config_lib.validate(config, num_devices=self.num_mesh_devices(config))
        self.config = config
        self.workdir = workdir
        process_count = jax.process_count()
        self.batch_per_process = config.train.batch_size // process_count
        if spec is None:
            data.validate_data_config(config.data)
            self.source = data.make_dataset(config.data, batch_size=self.batch_per_process, seed=config.seed,
                                            process_index=jax.process_index(), process_count=process_count)
            spec = self.source.spec
        else:
            self.source = None
        self.spec = spec
        try:
            self._build(config)
        except BaseException:
            self.close()  # stop the reader's threads before the error propagates
            raise

    def _build(self, config):
        config_lib.check_model_fits_data(config, tuple(self.spec.shape))
        if config.eval.metric == "cfd":  # checks the classifier's files now; loads it at the first evaluation
            from shortcut_jax.evaluation import feature_distance

            feature_distance.register(config.eval.classifier, reference_stats=config.eval.reference_stats or None)
        self.meta = {
            "architecture": architecture(config.model),
            "model": config.model.to_dict(),
            "data_shape": list(self.spec.shape),
            "num_classes": self.spec.num_classes,
            "objective": config.objective.to_dict(),
            "ema_decays": list(config.train.ema_decays),
        }
        self.ckpt_dir = os.path.join(self.workdir or "", "checkpoints")
        self._check_workdir()

        self.mesh = sharding.make_mesh(config.mesh)
        self.host_cpu = self._host_cpu() if config.train.init_on == "host" else None
        self.model = build_model(config.model, num_classes=self.spec.num_classes,
                                 ignore_level=config.objective.name == "flow_matching")
        self.apply_fn = lambda params, x, t, level, label: self.model.apply({"params": params}, x, t, level, label)
        self.obj_cfg = make_objective_config(config.objective, self.apply_fn, self.spec.num_classes)
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        self.sampler = Sampler(self.apply_fn, num_levels=config.objective.num_levels,
                               num_classes=self.spec.num_classes)

        init_rng = jax.random.PRNGKey(config.seed)
        self.abstract_state = jax.eval_shape(self._init, init_rng)
        self.state_shardings = sharding.state_shardings(self.abstract_state, self.mesh)
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.abstract_state,
            self.state_shardings)

    @staticmethod
    def num_mesh_devices(config) -> int:
        data_axis, fsdp = sharding.mesh_shape(config.mesh, jax.device_count())
        return data_axis * fsdp

    def _check_workdir(self):
        if not self.workdir or not os.path.isdir(self.ckpt_dir):
            return
        with checkpoint.Checkpointer(self.ckpt_dir, async_save=False) as ckpt:
            saved = ckpt.read_meta()
        if saved is not None:
            try:
                checkpoint.check_compatible(saved, self.meta, COMPATIBILITY_KEYS)
            except ValueError as e:
                raise config_lib.ConfigError(f"--workdir={self.workdir}: {e}") from None

    def _init(self, rng, model=None):
        init_rng, state_rng = jax.random.split(rng)
        shape = tuple(self.spec.shape)
        x = jnp.zeros((1, *shape), jnp.float32)
        params = (model or self.model).init(init_rng, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1,), jnp.int32))["params"]
        return train_state.create(params, self.tx, state_rng, self.config.train.ema_decays)

    def init_state(self):
        if self.host_cpu is not None:  # train.init_on='host'
            return self._init_on_host()
        return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.PRNGKey(self.config.seed))

    @staticmethod
    def _host_cpu():
        try:
            return jax.local_devices(backend="cpu")[0]
        except RuntimeError as err:
            raise config_lib.ConfigError(
                "train.init_on='host' needs JAX's CPU backend: add 'cpu' to JAX_PLATFORMS (e.g."
                " JAX_PLATFORMS=cuda,cpu) or set train.init_on='device'") from err

    def _init_on_host(self):
        """The initial state computed on this host's CPU, then placed shard by shard on the mesh
        (every process computes the same full state, so this works on many hosts as on one)."""
        model = self.model
        if getattr(model, "attention_impl", None) not in (None, "xla"):
            # a GPU kernel cannot be lowered for the CPU; the attention has no parameters, so the
            # XLA implementation initialises the same ones
            model = model.clone(attention_impl="xla")
        with jax.default_device(self.host_cpu):
            host = jax.device_get(jax.jit(functools.partial(self._init, model=model))(
                jax.random.PRNGKey(self.config.seed)))
        return jax.tree.map(
            lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x[idx])),
            host, self.state_shardings)

    def compile_step(self, donate: bool = True):
        """AOT-compiled train step, with compile time and the compiler's memory/cost figures.

        The state is donated (updated in place); ``donate=False`` keeps the input state alive
        beside the new one, for measuring what donation saves."""
        step = make_train_step(self.config.objective.name, self.obj_cfg, self.tx, self.schedule,
                               accum_steps=self.config.optim.accum_steps,
                               ema_debias=self.config.train.ema_debias)
        batch_sh = sharding.batch_sharding(self.mesh)
        b = self.config.train.batch_size
        abstract_batch = {
            "x": jax.ShapeDtypeStruct((b, *self.spec.shape), jnp.float32, sharding=batch_sh),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
        }
        jitted = jax.jit(step, donate_argnums=(0,) if donate else (),
                         out_shardings=(self.state_shardings, sharding.replicated(self.mesh)))
        start = time.perf_counter()
        compiled = jitted.lower(self.abstract_state, abstract_batch).compile()
        info = {"compile_seconds": time.perf_counter() - start}
        info.update(compiled_stats(compiled))
        return compiled, info

    def close(self):
        if self.source is not None:
            self.source.close()

    def eval_params(self, state):
        if self.config.eval.use_ema and state.ema_params:
            return state.ema_params[self.config.eval.ema_index]
        return state.params


def compiled_stats(compiled) -> dict:
    """Memory and FLOP figures from the compiler (absent where the backend does not report them)."""
    out = {}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                         "generated_code_size_in_bytes"):
                if hasattr(mem, name):
                    out[name] = int(getattr(mem, name))
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        if cost and "flops" in cost:
            out["compiler_flops"] = float(cost["flops"])
    except Exception:  # noqa: BLE001
        pass
    return out


# ----------------------------------------------------------------------------- loop


class NonFiniteLoss(FloatingPointError):
    pass


def _check_finite(pending: list) -> list[dict]:
    """Fetch pending (step, device metrics); raise on the first non-finite loss."""
    fetched = jax.device_get(pending)
    for step, m in fetched:
        # param_norm covers the state after the update: a finite loss can still blow up the weights
        bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(m[k])]
        if bad:
            raise NonFiniteLoss(
                f"non-finite {', '.join(bad)} (loss {m['loss']}) at step {step}; training stopped. The last"
                " checkpoint written before it is kept: lower optim.lr, set optim.grad_clip, or check the data."
            )
    return fetched


def _mean_metrics(fetched: list) -> dict:
    keys = fetched[0][1].keys()
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Train (or resume) to ``config.train.steps``; returns the final train state."""
    exp = Experiment(config, workdir)  # every check happens here, before the workdir is touched
    cfg = exp.config
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(exp.ckpt_dir, keep=cfg.train.keep_ckpts, async_save=cfg.train.async_ckpt)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state, _ = ckpt.restore(latest, exp.abstract_state)
            if data_state:  # empty for imported checkpoints: the stream starts fresh
                exp.source.set_state(data_state)
            log.info("resumed from step %d", latest)
        else:
            state = exp.init_state()
        compiled, compile_info = exp.compile_step()
        log.info("train step compiled: %s", json.dumps(compile_info))
        metric_writers.write_manifest(workdir, cfg, extra={"compile": compile_info, "meta": exp.meta,
                                                           "mesh": dict(exp.mesh.shape)})
        writer = metric_writers.MetricWriter(workdir, use_tensorboard=cfg.train.use_tensorboard,
                                             use_wandb=cfg.train.use_wandb, wandb_project=cfg.train.wandb_project,
                                             config=cfg)
        return _loop(exp, state, compiled, ckpt, writer, primary)
    finally:
        ckpt.wait()
        ckpt.close()
        exp.close()


def _loop(exp: Experiment, state, compiled, ckpt, writer, primary: bool):
    cfg = exp.config
    total = cfg.train.steps
    step = int(jax.device_get(state.step))
    bar = metric_writers.ProgressBar(total, step, cfg.train.batch_size, is_primary=primary and cfg.train.progress_bar)
    profile = tuple(int(s) for s in cfg.train.profile_steps.split(",")) if cfg.train.profile_steps else None
    pending: list = []
    wait_time = 0.0
    wait_count = 0
    last_log = time.perf_counter()
    try:
        while step < total:
            if profile and step == profile[0]:
                if primary:  # lets trace_summary attribute kernels to model scopes
                    trace_summary.write_hlo(compiled, os.path.join(exp.workdir, "profile"))
                jax.profiler.start_trace(os.path.join(exp.workdir, "profile"), create_perfetto_trace=True)
            t0 = time.perf_counter()
            batch = sharding.global_batch(exp.source.next_batch(), exp.mesh)
            wait_time += time.perf_counter() - t0
            wait_count += 1
            state, metrics = compiled(state, batch)
            step += 1
            pending.append((step, metrics))
            if profile and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()

            final = step == total
            if step % cfg.train.log_every == 0 or final:
                fetched = _check_finite(pending)
                pending = []
                now = time.perf_counter()
                scalars = _mean_metrics(fetched)
                scalars["input_wait_ms"] = 1000 * wait_time / max(wait_count, 1)
                scalars["steps_per_second"] = len(fetched) / max(now - last_log, 1e-9)
                scalars["images_per_second"] = scalars["steps_per_second"] * cfg.train.batch_size
                last_log, wait_time, wait_count = now, 0.0, 0
                writer.write_scalars(step, scalars)
                bar.update(step, {"loss": scalars["loss"]})
            else:
                bar.update(step)
            if step % cfg.train.ckpt_every == 0 or final:
                _check_finite(pending)  # never checkpoint a state past a non-finite loss
                ckpt.save(step, state, data_state=exp.source.get_state(), meta=exp.meta, force=final)
            if step % cfg.train.eval_every == 0 or final:
                run_eval(exp, state, step, writer, final=final)
        writer.flush()
        return state
    finally:
        bar.close()
        writer.close()


def run_eval(exp: Experiment, state, step: int, writer=None, out_dir: Optional[str] = None,
             final: bool = False) -> dict:
    """Every budget of ``config.eval``; a ``final`` evaluation draws ``eval.final_num_samples``
    where that is set."""
    ev = exp.config.eval
    return evaluate_budgets(
        exp.sampler, exp.eval_params(state), exp.source, kind=exp.spec.kind, shape=tuple(exp.spec.shape),
        num_classes=exp.spec.num_classes, budgets=ev.budgets,
        num_samples=(final and ev.final_num_samples) or ev.num_samples,
        batch_size=ev.batch_size, seed=ev.seed, out_dir=out_dir or os.path.join(exp.workdir, "eval", f"{step:08d}"),
        step=step, cfg_scale=ev.cfg_scale, grid_budgets=ev.grid_budgets, grid_size=ev.grid_size,
        metric=ev.metric, writer=writer, label=exp.config.objective.name,
    )


def evaluate_checkpoint(config, workdir: str, *, step: Optional[int] = None, out_dir: Optional[str] = None) -> dict:
    """Evaluate a saved run at every budget of ``config.eval``."""
    exp = Experiment(config, workdir)
    if not os.path.isdir(exp.ckpt_dir):
        raise FileNotFoundError(f"no checkpoints under {exp.ckpt_dir}: train first or fix --workdir")
    with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
        state, _, _ = ckpt.restore(step, exp.abstract_state)
    step = int(jax.device_get(state.step))
    writer = None
    if out_dir is None:
        out_dir, own = offline_out_dir(exp.workdir, step)
        if own:  # completes the run's evaluation at this step, so it joins the run's metrics too
            writer = metric_writers.MetricWriter(exp.workdir, use_tensorboard=False)
        log.info("offline evaluation of step %d: writing to %s%s", step, out_dir,
                 " and metrics.jsonl" if writer else "")
    try:
        return run_eval(exp, state, step, writer, out_dir=out_dir, final=True)
    finally:
        if writer is not None:
            writer.close()
        exp.close()
