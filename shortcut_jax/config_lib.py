"""Shared configuration defaults, the DiT variant table and config checks.

Experiment files in ``experiments/`` start from :func:`default_config` and change what their
setting needs. :func:`validate` runs before anything is compiled or written and raises
``ConfigError`` with a message that names the key to change.

Model defaults follow the shortcut models' reference network (its published numbers and
checkpoints depend on them), not the DiT paper:
- ``attention_scale='head_dim'``: logits divided by head_dim (the DiT paper: sqrt(head_dim));
- ``t_input_scale=1.0``: t in [0, 1] enters the sinusoid raw (the DiT paper: t * 1000);
- ``zero_init='final'``: only the final layer starts at zero, block modulations are
  Xavier-uniform (the DiT paper zero-initialises every block's modulation, 'adaln').
"""

from __future__ import annotations

import math

import ml_collections

from shortcut_jax.data import PAIRS_DATA, default_data_config
from shortcut_jax.evaluation.metrics import METRIC_CHOICES
from shortcut_jax.models import options
from shortcut_jax.models.options import (  # noqa: F401 - DIT_VARIANTS: read through config_lib too
    ATTENTION_IMPLS,
    DEFAULT_LEAN_OPS,
    DIT_VARIANTS,
    LEAN_OPS,
    MATMUL_PRECISIONS,
    QKV_GEMMS,
    REMAT_CHOICES,
)
from shortcut_jax.objectives import METHODS, check_method_config, method
from shortcut_jax.objectives.sampling import parse_interval
from shortcut_jax.objectives.shortcut import num_sc_rows as _objective_sc_rows

# eval.label_mode values (evaluation.sample_sets.class_labels)
LABEL_MODES = ("balanced", "random")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def default_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default; locked, so a misspelt key fails where it is set."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "dit"  # 'dit' or 'mlp'
    c.model.variant = "B"  # DiT: S, B, L, XL or '' (then width/depth/num_heads below)
    c.model.patch_size = 2
    c.model.width = 0  # 0: from the variant
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.mlp_ratio = 4.0
    c.model.attention_scale = "head_dim"
    # 'auto': cuDNN's fused kernel on NVIDIA GPUs where it applies, else XLA's; 'xla' or 'cudnn' force one
    c.model.attention_impl = "auto"
    c.model.t_input_scale = 1.0
    c.model.zero_init = "final"
    c.model.remat = "none"
    c.model.remat_blocks = -1  # how many blocks (the first ones) use model.remat; -1: all of them
    c.model.residual_dtype = "float32"  # 'float32' or 'compute' (the matmul dtype, bf16 on accelerators)
    # hand-written backward passes that keep only their inputs: the same function with less memory
    # traffic; a subset of LEAN_OPS, () for plain autodiff (needed for forward-mode derivatives)
    c.model.lean_ops = DEFAULT_LEAN_OPS  # 'gate' (models.layers.gated_add) not yet measured on accelerators
    c.model.dtype = "auto"  # 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'bfloat16', 'float32'
    # 'bf16': matmuls in model.dtype; 'fp8' (DiT): qkv, proj and the MLP of every block multiply in
    # FP8 (e4m3 operands, e5m2 gradients, per-tensor scales of the current step; models/fp8.py),
    # the GEMMs writing model.dtype. Meant for GPUs with FP8 tensor cores (Ada, Hopper and later);
    # allowed everywhere: XLA's CPU backend computes the same values slowly (tests), and with
    # model.dtype='float32' only the FP8 rounding differs from the float32 network.
    c.model.matmul_precision = "bf16"
    # FP8 scaling: 0 scales each quantized tensor by its own amax in the same step (current
    # scaling); N > 0 by the largest amax of the last N steps (delayed scaling), kept in each FP8
    # layer's amax_history parameter, so the quantization can fuse into the layer's producer
    # (models/fp8.py). Only with matmul_precision='fp8'; it adds parameters (a checkpoint of one
    # setting does not resume under another).
    c.model.fp8_amax_history = 0
    # DiT: q, k and v from one GEMM split afterwards (1), or three GEMMs over column slices of the
    # same kernel (3): the same parameters and function, without the split's copies and the
    # concatenation of their gradients; bf16 matmuls only (docs/configs.md)
    c.model.qkv_gemms = 1
    # DiT: run the blocks as one scan over parameters stacked on a leading layer axis (XLA compiles
    # one block instead of depth of them: shorter compiles and initialisation). The same network
    # and initial distribution; the checkpoint layout differs (blocks/... [depth, ...] instead of
    # block_0 .. block_N-1): models.convert.to_layout converts a state between the two.
    c.model.scan_blocks = False

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "shortcut"
    c.objective.num_levels = 7  # finest step 2^-7: sampling budgets 1, 2, ..., 128
    c.objective.sc_fraction = 0.125  # reference code 1/8 (bootstrap_every=8); paper text 1/4
    c.objective.teacher = "ema"  # 'ema' (reference code) or 'online' (stop-gradient current params)
    c.objective.level_assignment = "official"  # 'official' (even, deterministic) or 'random'
    c.objective.clip = 4.0  # clip of x' and the self-consistency target; 0 disables
    c.objective.label_dropout = 0.1  # flow rows only
    c.objective.bootstrap_cfg = False
    c.objective.bootstrap_cfg_scale = 1.5
    c.objective.noise_floor = 1e-5  # x_t = (1 - (1 - floor) t) x0 + t x1
    c.objective.level_weights = ()  # () (uniform) or one weight per level 0..num_levels-1
    c.objective.flow_t = "grid"  # t of flow rows: 'grid' (finest grid, as published), 'uniform', 'logit_normal'
    # a self-consistency share that grows during training: from sc_fraction_start at step 0 to
    # sc_fraction at step sc_ramp_steps (0: train.steps); -1 keeps sc_fraction throughout
    c.objective.sc_fraction_start = -1.0
    c.objective.sc_ramp_steps = 0
    # comparison methods (objectives/: diffusion, consistency, progressive, reflow)
    c.objective.diffusion_schedule = "cosine"  # 'cosine' or 'linear' alpha-bar schedule
    c.objective.diffusion_min_alpha_bar = 1e-4  # floor of alpha-bar (signal fraction at t = 0)
    c.objective.stage_steps = 0  # steps per curriculum stage; 0: train.steps // stages
    c.objective.consistency_final_level = -1  # last discretisation 2^-level; -1: num_levels - 1
    c.objective.reflow_fraction = 0.125  # live reflow: share of the batch on generated pairs
    c.objective.reflow_steps = 8  # live reflow: Euler steps that generate the pairs
    c.objective.reflow_cfg_scale = 1.0  # live reflow: guidance of the generating pass
    # MeanFlow and improved MeanFlow (objectives/meanflow.py; published values)
    c.objective.meanflow_flow_fraction = 0.75  # share of rows with r = t (plain flow matching)
    c.objective.meanflow_t_mean = -0.4  # logit-normal draws of (t, r): mean and std
    c.objective.meanflow_t_std = 1.0
    c.objective.meanflow_norm_p = 1.0  # adaptive weight 1 / sg(error + eps)^p; 0: plain mean
    c.objective.meanflow_norm_eps = 0.01
    c.objective.meanflow_cfg_omega = 1.0  # guidance folded into the target (class-conditional runs)
    c.objective.meanflow_cfg_kappa = 0.0
    c.objective.meanflow_cfg_interval = (0.0, 1.0)  # the papers' t range where guidance applies
    # meanflow_v, class-conditional: the guidance scale is a network input, drawn per row from
    # this range in training and chosen at sampling time (eval.cfg_scale, sample --cfg_scale)
    c.objective.meanflow_omega_range = (1.0, 1.0)
    c.objective.meanflow_omega_draw = "uniform"  # or 'log_uniform' (improved MeanFlow's, on [1, 8])
    # meanflow_v, class-conditional: the guidance interval (papers' t) is a network input too,
    # drawn per row in training (start in [0, 1/2], end in [1/2, 1]) and chosen at sampling time
    # (eval.guidance_interval, sample --guidance_interval); False: meanflow_cfg_interval, fixed
    c.objective.meanflow_interval_input = False
    c.objective.teacher_checkpoint = ""  # distillation: the teacher run's <workdir>/checkpoints
    c.objective.teacher_step = -1  # its step (-1: latest)
    c.objective.teacher_weights = "ema"  # 'ema' or 'params'

    c.data = default_data_config()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.weight_decay_mask = "all"  # 'all' or 'kernels' (no decay on biases, embeddings)
    c.optim.schedule = "constant"  # 'constant', 'warmup' (linear then constant), 'cosine'
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 0.0  # global-norm clip; 0 disables
    c.optim.accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000
    c.train.batch_size = 256  # global batch
    c.train.ema_decays = (0.999,)
    # Debiased EMA: normalised weights over the iterates, none left on the initial parameters
    # (the reference recipe keeps 37% on them after 1,000 steps at 0.999; that EMA also teaches).
    c.train.ema_debias = False
    c.train.log_every = 100
    c.train.ckpt_every = 5_000
    c.train.eval_every = 10_000
    c.train.keep_ckpts = 3
    c.train.async_ckpt = True
    c.train.use_tensorboard = True
    c.train.use_wandb = False
    c.train.wandb_project = "shortcut_jax"
    c.train.profile_steps = ()  # (start, stop), e.g. (100, 110): trace those steps to <workdir>/profile
    c.train.progress_bar = True
    # Where the initial state is computed: 'device' (one program on the mesh) or 'host' (on the
    # host CPU, then placed on the mesh: the initialiser's hundreds of small random-number
    # kernels are compiled for the CPU instead of the accelerator, and the initial parameters of
    # a seed are the same for every accelerator and mesh shape).
    c.train.init_on = "device"
    # Warm start: a fresh run starts from another run's parameters (training/runs.py):
    # its workdir or checkpoints folder ('' : off), which step (-1: the latest) and which weights
    # ('ema': its first EMA tree, 'params': the online ones). The optimiser starts fresh and the
    # EMA trees at the loaded parameters. Ignored when the workdir holds a checkpoint: a resume
    # continues its own run.
    c.train.init_from = ""
    c.train.init_from_step = -1
    c.train.init_from_weights = "ema"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by other axes
    c.mesh.fsdp = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.budgets = (1, 2, 4, 8, 32, 128)
    c.eval.grid_budgets = (1, 4, 128)
    c.eval.grid_size = 64
    c.eval.cfg_scale = 1.0
    # the papers' t range where cfg_scale applies, for a network that reads it as an input
    # (objective.meanflow_interval_input); other samplers guide every step
    c.eval.guidance_interval = (0.0, 1.0)
    c.eval.num_samples = 10_000
    c.eval.final_num_samples = 0  # samples at the last step's evaluation; 0: eval.num_samples
    c.eval.batch_size = 1000
    # 'auto' (sliced Wasserstein for points, none for images), 'none', 'sliced_wasserstein', 'cfd', 'fid'
    c.eval.metric = "auto"
    # 'cfd': classifier Frechet distance (shortcut_jax.evaluation.feature_distance), needs a
    # classifier saved by shortcut_jax.evaluation.train_classifier and, optionally, fixed reference statistics.
    c.eval.classifier = ""
    c.eval.reference_stats = ""
    # 'fid': FID in pytorch-fid's Inception features (shortcut_jax.evaluation.fid). Reference
    # statistics: a file of `python -m shortcut_jax.fid_stats --stats`, an ADM reference batch
    # or a mu/sigma file; '' computes them from eval.num_samples data images (cached, keyed by
    # the images and the weights, in fid_stats/ beside the workdir).
    c.eval.fid_reference = ""
    c.eval.fid_weights = ""  # '' -> $SHORTCUT_JAX_FID_WEIGHTS, then ~/.cache/shortcut_jax, torch hub's cache
    c.eval.fid_source = ""  # the data set the reference must record ('' : not checked)
    c.eval.fid_batch_size = 200  # images per Inception chunk (rounded up to the local devices)
    # Class labels of the samples: 'balanced' (each class N // num_classes times, the remainder
    # spread by the seed; 50 per class for 50k ImageNet samples) or 'random' (uniform).
    c.eval.label_mode = "balanced"
    # Budgets whose samples are written as the ADM evaluator's .npz (arr_0 uint8 NHWC, arr_1
    # labels), to eval.export_npz: a file name with {steps}, relative to the evaluation folder.
    c.eval.export_budgets = ()
    c.eval.export_npz = "samples_{steps}step.npz"
    c.eval.use_ema = True  # sample with an EMA tree (the reference code uses the online weights by default)
    c.eval.ema_index = 0  # which train.ema_decays tree; the teacher always reads the first
    c.eval.seed = 1
    # Latent runs: samples are decoded by the VAE that encoded the set (its folder from the set's
    # manifest, or eval.vae), eval.decode_batch_size rows per device at a time, before grids and
    # image metrics.
    c.eval.vae = ""
    c.eval.decode_batch_size = 32
    c.lock()
    return c


def latent_paper_config(objective: str) -> ml_collections.ConfigDict:
    """Shared start of the paper's latent-space settings (CelebA-HQ, ImageNet): sd-vae-ft-mse
    posterior moments of 256x256 images and their mirrors written by ``shortcut_jax.encode``
    (a fresh posterior sample at every visit, the mirror's moments when the flip says so), the
    reference optimiser (the defaults), long-run intervals, every budget."""
    c = default_config()
    c.data.name = "latents"
    c.data.random_flip = True
    c.data.image_size = 256  # the encoded images' size, checked against the set's manifest
    c.data.latent_vae = "stabilityai/sd-vae-ft-mse"
    c.objective.name = objective
    c.train.ckpt_every = 10_000
    c.train.eval_every = 20_000
    c.eval.budgets = (1, 2, 4, 8, 16, 32, 64, 128)
    c.eval.grid_budgets = (1, 4, 128)
    # grids only by default; FID needs reference statistics of the training images:
    # --config.eval.metric=fid --config.eval.fid_reference=<stats from python -m shortcut_jax.evaluation.fid>
    c.eval.metric = "none"
    return c


def apply_runlocal_latent(c) -> None:
    """``runlocal=True`` of the latent-space settings: a tiny DiT and a few steps on any encoded
    set (any image size, VAE and scale, e.g. a seeded VAE's from ``python -m shortcut_jax.seeded_vae``),
    a small evaluation: the latent chain end to end on a CPU, as a check (the numbers mean nothing)."""
    c.data.image_size = 0
    c.data.latent_vae = ""
    c.data.latent_scale = 0.0
    c.model.variant = ""
    c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
    c.train.steps, c.train.batch_size = 4, 64
    c.train.log_every, c.train.ckpt_every, c.train.eval_every = 2, 4, 4
    c.mesh.data = 1
    c.eval.budgets, c.eval.grid_budgets = (1, 4), (1, 4)
    c.eval.num_samples, c.eval.batch_size, c.eval.grid_size = 16, 16, 16


# preset=NAME in an experiment file's argument: config keys set together, after the file's own
# settings (--config.key=value flags still win). "few_step" is recommended for few-step quality
# early in training (evidence: experiments/cifar10_results.md): self-consistency targets from the
# online network (stop-gradient) instead of the lagging EMA teacher, a quarter of the batch on
# self-consistency, and evaluated EMA weights without the initialisation's share.
PRESETS = {
    "": {},  # the file's own settings (the published recipe where it follows one)
    "few_step": {"objective.teacher": "online", "objective.sc_fraction": 0.25, "train.ema_debias": True},
    # "one_step": MeanFlow's average-velocity objective with the shortcut recipe's optimiser (AdamW,
    # weight decay, EMA 0.999) and the debiased EMA; the experiment file adds its data's MeanFlow
    # time sampling where it has one (experiments/cifar10.py). On CIFAR-10 its single step scored
    # like its 128-step chain (evidence: experiments/cifar10_results.md, docs/one_step_study.md)
    "one_step": {"objective.name": "meanflow", "train.ema_debias": True},
    # MeanFlow and improved MeanFlow with the published optimiser choices where they differ from
    # the shortcut recipe: Adam with b2 = 0.95 and no weight decay, EMA 0.9999 (debiased, so that
    # short runs are not dominated by the initialisation)
    "meanflow": {
        "objective.name": "meanflow",
        "optim.b2": 0.95,
        "optim.weight_decay": 0.0,
        "train.ema_decays": (0.9999,),
        "train.ema_debias": True,
    },
    "meanflow_v": {
        "objective.name": "meanflow_v",
        "optim.b2": 0.95,
        "optim.weight_decay": 0.0,
        "train.ema_decays": (0.9999,),
        "train.ema_debias": True,
    },
}


def apply_preset(config, name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"config argument preset={name!r}: use one of {sorted(PRESETS)}")
    for dotted, value in PRESETS[name].items():
        section, key = dotted.split(".")
        config[section][key] = value


def model_dims(model_cfg) -> tuple[int, int, int]:
    """(width, depth, heads) of ``config.model`` (``models.options.model_dims``), ``ConfigError``
    for an unknown variant."""
    try:
        return options.model_dims(model_cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_level_weights(weights, num_levels: int) -> None:
    weights = tuple(weights)
    if not weights:
        return
    if (
        len(weights) != num_levels
        or any(not isinstance(w, (int, float)) or w < 0 for w in weights)
        or sum(weights) <= 0
    ):
        raise ConfigError(
            f"objective.level_weights needs () or {num_levels} non-negative weights (levels 0..{num_levels - 1}),"
            f" e.g. --config.objective.level_weights='({', '.join(['1.0'] * num_levels)})'; got {weights!r}"
        )


def check_lean_ops(ops) -> None:
    ops = tuple(ops)
    unknown = [p for p in ops if p not in LEAN_OPS]
    if unknown or len(set(ops)) != len(ops):
        raise ConfigError(f"model.lean_ops={ops!r}: use a subset of {LEAN_OPS} without repeats, () for none")


def check_batch_layout(objective_cfg, batch: int, what: str) -> None:
    """The self-consistency rows of a batch must cover every level at least once."""
    if objective_cfg.name != "shortcut":
        return
    n_sc = num_sc_rows(objective_cfg, batch)
    if n_sc < objective_cfg.num_levels:
        need = math.ceil(objective_cfg.num_levels / objective_cfg.sc_fraction)
        raise ConfigError(
            f"{what} {batch} gives {n_sc} self-consistency rows (objective.sc_fraction="
            f"{objective_cfg.sc_fraction}) for {objective_cfg.num_levels} levels: raise the batch to at least"
            f" {need}, raise objective.sc_fraction, or lower objective.num_levels"
        )


def num_sc_rows(objective_cfg, batch: int) -> int:
    return _objective_sc_rows(batch, objective_cfg.sc_fraction)  # the objective's own rounding


def validate(config, *, num_devices: int) -> None:
    """Static checks of a full config; raises ``ConfigError`` naming the key to change.

    Checks that need the data (image size against the patch) or the workdir (a checkpoint of a
    different model) run in ``train`` right after this, still before anything is compiled.
    """
    if config.objective.name not in METHODS:
        raise ConfigError(f"objective.name={config.objective.name!r} is unknown; use one of {sorted(METHODS)}")
    interval = parse_interval(config.eval.guidance_interval)
    if interval is None:
        raise ConfigError(
            f"eval.guidance_interval={tuple(config.eval.guidance_interval)} must be (start, end) with"
            " 0 <= start <= end <= 1"
        )
    if interval != (0.0, 1.0) and not (
        method(config.objective.name).guidance_input and config.objective.meanflow_interval_input
    ):
        raise ConfigError(
            f"eval.guidance_interval={interval} needs a network that reads the interval: set"
            " objective.meanflow_interval_input=True with objective.name='meanflow_v', or leave it (0, 1)"
        )
    if method(config.objective.name).guidance_input and config.eval.cfg_scale != 1.0:
        low, high = tuple(config.objective.meanflow_omega_range)
        if not low <= config.eval.cfg_scale <= high:
            raise ConfigError(
                f"eval.cfg_scale={config.eval.cfg_scale} is outside objective.meanflow_omega_range="
                f"{(low, high)}, the guidance scales {config.objective.name} trains its network for:"
                " widen the range or pick a scale inside it"
            )
    try:
        check_method_config(config.objective, batch_size=config.train.batch_size, total_steps=config.train.steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.model.name not in ("dit", "mlp"):
        raise ConfigError(f"model.name={config.model.name!r} is unknown; use 'dit' or 'mlp'")
    if config.model.name == "dit":
        width, depth, heads = model_dims(config.model)
        if not (width and depth and heads):
            raise ConfigError("set model.variant (S, B, L, XL) or all of model.width, model.depth, model.num_heads")
        if width % heads:
            raise ConfigError(f"model.width={width} is not divisible by model.num_heads={heads}")
        if width % 4:
            raise ConfigError(f"model.width={width} must be a multiple of 4 (2-D sin-cos positions)")
    for key, allowed in (
        ("attention_scale", ("head_dim", "sqrt_head_dim")),
        ("zero_init", ("final", "adaln")),
        ("remat", REMAT_CHOICES),
        ("attention_impl", ATTENTION_IMPLS),
        ("dtype", ("auto", "bfloat16", "float32")),
        ("residual_dtype", ("float32", "compute")),
        ("matmul_precision", MATMUL_PRECISIONS),
        ("qkv_gemms", QKV_GEMMS),
    ):
        if config.model[key] not in allowed:
            raise ConfigError(f"model.{key}={config.model[key]!r} is not one of {list(allowed)}")
    check_lean_ops(config.model.lean_ops)
    if config.model.matmul_precision == "fp8" and config.model.name != "dit":
        raise ConfigError(
            f"model.matmul_precision='fp8' applies to the DiT's blocks only; model.name="
            f"{config.model.name!r} has no FP8 layers: set model.matmul_precision='bf16'"
        )
    history = config.model.get("fp8_amax_history", 0)
    if isinstance(history, bool) or not isinstance(history, int) or history < 0:
        raise ConfigError(f"model.fp8_amax_history={history!r} must be an integer >= 0 (0: current scaling)")
    if history and config.model.matmul_precision != "fp8":
        raise ConfigError(
            f"model.fp8_amax_history={history} sets FP8's delayed scaling, but model.matmul_precision="
            f"{config.model.matmul_precision!r}: set model.matmul_precision='fp8' or model.fp8_amax_history=0"
        )
    if config.model.qkv_gemms != 1 and config.model.name != "dit":
        raise ConfigError(
            f"model.qkv_gemms={config.model.qkv_gemms} applies to the DiT's attention only; model.name="
            f"{config.model.name!r}: set model.qkv_gemms=1"
        )
    if config.model.qkv_gemms == 3 and config.model.matmul_precision == "fp8":
        raise ConfigError(
            "model.qkv_gemms=3 splits the qkv GEMM for bf16 matmuls; with model.matmul_precision='fp8'"
            " q, k and v stay one FP8 GEMM: set model.qkv_gemms=1"
        )
    if config.model.scan_blocks and config.model.name != "dit":
        raise ConfigError(
            f"model.scan_blocks=True applies to the DiT's blocks only; model.name={config.model.name!r}"
            " has no scanned form: set model.scan_blocks=False"
        )
    if config.model.name == "dit" and not -1 <= config.model.remat_blocks <= depth:
        raise ConfigError(
            f"model.remat_blocks={config.model.remat_blocks} must be -1 (every block) or 0..{depth}"
            " (the number of blocks that use model.remat)"
        )
    if config.model.remat_blocks != -1 and config.model.remat == "none":
        raise ConfigError(
            f"model.remat_blocks={config.model.remat_blocks} picks the blocks that use model.remat,"
            " which is 'none': set model.remat (e.g. 'dots') or leave model.remat_blocks=-1"
        )
    obj = config.objective
    if obj.teacher not in ("ema", "online"):
        raise ConfigError(f"objective.teacher={obj.teacher!r}: use 'ema' or 'online'")
    if obj.level_assignment not in ("official", "random"):
        raise ConfigError(f"objective.level_assignment={obj.level_assignment!r}: use 'official' or 'random'")
    if not 1 <= obj.num_levels <= 12:
        raise ConfigError(f"objective.num_levels={obj.num_levels} must be in 1..12 (budgets up to 2^num_levels)")
    if obj.name == "shortcut" and not 0 < obj.sc_fraction < 1:
        raise ConfigError(f"objective.sc_fraction={obj.sc_fraction} must be in (0, 1)")
    if obj.flow_t not in ("grid", "uniform", "logit_normal"):
        raise ConfigError(f"objective.flow_t={obj.flow_t!r}: use 'grid', 'uniform' or 'logit_normal'")
    check_level_weights(obj.level_weights, obj.num_levels)
    if METHODS[obj.name].frozen_teacher:  # where the teacher is read from (training/runs.py reads it)
        if obj.teacher_weights not in ("ema", "params"):
            raise ConfigError(
                f"objective.teacher_weights={obj.teacher_weights!r}: use 'ema' (the teacher run's first"
                " EMA tree) or 'params' (its online parameters)"
            )
        if obj.teacher_step < -1:
            raise ConfigError(
                f"objective.teacher_step={obj.teacher_step} must be -1 (the latest checkpoint) or a"
                " saved step of the teacher run"
            )
    bad_decays = [d for d in config.train.ema_decays if not 0.0 <= float(d) < 1.0]
    if bad_decays:
        raise ConfigError(f"train.ema_decays={tuple(config.train.ema_decays)}: each decay must be in [0, 1)")
    if obj.name == "shortcut" and config.train.ema_decays == () and obj.teacher == "ema":
        raise ConfigError("objective.teacher='ema' needs at least one train.ema_decays entry, or set it to 'online'")

    optim = config.optim
    if optim.schedule not in ("constant", "warmup", "cosine"):
        raise ConfigError(f"optim.schedule={optim.schedule!r}: use 'constant', 'warmup' or 'cosine'")
    if optim.weight_decay_mask not in ("all", "kernels"):
        raise ConfigError(f"optim.weight_decay_mask={optim.weight_decay_mask!r}: use 'all' or 'kernels'")
    if optim.accum_steps < 1:
        raise ConfigError(f"optim.accum_steps={optim.accum_steps} must be >= 1")

    train = config.train
    batch = train.batch_size
    if batch < 1:
        raise ConfigError(f"train.batch_size={batch} must be >= 1, e.g. --config.train.batch_size=64")
    if train.steps < 0:
        raise ConfigError(f"train.steps={train.steps} must be >= 0")
    if batch % num_devices:
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the {num_devices} devices of the mesh;"
            f" use a multiple of {num_devices} (e.g. {((batch + num_devices - 1) // num_devices) * num_devices})"
        )
    accum = optim.accum_steps
    if batch % accum:
        raise ConfigError(f"train.batch_size={batch} is not divisible by optim.accum_steps={accum}")
    micro = batch // accum
    if micro % num_devices:
        raise ConfigError(
            f"the micro-batch train.batch_size/optim.accum_steps={micro} is not divisible by the {num_devices}"
            " devices; lower optim.accum_steps or raise the batch"
        )
    check_batch_layout(obj, batch, "train.batch_size")
    if obj.name == "shortcut" and accum > 1:
        n_sc = num_sc_rows(obj, batch)
        if n_sc % accum or num_sc_rows(obj, micro) * accum != n_sc:
            raise ConfigError(
                f"with optim.accum_steps={accum}, the {n_sc} self-consistency rows of train.batch_size={batch}"
                " must split evenly over the micro-batches: pick a batch whose self-consistency share"
                f" (batch * objective.sc_fraction) is a multiple of {accum}"
            )
    for key in ("log_every", "ckpt_every", "eval_every"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}={train[key]} must be >= 1")
    if train.profile_steps:
        steps = tuple(train.profile_steps)
        if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 0 <= steps[0] < steps[1]:
            raise ConfigError(
                f"train.profile_steps={steps!r} must be () or (start, stop) with 0 <= start < stop,"
                " e.g. --config.train.profile_steps='(100,110)'"
            )
    if config.train.init_on not in ("device", "host"):
        raise ConfigError(f"train.init_on={config.train.init_on!r}: use 'device' or 'host'")
    check_init_from(config.train)
    check_pairs(config)
    num_ema = len(config.train.ema_decays)
    if config.eval.use_ema and num_ema and not 0 <= config.eval.ema_index < num_ema:
        raise ConfigError(
            f"eval.ema_index={config.eval.ema_index} must index train.ema_decays={tuple(config.train.ema_decays)}"
        )
    if config.eval.decode_batch_size < 1:
        raise ConfigError(
            f"eval.decode_batch_size={config.eval.decode_batch_size} must be >= 1 (latent runs"
            " decode samples in batches of this size; 8 or fewer for float32 on a GPU)"
        )
    if config.eval.final_num_samples < 0:
        raise ConfigError(f"eval.final_num_samples={config.eval.final_num_samples} must be >= 0 (0: eval.num_samples)")
    if config.eval.metric not in METRIC_CHOICES:
        raise ConfigError(f"eval.metric={config.eval.metric!r}: use one of {list(METRIC_CHOICES)}")
    if config.eval.metric == "cfd" and not config.eval.classifier:
        raise ConfigError(
            "eval.metric='cfd' needs eval.classifier (a directory written by `python -m shortcut_jax.evaluation.train_classifier`)"
        )
    for n in tuple(config.eval.budgets) + tuple(config.eval.grid_budgets):
        if n not in [2**k for k in range(obj.num_levels + 1)]:
            raise ConfigError(
                f"eval budget {n} is not a power of two up to 2^objective.num_levels={2**obj.num_levels}:"
                " fix eval.budgets / eval.grid_budgets"
            )
    check_eval_outputs(config.eval)


def check_init_from(train_cfg) -> None:
    """The warm-start keys. The source itself (its checkpoint, and whether its parameters fit) is
    looked at only when a fresh run is built (``runs.open_source``): a run that resumes
    does not read it, so it may be gone by then."""
    if train_cfg.init_from_weights not in ("ema", "params"):
        raise ConfigError(f"train.init_from_weights={train_cfg.init_from_weights!r}: use 'ema' or 'params'")
    if train_cfg.init_from_step < -1:
        raise ConfigError(f"train.init_from_step={train_cfg.init_from_step} must be -1 (the latest) or a saved step")
    if not train_cfg.init_from and train_cfg.init_from_step != -1:
        raise ConfigError(
            f"train.init_from_step={train_cfg.init_from_step} picks a step of train.init_from, which"
            " is '': set train.init_from to the source run's workdir, or leave the step at -1"
        )


def check_pairs(config) -> None:
    """Objective 'reflow' trains on stored pairs, so it needs the pairs reader.

    The other way round is allowed: any objective may train on the pairs' samples as data (flow
    matching or a shortcut model fit to a teacher's samples, i.e. distillation through data); it
    reads ``x`` and ``label`` and leaves ``noise`` aside."""
    if METHODS[config.objective.name].frozen_teacher and config.train.init_from:
        raise ConfigError(
            f"train.init_from={config.train.init_from!r} with objective.name={config.objective.name!r}:"
            " a distillation run already starts its student at the teacher"
            " (objective.teacher_checkpoint); set train.init_from=''"
        )
    if METHODS[config.objective.name].pairs and config.data.name != PAIRS_DATA:
        raise ConfigError(
            f"objective.name={config.objective.name!r} trains on stored (noise, sample) pairs:"
            f" set data.name={PAIRS_DATA!r} (not {config.data.name!r}) and data.path to the"
            " folder written by `python -m shortcut_jax.reflow_pairs`"
        )


def check_eval_outputs(eval_cfg) -> None:
    """Sample labels, the FID chunk and the sample export of the eval section."""
    if eval_cfg.label_mode not in LABEL_MODES:
        raise ConfigError(f"eval.label_mode={eval_cfg.label_mode!r}: use one of {list(LABEL_MODES)}")
    if eval_cfg.fid_batch_size < 1:
        raise ConfigError(f"eval.fid_batch_size={eval_cfg.fid_batch_size} must be >= 1")
    exported = tuple(eval_cfg.export_budgets)
    missing = sorted(set(exported) - set(eval_cfg.budgets))
    if missing:
        raise ConfigError(
            f"eval.export_budgets={exported} holds {missing}, which are not in eval.budgets="
            f"{tuple(eval_cfg.budgets)}: export only evaluated budgets, or add them there"
        )
    pattern = eval_cfg.export_npz
    if exported and not pattern.endswith(".npz"):
        raise ConfigError(f"eval.export_npz={pattern!r} must name a .npz file (the ADM sample format)")
    try:
        pattern.format(steps=1)
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"eval.export_npz={pattern!r}: the only field it may hold is {{steps}}"
            " (the budget), e.g. 'samples_{steps}step.npz'"
        ) from None
    if len(set(exported)) > 1 and "{steps}" not in pattern:
        raise ConfigError(
            f"eval.export_npz={pattern!r} is one file for {len(set(exported))} budgets: put"
            " {steps} in it, e.g. 'samples_{steps}step.npz'"
        )


def check_model_fits_data(config, shape: tuple) -> None:
    """Checks that need the data's shape (after the data config was validated)."""
    if config.model.name == "dit":
        if len(shape) != 3:
            raise ConfigError(
                f"model.name='dit' needs images [H, W, C]; the data gives examples of shape {shape}:"
                " use model.name='mlp' for points"
            )
        p = config.model.patch_size
        if shape[0] % p or shape[1] % p:
            raise ConfigError(
                f"image size {shape[0]}x{shape[1]} is not divisible by model.patch_size={p}: change the patch"
                " size or data.image_size"
            )
    elif len(shape) != 1:
        raise ConfigError(f"model.name='mlp' needs points [D]; the data gives {shape}: use model.name='dit'")


def parse_config_arg(arg: str | None, allowed: dict) -> dict:
    """``'variant=B,runlocal=True'`` -> typed dict; ``allowed`` maps each key to its default.

    Values take the type of their default (bools accept True/False), so a typo in a key or value
    fails when the config is built, with the list of valid keys.
    """
    out = dict(allowed)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ConfigError(f"config argument {item!r}: expected key=value with key in {sorted(allowed)}")
        default = allowed[key]
        value = value.strip()
        if isinstance(default, bool):
            if value not in ("True", "False", "true", "false", "1", "0"):
                raise ConfigError(f"config argument {key}={value!r} must be True or False")
            out[key] = value in ("True", "true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out
