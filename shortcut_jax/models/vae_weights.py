"""Weights for ``models.vae``: diffusers' PyTorch state dicts in, Flax parameters out.

Naming
------
Every Flax parameter path names its PyTorch state-dict key: module names ``down_blocks_0_resnets_1``
and ``mid_block/attentions_0`` stand for ``down_blocks.0.resnets.1`` and
``mid_block.attentions.0``; the attention output projection ``to_out`` is ``to_out.0``; ``kernel``
(convolutions, linear maps) and ``scale`` (GroupNorm) are ``weight``. Convolution weights are
transposed from PyTorch's [out, in, kh, kw] to [kh, kw, in, out], linear weights from [out, in]
to [in, out].

State dicts written before diffusers 0.14 name the mid blocks' attention ``query``, ``key``,
``value`` and ``proj_attn`` (some as 1x1 convolutions); they are renamed to ``to_q``, ``to_k``,
``to_v``, ``to_out.0`` before conversion, as diffusers itself does when it loads them.

``convert_state_dict`` consumes every key or raises, naming the keys the network needs that are
absent, the keys that nothing in the network reads, and any shape that does not match.

Files
-----
``load_vae(source)`` reads a diffusers model folder (``config.json`` plus
``diffusion_pytorch_model.safetensors``, read through safetensors' numpy API, or
``diffusion_pytorch_model.bin`` through torch when it is installed), the ``vae/`` sub-folder of a
pipeline folder, or a hub id such as ``stabilityai/sd-vae-ft-mse`` through ``huggingface_hub``
when the machine is online.

Seeded weights
--------------
``seeded_state_dict(names_and_shapes, seed)`` draws a full state dict from numpy alone by a fixed
rule (below), so a test can rebuild exactly the weights a reference implementation was run with
from the list of names and shapes and the seed, without the weights being stored or torch
installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.models.convert import flatten, unflatten
from shortcut_jax.models.vae import AutoencoderKL, VAEConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
SD_VAE_HUB_ID = "stabilityai/sd-vae-ft-mse"
# Keys listed in full in an error; the rest are counted.
MAX_LISTED = 20

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightsError(ValueError):
    """Weights that cannot be loaded into the network, with what to do about it."""


def download_hint(folder: str) -> str:
    return (
        f"get the weights with `huggingface-cli download {SD_VAE_HUB_ID} --local-dir {folder}` "
        f"(or pass the hub id {SD_VAE_HUB_ID!r} on a machine that is online)"
    )


# --- names -------------------------------------------------------------------------------------


def _torch_module_name(flax_name: str) -> str:
    """``down_blocks_0_resnets_1`` -> ``down_blocks.0.resnets.1``; ``to_out`` -> ``to_out.0``."""
    if flax_name == "to_out":
        return "to_out.0"
    return re.sub(r"_(\d+)(_|$)", lambda m: "." + m[1] + ("." if m[2] else ""), flax_name)


def torch_name(path: tuple[str, ...]) -> str:
    """The state-dict key of the Flax parameter at ``path``."""
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([_torch_module_name(m) for m in modules] + [leaf])


def flax_param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path of the network with its shape (traced, nothing is computed)."""
    side = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)
    return {path: tuple(leaf.shape) for path, leaf in flatten(shapes["params"]).items()}


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(flax_shape) == 4:  # [kh, kw, in, out] <- [out, in, kh, kw]
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if path[-1] == "kernel" and len(flax_shape) == 2:  # [in, out] <- [out, in]
        return flax_shape[::-1]
    return flax_shape


def expected_state_dict(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> PyTorch shape for every parameter the network needs."""
    return {torch_name(path): _torch_shape(path, shape) for path, shape in flax_param_shapes(config).items()}


def rename_legacy_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames ``...attentions.0.query.weight`` and friends to the current names."""
    renamed = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if (
            len(parts) >= 3
            and parts[-3].isdigit()
            and parts[-4:-3] == ["attentions"]
            and parts[-2] in _LEGACY_ATTENTION
        ):
            name = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        renamed[name] = value
    return renamed


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def convert_state_dict(state_dict: Mapping[str, Any], config: VAEConfig) -> dict:
    """diffusers state dict (name -> array, numpy or anything ``np.asarray`` reads) -> Flax params.

    Every key must be used and every parameter found; otherwise WeightsError lists the missing
    keys, the unexpected keys and the shape mismatches, by name. Values become float32.
    """
    state_dict = rename_legacy_attention(state_dict)
    flax_shapes = flax_param_shapes(config)
    by_name = {torch_name(path): path for path in flax_shapes}
    missing = sorted(set(by_name) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_name))
    params, mismatched = {}, []
    for name, path in by_name.items():
        if name not in state_dict:
            continue
        value = np.asarray(state_dict[name], dtype=np.float32)
        want = _torch_shape(path, flax_shapes[path])
        if value.shape != want and value.ndim == 4 and len(want) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a linear map stored as a 1x1 convolution (old checkpoints)
        if value.shape != want:
            mismatched.append(f"{name}: {value.shape}, expected {want}")
            continue
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        params[path] = value
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (the network needs them): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (nothing reads them): {_listed(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape: {_listed(mismatched)}")
    if problems:
        raise WeightsError(
            "the state dict does not match the VAE config: "
            + "; ".join(problems)
            + ". Check that config.json and the weights file come from the same model."
        )
    return unflatten(params)


# --- seeded weights ----------------------------------------------------------------------------


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """Tensor ``index`` of a seeded state dict, from ``np.random.default_rng([seed, index])``.

    The rule keeps activations of order one through any depth: GroupNorm weights ``1 + 0.1 z``,
    biases ``0.05 z``, convolution and linear weights ``z / sqrt(fan_in)`` (fan-in = in channels
    x kernel area), with z standard normal, float32.
    """
    z = np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        is_norm = name.endswith(".weight")
        return (np.float32(1.0) + np.float32(0.1) * z) if is_norm else np.float32(0.05) * z
    fan_in = int(np.prod(shape[1:]))
    return z / np.float32(np.sqrt(fan_in))


def seeded_state_dict(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    """A full state dict by ``seeded_tensor``, tensor i drawn from ``default_rng([seed, i])``."""
    return {
        name: seeded_tensor(name, tuple(int(d) for d in shape), seed, i)
        for i, (name, shape) in enumerate(names_and_shapes)
    }


def seeded_params(config: VAEConfig, seed: int) -> dict:
    """Flax parameters from the seeded rule over the keys in sorted order (for tests and
    benchmarks that need a VAE with fixed weights and no download)."""
    return convert_state_dict(seeded_state_dict(sorted(expected_state_dict(config).items()), seed), config)


# --- files -------------------------------------------------------------------------------------


def write_diffusers_folder(folder: str, config: VAEConfig, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` as a download has them."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, os.path.join(folder, SAFETENSORS_FILE))


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        if "bf16" in str(error).lower() or "bfloat16" in str(error).lower():
            try:
                import torch  # noqa: F401 - numpy cannot hold bfloat16; torch can
                from safetensors.torch import load_file as load_torch
            except ImportError:
                raise WeightsError(
                    f"{path} holds bfloat16 tensors, which need torch to read; install torch or use the float32 file"
                ) from error
            return {k: v.float().numpy() for k, v in load_torch(path).items()}
        raise WeightsError(
            f"cannot read {path} ({type(error).__name__}: {error}); the file is incomplete or "
            f"damaged: delete it and {download_hint(os.path.dirname(path))}"
        ) from error


def _read_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise WeightsError(
            f"{path} is a PyTorch pickle, which needs torch to read; install torch, or "
            f"{download_hint(os.path.dirname(path))} to get the .safetensors file"
        ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many error types for a broken file
        raise WeightsError(
            f"cannot read {path} ({type(error).__name__}: {error}); delete it and "
            f"{download_hint(os.path.dirname(path))}"
        ) from error
    return {k: v.float().numpy() for k, v in state.items()}


def model_folder(folder: str) -> str:
    """``folder`` itself, or its ``vae/`` sub-folder when it is a whole pipeline's folder."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isfile(
        os.path.join(folder, "vae", CONFIG_FILE)
    ):
        return os.path.join(folder, "vae")
    return folder


def weights_file(folder: str) -> str:
    """The weights file a folder holds, or WeightsError naming the folder and the fix."""
    for name in (SAFETENSORS_FILE, BIN_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise WeightsError(
        f"no VAE weights in {folder} (looked for {SAFETENSORS_FILE} and {BIN_FILE}; "
        f"found {present[:10]}); {download_hint(folder)}"
    )


@dataclasses.dataclass(frozen=True)
class LoadedVAE:
    """A VAE ready to run: its config, float32 params and where they came from."""

    config: VAEConfig
    params: dict
    name: str  # hub id, or the folder's name
    folder: str
    weights_path: str
    weights_sha256: str

    def module(self, dtype=jnp.float32) -> AutoencoderKL:
        return AutoencoderKL(self.config, dtype=dtype)

    def latent_decoder(self, dtype=jnp.bfloat16, batch_size: int = 32):
        """A function: scaled latents ``[N, h, w, c]`` (the space a model trains in) -> images
        ``[N, H, W, 3]`` float32 clipped to [-1, 1]. bf16 by default: on a GPU, float32
        convolutions at full precision are about 15x slower and need far more scratch memory
        (benchmarks/vae_speed.py).

        Host latents (numpy) give host images, decoded in batches of ``batch_size``, the last
        padded, so it compiles once. Latents on the devices (a sampler's output: a ``jax.Array``
        sharded over the batch) give device images sharded the same way, so that a metric can
        score them where they are: every device decodes its own rows, ``batch_size`` at a time,
        with the weights replicated to it once per mesh; nothing crosses devices.
        """
        from shortcut_jax.models.vae import unscale_latents

        module, config = self.module(dtype), self.config

        def decode_batch(params, scaled):
            images = module.apply({"params": params}, unscale_latents(scaled, config), method=AutoencoderKL.decode)
            return jnp.clip(images, -1.0, 1.0)

        decode = jax.jit(decode_batch)
        on_devices = _DeviceDecoder(decode_batch, self.params, batch_size)

        def run(latents):
            if isinstance(latents, jax.Array):
                return on_devices(latents)
            latents = np.asarray(latents, np.float32)
            out = []
            for start in range(0, len(latents), batch_size):
                chunk = latents[start : start + batch_size]
                padded = np.zeros((batch_size, *latents.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                out.append(np.asarray(decode(self.params, padded))[: len(chunk)])
            side = latents.shape[1] * config.downsample_factor
            return np.concatenate(out) if out else np.zeros((0, side, side, config.out_channels), np.float32)

        return run

    def describe(self) -> dict[str, Any]:
        """What a latent set records about the VAE that made it."""
        return {
            "name": self.name,
            "folder": os.path.abspath(self.folder),
            "weights_file": os.path.basename(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "config": self.config.to_diffusers(),
        }


class _DeviceDecoder:
    """Decodes a device array of latents where it lies: ``shard_map`` over the mesh of its
    sharding, each device running ``decode_batch`` over its own rows in chunks of
    ``batch_size`` (``lax.map``; the last chunk zero-padded), so the images come out sharded
    like the latents. An array on one device, or one whose batch is not split, is decoded the
    same way on a mesh of its devices with the rows unsplit.
    """

    def __init__(self, decode_batch, params, batch_size: int):
        self.decode_batch = decode_batch
        self.params = params
        self.batch_size = int(batch_size)
        self._programs: dict = {}  # (mesh, batch spec) -> (jitted program, params on that mesh)

    def _local_decode(self, params, latents):
        """One device's rows ``[L, h, w, c]`` -> ``[L, H, W, 3]``, ``batch_size`` rows at a time."""
        rows = latents.shape[0]
        b = min(self.batch_size, rows)  # a device holding fewer rows decodes them in one call
        num_chunks = -(-rows // b)
        padded = jnp.pad(latents, ((0, num_chunks * b - rows),) + ((0, 0),) * (latents.ndim - 1))
        chunks = padded.reshape(num_chunks, b, *latents.shape[1:])  # [k, b, h, w, c]
        images = jax.lax.map(lambda chunk: self.decode_batch(params, chunk), chunks)  # [k, b, H, W, 3]
        return images.reshape(num_chunks * b, *images.shape[2:])[:rows]

    def _program(self, sharding):
        from jax.sharding import NamedSharding, PartitionSpec

        if isinstance(sharding, NamedSharding):
            mesh, batch_axes = sharding.mesh, (tuple(sharding.spec) or (None,))[0]
        else:  # one device, or a sharding without a mesh: decode the rows unsplit on its devices
            mesh, batch_axes = jax.sharding.Mesh(np.asarray(list(sharding.device_set)), ("rows",)), None
        key = (mesh, batch_axes)
        if key not in self._programs:
            spec = PartitionSpec(batch_axes)
            program = jax.jit(
                jax.shard_map(self._local_decode, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec),
                out_shardings=NamedSharding(mesh, spec),
            )
            params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
            self._programs[key] = (program, params)
        return self._programs[key]

    def __call__(self, latents):
        if isinstance(latents, jax.core.Tracer):  # shapes only (jax.eval_shape): no sharding to follow
            return self.decode_batch(self.params, latents)
        program, params = self._program(latents.sharding)
        return program(params, jnp.asarray(latents, jnp.float32))


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not os.path.exists(source)


def _download(repo_id: str) -> str:
    try:
        import huggingface_hub
    except ImportError as error:
        raise WeightsError(
            f"{repo_id!r} is not a folder here, and loading it from the hub needs "
            "huggingface_hub (pip install huggingface_hub); or "
            f"{download_hint('DIR')} and pass DIR"
        ) from error
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE])
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, ... all end the same way
        raise WeightsError(
            f"cannot fetch {repo_id!r} from the hub ({type(error).__name__}: {error}); on a "
            f"machine that is online, {download_hint('DIR')} and pass DIR"
        ) from error


def load_vae(source: str) -> LoadedVAE:
    """A diffusers AutoencoderKL from a folder (or a pipeline folder's ``vae/``) or a hub id."""
    if os.path.isdir(source):
        folder, name = model_folder(source), os.path.basename(os.path.normpath(source))
    elif _looks_like_hub_id(source):
        folder, name = _download(source), source
    else:
        raise WeightsError(f"VAE {source!r} is neither a folder nor a hub id (owner/name); {download_hint(source)}")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise WeightsError(f"no {CONFIG_FILE} in {folder}; {download_hint(folder)}")
    try:
        with open(config_path) as f:
            config = VAEConfig.from_diffusers(json.load(f))
    except json.JSONDecodeError as error:
        raise WeightsError(f"{config_path} is not valid JSON ({error}); {download_hint(folder)}") from error
    path = weights_file(folder)
    state_dict = _read_safetensors(path) if path.endswith(".safetensors") else _read_bin(path)
    try:
        params = convert_state_dict(state_dict, config)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error} If the download was interrupted, {download_hint(folder)}") from error
    return LoadedVAE(config, params, name, folder, path, file_sha256(path))
