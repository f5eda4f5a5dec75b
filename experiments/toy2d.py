"""2-D toy distributions with a residual MLP: the quick-start run (CPU, a few minutes).

Command:
  python -m shortcut_jax.main --config=experiments/toy2d.py --workdir=workdirs/toy2d
Variants (`--config=experiments/toy2d.py:<arg>`, comma-separated key=value):
  dataset=checkerboard|gaussian_mixture|two_moons|spiral, objective=shortcut|flow_matching,
  steps=<int>, runlocal=True (a few steps, for tests).
Expected (checkerboard, shortcut, 4000 steps): sliced Wasserstein distance at 1 step within
1.5x of the 128-step distance, both near the data-against-data floor; see README's benchmark.
"""
from shortcut_jax import config_lib


def parse_arg(arg: str) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def get_config(arg: str = ""):
    args = parse_arg(arg)
    c = config_lib.default_config()
    c.data.name = args.get("dataset", "checkerboard")
    c.model.name = "mlp"
    c.model.variant = ""
    c.model.width = 256
    c.model.depth = 4
    c.model.mlp_ratio = 2.0
    c.model.dtype = "float32"
    c.objective.name = args.get("objective", "shortcut")
    c.objective.sc_fraction = 0.25
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.train.steps = int(args.get("steps", 4000))
    c.train.batch_size = 512
    c.train.ema_decays = (0.999,)
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.train.eval_every = c.train.steps
    c.mesh.data = 1  # the model is tiny: one device
    c.eval.budgets = (1, 2, 4, 8, 16, 32, 64, 128)
    c.eval.grid_budgets = (1, 4, 128)
    c.eval.num_samples = 10_000
    c.eval.batch_size = 10_000
    if args.get("runlocal", "False") == "True":
        c.train.steps = 20
        c.train.batch_size = 64
        c.train.log_every = 5
        c.train.ckpt_every = 10
        c.train.eval_every = 20
        c.eval.budgets = (1, 128)
        c.eval.grid_budgets = (1,)
        c.eval.num_samples = 1000
        c.eval.batch_size = 1000
    return c
