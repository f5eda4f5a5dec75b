"""``Experiment``: everything a run builds from its config before it touches the workdir.

The config is checked (``config_lib.validate``), the data source opened once (its reader's
preparation checks files and headers), the workdir's checkpoint checked for compatibility, and
then the model, objective context, optimiser, mesh, state shardings, sampler and evaluation metric
are built; a fresh distillation run also finds and checks its teacher's checkpoint (``training/runs.py``),
which ``init_state`` then reads. Nothing here is compiled or written; the train loop (``train.py``), the evaluation
(``evaluate.py``), the checkpoint importer and the benchmarks all start from one.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from shortcut_jax import config_lib, data
from shortcut_jax.infra import checkpoint, sharding
from shortcut_jax.training import runs, train_state
from shortcut_jax.evaluation import metrics
from shortcut_jax.models import build_model, convert
from shortcut_jax.models.options import mlp_dims
from shortcut_jax.objectives import METHODS, make_objective_config, make_sampler, method
from shortcut_jax.training.train_step import make_train_step

log = logging.getLogger(__name__)

# Keys whose change makes a saved checkpoint unusable for the current config: what fixes the
# parameter shapes and the meaning of the level input. Execution choices (dtype, remat, attention
# kernel, residual dtype) may change between launches.
COMPATIBILITY_KEYS = (
    "architecture",
    "data_shape",
    "num_classes",
    "objective.name",
    "objective.num_levels",
    "ema_decays",
)
# The objective settings among them (plus those that change what a given objective's weights
# mean), checked first so that the refusal names the setting to restore.
OBJECTIVE_KEYS = {
    "": ("objective.name", "objective.num_levels"),
    "diffusion": ("objective.diffusion_schedule", "objective.diffusion_min_alpha_bar"),
}


def architecture(model_cfg) -> dict:
    if model_cfg.name == "dit":
        width, depth, heads = config_lib.model_dims(model_cfg)
        return {
            "name": "dit",
            "patch_size": model_cfg.patch_size,
            "width": width,
            "depth": depth,
            "num_heads": heads,
            "mlp_ratio": model_cfg.mlp_ratio,
            # delayed FP8 scaling adds a parameter to every FP8 layer (written only where set, so
            # the record of every other run is as before)
            **(
                {"fp8_amax_history": model_cfg.fp8_amax_history}
                if model_cfg.get("fp8_amax_history", 0) and model_cfg.matmul_precision == "fp8"
                else {}
            ),
        }
    return {
        "name": model_cfg.name,
        "width": mlp_dims(model_cfg)[0],
        "depth": mlp_dims(model_cfg)[1],
        "mlp_ratio": model_cfg.mlp_ratio,
    }


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
    # weight matrices of one layer (rank >= 2), in either block layout (a stacked bias is 2-D)
    return convert.weight_matrix_mask


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim_cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=weight_decay_mask(optim_cfg.weight_decay_mask),
    )
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw), schedule
    return adamw, schedule


# ----------------------------------------------------------------------------- the experiment


def check_workdir_matches(workdir: str, saved_meta: dict, meta: dict) -> None:
    """One line naming each setting of ``COMPATIBILITY_KEYS`` in which the checkpoint of
    ``workdir`` (its metadata ``saved_meta``) differs from this run's ``meta``; local or remote."""
    diffs = checkpoint.differences(saved_meta, meta, COMPATIBILITY_KEYS)
    if diffs:
        raise config_lib.ConfigError(
            f"--workdir={workdir} holds a checkpoint written by a different configuration"
            f" ({'; '.join(diffs)}): use a fresh --workdir, or restore the configuration it was saved with"
        )


class Experiment:
    """Everything built from a validated config, before anything touches the workdir."""

    # latents [N, h, w, c] -> images [N, H, W, 3] in [-1, 1] for latent runs (None: samples are images)
    decode = None
    vae_record = None  # latent runs: the record of the VAE that encoded the data (name, folder, sha256)

    def __init__(self, config, workdir: Optional[str], *, spec: Optional[data.DataSpec] = None):
        """``spec`` given: no data source is opened (benchmarks, checkpoint import); ``workdir``
        None: nothing on disk is consulted."""
        config_lib.validate(config, num_devices=self.num_mesh_devices(config))
        self.check_mesh_spans_processes(config)
        self.config = config
        self.workdir = workdir
        process_count = jax.process_count()
        self.batch_per_process = config.train.batch_size // process_count
        if spec is None:
            # make_dataset runs the reader's checks (file listing, header scan, array loading)
            # once and builds the source from what they read.
            self.source = data.make_dataset(
                config.data,
                batch_size=self.batch_per_process,
                seed=config.seed,
                process_index=jax.process_index(),
                process_count=process_count,
            )
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
        try:  # checks the metric's files now; a network behind it is loaded at the first evaluation
            self.metric = metrics.build_metric(config.eval, self.spec.kind)
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from None
        self.decode = self._latent_decoder(config)
        self.meta = {
            "architecture": architecture(config.model),
            "model": config.model.to_dict(),
            "data_shape": list(self.spec.shape),
            "num_classes": self.spec.num_classes,
            "objective": config.objective.to_dict(),
            "ema_decays": list(config.train.ema_decays),
            # not compatibility keys: a resume may change them (train.py says how it continues)
            "global_batch": config.train.batch_size,
            "process_count": jax.process_count(),
        }
        if self.vae_record is not None:  # the VAE that decodes a latent run's samples
            self.meta["vae"] = self.vae_record
        self.ckpt_dir = os.path.join(self.workdir or "", "checkpoints")
        self.resumes = self._check_workdir()  # the workdir holds a checkpoint of this run
        # train.init_from: read and checked now for a fresh run; a resume never reads it
        self.warm_start = (
            runs.open_source(config.train, self.meta)
            if config.train.init_from and self.workdir and not self.resumes
            else None
        )
        if self.warm_start is not None:  # provenance, saved with every checkpoint (not a compatibility key)
            self.meta["init_from"] = self.warm_start.provenance()

        self.mesh = sharding.make_mesh(config.mesh)
        self.host_cpu = self._host_cpu() if config.train.init_on == "host" else None
        self.method = needs = method(config.objective.name)
        model_args = dict(
            num_classes=self.spec.num_classes,
            ignore_level=not needs.level_input,
            guidance_input=needs.guidance_input and self.spec.num_classes > 0,
            guidance_interval_input=needs.guidance_input
            and self.spec.num_classes > 0
            and bool(config.objective.meanflow_interval_input),
        )
        self.model = build_model(config.model, **model_args)
        self.apply_fn = lambda params, x, t, level, label, guidance=None: self.model.apply(
            {"params": params}, x, t, level, label, guidance
        )
        jvp_apply_fn = None
        if needs.forward_mode:  # the same parameters, through ops that have a forward-mode rule
            self.jvp_model = build_model(config.model, forward_mode=True, **model_args)
            jvp_apply_fn = lambda params, x, t, level, label, guidance=None: self.jvp_model.apply(  # noqa: E731
                {"params": params}, x, t, level, label, guidance
            )
        self.obj_cfg = make_objective_config(
            config.objective,
            self.apply_fn,
            self.spec.num_classes,
            total_steps=config.train.steps,
            jvp_apply_fn=jvp_apply_fn,
        )
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        self.sampler = make_sampler(config.objective.name, self.obj_cfg, seed=config.eval.seed, mesh=self.mesh)

        init_rng = jax.random.PRNGKey(config.seed)
        self.abstract_state = jax.eval_shape(self._init, init_rng)
        self.state_shardings = sharding.state_shardings(
            self.abstract_state, self.mesh, layer_axis=convert.in_stacked_blocks
        )
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.abstract_state, self.state_shardings
        )
        # a fresh distillation run starts at its teacher, found and checked now (training/runs.py); a
        # resumed one finds its teacher in its own checkpoint, and without a workdir (benchmarks)
        # the frozen teacher is a copy of the initial parameters
        self.teacher_source = None
        if needs.frozen_teacher and self.workdir and not self.resumes:
            self.teacher_source = runs.find_teacher(config.objective, self.meta, self.abstract_state.params)
            self.meta["teacher"] = self.teacher_source.describe()

    def _latent_decoder(self, config):
        """For a latent set, or reflow pairs of a latent run: the VAE that encoded the set (the
        folder its manifest names, or ``eval.vae``), as a decoder of sampled latents; checked to
        be the same weights."""
        manifest = getattr(self.source, "manifest", None)
        if manifest is None:
            return None
        if config.data.name == "latents":
            recorded, encoded = manifest["vae"], f"latent set {config.data.path}"
        elif config.data.name == data.PAIRS_DATA:
            recorded = data.pairs.vae_record(manifest)
            encoded = f"the latent set whose teacher made the reflow pairs in {config.data.path}"
        else:
            return None
        if recorded is None:  # pairs of a pixel or point run
            return None
        self.vae_record = recorded  # kept in the run's metadata: sampling finds its decoder there
        return self.vae_decoder(config, recorded, encoded)

    @staticmethod
    def vae_decoder(config, recorded: Optional[dict], encoded: str):
        """The decoder of the VAE ``recorded`` (a latent set's record: name, folder, sha256), from
        ``eval.vae`` or the recorded folder, checked to hold the same weights (``recorded`` None:
        ``eval.vae`` as it is)."""
        from shortcut_jax.models import resolve_dtype, vae_weights

        where = config.eval.vae or recorded["folder"]
        try:
            vae = vae_weights.load_vae(where)
        except vae_weights.WeightsError as err:
            raise config_lib.ConfigError(
                f"decoding the samples of {encoded}: {err} (set eval.vae to the VAE's folder on this machine)"
            ) from None
        if recorded is not None and vae.weights_sha256 != recorded["weights_sha256"]:
            raise config_lib.ConfigError(
                f"eval.vae={where!r} holds other weights (sha256 {vae.weights_sha256[:12]}...) than the VAE"
                f" that encoded {encoded} ({recorded['name']}, sha256 {recorded['weights_sha256'][:12]}...):"
                " point eval.vae at that VAE's folder"
            )
        # bf16 on accelerators (float32 convolutions at full precision are about 15x slower there)
        return vae.latent_decoder(dtype=resolve_dtype("auto"), batch_size=config.eval.decode_batch_size)

    @staticmethod
    def num_mesh_devices(config) -> int:
        data_axis, fsdp = sharding.mesh_shape(config.mesh, jax.device_count())
        return data_axis * fsdp

    @staticmethod
    def check_mesh_spans_processes(config) -> None:
        """In a job of several processes each one feeds its slice of the batch to its own devices,
        so the mesh must hold every device of every process."""
        used, total, processes = Experiment.num_mesh_devices(config), jax.device_count(), jax.process_count()
        if processes > 1 and used != total:
            raise config_lib.ConfigError(
                f"mesh.data={config.mesh.data} x mesh.fsdp={config.mesh.fsdp} uses {used} of the {total} devices of"
                f" the {processes} processes; each process feeds its own devices its slice of the batch, so the"
                " mesh must hold them all: set mesh.data=-1"
            )

    def _check_workdir(self) -> bool:
        """Whether the workdir holds a checkpoint (checked to fit this config)."""
        # through epath, so that a remote workdir (gs://...) is looked at, not skipped
        if not self.workdir or not epath.Path(self.ckpt_dir).is_dir():
            return False
        with checkpoint.Checkpointer(self.ckpt_dir, async_save=False) as ckpt:
            saved = ckpt.read_meta()
        if saved is not None:
            if "teacher" in saved:  # where the run's teacher came from, kept in every checkpoint's meta
                self.meta["teacher"] = saved["teacher"]
            self._check_teacher_matches(saved)
            self._check_objective_matches(saved)
            check_workdir_matches(self.workdir, saved, self.meta)
        return saved is not None

    def _check_objective_matches(self, saved: dict) -> None:
        """The workdir's run was trained under one objective; another one would train (or sample)
        its weights under a loss they were not trained for. One line names the saved and the given
        settings."""
        name = self.config.objective.name
        keys = OBJECTIVE_KEYS[""] + (
            OBJECTIVE_KEYS.get(name, ()) if (saved.get("objective") or {}).get("name") == name else ()
        )
        diffs = []
        for key in keys:
            field = key.split(".", 1)[1]
            saved_value = (saved.get("objective") or {}).get(field, None)
            given = self.config.objective.get(field)
            if saved_value is not None and checkpoint.differences({"v": saved_value}, {"v": given}, ["v"]):
                diffs.append((key, saved_value, given))
        if diffs:
            saved_text = ", ".join(f"{k}={v!r}" for k, v, _ in diffs)
            given_text = ", ".join(f"{k}={g!r}" for k, _, g in diffs)
            flags = " ".join(f"--config.{k}={v}" for k, v, _ in diffs)
            raise config_lib.ConfigError(
                f"--workdir={self.workdir} holds a run trained with {saved_text}; the config gives {given_text}:"
                f" continue that run with its setting ({flags}) or use a fresh --workdir"
            )

    def _check_teacher_matches(self, saved: dict) -> None:
        """A distillation run's state holds a frozen teacher that other runs' states lack, so
        neither continues the other's checkpoint (distilling a run in its own workdir, say)."""
        name = self.config.objective.name
        saved_name = (saved.get("objective") or {}).get("name")
        if saved_name in METHODS and METHODS[saved_name].frozen_teacher != METHODS[name].frozen_teacher:
            raise config_lib.ConfigError(
                f"--workdir={self.workdir} holds a checkpoint of an objective.name={saved_name!r} run, which"
                f" objective.name={name!r} cannot continue (one distils a frozen teacher, the other not): use a"
                " fresh --workdir (to distil that run, name it in objective.teacher_checkpoint)"
            )

    def _init(self, rng, model=None):
        init_rng, state_rng = jax.random.split(rng)
        shape = tuple(self.spec.shape)
        x = jnp.zeros((1, *shape), jnp.float32)
        params = (model or self.model).init(
            init_rng, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
        )["params"]
        frozen = params if self.method.frozen_teacher else None
        return train_state.create(params, self.tx, state_rng, self.config.train.ema_decays, frozen_teacher=frozen)

    def _init_from_teacher(self):
        """The initial state of a distillation run: student, EMA trees and frozen teacher at the
        teacher's weights (read into the parameters' shardings), the optimiser state fresh, the
        state rng the one ``_init`` gives for the seed."""
        weights = runs.restore_teacher(self.teacher_source, self.abstract_state.params)

        def init(weights, rng):
            _, state_rng = jax.random.split(rng)
            return train_state.create(weights, self.tx, state_rng, self.config.train.ema_decays, frozen_teacher=weights)

        return jax.jit(init, out_shardings=self.state_shardings)(weights, jax.random.PRNGKey(self.config.seed))

    def init_state(self):
        if self.teacher_source is not None:
            return self._init_from_teacher()
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
                " JAX_PLATFORMS=cuda,cpu) or set train.init_on='device'"
            ) from err

    def _init_on_host(self):
        """The initial state computed on this host's CPU, then placed shard by shard on the mesh
        (every process computes the same full state, so this works on many hosts as on one)."""
        model = self.model
        if getattr(model, "attention_impl", None) not in (None, "xla"):
            # a GPU kernel cannot be lowered for the CPU; the attention has no parameters, so the
            # XLA implementation initialises the same ones
            model = model.clone(attention_impl="xla")
        with jax.default_device(self.host_cpu):
            host = jax.device_get(
                jax.jit(functools.partial(self._init, model=model))(jax.random.PRNGKey(self.config.seed))
            )
        return jax.tree.map(
            lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x[idx])),
            host,
            self.state_shardings,
        )

    def train_step_fn(self):
        """The train step, not yet jitted: ``(state, batch) -> (state, metrics)``. What
        ``compile_step`` compiles and the benchmarks trace."""
        return make_train_step(
            self.config.objective.name,
            self.obj_cfg,
            self.tx,
            self.schedule,
            accum_steps=self.config.optim.accum_steps,
            ema_debias=self.config.train.ema_debias,
        )

    def abstract_batch(self) -> dict:
        """The global batch the step takes, as ``jax.ShapeDtypeStruct`` leaves with its shardings."""
        batch_sh = sharding.batch_sharding(self.mesh)
        b = self.config.train.batch_size
        batch = {
            "x": jax.ShapeDtypeStruct((b, *self.spec.shape), jnp.float32, sharding=batch_sh),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
        }
        if self.config.data.name == data.PAIRS_DATA:  # stored reflow pairs: the noise of each row too
            batch["noise"] = batch["x"]
        return batch

    def compile_step(self, donate: bool = True):
        """AOT-compiled train step, with compile time and the compiler's memory/cost figures.

        The state is donated (updated in place); ``donate=False`` keeps the input state alive
        beside the new one, for measuring what donation saves."""
        jitted = jax.jit(
            self.train_step_fn(),
            donate_argnums=(0,) if donate else (),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        )
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):  # the mesh that sharding.batch_rows constrains rows to
            compiled = jitted.lower(self.abstract_state, self.abstract_batch()).compile()
        info = {"compile_seconds": time.perf_counter() - start}
        info.update(compiled_stats(compiled))
        return compiled, info

    def close(self):
        if self.source is not None:
            self.source.close()

    def restore(self, ckpt: checkpoint.Checkpointer, step: Optional[int]):
        """(state, data_state, meta) of the checkpoint at ``step`` (None: latest), in this run's
        block layout and shardings.

        A checkpoint written with the other ``model.scan_blocks`` (blocks unrolled or stacked)
        is read in its own layout and converted on the devices (an exact reshuffle of the
        parameters, the EMA trees and Adam's moments), so a run can be evaluated, sampled or
        resumed with either setting."""
        saved = ckpt.read_meta(step) or {}
        saved_stacked = bool((saved.get("model") or {}).get("scan_blocks", False))
        stacked = bool(self.config.model.scan_blocks) and self.config.model.name == "dit"
        if saved_stacked == stacked:
            return ckpt.restore(step, self.abstract_state)
        as_saved = jax.eval_shape(lambda s: convert.to_layout(s, saved_stacked), self.abstract_state)
        as_saved = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            as_saved,
            sharding.state_shardings(as_saved, self.mesh, layer_axis=convert.in_stacked_blocks),
        )
        state, data_state, meta = ckpt.restore(step, as_saved)
        log.info(
            "checkpoint written with model.scan_blocks=%s: blocks converted to the %s layout",
            saved_stacked,
            "stacked" if stacked else "unrolled",
        )
        # (not donated: stacking changes every block array's shape, so no buffer could be reused)
        state = jax.jit(lambda s: convert.to_layout(s, stacked), out_shardings=self.state_shardings)(state)
        return state, data_state, meta

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
            for name in (
                "temp_size_in_bytes",
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "generated_code_size_in_bytes",
            ):
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


def parameter_overview(params) -> tuple[int, str]:
    """(total count, a table of parameter counts by top-level module) for the start-up log."""
    rows = []
    for name, sub in params.items() if isinstance(params, dict) else [("params", params)]:
        leaves = jax.tree.leaves(sub)
        rows.append((name, sum(int(np.prod(leaf.shape)) for leaf in leaves), len(leaves)))
    total = sum(count for _, count, _ in rows)
    width = max([len(name) for name, _, _ in rows] + [6])
    lines = [f"{'module':<{width}}  {'parameters':>12}  arrays"]
    lines += [f"{name:<{width}}  {count:>12,}  {n}" for name, count, n in rows]
    lines.append(f"{'total':<{width}}  {total:>12,}  {sum(n for _, _, n in rows)}")
    return total, "\n".join(lines)
