"""Training: ``train_and_evaluate(config, workdir)``, the loop around the jitted train step.

The path of a batch::

    experiments/<setting>.py:get_config(arg)  (+ --config.key=value)  -> ConfigDict
    main.py -> train_and_evaluate(config, workdir)
      Experiment(config, workdir)      (experiment.py: checks, data source, model, mesh, shardings)
      exp.restore(ckpt, latest) or exp.init_state()   (state sharded over the mesh)
      exp.compile_step()               (train_step.py, jitted once, state donated)
      loop:
        source.next_batch()            (numpy rows of this process; data/)
          -> sharding.global_batch     (a jax.Array over the mesh's batch axes)
          -> compiled(state, batch)    (objective -> grads -> optax update -> EMA update)
          -> metrics kept on device until the next log step, then checked finite and written
        every train.ckpt_every steps: checkpoint (state, data position, run metadata)
        every train.eval_every steps: evaluator.evaluate_state (samples at every budget)
        on SIGTERM or a preemption notice: finish the step, checkpoint it, return (exit 0)

Everything that can be wrong with a config is checked before anything is compiled or written
(``config_lib.validate``, the data checks, the workdir's checkpoint). A run resumes by itself
from the latest checkpoint in ``workdir``, including the data stream's position; checkpoints
are only written after the metrics since the last one were checked to be finite.

Resuming elsewhere. A checkpoint restores onto any mesh and any number of processes: every array
is read into the shardings of the current run (``Experiment.abstract_state``), and the data
position counts examples of the global batch (batches for the 2-D toys), whoever read them. With
the same ``train.batch_size`` the run continues exactly where it stopped (up to the order of
floating-point sums, which depends on the mesh). A different ``train.batch_size`` is accepted: the
stream continues at the first example not yet seen, and the step count (and with it the learning
rate schedule) continues from the saved step; the learning rate is not rescaled.

Preemption. SIGTERM (SLURM, Kubernetes, spot VMs) or a Cloud TPU maintenance notice stops the loop
after the step in flight, on every process at the same step (``distributed.StopRequests``); that
step is checkpointed and ``train_and_evaluate`` returns, so the command exits with status 0 and
the same command resumes the run.

Remote workdirs. ``workdir`` may be any path orbax and ``etils.epath`` accept (``gs://bucket/run``
with gcsfs or TensorFlow installed): checkpoints go through orbax, metrics, the manifest and the
evaluation files through ``etils.epath``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from shortcut_jax.infra import checkpoint, distributed, manifest, sharding, writers
from shortcut_jax.training import runs
from shortcut_jax.evaluation.evaluator import check_before_sampling, evaluate_state
from shortcut_jax.training.experiment import Experiment, parameter_overview

log = logging.getLogger(__name__)

# The compiled step's HLO, written beside a profile so kernels can be attributed to model scopes.
HLO_FILE = "train_step.hlo.txt"


def write_hlo(compiled, trace_dir: str) -> str:
    """The compiled step's HLO text as ``trace_dir/HLO_FILE``."""
    epath.Path(trace_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(trace_dir, HLO_FILE)
    epath.Path(path).write_text(compiled.as_text())
    return path


class NonFiniteLoss(FloatingPointError):
    pass


def _check_finite(pending: list) -> list[dict]:
    """Fetch pending (step, device metrics); raise on the first non-finite loss."""
    fetched = jax.device_get(pending)
    for step, m in fetched:
        # param_norm covers the state after the update: a finite loss can still blow up the weights
        bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(m[k])]
        if bad:
            raise NonFiniteLoss(
                f"non-finite {', '.join(bad)} (loss {m['loss']}) at step {step}; training stopped. The last"
                " checkpoint written before it is kept: lower optim.lr, set optim.grad_clip, or check the data."
            )
    return fetched


def _mean_metrics(fetched: list) -> dict:
    """Means over a log interval; a metric with a '<name>/rows' companion (a mean over a varying
    number of rows, such as a level's) is weighted by those rows, so a step without any counts
    for nothing."""
    keys = fetched[0][1].keys()
    out = {}
    for k in keys:
        values = np.array([m[k] for _, m in fetched], np.float64)
        if k + "/rows" in keys:
            rows = np.array([m[k + "/rows"] for _, m in fetched], np.float64)
            out[k] = float(np.sum(values * rows) / max(np.sum(rows), 1.0))
        else:
            out[k] = float(np.mean(values))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Train (or resume) to ``config.train.steps``; returns the final train state."""
    exp = Experiment(config, workdir)  # every check happens here, before the workdir is touched
    try:
        check_before_sampling(exp)  # the evaluation's checks too, before training starts
    except BaseException:
        exp.close()
        raise
    cfg = exp.config
    # Every process has looked at the workdir before any creates its checkpoint folder: they all
    # take the same branch in Experiment's check, whose orbax manager synchronises the processes.
    distributed.sync("workdir_checked")
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.Checkpointer(exp.ckpt_dir, keep=cfg.train.keep_ckpts, async_save=cfg.train.async_ckpt)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state, saved_meta = exp.restore(ckpt, latest)
            if data_state:  # empty for imported checkpoints: the stream starts fresh
                exp.source.set_state(data_state)
            log.info("resumed from step %d%s", latest, _layout_change(saved_meta, exp.meta))
            if cfg.train.init_from:
                log.info("train.init_from=%s is not read: the run resumes from its own checkpoint", cfg.train.init_from)
        else:
            state = exp.init_state()
            if exp.warm_start is not None:  # train.init_from, checked when the experiment was built
                state = runs.warm_started(exp, state, exp.warm_start)
        num_params, overview = parameter_overview(state.params)
        log.info("parameters (%s):\n%s", f"{num_params:,}", overview)
        compiled, compile_info = exp.compile_step()
        log.info("train step compiled: %s", json.dumps(compile_info))
        distributed.sync("train_step_compiled")  # no process starts the step while another compiles it
        manifest.write_manifest(
            workdir,
            cfg,
            extra={"compile": compile_info, "meta": exp.meta, "num_params": num_params, "mesh": dict(exp.mesh.shape)},
        )
        writer = writers.MetricWriter(
            workdir,
            use_tensorboard=cfg.train.use_tensorboard,
            use_wandb=cfg.train.use_wandb,
            wandb_project=cfg.train.wandb_project,
            config=cfg,
            resume_step=int(jax.device_get(state.step)),
        )
        with distributed.StopRequests(ckpt.reached_preemption) as stop:
            return _loop(exp, state, compiled, ckpt, writer, stop)
    finally:
        ckpt.wait()
        ckpt.close()
        exp.close()


def _layout_change(saved: dict, current: dict) -> str:
    """A note for the resume log line where the global batch or the process count changed."""
    notes = []
    for key, what in (("global_batch", "global batch"), ("process_count", "processes")):
        if key in saved and saved[key] != current[key]:
            notes.append(f"{what} {saved[key]} -> {current[key]}")
    if not notes:
        return ""
    return (
        " (" + ", ".join(notes) + "; the data stream continues at the first example not yet seen,"
        " the schedule at the saved step)"
    )


def _progress_bar(cfg, step: int) -> tqdm:
    # Outside a terminal (batch jobs writing a log file) the bar refreshes at most every 30 s.
    interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(
        total=cfg.train.steps,
        initial=step,
        unit="step",
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=1.0 if interactive else 30.0,
        disable=not (cfg.train.progress_bar and writers.primary_process()),
    )


def _loop(exp: Experiment, state, compiled, ckpt, writer, stop: distributed.StopRequests):
    cfg = exp.config
    total = cfg.train.steps
    step = int(jax.device_get(state.step))
    bar = _progress_bar(cfg, step)
    profile = tuple(cfg.train.profile_steps) or None
    profile_dir = os.path.join(exp.workdir, "profile")
    pending: list = []
    wait_time = 0.0
    wait_count = 0
    last_log = time.perf_counter()
    try:
        while step < total:
            if profile and step == profile[0]:
                if writers.primary_process():
                    write_hlo(compiled, profile_dir)
                jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                t0 = time.perf_counter()
                batch = sharding.global_batch(exp.source.next_batch(), exp.mesh)
                wait_time += time.perf_counter() - t0
                wait_count += 1
                state, metrics = compiled(state, batch)
            step += 1
            pending.append((step, metrics))
            if profile and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()

            final = step == total
            # asked after every step on every process: a preemption stops all of them at one step
            stopping = not final and stop.reached(step)
            if step % cfg.train.log_every == 0 or final or stopping:
                fetched = _check_finite(pending)
                pending = []
                now = time.perf_counter()
                scalars = _mean_metrics(fetched)
                scalars["input_wait_ms"] = 1000 * wait_time / max(wait_count, 1)
                scalars["steps_per_second"] = len(fetched) / max(now - last_log, 1e-9)
                scalars["images_per_second"] = scalars["steps_per_second"] * cfg.train.batch_size
                last_log, wait_time, wait_count = now, 0.0, 0
                writer.write_scalars(step, scalars)
                bar.set_postfix(
                    {"loss": f"{scalars['loss']:.4g}", "img/s": f"{scalars['images_per_second']:.1f}"}, refresh=False
                )
            bar.update(step - bar.n)
            if step % cfg.train.ckpt_every == 0 or final or stopping:
                _check_finite(pending)  # never checkpoint a state past a non-finite loss
                ckpt.save(step, state, data_state=exp.source.get_state(), meta=exp.meta, force=final or stopping)
            if stopping:
                ckpt.wait()
                log.warning(
                    "stopped at step %d of %d on %s: checkpoint of step %d saved in %s; run the same"
                    " command again to resume",
                    step,
                    total,
                    stop.reason,
                    step,
                    exp.ckpt_dir,
                )
                break
            if step % cfg.train.eval_every == 0 or final:
                evaluate_state(exp, state, step, writer=writer, final=final)
        writer.flush()
        return state
    finally:
        bar.close()
        writer.close()
