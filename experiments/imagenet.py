"""ImageNet 256, class-conditional, DiT-B/2 or DiT-XL/2 in SD-VAE latent space (the paper's setting).

Reference recipe: batch 256, about 810k steps, AdamW lr 1e-4, betas (0.9, 0.999), weight decay
0.1, constant lr, bf16, EMA 0.999 teacher, self-consistency fraction 1/8, label dropout 0.1 on
flow rows, bootstrap CFG with scale 1.5 on the smallest shortcut level's targets, evaluation with
CFG 1.5.

Data: the SD-VAE (sd-vae-ft-mse) posterior moments of every image and its mirror with labels,
written once by ``python -m shortcut_jax.encode --source_type=tfds --source=imagenet2012
--data_dir=/data/tfds --out=/data/imagenet256_latents --vae=/models/sd-vae-ft-mse
--image_size=256`` (README: "Latent space"); ``--config.data.path=...`` names that folder.

Command:
  python -m shortcut_jax.main --config=experiments/imagenet.py:variant=B \\
      --config.data.path=/data/imagenet256_latents --workdir=workdirs/imagenet_b
Expected (paper, FID-50k at 128 / 4 / 1 steps): DiT-B 15.5 / 28.3 / 40.3; DiT-XL 3.8 / 7.8 / 10.6.
On one 80 GB GPU DiT-XL/2 at batch 256 needs ``--config.model.remat=dots`` or more devices (see
README); adding ``--config.model.remat_blocks=14`` rematerialises only half of the 28 blocks
(with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``).
Arguments: variant=S|B|L|XL, objective=shortcut|flow_matching, runlocal=True (a tiny model and a few
steps on any encoded set, e.g. one made offline with a seeded VAE: docs/data.md), preset=meanflow|meanflow_v (MeanFlow, improved MeanFlow with their published optimiser: config_lib.PRESETS;
MeanFlow with its published guidance folded into training, omega 1 and kappa 0.5, and evaluated
without a guidance pass; improved MeanFlow trained for guidance scales 1 to 8, drawn log-uniformly), and preset=few_step (online teacher, 1/4 self-consistency, debiased EMA: few-step quality early in
training on CIFAR-10, experiments/cifar10_results.md; not measured on this data set).
"""

from shortcut_jax import config_lib

TEST_ARGS = (
    "runlocal=True",
    "variant=B",
    "variant=XL",
    "variant=B,objective=flow_matching",
    "variant=B,preset=few_step",
    "variant=B,preset=meanflow",
    "variant=B,preset=meanflow_v",
)


def get_config(arg: str = "variant=B"):
    args = config_lib.parse_config_arg(arg, {"variant": "B", "objective": "shortcut", "preset": "", "runlocal": False})
    c = config_lib.latent_paper_config(args["objective"])
    c.model.variant = args["variant"]
    c.objective.bootstrap_cfg = True
    c.objective.bootstrap_cfg_scale = 1.5
    c.train.steps = 810_000
    c.eval.cfg_scale = 1.5
    config_lib.apply_preset(c, args["preset"])
    if c.objective.name == "meanflow":
        # MeanFlow's ImageNet runs fold guidance into the training target (the published code's
        # default: omega 1, kappa 0.5, at every t; effective scale omega / (1 - kappa) = 2), so
        # its samples take no guidance pass
        c.objective.meanflow_cfg_omega = 1.0
        c.objective.meanflow_cfg_kappa = 0.5
        c.objective.meanflow_cfg_interval = (0.0, 1.0)
        c.eval.cfg_scale = 1.0
    if c.objective.name == "meanflow_v":
        # improved MeanFlow's guidance scale is a network input drawn in training log-uniformly on
        # [1, 8], as published, and so is the guidance interval (the t range where the scale
        # applies); eval.cfg_scale and eval.guidance_interval pick them at sampling time
        c.objective.meanflow_omega_range = (1.0, 8.0)
        c.objective.meanflow_omega_draw = "log_uniform"
        c.objective.meanflow_interval_input = True
    if args["runlocal"]:  # a tiny model and a few steps on any encoded set (a seeded VAE's too)
        config_lib.apply_runlocal_latent(c)
    return c
