"""CelebA-HQ 256, unconditional, DiT-B/2 in the Stable Diffusion VAE's latent space (the paper's setting).

Hyperparameters are the reference recipe's: batch 64, about 410k steps, AdamW lr 1e-4, betas
(0.9, 0.999), weight decay 0.1 on all parameters, constant lr, bf16 matmuls, EMA 0.999 teacher,
self-consistency fraction 1/8 (the paper's text says 1/4: `--config.objective.sc_fraction=0.25`), levels 0..6,
clipping at 4.

Data: the SD-VAE (sd-vae-ft-mse) posterior moments of every image and its mirror, written once
by ``python -m shortcut_jax.encode --source=/data/celebahq256 --out=/data/celebahq256_latents
--vae=/models/sd-vae-ft-mse --image_size=256`` (README: "Latent space"); the latent reader draws
a fresh posterior sample at every visit and flips by picking the mirror's moments.

Command:
  python -m shortcut_jax.main --config=experiments/celebahq.py \\
      --config.data.path=/data/celebahq256_latents --workdir=workdirs/celebahq_b
Expected (paper, FID-50k at 128 / 4 / 1 steps): 6.9 / 13.8 / 20.5 after about 410k steps.
Arguments: variant=S|B|L|XL, objective=shortcut|flow_matching, runlocal=True (a tiny model and a few
steps on any encoded set, e.g. one made offline with a seeded VAE: docs/data.md), preset=meanflow|meanflow_v (MeanFlow, improved MeanFlow with their published optimiser: config_lib.PRESETS), and preset=few_step (online teacher, 1/4 self-consistency, debiased EMA: few-step quality early in
training on CIFAR-10, experiments/cifar10_results.md; not measured on this data set).
"""

from shortcut_jax import config_lib

TEST_ARGS = ("runlocal=True", "", "objective=flow_matching", "variant=XL", "preset=few_step")


def get_config(arg: str = ""):
    args = config_lib.parse_config_arg(arg, {"variant": "B", "objective": "shortcut", "preset": "", "runlocal": False})
    c = config_lib.latent_paper_config(args["objective"])
    c.data.use_labels = False
    c.model.variant = args["variant"]
    c.objective.label_dropout = 0.0  # unconditional
    c.train.steps = 410_000
    c.train.batch_size = 64
    config_lib.apply_preset(c, args["preset"])
    if args["runlocal"]:  # a tiny model and a few steps on any encoded set (a seeded VAE's too)
        config_lib.apply_runlocal_latent(c)
    return c
