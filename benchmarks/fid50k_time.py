"""Wall time of a whole FID-50k per step budget, split into sampling, VAE decoding and scoring.

Runs the evaluation the CLI runs (``evaluate.evaluate_budgets`` with ``eval.metric='fid'``) for
a latent DiT of ``experiments/imagenet.py`` (32x32x4 latents, 1,000 classes, classifier-free
guidance at ``--cfg_scale``) on every local device. Speed does not depend on the weights' values,
so the DiT has its initial weights, the sd-vae-ft-mse decoder and pytorch-fid's Inception network
seeded ones, and the reference statistics come from random features (the FID values printed are
therefore meaningless; the times are the product)::

    python -m benchmarks.fid50k_time --variant=B --budgets=1,4,128 --num_samples=50000,50000,5000 \\
        --out=results/

``--num_samples`` gives a count per budget; a budget timed on fewer than 50,000 samples gets a
line extrapolated linearly to 50,000 (sampling, decoding and features scale with the count; the
Fréchet distance itself does not), marked as such. The decoder's and the Inception network's first
calls (compilation) are timed apart, before the budgets; each budget's sampler compiles inside its
first batch (``sample_s``). Decoded images stay on the devices for FID: ``score_s`` is the
quantisation, the Inception network and the features' copy to the host; ``host_copy_s`` the
copies of images to the host (none here: no grids, no sample files). ``--tiny`` runs a 2-block DiT on 8x8 latents
with a small VAE (a check of the script on a CPU). Writes ``OUT/fid50k_time.json`` and each
budget's ``evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

FULL = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B")
    parser.add_argument("--budgets", default="1,4,128")
    parser.add_argument("--num_samples", default="50000,50000,5000", help="one count per budget, or one for all")
    parser.add_argument("--batch_size", type=int, default=1000, help="eval.batch_size (samples per sampler call)")
    parser.add_argument("--decode_batch_size", type=int, default=100, help="eval.decode_batch_size")
    parser.add_argument("--fid_batch_size", type=int, default=500, help="eval.fid_batch_size")
    parser.add_argument("--cfg_scale", type=float, default=1.5)
    parser.add_argument("--tiny", action="store_true", help="2 blocks of width 32, 8x8 latents, a small VAE")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def _counts(args) -> list[tuple[int, int]]:
    budgets = [int(b) for b in args.budgets.split(",")]
    counts = [int(n) for n in args.num_samples.split(",")]
    if len(counts) == 1:
        counts = counts * len(budgets)
    if len(counts) != len(budgets):
        raise SystemExit(f"--num_samples has {len(counts)} entries for {len(budgets)} budgets")
    return list(zip(budgets, counts))


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = _counts(args)
    os.makedirs(args.out, exist_ok=True)

    import jax
    import jax.numpy as jnp

    from experiments import imagenet
    from shortcut_jax import data, evaluate
    from shortcut_jax.infra import sharding
    from shortcut_jax.evaluation import fid, inception, metrics
    from shortcut_jax.training.experiment import Experiment
    from shortcut_jax.models import vae as vae_lib
    from shortcut_jax.models import vae_weights

    scratch = tempfile.mkdtemp(prefix="fid50k-")
    weights = os.path.join(scratch, "inception_seeded.npz")
    inception.save_variables(
        inception.torch_state_dict_to_variables(
            inception.synthetic_torch_state_dict(sorted(inception.expected_torch_shapes().items()), seed=0)
        ),
        weights,
    )

    vae_config = vae_lib.VAEConfig.tiny() if args.tiny else vae_lib.VAEConfig()
    latent_side = 8 if args.tiny else 32
    image_side = latent_side * vae_config.downsample_factor
    reference = os.path.join(scratch, "reference_random.npz")
    features = np.random.default_rng(0).standard_normal((4096, 2048))
    fid.save_stats(
        fid.stats_from_features(features, source="random", resolution=(image_side, image_side), extractor=None),
        reference,
    )

    config = imagenet.get_config(f"variant={args.variant}")
    if args.tiny:
        config.model.variant = ""
        config.model.update(width=32, depth=2, num_heads=2)
    config.data.path = scratch  # not read: the experiment gets the data's spec directly
    config.eval.update(
        metric="fid",
        fid_weights=weights,
        fid_reference=reference,
        fid_source="random",
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        fid_batch_size=args.fid_batch_size,
        cfg_scale=args.cfg_scale,
        grid_budgets=(),
        grid_size=0,
        export_budgets=(),
    )
    spec = data.DataSpec(shape=(latent_side, latent_side, vae_config.latent_channels), num_classes=1000, kind="images")
    exp = Experiment(config, None, spec=spec)
    began = time.perf_counter()
    state = exp.init_state()
    params = exp.eval_params(state)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - began

    vae = vae_weights.LoadedVAE(
        config=vae_config,
        params=vae_weights.seeded_params(vae_config, seed=0),
        name="seeded",
        folder=scratch,
        weights_path="",
        weights_sha256="",
    )
    decode = vae.latent_decoder(dtype=jnp.bfloat16, batch_size=args.decode_batch_size)
    metric = metrics.build_metric(config.eval, "images")

    # compilation of the decoder and the Inception network apart (each budget's sampler compiles
    # in its first batch, inside sample_s), on what the evaluation gives them: a batch of latents
    # on the devices, sharded as the sampler leaves it, and the decoded images where they lie
    began = time.perf_counter()
    latents = jax.device_put(np.zeros((args.batch_size, *spec.shape), np.float32), sharding.batch_sharding(exp.mesh))
    images = jax.block_until_ready(decode(latents))
    decoder_compile_s = time.perf_counter() - began
    began = time.perf_counter()
    metric.extractor.on_device(images, len(images))
    inception_compile_s = time.perf_counter() - began

    # the Fréchet distance (a 2048-d matrix square root on the host) does not grow with the count
    stats = fid.load_stats(reference)
    began = time.perf_counter()
    fid.frechet_inception_distance(
        stats,
        fid.stats_from_features(features[::-1][:3000], source="random", resolution=stats.resolution, extractor=None),
    )
    fd_s = time.perf_counter() - began

    rows = []
    for budget, count in runs:
        eval_cfg = config.eval.copy_and_resolve_references()
        eval_cfg.unlock()
        eval_cfg.update(budgets=(budget,), final_num_samples=count, num_samples=count)
        out_dir = os.path.join(args.out, f"{budget}step")
        began = time.perf_counter()
        result = evaluate.evaluate_budgets(
            eval_cfg,
            exp.sampler,
            params,
            None,
            spec,
            metric,
            out_dir=out_dir,
            step=0,
            final=True,
            decode=decode,
            progress=False,
        )
        wall = time.perf_counter() - began
        with open(os.path.join(out_dir, evaluate.FINISHED)) as f:
            timing = json.load(f)["timings"][str(budget)]
        row = {"budget": budget, "samples": count, "wall_s": round(wall, 1), **timing, "fid_random": result[budget]}
        if count < FULL:  # everything but the Fréchet distance grows with the count
            row["extrapolated_50k_s"] = round(max(timing["total_s"] - fd_s, 0.0) * FULL / count + fd_s, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "variant": "tiny" if args.tiny else args.variant,
        "cfg_scale": args.cfg_scale,
        "batch_size": args.batch_size,
        "decode_batch_size": args.decode_batch_size,
        "fid_batch_size": args.fid_batch_size,
        "frechet_s": round(fd_s, 2),
        "decoder_first_call_s": round(decoder_compile_s, 1),
        "inception_first_call_s": round(inception_compile_s, 1),
        "init_s": round(init_s, 1),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(os.path.join(args.out, "fid50k_time.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
