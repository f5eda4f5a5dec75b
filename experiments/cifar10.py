"""CIFAR-10 (JPEG q75) pixels 32x32x3, unconditional DiT-S/2: the project's few-step study.

Data: the class-folder archive, extracted once, read by the image-folder reader::

  python -c "from shortcut_jax.data import extract_archive as e; print(e('../shared/data/cifar10-train.tar.gz', 'data'))"

Command (published recipe: batch 256, AdamW 1e-4, weight decay 0.1, EMA teacher, 1/8 self-consistency):
  python -m shortcut_jax.main --config=experiments/cifar10.py \\
      --config.data.path=data/cifar10/train --workdir=workdirs/cifar10_shortcut
Variants (comma-separated key=value): preset=few_step (the recommended few-step setting:
teacher=online, sc_fraction=0.25, ema_debias=True; arguments given beside it win),
objective=shortcut|flow_matching, sc_fraction=<float>,
teacher=ema|online, assignment=official|random, flow_t=grid|uniform|logit_normal,
level_weights=<7 weights joined by ':'>, ema_debias=True (normalised EMA: teacher and evaluated
weights carry no weight of the initialisation), ema_decay=<float> (the teacher's EMA, 0.999 as
published; also the evaluated one unless eval_ema_decay=<float> adds a second), steps=<int>,
seed=<int>, runlocal=True,
classifier=<dir from benchmarks.train_classifier> (reports the classifier Frechet distance, CFD,
against the test split at every budget; CFD is this project's offline yardstick, not FID).
Expected (one H100, mean of two seeds, 5,000 samples, CFD against the test split; about 6 minutes
of training at 5,000-6,000 images/s): after 7,000 steps preset=few_step gives CFD 24.8 at 1 step,
16.7 at 4 and 17.4 at 128 steps, flow matching 97.8, 39.0 and 17.9, the published recipe 80.2,
84.7 and 18.0 (experiments/cifar10_results.md). Score with
`classifier=shortcut_jax/evaluation/cifar10_classifier`.
"""
from shortcut_jax import config_lib

TEST_ARGS = ("", "objective=flow_matching", "teacher=online,assignment=random,sc_fraction=0.25",
             "ema_debias=True,sc_fraction=0.25,ema_decay=0.99,eval_ema_decay=0.999", "preset=few_step",
             "runlocal=True")


def get_config(arg: str = ""):
    args = config_lib.parse_config_arg_with_preset(arg, {  # preset=few_step: see config_lib.PRESETS
        "objective": "shortcut", "sc_fraction": 0.125, "teacher": "ema", "assignment": "official",
        "flow_t": "grid", "level_weights": "", "steps": 7000, "seed": 0, "classifier": "", "ema_debias": False,
        "ema_decay": 0.999, "eval_ema_decay": 0.0, "runlocal": False})
    c = config_lib.default_config()
    c.seed = args["seed"]
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
    c.objective.sc_fraction = args["sc_fraction"]
    c.objective.teacher = args["teacher"]
    c.objective.level_assignment = args["assignment"]
    config_lib.set_ema(c, args["ema_decay"], args["eval_ema_decay"], args["ema_debias"])
    c.objective.flow_t = args["flow_t"]
    c.objective.level_weights = args["level_weights"].replace(":", ",")
    c.objective.label_dropout = 0.0
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.1
    c.train.steps = args["steps"]
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
    return c
