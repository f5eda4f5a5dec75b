"""Golden outputs of diffusers' PyTorch AutoencoderKL for the parity test of ``models.vae``.

Builds diffusers' ``AutoencoderKL`` from the full sd-vae-ft-mse config with the weights of
``vae_weights.seeded_state_dict`` (no download), runs it in float64 on a few random 64x64 images
and writes ``tests/goldens/vae_sd_ft_mse_64.npz``: the inputs, the encoder's posterior mean and
std, the decoder's output on given latents, the state dict's names and shapes and the seed. The
weights are not stored: the test rebuilds them from the names, shapes and seed, so it needs
neither torch nor diffusers.

    pip install torch diffusers   # CPU wheels suffice; torchvision is not needed
    python -m benchmarks.vae_parity_golden [--out tests/goldens/vae_sd_ft_mse_64.npz]

float64 makes the golden the exact function to well below the test's 1e-5 tolerance; the
script also prints how far diffusers' own float32 run is from it, for scale.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from shortcut_jax.models.vae import VAEConfig
from shortcut_jax.models.vae_weights import seeded_state_dict

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "goldens", "vae_sd_ft_mse_64.npz")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()

    import diffusers
    import torch

    config = VAEConfig.sd_vae_ft_mse()
    model = diffusers.AutoencoderKL(**config.to_diffusers()).eval()
    names_and_shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    weights = seeded_state_dict(names_and_shapes, args.seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)

    rng = np.random.default_rng([args.seed, 1])
    size, f = args.image_size, config.downsample_factor
    images = rng.uniform(-1, 1, (args.num_images, size, size, config.in_channels)).astype(np.float32)
    latents = rng.standard_normal((args.num_images, size // f, size // f, config.latent_channels)).astype(np.float32)

    def run(dtype):
        model.to(dtype)
        to_torch = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)  # noqa: E731 - NHWC -> NCHW
        to_numpy = lambda t: t.permute(0, 2, 3, 1).to(torch.float64).numpy()  # noqa: E731
        with torch.no_grad():
            posterior = model.encode(to_torch(images)).latent_dist
            decoded = model.decode(to_torch(latents)).sample
        return to_numpy(posterior.mean), to_numpy(posterior.std), to_numpy(decoded)

    mean, std, decoded = run(torch.float64)
    mean32, std32, decoded32 = run(torch.float32)
    for name, ref, got in (("mean", mean, mean32), ("std", std, std32), ("decoded", decoded, decoded32)):
        print(
            f"{name}: shape {ref.shape}, rms {np.sqrt(np.mean(ref**2)):.4f}; "
            f"diffusers float32 relative error {relative_error(got, ref):.2e}"
        )

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        seed=np.int64(args.seed),
        names=np.array([n for n, _ in names_and_shapes]),
        shape_ndims=np.array([len(s) for _, s in names_and_shapes], dtype=np.int64),
        shape_dims=np.array([d for _, s in names_and_shapes for d in s], dtype=np.int64),
        config_json=np.array(json.dumps(config.to_diffusers())),
        images=images,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        latents=latents,
        decoded=decoded.astype(np.float32),
        versions=np.array(json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__})),
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
