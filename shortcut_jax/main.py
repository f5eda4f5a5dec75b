"""Command line: ``python -m shortcut_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR``.

Flags only; the work happens in ``loop.train_and_evaluate``. Any config value can be
overridden with ``--config.<key>=<value>``. On multi-host systems (TPU pods, several GPU hosts)
pass ``--multihost`` so every process joins the job before JAX touches a device; on a scheduler
(SLURM, Cloud TPU) JAX finds the coordinator itself, elsewhere give ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (two CPU processes on one machine: README, Launching).
SIGTERM stops the run after the current step with a checkpoint and exit status 0.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; `path.py:arg` picks a variant.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples. Resumes if it holds a run.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, multi-node GPU).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-node GPU without a scheduler.")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-node GPU without a scheduler).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-node GPU without a scheduler).")
flags.DEFINE_float(
    "initialization_timeout",
    300,
    "Seconds to wait for the coordinator and every process to"
    " join (--multihost); a process that cannot reach the coordinator fails after it.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from shortcut_jax.infra import distributed

    if FLAGS.multihost:
        distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, timeout_s=FLAGS.initialization_timeout
        )
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    from shortcut_jax.training import loop

    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.info("done: results in %s", FLAGS.workdir)


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    cli.run(main)
