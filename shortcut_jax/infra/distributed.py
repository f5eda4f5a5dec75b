"""Joining a multi-process job, waiting for its processes, and agreeing on when to stop early.

Joining. ``initialize`` wraps ``jax.distributed.initialize`` so that it is bounded in time and
its failures say what to check. When a process cannot reach the coordinator, JAX's runtime aborts
the process from C++ after the time-out with a bare ``DEADLINE_EXCEEDED``; so every process other
than the coordinator first waits for the coordinator's port itself and raises
``CoordinatorUnreachable`` naming the address and the time-out. A process that does reach the
coordinator but whose peers never arrive is still ended by the runtime after the same time-out;
the log line written just before joining names the address, the process and the time-out.

On CPU the processes exchange collectives through Gloo (``jax_cpu_collectives_implementation``,
JAX's default), so a job of several CPU processes on one machine runs the same programs as one on
several accelerator hosts. ``sync`` is a barrier between processes that compiles nothing; the loop
and the samplers call it between compiling a program and running it.

Stopping early. A preempted job gets a notice before it is killed: SIGTERM from SLURM,
Kubernetes or a spot VM, or a maintenance event on a Cloud TPU. ``StopRequests`` turns it into
"stop after this step", the same step on every process:

* one process without ``jax.distributed``: a SIGTERM handler, installed for the duration of the
  loop (the previous handler is put back after it), sets a flag;
* a multi-process job: JAX's preemption service (``jax.distributed`` starts it) catches SIGTERM on
  CPU and GPU, and TPU maintenance notices, on any process and picks the first step that every
  process can still reach; ``CheckpointManager.reached_preemption(step)`` (orbax), asked after
  every step by every process, turns True at that step on all of them. Installing a Python
  handler there would replace the service's own, so none is installed.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Callable, Optional

import jax

log = logging.getLogger(__name__)

# jax.distributed.initialize's own default: long enough for a pod's hosts to boot unevenly.
DEFAULT_TIMEOUT_S = 300
# How long a process waits at a barrier for the others, which may be compiling a large program
# that it loaded from the cache; a process that died ends the job sooner (JAX's heartbeat).
SYNC_TIMEOUT_S = 3600


class CoordinatorUnreachable(ConnectionError):
    pass


def is_initialized() -> bool:
    """Whether this process joined a job through ``jax.distributed``."""
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _distributed  # older JAX without the public check

    return _distributed.global_state.client is not None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be host:port, e.g. 10.0.0.1:12355")
    return host.strip("[]") or "localhost", int(port)


def wait_for_coordinator(address: str, timeout_s: float, *, poll_s: float = 0.25) -> None:
    """Returns once a TCP connection to ``address`` (host:port) succeeds; raises
    ``CoordinatorUnreachable`` naming the address and the time-out otherwise."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last_error: Optional[OSError] = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 5.0)):
                return
        except OSError as err:  # refused (not listening yet), unreachable, name not resolved
            last_error = err
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))
    raise CoordinatorUnreachable(
        f"could not reach the coordinator at {address} within the {timeout_s:g} s time-out"
        f" ({last_error}). Start process 0 (it listens there), check the address, port and"
        " firewall, or raise --initialization_timeout."
    )


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Joins the job (``jax.distributed.initialize``) within ``timeout_s`` seconds.

    Arguments left None are found by JAX from the environment (SLURM, Cloud TPU, Open MPI,
    ``JAX_COORDINATOR_ADDRESS``...). Where the address and this process's index are known and
    the index is not 0, the coordinator is first waited for here, so an unreachable coordinator
    fails with a Python error that names it instead of an abort from JAX's runtime.
    """
    if timeout_s <= 0:
        raise ValueError(f"the initialization time-out must be > 0 seconds, got {timeout_s}")
    start = time.monotonic()
    if coordinator_address and process_id not in (None, 0):
        wait_for_coordinator(coordinator_address, timeout_s)
    remaining = max(1, int(round(timeout_s - (time.monotonic() - start))))
    log.info(
        "joining the job: coordinator %s, process %s of %s, time-out %d s (JAX ends a process"
        " whose peers do not all arrive by then)",
        coordinator_address or "(from the environment)",
        "?" if process_id is None else process_id,
        "?" if num_processes is None else num_processes,
        remaining,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=remaining,
    )


def sync(name: str, timeout_s: float = SYNC_TIMEOUT_S) -> None:
    """Waits until every process of the job reaches ``sync(name)``; nothing in a single process.

    A barrier of the coordination service, not a collective over devices: it has its own
    time-out and needs no compiled program. Processes call it between compiling a program and
    running it. On CPU, Gloo gives a process 30 s to join a collective the others started, and
    the processes of one job do not compile alike: a program's key in JAX's persistent
    compilation cache differs from process to process (it includes the process's view of the
    devices) and only process 0 writes entries, so process 0 may load a program that the others
    compile for a minute.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


class StopRequests:
    """Whether the loop should stop after a step: a context manager around the loop.

    ``reached(step)`` is asked after every step, by every process, with the same steps; it is
    True at the step to stop at, on every process alike. ``preemption_check(step)`` is the
    job-wide notice (``Checkpointer.reached_preemption``); the local SIGTERM flag is only used by
    a process that is not part of a ``jax.distributed`` job (see the module docstring).
    """

    def __init__(self, preemption_check: Callable[[int], bool]):
        self._preemption_check = preemption_check
        self._signalled: Optional[str] = None
        self._previous = None
        self._installed = False
        self.reason: Optional[str] = None

    def __enter__(self) -> "StopRequests":
        if is_initialized():
            return self  # JAX's preemption service owns SIGTERM
        if threading.current_thread() is not threading.main_thread():
            log.warning("the train loop runs outside the main thread: SIGTERM will not stop it cleanly")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # signal.signal reports None for a handler set outside Python; the default is put back then.
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        del frame
        # Only a flag: the step in flight finishes, then the loop saves and returns.
        self._signalled = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        if self.reason is not None:
            return True
        if self._signalled is not None:
            self.reason = self._signalled
        elif self._preemption_check(step):
            self.reason = "a preemption notice"
        return self.reason is not None
