"""The FID Inception-v3 in Flax: pytorch-fid's network, so FIDs computed here are the literature's.

FID is only comparable between papers when every one of them runs the same network on the same
inputs. The network the literature settled on is the TensorFlow Inception-v3 graph of 2015-12-05
(``pool_3``, 2048 features), which pytorch-fid ships as ``pt_inception-2015-12-05-6726825d.pth``
together with the few places where that graph differs from a textbook Inception-v3. This module
rebuilds that network layer for layer (NHWC, float32):

* every convolution is bias-free and followed by BatchNorm (epsilon 0.001, running statistics)
  and ReLU;
* the average-pool branch of the A and C blocks and of the first E block leaves the zero padding
  out of the average (TensorFlow's pooling); the second E block max-pools in that branch (a quirk
  of the 2015 graph that the weights were trained with);
* inputs are resized to 299x299 with bilinear interpolation exactly as ``torch.nn.functional.
  interpolate(mode='bilinear', align_corners=False)`` does it (half-pixel centres, source
  coordinates clamped at 0, no anti-aliasing), after uint8 pixels are mapped to [0, 1] by
  dividing by 255, and then scaled to [-1, 1];
* the features are the global average of the last block: ``float32 [N, 2048]``.

Weights: ``load_variables`` reads pytorch-fid's ``.pth`` (through torch, when it is installed) or
a ``.npz`` converted once with::

    python -m shortcut_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \\
        --out ~/.cache/shortcut_jax/pt_inception-2015-12-05-6726825d.npz

(the converted file needs no torch). :func:`find_weights` says where they are looked for.

Parity with pytorch-fid is checked against features that pytorch-fid's own network computed
(``benchmarks/fid_inception_golden.py`` writes them, ``tests/goldens/fid_inception_golden.npz``
holds them) with weights drawn by :func:`synthetic_torch_state_dict`, so the check needs neither
the real weights nor torch.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import sys
import zlib
from typing import Any, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The one quantisation of samples to 8-bit images, shared with CFD and the ADM sample files
# (imported under the name this module has always offered it by).
from shortcut_jax.evaluation.pixels import to_uint8 as images_to_uint8  # noqa: F401
from shortcut_jax.evaluation.chunked_features import ChunkedFeatures
from shortcut_jax.infra import files

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "WEIGHTS_ENV_VAR",
    "FIDInceptionV3",
    "InceptionFeatures",
    "WeightsNotFoundError",
    "bilinear_resize",
    "expected_torch_shapes",
    "find_weights",
    "load_torch_state_dict",
    "load_variables",
    "save_variables",
    "synthetic_torch_state_dict",
    "torch_state_dict_to_variables",
    "variables_fingerprint",
]

FEATURE_DIM = 2048
INPUT_SIZE = 299
# The released file's name carries the first 8 hex digits of its SHA-256 (torch hub's rule).
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
CONVERTED_FILE = "pt_inception-2015-12-05-6726825d.npz"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_ENV_VAR = "SHORTCUT_JAX_FID_WEIGHTS"
# Where a converted file is expected by default, and where torch hub (and so pytorch-fid itself)
# caches the downloaded original.
DEFAULT_DIR = os.path.join("~", ".cache", "shortcut_jax")
TORCH_HUB_DIR = os.path.join("~", ".cache", "torch", "hub", "checkpoints")
# Identifies the network definition in fingerprints, so statistics of another architecture with
# equal weights can never pass for these.
NETWORK_ID = "fid_inception_v3/pytorch-fid"
_NPZ_FORMAT = "shortcut_jax.fid_inception/1"

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """Bias-free convolution -> BatchNorm (running statistics, eps 0.001) -> ReLU.

    Submodules are called ``conv`` and ``bn`` so that parameter paths read like the state dict's
    names (``Mixed_5b.branch1x1.conv.weight`` <-> ``Mixed_5b/branch1x1/conv/kernel``).
    """

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # symmetric (rows, columns), as torch's Conv2d takes it

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_HIGHEST,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TensorFlow's average pool: the padded zeros are not part of the count.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class BlockC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions and an avg pool branch."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class BlockE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs.

    ``pool='avg'`` for Mixed_7b; ``pool='max'`` for Mixed_7c, which is how the 2015 graph (and so
    every published FID) has it.
    """

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """``float32 [N, H, W, 3]`` in [-1, 1] (H, W = 299 for FID) -> pool features ``[N, 2048]``."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
        x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [N, 147, 147, 64]
        x = _max_pool_3x3_stride2(x)  # [N, 73, 73, 64]
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
        x = _max_pool_3x3_stride2(x)  # [N, 35, 35, 192]
        x = BlockA(32, name="Mixed_5b")(x)  # [N, 35, 35, 256]
        x = BlockA(64, name="Mixed_5c")(x)  # [N, 35, 35, 288]
        x = BlockA(64, name="Mixed_5d")(x)  # [N, 35, 35, 288]
        x = BlockB(name="Mixed_6a")(x)  # [N, 17, 17, 768]
        x = BlockC(128, name="Mixed_6b")(x)
        x = BlockC(160, name="Mixed_6c")(x)
        x = BlockC(160, name="Mixed_6d")(x)
        x = BlockC(192, name="Mixed_6e")(x)  # [N, 17, 17, 768]
        x = BlockD(name="Mixed_7a")(x)  # [N, 8, 8, 1280]
        x = BlockE("avg", name="Mixed_7b")(x)  # [N, 8, 8, 2048]
        x = BlockE("max", name="Mixed_7c")(x)  # [N, 8, 8, 2048]
        return jnp.mean(x, axis=(1, 2))  # [N, 2048]


# ----------------------------------------------------------------------------------- input resize


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of bilinear resampling along one axis, torch's way.

    ``F.interpolate(size=..., mode='bilinear', align_corners=False)`` maps output index ``d``
    to ``s = (d + 0.5) * scale - 0.5`` with ``scale = float32(in) / out``, the product taken in
    double precision and rounded to float32 (the rounding matters: float32 throughout moves
    pixels by up to 1e-5); ``s`` is clamped at 0 from below, and pixel ``floor(s)`` is blended
    with the next one (the last pixel repeats at the far edge) by ``s - floor(s)``. No
    anti-aliasing when shrinking.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return lo, hi, np.float32(1.0) - frac, frac


def bilinear_resize(x, size: int = INPUT_SIZE):
    """``[N, H, W, C]`` float -> ``[N, size, size, C]``, torch's bilinear resampling (see above).

    Gathers the four neighbours and blends them in torch's order (columns within each row
    first), instead of a resampling matmul, so the result does not depend on matmul precision
    and agrees with torch's to one float32 rounding. An input of the target size comes back
    unchanged.
    """
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    r_lo, r_hi, r_wlo, r_whi = _linear_taps(h, size)
    c_lo, c_hi, c_wlo, c_whi = _linear_taps(w, size)
    rows_lo, rows_hi = x[:, r_lo], x[:, r_hi]  # [N, size, W, C]
    c_wlo, c_whi = c_wlo[None, None, :, None], c_whi[None, None, :, None]
    top = c_wlo * rows_lo[:, :, c_lo] + c_whi * rows_lo[:, :, c_hi]  # [N, size, size, C]
    bottom = c_wlo * rows_hi[:, :, c_lo] + c_whi * rows_hi[:, :, c_hi]
    return r_wlo[None, :, None, None] * top + r_whi[None, :, None, None] * bottom


def _to_network_input(images_u8):
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 299, 299, 3]`` in [-1, 1], pytorch-fid's order:
    divide by 255, resize, then ``2x - 1``."""
    x = images_u8.astype(jnp.float32) / jnp.float32(255.0)
    return 2.0 * bilinear_resize(x) - 1.0


# ---------------------------------------------------------------------------------------- weights


class WeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are not where they were looked for."""


def _candidate_paths() -> list[str]:
    names = []
    for folder in (DEFAULT_DIR, TORCH_HUB_DIR):
        for name in (CONVERTED_FILE, WEIGHTS_FILE):
            names.append(os.path.expanduser(os.path.join(folder, name)))
    return names


def find_weights(path: str | None = None) -> str:
    """The weights file to use: ``path`` if given, else ``$SHORTCUT_JAX_FID_WEIGHTS``, else the
    first existing of ``~/.cache/shortcut_jax/pt_inception-2015-12-05-6726825d.{npz,pth}`` and
    torch hub's cache (``~/.cache/torch/hub/checkpoints/``, where pytorch-fid downloads to).

    Raises :class:`WeightsNotFoundError` naming the file, every place looked at, where the file
    comes from and how to convert it.
    """
    how = (
        f"The FID Inception weights are pytorch-fid's {WEIGHTS_FILE}, from {WEIGHTS_URL} . "
        f"Download it and either pass its path (eval.fid_weights in the run's config, "
        f"--fid_weights of shortcut_jax.evaluate, or --weights of shortcut_jax.evaluation.fid), "
        f"set ${WEIGHTS_ENV_VAR} to it, or put it (or the .npz that "
        f"'python -m shortcut_jax.evaluation.inception --convert {WEIGHTS_FILE} --out "
        f"{os.path.join(DEFAULT_DIR, CONVERTED_FILE)}' writes, which needs no torch to load) in "
        f"{DEFAULT_DIR}{os.sep}."
    )
    if path:
        full = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(full):
            raise WeightsNotFoundError(f"FID Inception weights not found at {full!r}. {how}")
        return full
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        full = os.path.expanduser(env)
        if not os.path.isfile(full):
            raise WeightsNotFoundError(f"${WEIGHTS_ENV_VAR}={env!r} but no file is there. {how}")
        return full
    candidates = _candidate_paths()
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise WeightsNotFoundError(
        f"FID Inception weights ({WEIGHTS_FILE} or its converted {CONVERTED_FILE}) not found; "
        f"looked at ${WEIGHTS_ENV_VAR} (unset) and {candidates}. {how}"
    )


@functools.lru_cache(maxsize=None)
def _variable_shapes() -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """Flattened ``{'params': {path: shape}, 'batch_stats': {path: shape}}`` of the network."""
    abstract = jax.eval_shape(
        FIDInceptionV3().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    )
    return {
        col: {
            path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
        }
        for col, tree in abstract.items()
    }


# Flax leaf (collection, last path element) <-> state-dict suffix. Convolution kernels go from
# torch's [out, in, kh, kw] to Flax's [kh, kw, in, out].
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Keys a state dict may hold that these features do not use: BatchNorm's update counter (absent
# in files saved before torch 0.4.1), and the 1008-way classifier on top of the pool features.
_OPTIONAL_TORCH = re.compile(r"(.+\.bn\.num_batches_tracked|fc\.weight|fc\.bias)")


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_LEAF_TO_TORCH[(collection, path[-1])],))


def _torch_shape(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return shape


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """``{state dict name: shape}`` of every tensor the network needs (no optional keys)."""
    return {
        _torch_name(col, path): _torch_shape(col, path, shape)
        for col, leaves in _variable_shapes().items()
        for path, shape in leaves.items()
    }


def _listed(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def torch_state_dict_to_variables(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's state dict (names as in its ``.pth``; numpy arrays or tensors) -> Flax
    ``{'params': ..., 'batch_stats': ...}`` in float32.

    Every key must be used: names the network does not have, or that it has but the dict lacks,
    are refused by name (a file of another Inception would otherwise load half its weights).
    BatchNorm's ``num_batches_tracked`` and the classifier ``fc.*`` are accepted and ignored.
    """
    expected = expected_torch_shapes()
    given = set(state_dict)
    missing = sorted(set(expected) - given)
    unexpected = sorted(k for k in given - set(expected) if not _OPTIONAL_TORCH.fullmatch(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_listed(unexpected)}")
        raise ValueError(
            "this state dict is not pytorch-fid's FID Inception-v3 ("
            + "; ".join(parts)
            + f"). Use {WEIGHTS_FILE} from {WEIGHTS_URL}."
        )
    variables: dict[str, Any] = {}
    for col, leaves in _variable_shapes().items():
        flat = {}
        for path, shape in leaves.items():
            name = _torch_name(col, path)
            value = np.asarray(_to_numpy(state_dict[name]), dtype=np.float32)
            if value.shape != expected[name]:
                raise ValueError(f"{name} has shape {value.shape}, the network needs {expected[name]}")
            flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
        variables[col] = flax.traverse_util.unflatten_dict(flat)
    return variables


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def synthetic_torch_state_dict(
    names_and_shapes: Sequence[tuple[str, Sequence[int]]], seed: int
) -> dict[str, np.ndarray]:
    """Random weights in pytorch-fid's layout, reproducible from ``(names, shapes, seed)`` alone.

    This is what parity is checked with: the reference network is built with these weights, its
    features are stored, and a test rebuilds the same weights from the stored names and seed,
    with no torch and no weights file. Each tensor draws from its own generator, seeded by
    ``(seed, crc32(name))``, so the order of the list does not matter. Scales keep activations of
    order one through all 94 layers: He-scaled kernels (std ``sqrt(2 / fan_in)``), BatchNorm
    gains near 1, small shifts, and running statistics of the size such layers have.
    """
    out = {}
    for name, shape in names_and_shapes:
        shape = tuple(int(s) for s in shape)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("num_batches_tracked"):
            value = np.zeros(shape, np.int64)
        elif name.endswith("conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif leaf == "running_mean":
            value = 0.2 * rng.standard_normal(shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "weight":  # BatchNorm gain
            value = rng.uniform(0.7, 1.3, shape)
        elif leaf == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:
            raise ValueError(f"no rule for {name!r}")
        out[name] = value if value.dtype == np.int64 else value.astype(np.float32)
    return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A ``.pth`` state dict as numpy arrays (needs torch; tensors only, nothing is executed)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path!r} needs torch. Install it, or convert the file once on a machine "
            f"that has it: python -m shortcut_jax.evaluation.inception --convert {path} --out "
            f"{os.path.join(DEFAULT_DIR, CONVERTED_FILE)}"
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return {k: _to_numpy(v) for k, v in state.items()}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def variables_fingerprint(variables) -> str:
    """16 hex digits of SHA-256 over the network id and every variable (path, shape, bytes):
    what statistics record, so that features of different weights are never compared."""
    digest = hashlib.sha256(NETWORK_ID.encode())
    for path, leaf in sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()):
        leaf = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(("/".join(path) + str(leaf.shape)).encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def save_variables(variables, path: str, *, source_sha256: str = "") -> None:
    """Writes converted variables as ``.npz`` (keys ``params/Mixed_5b/...``), atomically."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    arrays["__format__"] = np.asarray(_NPZ_FORMAT)
    arrays["__source_sha256__"] = np.asarray(source_sha256)
    files.atomic_savez(path, **arrays)


def _load_npz_variables(path: str) -> tuple[dict[str, Any], str]:
    with np.load(path) as f:
        files = set(f.files)
        if "__format__" not in files or str(f["__format__"]) != _NPZ_FORMAT:
            raise ValueError(
                f"{path!r} is not a converted FID Inception file (no {_NPZ_FORMAT!r} marker); "
                f"write one with python -m shortcut_jax.evaluation.inception --convert "
                f"{WEIGHTS_FILE} --out {path}"
            )
        source = str(f["__source_sha256__"]) if "__source_sha256__" in files else ""
        arrays = {k: f[k] for k in files if not k.startswith("__")}
    expected = {"/".join((col,) + p): s for col, leaves in _variable_shapes().items() for p, s in leaves.items()}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match the network: missing {_listed(missing)}; unexpected {_listed(unexpected)}"
        )
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ValueError(f"{path!r}: {key} has shape {arrays[key].shape}, the network needs {shape}")
    return flax.traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in arrays.items()}, sep="/"), source


def load_variables(path: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Variables of the FID Inception from ``path`` (``.pth`` or converted ``.npz``; see
    :func:`find_weights` for where they are looked for when ``path`` is None).

    Returns ``(variables, info)`` with ``info = {'path', 'source_sha256', 'fingerprint'}``.
    A ``.pth`` whose hash does not start with the released file's prefix is refused: FIDs from
    other weights are not comparable with anyone's.
    """
    full = find_weights(path)
    if full.endswith(".npz"):
        variables, source_sha = _load_npz_variables(full)
    else:
        source_sha = _sha256(full)
        _check_release_hash(full, source_sha)
        variables = torch_state_dict_to_variables(load_torch_state_dict(full))
    if source_sha and not source_sha.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(
            f"{full!r} was converted from a file whose SHA-256 is {source_sha[:16]}..., not "
            f"the released {WEIGHTS_FILE} ({WEIGHTS_SHA256_PREFIX}...). Convert the file from "
            f"{WEIGHTS_URL} ."
        )
    info = {"path": full, "source_sha256": source_sha, "fingerprint": variables_fingerprint(variables)}
    return variables, info


def _check_release_hash(path: str, sha: str) -> None:
    if not sha.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(
            f"{path!r} has SHA-256 {sha[:16]}..., not the released {WEIGHTS_FILE} "
            f"({WEIGHTS_SHA256_PREFIX}...): a partial download or other weights. Download it "
            f"again from {WEIGHTS_URL} ."
        )


# ------------------------------------------------------------------------------ feature extractor


class InceptionFeatures(ChunkedFeatures):
    """FID pool features: ``extractor(images) -> float32 [N, 2048]``, or for images already on the
    devices ``extractor.on_device(images, count)`` (quantised and checked there; only the
    features come to the host; see ``chunked_features``).

    ``images``: ``[N, H, W, 3]``, uint8 or float in [-1, 1] (quantised to uint8 first, see
    ``pixels.to_uint8``), any H and W. Images go through in chunks of ``batch_size`` (the
    last chunk zero-padded), split over ``devices`` (default: this process's devices; the chunk
    is rounded up to a multiple of their number). The network is compiled once for all input
    sizes: only the resize step is compiled per (H, W).

    All convolutions run at full float32 precision (``Precision.HIGHEST`` and float32 default
    matmul precision): TF32, the default on recent NVIDIA GPUs, moves FIDs by more than the
    differences between models that papers report.
    """

    def __init__(
        self,
        variables=None,
        *,
        weights_path: str | None = None,
        batch_size: int = 200,
        devices: Sequence[Any] | None = None,
    ):
        if variables is not None and weights_path is not None:
            raise ValueError("give variables or weights_path, not both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if variables is None:
            variables, self.info = load_variables(weights_path)
        else:
            self.info = {"path": "", "source_sha256": "", "fingerprint": variables_fingerprint(variables)}
        self.fingerprint = self.info["fingerprint"]
        model = FIDInceptionV3()
        super().__init__(
            _to_network_input,
            lambda v, x: model.apply(v, x),
            variables,
            dim=FEATURE_DIM,
            batch_size=batch_size,
            devices=devices,
        )

    @property
    def extractor_id(self) -> str:
        return f"{NETWORK_ID}:{self.fingerprint}"


# ------------------------------------------------------------------------------------ conversion


def convert(pth_path: str, out_path: str) -> dict[str, str]:
    """pytorch-fid's ``.pth`` -> converted ``.npz`` that loads without torch."""
    if not os.path.isfile(pth_path):
        raise WeightsNotFoundError(f"{pth_path!r} does not exist; download {WEIGHTS_URL}")
    sha = _sha256(pth_path)
    _check_release_hash(pth_path, sha)
    variables = torch_state_dict_to_variables(load_torch_state_dict(pth_path))
    save_variables(variables, out_path, source_sha256=sha)
    return {"path": out_path, "source_sha256": sha, "fingerprint": variables_fingerprint(variables)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shortcut_jax.evaluation.inception",
        description=f"Convert pytorch-fid's {WEIGHTS_FILE} to a .npz that loads without torch.",
    )
    parser.add_argument("--convert", required=True, metavar="IN.pth", help=f"the .pth from {WEIGHTS_URL}")
    parser.add_argument(
        "--out",
        default=os.path.join(DEFAULT_DIR, CONVERTED_FILE),
        metavar="OUT.npz",
        help="where to write (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    info = convert(os.path.expanduser(args.convert), os.path.expanduser(args.out))
    print(f"wrote {info['path']} (fingerprint {info['fingerprint']}, source sha256 {info['source_sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
