"""scikit-learn's digits (8x8x1, 10 classes) with a small class-conditional DiT: a CPU-sized image run.

Command:
  python -m shortcut_jax.main --config=experiments/digits.py --workdir=workdirs/digits
Variants: `:objective=flow_matching`, `:runlocal=True` (a few steps with a tiny model, for tests).
Expected: not measured yet (this config exercises the image path on CPU-sized data; grids are
written every 1000 steps under <workdir>/eval).
"""

from shortcut_jax import config_lib

TEST_ARGS = ("", "runlocal=True")


def get_config(arg: str = ""):
    args = config_lib.parse_config_arg(arg, {"objective": "shortcut", "runlocal": False})
    c = config_lib.default_config()
    c.data.name = "digits"
    c.model.name = "dit"
    c.model.variant = ""
    c.model.patch_size = 2
    c.model.width = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.objective.name = args["objective"]
    c.objective.sc_fraction = 0.25
    c.optim.lr = 3e-4
    c.train.steps = 5000
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.train.eval_every = 1000
    c.eval.budgets = (1, 4, 128)
    c.eval.grid_budgets = (1, 4, 128)
    c.eval.metric = "none"
    if args["runlocal"]:
        c.model.width = 32
        c.model.depth = 2
        c.model.num_heads = 2
        c.train.steps = 6
        c.train.batch_size = 64
        c.train.log_every = 2
        c.train.ckpt_every = 3
        c.train.eval_every = 6
        c.eval.budgets = (1,)
        c.eval.grid_budgets = (1,)
        c.eval.grid_size = 16
        c.mesh.data = 1
    return c
