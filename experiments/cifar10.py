"""CIFAR-10 (JPEG q75) pixels 32x32x3, unconditional DiT-S/2: the project's few-step study.

Data: the class-folder archive, extracted once, read by the image-folder reader::

  python -c "from shortcut_jax.data import extract_archive as e; print(e('../shared/data/cifar10-train.tar.gz', 'data'))"

Command (published recipe: batch 256, AdamW 1e-4, weight decay 0.1, EMA teacher, 1/8 self-consistency):
  python -m shortcut_jax.main --config=experiments/cifar10.py \\
      --config.data.path=data/cifar10/train --workdir=workdirs/cifar10_shortcut
Arguments (`experiments/cifar10.py:key=value,...`), switches that set several keys together:
  preset=meanflow|meanflow_v (MeanFlow, improved MeanFlow, with their published optimiser choices:
  Adam b2 0.95, no weight decay, EMA 0.9999 debiased; config_lib.PRESETS; either objective, by
  preset= or objective=, takes MeanFlow's CIFAR-10 time sampling: logit-normal(-2, 2), r != t on
  3/4 of the rows, adaptive weight power 0.75),
  preset=few_step (the recommended few-step setting: objective.teacher=online,
  objective.sc_fraction=0.25, train.ema_debias=True; see config_lib.PRESETS),
  preset=one_step (the best 1-step setting measured: objective=meanflow with this file's optimiser
  and MeanFlow's CIFAR-10 time sampling, train.ema_debias=True; 1-step CFD 17.2 against 17.5 at 128
  steps, two seeds, experiments/cifar10_results.md),
  objective=shortcut|flow_matching|diffusion|consistency_training|live_reflow|consistency_distillation|
  progressive_distillation|meanflow|meanflow_v (the distillation methods start from a trained run of the same model:
  --config.objective.teacher_checkpoint=workdirs/cifar10_flow, a flow-matching or shortcut run's
  workdir, its latest EMA weights; objective.teacher_step, objective.teacher_weights=params pick
  others), classifier=<dir from shortcut_jax.evaluation.train_classifier> (reports the
  classifier Frechet distance, CFD, against the test split at every budget; CFD is this project's
  offline yardstick, not FID), runlocal=True (a tiny model and a few steps, for tests).
Everything else through flags, e.g. --config.objective.level_assignment=random,
--config.objective.flow_t=logit_normal, --config.objective.level_weights='(4,2,1,1,1,1,1)',
--config.train.ema_decays='(0.99,0.999)' --config.eval.ema_index=1 (teacher at 0.99, the 0.999
average evaluated), --config.train.steps=N, --config.seed=N.
Expected (one H100, mean of two seeds, 5,000 samples, CFD against the test split; about 6 minutes
of training at 5,000-6,000 images/s): after 7,000 steps preset=few_step gives CFD 24.8 at 1 step,
16.7 at 4 and 17.4 at 128 steps, flow matching 97.8, 39.0 and 17.9, the published recipe 80.2,
84.7 and 18.0 (experiments/cifar10_results.md). Score with
`classifier=shortcut_jax/evaluation/cifar10_classifier`.
"""

from shortcut_jax import config_lib

TEST_ARGS = ("", "objective=flow_matching", "preset=few_step", "preset=one_step", "preset=meanflow", "runlocal=True")


def get_config(arg: str = ""):
    args = config_lib.parse_config_arg(
        arg, {"objective": "shortcut", "preset": "", "classifier": "", "runlocal": False}
    )
    c = config_lib.default_config()
    c.data.name = "image_folder"
    c.data.path = "data/cifar10/train"
    c.data.use_labels = False
    c.data.random_flip = True
    c.data.num_workers = 16
    c.data.cache_decoded = True  # 150 MiB decoded once; no decoding threads while training
    c.model.name = "dit"
    c.model.variant = "S"
    c.model.patch_size = 2
    c.objective.name = args["objective"]
    c.objective.label_dropout = 0.0
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.1
    c.train.steps = 7000
    c.train.batch_size = 256
    c.train.log_every = 100
    c.train.ckpt_every = 3500
    c.train.eval_every = 1500
    c.eval.budgets = (1, 2, 4, 8, 32, 128)
    c.eval.grid_budgets = (1, 2, 4, 8, 32, 128)
    c.eval.num_samples = 1000  # every eval_every steps: the curves against training steps
    c.eval.final_num_samples = 5000  # the last step: the table
    c.eval.batch_size = 1000
    c.eval.metric = "none"
    if args["classifier"]:  # classifier Frechet distance against the test split's statistics
        c.eval.metric = "cfd"
        c.eval.classifier = args["classifier"]
        c.eval.reference_stats = args["classifier"] + "/test_stats.npz"
    if args["runlocal"]:
        c.model.variant = ""
        c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
        c.train.steps = 4
        c.train.batch_size = 64
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.train.eval_every = 4
        c.eval.budgets = (1,)
        c.eval.grid_budgets = (1,)
        c.eval.grid_size = 16
        c.eval.num_samples = 200
        c.eval.final_num_samples = 0
        c.mesh.data = 1
    config_lib.apply_preset(c, args["preset"])
    if c.objective.name in ("meanflow", "meanflow_v"):
        # MeanFlow's own CIFAR-10 choices, where they differ from its ImageNet ones (the package
        # defaults): (t, r) from logit-normal(-2, 2) draws, which reach the data end of the path
        # far more often than (-0.4, 1); r != t on 3/4 of the rows; adaptive weight power 0.75
        c.objective.meanflow_t_mean = -2.0
        c.objective.meanflow_t_std = 2.0
        c.objective.meanflow_flow_fraction = 0.25
        c.objective.meanflow_norm_p = 0.75
    return c
