"""Speed of the latent pipeline: the VAE encoder (and decoder) at 256x256, the latent reader.

    python -m benchmarks.vae_speed --sections=encoder,decoder --batch_size=64
    python -m benchmarks.vae_speed --sections=reader --reader_examples=1281167 \\
        --reader_dir=/scratch/synthetic_latents --reader_dtype=float16

encoder: ``shortcut_jax.encode``'s jitted function (every image and its mirror, batch split over
all local devices) on random uint8 images, float32 and bfloat16 compute; images/s counts source
images (the VAE runs on twice as many). decoder: latents -> images, the evaluation's direction.
Both use the sd-vae-ft-mse network with seeded weights (speed does not depend on the values;
``--vae=DIR`` loads real ones), ``--tiny`` a small VAE for a quick check. Timing: one compiled
warm-up call, then ``--num_batches`` calls, each waited for; ``temp_gib`` is the compiler's
figure for the program's scratch memory.

reader: writes a synthetic latent set of ``--reader_examples`` examples of 32x32x4 moments (once;
kept in ``--reader_dir`` and reused when its manifest matches), then reads ``--reader_batches``
batches of ``--batch_size`` through ``data.name='latents'`` with shuffling and flips, and prints
latents/s and the process's resident memory (VmRSS, split into anonymous and file-backed pages,
and its peak VmHWM) before and after. Pages that are not in the page cache come from disk: a
first pass over a set larger than memory measures the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

SD_SIZE = 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="encoder,decoder,reader")
    parser.add_argument("--batch_size", type=int, default=64, help="images (encoder/decoder) or latents (reader)")
    parser.add_argument("--decoder_batch_size", type=int, default=0, help="0: --batch_size")
    parser.add_argument("--num_batches", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=SD_SIZE)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to time")
    parser.add_argument("--vae", default="", help="diffusers VAE folder; default: sd-vae-ft-mse with seeded weights")
    parser.add_argument("--tiny", action="store_true", help="a small VAE (quick check on CPU)")
    parser.add_argument("--reader_examples", type=int, default=65_536)
    parser.add_argument("--reader_dir", default="", help="where the synthetic set is written (default: a temp dir)")
    parser.add_argument("--reader_dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--reader_batches", type=int, default=200)
    parser.add_argument("--reader_shard_size", type=int, default=10_000)
    parser.add_argument("--latent_side", type=int, default=32)
    return parser.parse_args(argv)


def memory() -> dict[str, float]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM in MiB (Linux)."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def _vae(args):
    from shortcut_jax.models import vae_weights
    from shortcut_jax.models.vae import VAEConfig

    if args.vae:
        return vae_weights.load_vae(args.vae)
    config = VAEConfig.tiny() if args.tiny else VAEConfig.sd_vae_ft_mse()
    return vae_weights.LoadedVAE(config, vae_weights.seeded_params(config, 0), "seeded", "", "", "")


def _compile_and_time(jitted, arguments, num_batches: int) -> dict[str, float]:
    """Compiles once (ahead of time, for the compiler's memory figure), then times one warm-up
    call and ``num_batches`` calls, each waited for."""
    import jax

    start = time.perf_counter()
    compiled = jitted.lower(*arguments).compile()
    compile_s = time.perf_counter() - start
    memory_stats = compiled.memory_analysis()
    temp_gib = getattr(memory_stats, "temp_size_in_bytes", 0) / 2**30
    jax.block_until_ready(compiled(*arguments))
    start = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(compiled(*arguments))
    return {"compile_s": compile_s, "temp_gib": temp_gib, "per_call_s": (time.perf_counter() - start) / num_batches}


def report(rows: list[dict], row: dict) -> list[dict]:
    """Prints ``row`` at once (a later section may fail) and appends it to ``rows``."""
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
    print(json.dumps(rounded), flush=True)
    rows.append(row)
    return rows


def bench_encoder(args, vae) -> list[dict]:
    import jax

    from shortcut_jax.encode import make_encoder

    devices = jax.local_devices()
    pixels = np.random.default_rng(0).integers(
        0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    rows = []
    for dtype in args.dtypes.split(","):
        encode, params, sharding = make_encoder(vae, dtype, devices)
        timing = _compile_and_time(encode, (params, jax.device_put(pixels, sharding)), args.num_batches)
        per_call = timing.pop("per_call_s")
        report(
            rows,
            {
                "section": "encoder",
                "dtype": dtype,
                "batch": args.batch_size,
                **timing,
                "ms_per_batch": 1e3 * per_call,
                "source_images_per_s": args.batch_size / per_call,
                "vae_images_per_s": 2 * args.batch_size / per_call,
            },
        )
    return rows


def bench_decoder(args, vae) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from shortcut_jax.models.vae import AutoencoderKL

    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    shard, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    batch_size = args.decoder_batch_size or args.batch_size
    latents = (
        np.random.default_rng(1)
        .standard_normal((batch_size, *vae.config.latent_shape(args.image_size)))
        .astype(np.float32)
    )
    rows = []
    for dtype in args.dtypes.split(","):
        model = AutoencoderKL(vae.config, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        decode = jax.jit(
            lambda p, z, m=model: m.apply({"params": p}, z, method=AutoencoderKL.decode),
            in_shardings=(replicated, shard),
            out_shardings=shard,
        )
        timing = _compile_and_time(
            decode, (jax.device_put(vae.params, replicated), jax.device_put(latents, shard)), args.num_batches
        )
        per_call = timing.pop("per_call_s")
        report(
            rows,
            {
                "section": "decoder",
                "dtype": dtype,
                "batch": batch_size,
                **timing,
                "ms_per_batch": 1e3 * per_call,
                "images_per_s": batch_size / per_call,
            },
        )
    return rows


def write_synthetic_set(root: str, examples: int, side: int, dtype: str, shard_size: int) -> None:
    """A latent set in the encoder's format with random moments (std > 0) and 1000 classes."""
    from shortcut_jax.data import latents as latent_format

    shape = [side, side, 4]
    manifest_path = os.path.join(root, latent_format.MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if (old.get("count"), old.get("latent_shape"), old.get("dtype"), old.get("shard_size")) == (
            examples,
            shape,
            dtype,
            shard_size,
        ):
            return
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((min(shard_size, 1024), 2, 2, *shape)).astype(dtype)
    block[:, :, 1] = np.abs(block[:, :, 1]) * 0.1
    shards = []
    for s, start in enumerate(range(0, examples, shard_size)):
        count = min(shard_size, examples - start)
        moments_path, labels_path = latent_format.shard_paths(root, s)
        moments = np.lib.format.open_memmap(moments_path, mode="w+", dtype=dtype, shape=(count, 2, 2, *shape))
        for a in range(0, count, len(block)):
            moments[a : a + len(block)] = block[: count - a]
        moments.flush()
        del moments
        np.save(labels_path, (np.arange(start, start + count) % 1000).astype(np.int32))
        shards.append({"index": s, "start": start, "count": count})
    manifest = {
        "format": latent_format.FORMAT,
        "version": latent_format.FORMAT_VERSION,
        "complete": True,
        "count": examples,
        "num_classes": 1000,
        "image_size": 8 * side,
        "vae": {"name": "synthetic", "weights_sha256": "0" * 64},
        "scaling_factor": 0.18215,
        "shift_factor": 0.0,
        "latent_shape": shape,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_shards": len(shards),
        "shards": shards,
        "source": {"type": "synthetic"},
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def bench_reader(args) -> list[dict]:
    from shortcut_jax.data import default_data_config, make_dataset

    root = args.reader_dir or os.path.join(tempfile.gettempdir(), "shortcut_jax_synthetic_latents")
    start = time.perf_counter()
    write_synthetic_set(root, args.reader_examples, args.latent_side, args.reader_dtype, args.reader_shard_size)
    written = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root))
    config = default_data_config()
    config.name, config.path, config.random_flip = "latents", root, True
    before = memory()
    start = time.perf_counter()
    source = make_dataset(config, batch_size=args.batch_size, seed=0)
    opened = time.perf_counter() - start
    source.next_batch()
    start = time.perf_counter()
    for _ in range(args.reader_batches):
        source.next_batch()
    elapsed = time.perf_counter() - start
    after = memory()
    return report(
        [],
        {
            "section": "reader",
            "examples": args.reader_examples,
            "dtype": args.reader_dtype,
            "set_gib": size / 2**30,
            "write_or_reuse_s": written,
            "open_s": opened,
            "batch": args.batch_size,
            "batches": args.reader_batches,
            "latents_per_s": args.batch_size * args.reader_batches / elapsed,
            "ms_per_batch": 1e3 * elapsed / args.reader_batches,
            "memory_mib_before": before,
            "memory_mib_after": after,
        },
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sections = args.sections.split(",")
    rows = []
    if "encoder" in sections or "decoder" in sections:
        import jax

        vae = _vae(args)
        print(
            f"devices: {jax.local_device_count()} x {jax.local_devices()[0].device_kind}; VAE "
            f"{vae.config.block_out_channels}, {args.image_size}x{args.image_size}"
        )
        if "encoder" in sections:
            rows += bench_encoder(args, vae)
        if "decoder" in sections:
            rows += bench_decoder(args, vae)
    if "reader" in sections:
        rows += bench_reader(args)
    return rows


if __name__ == "__main__":
    main()
