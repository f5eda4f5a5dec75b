"""The model choices a config names: DiT sizes, remat policies, lean backward passes, matmul
precision. The networks read them, and ``config_lib`` checks a config against them (this module
imports nothing, so a check costs no model import beyond it)."""

from __future__ import annotations

# name -> (width, depth, heads); MLP ratio 4 for all.
DIT_VARIANTS = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

# model.remat: 'none', or a policy of models.dit.REMAT_POLICIES
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch")

# The same network computed with less memory traffic, each part switchable for measurement:
# 'norm': LayerNorm + modulation with a backward pass that keeps x and the per-token statistics;
# 'gelu': GELU in float32 with a backward pass that keeps only its input;
# 'gate': the gated residual updates keep their branch in its own dtype, not a float32 copy.
LEAN_OPS = ("norm", "gelu", "gate")
# the default: the parts measured on accelerators ('gate' is not yet)
DEFAULT_LEAN_OPS = ("norm", "gelu")

# model.matmul_precision: 'bf16' multiplies in the compute dtype (bf16 on accelerators, float32
# on CPU); 'fp8' runs the four large dense layers of every block (qkv, proj, fc1, fc2: about 94% of
# DiT-B/2's matmul FLOPs at 256 tokens) through FP8 GEMMs (models/fp8.py). The rest stays in the
# compute dtype: the attention products (most of the other 6%); the adaLN modulations, the
# embedders and the patch embedding (matmuls over batch rows or 16-wide patches, under 1% of the
# FLOPs; an error in a modulation scales or shifts every token of an example alike); and the
# final layer (16 output features: the network's output itself).
MATMUL_PRECISIONS = ("bf16", "fp8")

# model.qkv_gemms: q, k and v from one GEMM of the fused [width, 3 * width] kernel, split after
# it (1), or from three GEMMs over its column slices (3: the same parameters; with bf16 matmuls)
QKV_GEMMS = (1, 3)

# model.attention_impl: 'auto' (cuDNN's fused kernel where it applies), 'xla' or 'cudnn'
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def model_dims(model_cfg) -> tuple[int, int, int]:
    """(width, depth, heads) from the variant, with explicit non-zero fields overriding it;
    ``ValueError`` naming ``model.variant`` for an unknown one."""
    variant = model_cfg.get("variant", "")
    if variant and variant not in DIT_VARIANTS:
        raise ValueError(f"model.variant={variant!r} is unknown; use one of {sorted(DIT_VARIANTS)} or ''")
    base = DIT_VARIANTS.get(variant, (0, 0, 0))
    width = model_cfg.width or base[0]
    depth = model_cfg.depth or base[1]
    heads = model_cfg.num_heads or base[2]
    return width, depth, heads


# the MLP for points: (width, depth) where config.model leaves them 0
MLP_DEFAULT_DIMS = (256, 4)


def mlp_dims(model_cfg) -> tuple[int, int]:
    """(width, depth) of the point MLP, explicit non-zero fields overriding the defaults."""
    return model_cfg.width or MLP_DEFAULT_DIMS[0], model_cfg.depth or MLP_DEFAULT_DIMS[1]
