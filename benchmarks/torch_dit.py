"""A PyTorch port of the project's DiT and of its flow-matching and shortcut train steps: the
anchor rows of ``benchmarks.train_step`` (``torch-*``), which time a PyTorch step beside the JAX
one in the same call, on the same card.

The network is ``shortcut_jax.models.dit.DiT`` with the presets' choices (``zero_init='final'``,
logits divided by ``head_dim``, t entering the sinusoid raw), written for PyTorch:
- patch embedding: a ``p x p`` stride-``p`` convolution, plus the fixed 2-D sin-cos table;
- conditioning: ``t_embed(t) + level_embed(level) + label_embed(label)``; each embedder is a
  256-wide sinusoid of the raw input (float32) -> Linear -> SiLU -> Linear; the label table has
  ``num_classes + 1`` rows (the last is the null class);
- each block: adaLN (Linear of SiLU(cond) to shift, scale, gate for attention and for the MLP),
  LayerNorm without affine parameters (eps 1e-6, float32) -> modulate -> attention -> gated
  residual; the same for the MLP (tanh GELU); the residual stream is float32;
- final layer: adaLN shift and scale, LayerNorm, modulate, Linear to ``p * p * C`` features,
  unpatchified in the order ``(row, col, p_row, p_col, C)`` of the JAX model.

Inputs and outputs are NCHW (PyTorch's layout); ``flax_to_state_dict`` converts a Flax parameter
tree in the unrolled ``block_i`` layout (``model.scan_blocks=False``) to this module's state dict,
and ``tests/test_torch_dit.py`` checks that both networks compute the same function.

The train steps follow ``shortcut_jax/objectives``: flow matching (t on the 2^-7 grid, the level
input constant, labels dropped to the null class with probability 0.1) and shortcut (the first
``round(B * sc_fraction)`` rows are self-consistency rows spread over the levels as the
'official' assignment does, their target the clipped mean of two no-gradient half steps of the
EMA weights at level ``k + 1``; the other rows flow rows at level 7), one student pass over all
rows, AdamW (lr 1e-4, betas 0.9/0.999, weight decay 0.1 on every parameter; ``fused=True`` on
CUDA) and an EMA update (decay 0.999). Matmuls run under bf16 autocast, optionally with
``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GIB = 2.0**30


# ----------------------------------------------------------------------------- the network


def sincos_positions(width: int, grid: int) -> np.ndarray:
    """``[grid**2, width]`` float32 table: first half of the channels encodes the column, second
    half the row, each as [sin, cos] with frequencies ``10000^(-2k / (width / 2))``."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4")
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    row, col = np.divmod(np.arange(grid * grid), grid)  # token i * grid + j sits at row i, column j

    def axis(pos):
        angles = pos[:, None].astype(np.float64) * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([axis(col), axis(row)], axis=1).astype(np.float32)


def sinusoid(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of ``values`` (float32) times ``exp(-ln(max_period) i / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=values.device) * (-math.log(max_period) / half))
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, input_scale: float = 1.0, frequency_dim: int = 256):
        super().__init__()
        self.input_scale = input_scale
        self.frequency_dim = frequency_dim
        self.hidden = nn.Linear(frequency_dim, width)
        self.out = nn.Linear(width, width)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        emb = sinusoid(values.float() * self.input_scale, self.frequency_dim)
        return self.out(F.silu(self.hidden(emb)))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, then the per-example modulation; float32."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)
    return h * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, attention_scale: str):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.scale = 1.0 / head_dim if attention_scale == "head_dim" else 1.0 / math.sqrt(head_dim)
        self.adaln = nn.Linear(width, 6 * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, cond_silu: torch.Tensor) -> torch.Tensor:
        # x: [batch, tokens, width] float32; cond_silu: SiLU(cond), [batch, width]
        batch, tokens, width = x.shape
        mod = self.adaln(cond_silu).float()
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)

        h = norm_modulate(x, shift_a, scale_a)
        # the fused projection's features are [q heads, k heads, v heads], each head_dim wide
        qkv = self.qkv(h).view(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, tokens, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        attn = self.proj(attn.transpose(1, 2).reshape(batch, tokens, width))
        x = x + gate_a[:, None] * attn.float()

        h = self.mlp(norm_modulate(x, shift_m, scale_m))
        return x + gate_m[:, None] * h.float()


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.adaln = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor, cond_silu: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(cond_silu).float().chunk(2, dim=-1)
        return self.out(norm_modulate(x, shift, scale))


class DiT(nn.Module):
    """``DiT(x, t, level, label)``: x ``[batch, C, H, W]``, t float ``[batch]``, level and label
    integer ``[batch]``; returns ``[batch, C_out, H, W]`` in float32."""

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int = 2,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        out_channels: Optional[int] = None,
        attention_scale: str = "head_dim",
        t_input_scale: float = 1.0,
        ignore_level: bool = False,
    ):
        super().__init__()
        if attention_scale not in ("head_dim", "sqrt_head_dim"):
            raise ValueError(f"attention_scale must be 'head_dim' or 'sqrt_head_dim', got {attention_scale!r}")
        if input_size % patch_size or width % num_heads:
            raise ValueError("input_size must be divisible by patch_size and width by num_heads")
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.out_channels = out_channels or in_channels
        self.ignore_level = ignore_level
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.register_buffer("positions", torch.from_numpy(sincos_positions(width, self.grid)), persistent=False)
        self.t_embed = TimestepEmbedder(width, t_input_scale)
        self.level_embed = TimestepEmbedder(width, 1.0)
        self.label_embed = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio, attention_scale) for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, level: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).float() + self.positions[None]
        if self.ignore_level:
            level = torch.zeros_like(level)
        cond = self.t_embed(t).float() + self.level_embed(level).float() + self.label_embed(label).float()
        cond_silu = F.silu(cond)
        for block in self.blocks:
            tokens = block(tokens, cond_silu)
        out = self.final(tokens, cond_silu).float()
        # [batch, gh*gw, p*p*C] -> [batch, gh, gw, p, p, C] -> [batch, C, gh, p, gw, p]
        g, p, c = self.grid, self.patch_size, self.out_channels
        out = out.view(batch, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, c, g * p, g * p)


# ----------------------------------------------------------------------------- Flax parameters


def flax_to_state_dict(flax_params: Any) -> dict[str, torch.Tensor]:
    """The torch ``DiT``'s state dict from a Flax DiT parameter tree (``{'params': ...}`` or the
    tree under it) in the unrolled layout: Dense kernels ``[in, out]`` transposed to ``[out, in]``,
    the patch convolution's ``[p, p, C_in, width]`` to ``[width, C_in, p, p]``, ``block_i`` to
    ``blocks.i``. Load with ``strict=True`` so that a missing or extra parameter is an error."""
    tree = flax_params.get("params", flax_params) if hasattr(flax_params, "get") else flax_params
    if "blocks" in tree:
        raise ValueError(
            "the Flax tree has stacked 'blocks' (model.scan_blocks=True); convert it to the unrolled"
            " block_i layout first (shortcut_jax.models.convert.to_layout)"
        )
    out = {}

    def walk(node, path):
        if hasattr(node, "items"):
            for key, child in node.items():
                walk(child, path + (str(key),))
            return
        value = np.asarray(node, dtype=np.float32)
        *module, leaf = path
        if module and module[0].startswith("block_"):
            module = ["blocks", module[0][len("block_") :], *module[1:]]
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf == "embedding":
            leaf = "weight"
        elif leaf != "bias":
            raise ValueError(f"unexpected Flax parameter {'/'.join(path)}")
        out[".".join([*module, leaf])] = torch.tensor(value)

    walk(tree, ())
    return out


# ----------------------------------------------------------------------------- train steps


@dataclasses.dataclass(frozen=True)
class StepConfig:
    objective: str  # 'flow_matching' or 'shortcut'
    num_classes: int = 1000
    num_levels: int = 7
    sc_fraction: float = 0.125
    label_dropout: float = 0.1
    clip: float = 4.0
    noise_floor: float = 1e-5
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    ema_decay: float = 0.999


def official_levels(n_sc: int, num_levels: int) -> np.ndarray:
    """The 'official' level assignment: ``n_sc // K`` rows per level, the remainder to level 0."""
    per_level = n_sc // num_levels
    counts = [per_level] * num_levels
    counts[0] += n_sc - per_level * num_levels
    return np.repeat(np.arange(num_levels), counts)


class TrainStep:
    """Model, EMA copy, AdamW and the step of one objective; ``step(x1, labels)`` -> loss tensor.

    The step is three functions (each compiled with ``compile=True``): ``rows`` draws the noise,
    t, levels and labels of every row and the flow targets; ``teacher`` (no gradient, EMA weights)
    builds the self-consistency targets; ``student`` is the forward pass and loss over all rows.
    The backward pass, the fused AdamW update and the EMA update (``torch._foreach_lerp_``) follow.
    """

    def __init__(self, model_kwargs: dict, cfg: StepConfig, device: str, *, amp: bool, compile: bool):
        if cfg.objective not in ("flow_matching", "shortcut"):
            raise ValueError(f"objective must be 'flow_matching' or 'shortcut', got {cfg.objective!r}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.amp = amp
        kwargs = dict(model_kwargs, num_classes=cfg.num_classes, ignore_level=cfg.objective == "flow_matching")
        self.model = DiT(**kwargs).to(self.device)
        self.init_params()
        self.ema = DiT(**kwargs).to(self.device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.params = [p for p in self.model.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self._sc_levels = {}
        self.rows = self._rows
        self.teacher = self._teacher
        self.student = self._student
        if compile:
            self.rows = torch.compile(self._rows)
            self.teacher = torch.compile(self._teacher)
            self.student = torch.compile(self._student)

    @torch.no_grad()
    def init_params(self):
        """The JAX model's initial distributions (Glorot-uniform blocks, N(0, 0.02) embedders,
        zero final layer); the timing does not depend on them, a first loss of ~2 does."""
        for name, p in self.model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.startswith(("t_embed", "level_embed", "label_embed")):
                p.normal_(0.0, 0.02)
            elif name.startswith("final"):
                p.zero_()
            elif name == "patch_embed.weight":
                fan_in, fan_out = p[0].numel(), p.shape[0]
                p.uniform_(-math.sqrt(6 / (fan_in + fan_out)), math.sqrt(6 / (fan_in + fan_out)))
            elif name.endswith("qkv.weight"):
                for part in p.chunk(3, dim=0):
                    nn.init.xavier_uniform_(part)
            else:
                nn.init.xavier_uniform_(p)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def sc_levels(self, batch: int) -> torch.Tensor:
        """Levels of the self-consistency rows (empty for flow matching), built once per batch size."""
        if batch not in self._sc_levels:
            n_sc = int(round(batch * self.cfg.sc_fraction)) if self.cfg.objective == "shortcut" else 0
            levels = official_levels(n_sc, self.cfg.num_levels) if n_sc else np.zeros((0,), np.int64)
            self._sc_levels[batch] = torch.as_tensor(levels, dtype=torch.long, device=self.device)
        return self._sc_levels[batch]

    def _rows(self, x1: torch.Tensor, labels: torch.Tensor, sc_level: torch.Tensor):
        cfg = self.cfg
        b = x1.shape[0]
        n_sc = sc_level.shape[0]
        x0 = torch.randn_like(x1)
        fine = 2**cfg.num_levels
        t = torch.randint(0, fine, (b,), device=x1.device).float() / fine
        level = torch.full((b,), cfg.num_levels, dtype=torch.long, device=x1.device)
        drop = torch.rand((b,), device=x1.device) < cfg.label_dropout
        label = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels)
        if n_sc:
            grid = 2**sc_level
            t_sc = torch.floor(torch.rand((n_sc,), device=x1.device) * grid) / grid
            t = torch.cat([t_sc, t[n_sc:]])
            level = torch.cat([sc_level, level[n_sc:]])
            label = torch.cat([labels[:n_sc], label[n_sc:]])  # no label dropout on these rows
        tt = t[:, None, None, None]
        x_t = (1.0 - (1.0 - cfg.noise_floor) * tt) * x0 + tt * x1
        target_flow = x1[n_sc:] - (1.0 - cfg.noise_floor) * x0[n_sc:]
        return x_t, t, level, label, target_flow

    def _teacher(self, x_t, t, level, label):
        """Mean of two half steps of the EMA weights at level ``k + 1``, clipped."""
        clip = self.cfg.clip
        half_level = level + 1
        half_d = (0.5 ** half_level.float())[:, None, None, None]
        with self.autocast():
            s1 = self.ema(x_t, t, half_level, label).float()
            x_mid = torch.clamp(x_t + half_d * s1, -clip, clip)
            s2 = self.ema(x_mid, t + half_d.view(-1), half_level, label).float()
        return torch.clamp((s1 + s2) / 2, -clip, clip)

    def _student(self, x_t, t, level, label, target):
        with self.autocast():
            pred = self.model(x_t, t, level, label)
        # the mean of per-row MSEs: the shortcut loss with uniform level weights, as flow matching's
        return torch.mean(torch.square(pred.float() - target))

    def step(self, x1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_t, t, level, label, target = self.rows(x1, labels, self.sc_levels(x1.shape[0]))
        n_sc = x1.shape[0] - target.shape[0]
        if n_sc:
            with torch.no_grad():
                target_sc = self.teacher(x_t[:n_sc], t[:n_sc], level[:n_sc], label[:n_sc])
            target = torch.cat([target_sc, target])
        loss = self.student(x_t, t, level, label, target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.cfg.ema_decay)
        return loss.detach()


# ----------------------------------------------------------------------------- timing


def time_train_step(
    model_kwargs: dict,
    cfg: StepConfig,
    *,
    batch: int,
    shape: tuple[int, int, int],
    warmup: int = 3,
    steps: int = 20,
    compile: bool = True,
    amp: Optional[bool] = None,
    device: Optional[str] = None,
    seed: int = 0,
) -> dict:
    """Times ``steps`` train steps after ``warmup`` untimed ones on a synthetic batch
    (``shape``: ``(H, W, C)``, the batch resident on the device).

    On CUDA each step is timed with CUDA events (recorded around each step, read after one
    synchronisation at the end); on CPU with ``time.perf_counter``. Returns the median step time,
    images/s, the steps' losses, the time of the first step (compilation included, with
    ``compile``), the time building the model, EMA copy and optimiser took, and on CUDA the peak
    of ``torch.cuda.max_memory_allocated`` over the whole run. ``amp`` (bf16 autocast) defaults
    to on for CUDA, off on CPU."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (the first step compiles)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    amp = cuda if amp is None else amp
    torch.manual_seed(seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def sync():
        if cuda:
            torch.cuda.synchronize()

    height, width, channels = shape
    start = time.perf_counter()
    step = TrainStep(dict(model_kwargs, input_size=height, in_channels=channels), cfg, device, amp=amp, compile=compile)
    sync()
    init_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn((batch, channels, height, width), generator=gen).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)

    losses = []
    start = time.perf_counter()
    losses.append(step.step(x1, labels))
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        losses.append(step.step(x1, labels))
    sync()
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for begin, end in events:
            begin.record()
            losses.append(step.step(x1, labels))
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(step.step(x1, labels))
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "amp": "bf16" if amp else "float32",
        "compiled": compile,
        "batch": batch,
        "step_ms": step_s * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "images_per_s": batch / step_s,
        "first_step_s": first_step_s,
        "init_s": init_s,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "losses": [float(v) for v in losses],
    }
