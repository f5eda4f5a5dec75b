"""Command: write a VAE folder with seeded weights, for the latent chain where no weights can be
downloaded (an offline machine, CI)::

    python -m shortcut_jax.seeded_vae --out=workdirs/tiny-vae                  # a small VAE (CPU)
    python -m shortcut_jax.seeded_vae --out=workdirs/seeded-sd-vae --size=sd   # sd-vae-ft-mse's shape

The folder is laid out as a diffusers download (``config.json`` and
``diffusion_pytorch_model.safetensors``), so ``--vae=`` of ``encode``, ``eval.vae`` and every reader
take it as they take the real one. Its weights are drawn by a fixed rule from ``--seed``
(``models.vae_weights.seeded_state_dict``): the pictures it decodes are noise-like, but every
step of the chain (encode -> train -> sample -> evaluate) runs as with real weights. An existing
folder is never overwritten.
"""

from __future__ import annotations

import os

SIZES = ("tiny", "sd")


def write_seeded_vae(out: str, *, size: str = "tiny", seed: int = 0) -> str:
    """Writes the folder; ``ValueError`` for an unknown size or an existing folder."""
    from shortcut_jax.models import vae_weights
    from shortcut_jax.models.vae import VAEConfig

    if size not in SIZES:
        raise ValueError(f"--size={size!r}: use one of {SIZES}")
    if os.path.exists(out):
        raise ValueError(f"--out={out} exists: give a new folder (nothing already saved is replaced)")
    config = VAEConfig.tiny() if size == "tiny" else VAEConfig.sd_vae_ft_mse()
    state = vae_weights.seeded_state_dict(sorted(vae_weights.expected_state_dict(config).items()), seed)
    vae_weights.write_diffusers_folder(out, config, state)
    return out


def _define_flags():
    from absl import flags

    flags.DEFINE_string("out", None, "The folder to write (must not exist).")
    flags.DEFINE_enum("size", "tiny", list(SIZES), "tiny (CPU-sized) or sd (sd-vae-ft-mse's shapes).")
    flags.DEFINE_integer("seed", 0, "Seed of the weights.")
    flags.mark_flags_as_required(["out"])
    return flags.FLAGS


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    def _write(fv):
        print(f"wrote {write_seeded_vae(fv.out, size=fv.size, seed=fv.seed)} ({fv.size} VAE, seed {fv.seed})")

    cli.run_flags(_define_flags(), _write, names=())
