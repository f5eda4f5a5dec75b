"""Pre-encode an image set into VAE posterior moments: ``python -m shortcut_jax.encode``.

    python -m shortcut_jax.encode --source=/data/celebahq256 --out=/data/celebahq256_latents \\
        --vae=/models/sd-vae-ft-mse --image_size=256 --batch_size=128

reads the images through ``data.image_source`` (``--source_type``: ``image_folder``, the default,
class sub-folders or a flat folder; or ``tfds``, ``--source=celeb_a_hq/256 --split=train
--data_dir=...``, a data set TFDS prepared in ArrayRecord), centre-crops and resizes each to ``--image_size`` (see
``image_source`` for the convention), encodes it **and its horizontal mirror** with the VAE, and
writes the posterior mean and standard deviation of both with the labels, in shards of
``--shard_size`` examples, plus ``manifest.json`` (the format is described in ``data.latents``;
train on it with ``data.name='latents'``, ``data.path=<--out>``).

- All local devices: the batch (``--batch_size``, a multiple of the local device count) is split
  over a 1-D mesh, parameters replicated; one compilation.
- Resumable: each shard is written under a temporary name and renamed when complete, so a
  killed run leaves only whole shards; run the same command again and it encodes the shards
  that are missing (or damaged) and nothing else. Shards do not depend on which run wrote them:
  a resumed encode gives the same files as an unbroken one. ``--max_shards`` stops after that many
  new shards (to split the work between sessions).
- Checked: the manifest records the source's fingerprint, the VAE's weight hash and every
  setting that shapes the files; a folder written with other settings is refused before anything
  is computed. At the end every shard is checked and the example count compared with the
  source's, and only then is the manifest marked complete.
- ``--vae`` is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
  or a hub id (needs ``huggingface_hub`` and a connection); ``--compute_dtype=bfloat16`` runs the
  network in bf16 (statistics and posterior in float32); ``--dtype=float16`` halves the files
  (ImageNet at 256: 1.28M x 64 KiB = 84 GB in float32).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
from typing import Any

import numpy as np

from shortcut_jax.data import latents as latent_format
from shortcut_jax.data.image_source import IMAGE_SOURCES, ImageBatches
from shortcut_jax.infra import files

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16")
# Manifest entries that must agree for a resumed encode to add to the shards already written.
PLAN_KEYS = (
    "count",
    "num_classes",
    "image_size",
    "latent_shape",
    "dtype",
    "compute_dtype",
    "shard_size",
    "num_shards",
    "scaling_factor",
    "shift_factor",
)


class EncodeError(ValueError):
    """Settings or an output folder the encoder refuses, with what to change."""


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    image_size: int = 256
    batch_size: int = 64  # global, over the local devices
    shard_size: int = 4096
    dtype: str = "float32"  # storage dtype of the moments
    compute_dtype: str = "float32"


def check_settings(settings: EncodeSettings, vae_config, num_devices: int) -> None:
    s = settings
    if s.image_size <= 0 or s.image_size % vae_config.downsample_factor:
        raise EncodeError(
            f"--image_size={s.image_size} must be a positive multiple of the VAE's downsampling "
            f"factor {vae_config.downsample_factor}"
        )
    if s.batch_size <= 0 or s.batch_size % num_devices:
        raise EncodeError(
            f"--batch_size={s.batch_size} must be a positive multiple of the {num_devices} local "
            f"devices (e.g. {num_devices * max(1, s.batch_size // num_devices)})"
        )
    if s.shard_size <= 0:
        raise EncodeError(f"--shard_size must be > 0, got {s.shard_size}")
    if s.dtype not in latent_format.STORAGE_DTYPES:
        raise EncodeError(f"--dtype={s.dtype!r} must be one of {latent_format.STORAGE_DTYPES}")
    if s.compute_dtype not in COMPUTE_DTYPES:
        raise EncodeError(f"--compute_dtype={s.compute_dtype!r} must be one of {COMPUTE_DTYPES}")


def plan(source: ImageBatches, vae, settings: EncodeSettings) -> dict[str, Any]:
    """The manifest of the finished set, without ``complete``."""
    count = source.num_examples
    num_shards = -(-count // settings.shard_size)
    shards = [
        {
            "index": s,
            "start": s * settings.shard_size,
            "count": min(settings.shard_size, count - s * settings.shard_size),
        }
        for s in range(num_shards)
    ]
    return {
        "format": latent_format.FORMAT,
        "version": latent_format.FORMAT_VERSION,
        "source": source.describe(),
        "count": count,
        "num_classes": source.num_classes,
        "image_size": settings.image_size,
        "vae": vae.describe(),
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
        "latent_shape": list(vae.config.latent_shape(settings.image_size)),
        "dtype": settings.dtype,
        "compute_dtype": settings.compute_dtype,
        "layout": {"moments": latent_format.MOMENTS_LAYOUT, "labels": "[n] int32"},
        "shard_size": settings.shard_size,
        "num_shards": num_shards,
        "shards": shards,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in PLAN_KEYS if old.get(key) != new.get(key)]
    for section, key in (("source", "type"), ("source", "fingerprint"), ("vae", "weights_sha256"), ("vae", "config")):
        before, after = old.get(section, {}).get(key), new[section].get(key)
        if before != after:
            diffs.append(f"{section}.{key}: {before!r} -> {after!r}")
    return diffs


def _write_json(path: str, value: dict[str, Any]) -> None:
    files.atomic_write_text(path, json.dumps(value, indent=2))


def prepare_out_dir(out_dir: str, planned: dict[str, Any]) -> dict[str, Any] | None:
    """Creates ``out_dir`` or checks that it holds an encode of the same plan (returning its
    manifest); removes the temporary files a killed run left. Raises EncodeError before
    touching anything else."""
    manifest_path = os.path.join(out_dir, latent_format.MANIFEST)
    existing = None
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                existing = json.load(f)
        except (json.JSONDecodeError, OSError) as error:
            raise EncodeError(
                f"--out={out_dir!r} has an unreadable {latent_format.MANIFEST} ({error}); "
                "delete the folder or choose another --out"
            ) from error
        diffs = _differences(existing, planned)
        if existing.get("format") != latent_format.FORMAT or diffs:
            raise EncodeError(
                f"--out={out_dir!r} holds latents encoded with other settings ({'; '.join(diffs)}); "
                "choose another --out, or delete that folder to encode again"
            )
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise EncodeError(
            f"--out={out_dir!r} is a folder that holds other files and no {latent_format.MANIFEST}; "
            "choose an empty or new folder"
        )
    os.makedirs(out_dir, exist_ok=True)
    # the temporary files of a killed run (and the unhidden names earlier versions wrote)
    for pattern in (files.partial_name("shard_*.npy"), "shard_*.npy.tmp"):
        for stray in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(stray)
    return existing


def shard_is_done(out_dir: str, planned: dict[str, Any], shard: dict[str, Any]) -> bool:
    moments_path, labels_path = latent_format.shard_paths(out_dir, shard["index"])
    shape = latent_format.moments_shape(planned, shard["count"])
    return (
        latent_format.shard_problem(moments_path, shape, np.dtype(planned["dtype"])) is None
        and latent_format.shard_problem(labels_path, (shard["count"],), np.dtype(np.int32)) is None
    )


def make_encoder(vae, compute_dtype: str, devices):
    """jit(params, uint8 [B, S, S, 3]) -> float32 [B, 2 (image, mirror), 2 (mean, std), h, w, c],
    the batch split over ``devices`` (a 1-D mesh), parameters replicated. Returns
    (function, params placed on the mesh, batch sharding)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from shortcut_jax.models.vae import AutoencoderKL

    module = vae.module(jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32)
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def encode_with_mirror(params, pixels):
        b, height, width, channels = pixels.shape
        images = pixels.astype(jnp.float32) / 127.5 - 1.0  # as data.core.uint8_to_float
        # [B, 2, S, S, 3] -> [2B, ...]: an image and its mirror side by side, so the reshape keeps
        # each device's rows on that device
        pairs = jnp.stack([images, images[:, :, ::-1]], axis=1).reshape(2 * b, height, width, channels)
        mean, std = module.apply({"params": params}, pairs, method=AutoencoderKL.encode)
        moments = jnp.stack([mean, std], axis=1)  # [2B, 2, h, w, c]
        return moments.reshape(b, 2, *moments.shape[1:])

    encode = jax.jit(encode_with_mirror, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
    params = jax.device_put(vae.params, replicated)
    return encode, params, batch_sharding


def _write_shard(
    out_dir: str,
    planned: dict[str, Any],
    shard: dict[str, Any],
    source: ImageBatches,
    encode,
    params,
    batch_sharding,
    batch_size: int,
    progress_bar,
) -> None:
    import jax

    moments_path, labels_path = latent_format.shard_paths(out_dir, shard["index"])
    start, count = shard["start"], shard["count"]
    dtype = np.dtype(planned["dtype"])
    moments_file, labels_file = files.AtomicFile(moments_path), files.AtomicFile(labels_path)
    moments = np.lib.format.open_memmap(
        moments_file.partial, mode="w+", dtype=dtype, shape=latent_format.moments_shape(planned, count)
    )
    labels = np.empty(count, dtype=np.int32)
    image_shape = (planned["image_size"], planned["image_size"], 3)

    def fetch(job):
        row, n, result = job
        moments[row : row + n] = np.asarray(result)[:n].astype(dtype)  # noqa: F821 - deleted after the loop
        progress_bar.update(n)

    row, in_flight = 0, None
    for pixels, batch_labels in source.batches(start, start + count, batch_size):
        n = len(pixels)
        if pixels.shape[1:] != image_shape or pixels.dtype != np.uint8:
            raise EncodeError(
                f"the source gave {pixels.dtype} images of shape {pixels.shape[1:]}, expected uint8 {image_shape}"
            )
        padded = np.zeros((batch_size, *image_shape), np.uint8)  # one shape, one compilation
        padded[:n] = pixels
        result = encode(params, jax.device_put(padded, batch_sharding))  # runs while the next batch decodes
        labels[row : row + n] = batch_labels
        if in_flight is not None:
            fetch(in_flight)
        in_flight, row = (row, n, result), row + n
    if in_flight is not None:
        fetch(in_flight)
    if row != count:
        raise EncodeError(f"the source gave {row} images for examples [{start}, {start + count}), expected {count}")
    moments.flush()
    del moments
    with open(labels_file.partial, "wb") as f:
        np.save(f, labels)
    moments_file.commit()
    labels_file.commit()


def encode_images(
    source: ImageBatches,
    out_dir: str,
    vae,
    settings: EncodeSettings,
    *,
    max_shards: int | None = None,
    progress: bool = True,
    devices=None,
) -> dict[str, Any]:
    """Encodes every missing shard of ``source`` into ``out_dir``; returns the manifest
    (``complete`` once every shard is there and counted)."""
    import jax
    from tqdm import tqdm

    devices = list(devices if devices is not None else jax.local_devices())
    check_settings(settings, vae.config, len(devices))
    if source.image_size != settings.image_size:
        raise EncodeError(
            f"the source gives {source.image_size}x{source.image_size} images but image_size={settings.image_size}"
        )
    planned = plan(source, vae, settings)
    existing = prepare_out_dir(out_dir, planned)
    todo = [s for s in planned["shards"] if not shard_is_done(out_dir, planned, s)]
    if existing is not None and existing.get("complete") and not todo:
        log.info("%s already holds all %d examples", out_dir, existing["count"])
        return existing
    _write_json(os.path.join(out_dir, latent_format.MANIFEST), {**planned, "complete": False})
    done_examples = planned["count"] - sum(s["count"] for s in todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    log.info(
        "%s: %d of %d shards to encode (%d of %d examples done)",
        out_dir,
        len(todo),
        planned["num_shards"],
        done_examples,
        planned["count"],
    )
    if todo:
        encode, params, batch_sharding = make_encoder(vae, settings.compute_dtype, devices)
        start = time.perf_counter()
        with tqdm(
            total=planned["count"],
            initial=done_examples,
            unit="img",
            disable=not progress,
            desc="encoding",
            smoothing=0.1,
        ) as bar:
            for shard in todo:
                _write_shard(out_dir, planned, shard, source, encode, params, batch_sharding, settings.batch_size, bar)
        encoded = sum(s["count"] for s in todo)
        log.info("encoded %d images (and their mirrors) in %.1f s", encoded, time.perf_counter() - start)
    missing = [s["index"] for s in planned["shards"] if not shard_is_done(out_dir, planned, s)]
    if missing:
        if max_shards is None:
            raise EncodeError(f"shards {missing[:10]} of {out_dir} are missing after encoding; run again")
        return {**planned, "complete": False}
    total = sum(
        len(np.load(latent_format.shard_paths(out_dir, s["index"])[1], mmap_mode="r")) for s in planned["shards"]
    )
    if total != source.num_examples:
        raise EncodeError(
            f"{out_dir} holds {total} examples but the source has {source.num_examples}; "
            "delete the folder and encode again"
        )
    manifest = {**planned, "complete": True}
    _write_json(os.path.join(out_dir, latent_format.MANIFEST), manifest)
    return manifest


def main(argv) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from shortcut_jax.models.vae_weights import load_vae

    if FLAGS.source_type not in IMAGE_SOURCES:
        raise SystemExit(f"--source_type={FLAGS.source_type!r} is unknown; use one of {sorted(IMAGE_SOURCES)}")
    settings = EncodeSettings(
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        shard_size=FLAGS.shard_size,
        dtype=FLAGS.dtype,
        compute_dtype=FLAGS.compute_dtype,
    )
    vae = load_vae(FLAGS.vae)
    import jax

    check_settings(settings, vae.config, jax.local_device_count())
    options = {}
    if FLAGS.source_type == "tfds":
        options = {"split": FLAGS.split, "data_dir": FLAGS.data_dir}
    elif FLAGS.split != "train" or FLAGS.data_dir:
        raise SystemExit(
            f"--split and --data_dir are for --source_type=tfds; leave them out for --source_type={FLAGS.source_type}"
        )
    source = IMAGE_SOURCES[FLAGS.source_type](FLAGS.source, FLAGS.image_size, FLAGS.num_workers, **options)
    try:
        manifest = encode_images(source, FLAGS.out, vae, settings, max_shards=FLAGS.max_shards)
    finally:
        source.close()
    state = "complete" if manifest["complete"] else "incomplete (run again to continue)"
    print(f"{FLAGS.out}: {manifest['count']} examples, latents {manifest['latent_shape']}, {state}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "source",
        None,
        "Images: a folder (--source_type=image_folder) or a TFDS name (--source_type=tfds, e.g. celeb_a_hq/256).",
    )
    flags.DEFINE_string("source_type", "image_folder", f"One of {sorted(IMAGE_SOURCES)}.")
    flags.DEFINE_string("split", "train", "TFDS split (--source_type=tfds).")
    flags.DEFINE_string("data_dir", "", "TFDS data folder (--source_type=tfds); '' is TFDS's default.")
    flags.DEFINE_string("out", None, "Output folder (created; an unfinished one is continued).")
    flags.DEFINE_string("vae", "stabilityai/sd-vae-ft-mse", "diffusers VAE folder or hub id.")
    flags.DEFINE_integer("image_size", 256, "Centre-crop and resize every image to this square size.")
    flags.DEFINE_integer("batch_size", 64, "Images per step over all local devices (a multiple of their count).")
    flags.DEFINE_integer("shard_size", 4096, "Examples per shard file.")
    flags.DEFINE_enum("dtype", "float32", list(latent_format.STORAGE_DTYPES), "Storage dtype of the moments.")
    flags.DEFINE_enum("compute_dtype", "float32", list(COMPUTE_DTYPES), "The VAE's compute dtype.")
    flags.DEFINE_integer("num_workers", 8, "Image decoding threads (TFDS: worker processes).")
    flags.DEFINE_integer("max_shards", None, "Stop after encoding this many new shards.")
    flags.mark_flags_as_required(["source", "out"])


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    _define_flags()

    cli.run(main)
