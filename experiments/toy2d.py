"""2-D toy distributions with a residual MLP: the quick-start run (CPU, a few minutes).

Command:
  python -m shortcut_jax.main --config=experiments/toy2d.py --workdir=workdirs/toy2d
Arguments (`--config=experiments/toy2d.py:<key>=<value>,...`): objective=shortcut|flow_matching|
  diffusion|consistency_training|live_reflow|consistency_distillation|progressive_distillation|
  meanflow|meanflow_v, preset=meanflow|meanflow_v (with MeanFlow's published optimiser)
  (objectives.registry.METHODS), runlocal=True (a few steps, for tests). The two distillation methods
  start from a trained run of the same model, named by objective.teacher_checkpoint (its workdir
  or <workdir>/checkpoints; the student starts at the teacher's EMA weights):
    python -m shortcut_jax.main --config=experiments/toy2d.py:objective=flow_matching --workdir=workdirs/toy2d_fm
    python -m shortcut_jax.main --config=experiments/toy2d.py:objective=progressive_distillation \
        --config.objective.teacher_checkpoint=workdirs/toy2d_fm --workdir=workdirs/toy2d_pd
  (progressive distillation: 7 phases of train.steps / 7 steps, or objective.stage_steps).
  Everything else through flags, e.g.
  --config.data.name=checkerboard|gaussian_mixture|two_moons|spiral, --config.train.steps=N,
  --config.seed=N, --config.objective.teacher=ema, --config.objective.sc_fraction=0.25,
  --config.objective.level_assignment=random, --config.train.ema_debias=True,
  --config.train.ema_decays='(0.99,0.999)' --config.eval.ema_index=1 (a second EMA evaluated),
  --config.objective.level_weights='(4,2,1,1,1,1,1)' (level 0 is the 1-step level),
  --config.objective.flow_t=logit_normal (t of the flow-matching rows),
  --config.objective.meanflow_norm_p=0 (MeanFlow without its adaptive weight: on this data both
  forms then improve with the step count, docs/results.md).
Expected (checkerboard, shortcut, 4000 steps; H100, 3 seeds, see README's benchmark): sliced
Wasserstein distance 0.056 at 1 step and 0.038 at 128 steps against a data-against-data floor of
0.022; flow matching with the same model and steps: 1.11 at 1 step, 0.036 at 128.
Half the batch is self-consistency rows and the teacher is the online model under
stop-gradient. With the EMA teacher (decay 0.999) 4000 steps leave the 1-step samples unformed
(1-step distance 0.29 in one CPU run at fraction 1/4).
"""

from shortcut_jax import config_lib

TEST_ARGS = ("", "objective=flow_matching", "objective=meanflow", "preset=meanflow_v", "runlocal=True")


def get_config(arg: str = ""):
    args = config_lib.parse_config_arg(arg, {"objective": "shortcut", "preset": "", "runlocal": False})
    c = config_lib.default_config()
    c.data.name = "checkerboard"
    c.model.name = "mlp"
    c.model.variant = ""
    c.model.width = 256
    c.model.depth = 4
    c.model.mlp_ratio = 2.0
    c.model.dtype = "float32"
    c.objective.name = args["objective"]
    c.objective.sc_fraction = 0.5
    c.objective.teacher = "online"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.train.steps = 4000
    c.train.batch_size = 512
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.train.eval_every = c.train.steps
    c.mesh.data = 1  # the model is tiny: one device
    c.eval.budgets = (1, 2, 4, 8, 16, 32, 64, 128)
    c.eval.grid_budgets = (1, 4, 128)
    c.eval.num_samples = 10_000
    c.eval.batch_size = 10_000
    if args["preset"]:  # meanflow|meanflow_v: the objective and its published optimiser (b2, no decay, EMA)
        config_lib.apply_preset(c, args["preset"])
    if args["runlocal"]:
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
