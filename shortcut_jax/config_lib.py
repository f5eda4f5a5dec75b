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

# name -> (width, depth, heads); MLP ratio 4 for all.
DIT_VARIANTS = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def default_config() -> ml_collections.ConfigDict:
    from shortcut_jax.data import default_data_config

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
    c.model.attention_impl = "auto"  # 'auto', 'xla' or 'cudnn' (cudnn has no forward-mode autodiff)
    c.model.t_input_scale = 1.0
    c.model.zero_init = "final"
    c.model.remat = "none"
    c.model.dtype = "auto"  # 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'bfloat16', 'float32'

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
    c.objective.level_weights = ""  # '' (uniform) or comma-separated weights per level 0..num_levels-1

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
    c.train.log_every = 100
    c.train.ckpt_every = 5_000
    c.train.eval_every = 10_000
    c.train.keep_ckpts = 3
    c.train.async_ckpt = True
    c.train.use_tensorboard = True
    c.train.use_wandb = False
    c.train.wandb_project = "shortcut_jax"
    c.train.profile_steps = ""  # e.g. '100,110': trace steps [100, 110) to <workdir>/profile
    c.train.progress_bar = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by other axes
    c.mesh.fsdp = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.budgets = (1, 2, 4, 8, 32, 128)
    c.eval.grid_budgets = (1, 4, 128)
    c.eval.grid_size = 64
    c.eval.cfg_scale = 1.0
    c.eval.num_samples = 10_000
    c.eval.batch_size = 1000
    c.eval.metric = "auto"  # 'auto': sliced Wasserstein for points; 'none' for images until features exist
    c.eval.use_ema = True
    c.eval.seed = 1
    return c


def model_dims(model_cfg) -> tuple[int, int, int]:
    """(width, depth, heads) from the variant, with explicit non-zero fields overriding it."""
    variant = model_cfg.get("variant", "")
    if variant and variant not in DIT_VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is unknown; use one of {sorted(DIT_VARIANTS)} or ''")
    base = DIT_VARIANTS.get(variant, (0, 0, 0))
    width = model_cfg.width or base[0]
    depth = model_cfg.depth or base[1]
    heads = model_cfg.num_heads or base[2]
    return width, depth, heads


def parse_level_weights(spec: str, num_levels: int) -> list[float] | None:
    if not spec:
        return None
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ConfigError(f"objective.level_weights={spec!r} must be comma-separated numbers") from None
    if len(weights) != num_levels or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"objective.level_weights needs {num_levels} non-negative weights (levels 0..{num_levels - 1}),"
            f" got {spec!r}"
        )
    return weights


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
    return int(round(batch * objective_cfg.sc_fraction))
