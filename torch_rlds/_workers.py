"""DataLoader workers that die or go silent: found, named, stopped, and reported from
``next()`` only; and workers that outlive the training process: none do."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from torch_rlds import _torchdata


class WorkerError(RuntimeError):
    """A DataLoader worker died (killed by a signal, crashed, exited) or, under the loader's
    ``timeout``, sent no batch in time.

    A ``RuntimeError``, as torch raises, and its message starts with torch's own words
    (``DataLoader worker (pid N) is killed by signal: ...``, ``... exited unexpectedly``,
    ``DataLoader timed out after N seconds``), so code that matches torch's keeps working.

    ``worker`` is its index, ``pid`` its process id, ``exitcode`` its exit status (negative: the
    signal that killed it; ``None``: still running when the loader gave up on it). The pass
    ends with it: the loader shuts its other workers down, and ``iter()`` on the loader again
    resumes right after the last batch handed out, with fresh workers.
    """

    def __init__(self, message: str, worker: int | None = None, pid: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.exitcode = exitcode


# The messages torch's DataLoader iterator raises for a dead or silent worker, and for an
# error a worker raised (torch 2.3 on).
_TORCH_TIMEOUT = "DataLoader timed out after"
_PIDS = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")
_RAISED_IN_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+")
# A worker killed while it sends a batch can break the transfer (a reset connection, a
# truncated pickle) a moment before it can be seen dead: how long to look for the death.
_DEATH_GRACE_S = 2.0


def summary(error: BaseException) -> str:
    """``Type: message`` of ``error`` in one line (torch puts a worker's traceback first)."""
    lines = str(error).strip().splitlines()
    last = lines[-1][:300] if lines else ""
    kind = type(error).__name__
    return last if last.startswith(f"{kind}:") else f"{kind}: {last}"


def diagnose(inner: Any, error: Exception) -> WorkerError | None:
    """:func:`_worker_failure`, safe from torch's SIGCHLD handler, which raises its own
    ``RuntimeError`` in the main thread at any moment once a worker has died."""
    for _ in range(3):
        try:
            if _torchdata.watched_by_sigchld(inner):  # the pass ends: stop watching them
                _torchdata.unwatch_workers(inner)
            return _worker_failure(inner, error)
        except RuntimeError as late:  # the handler ran first; its message names the worker
            error = late
    return _worker_failure(inner, error)


def _worker_failure(inner: Any, error: Exception) -> WorkerError | None:
    """The :class:`WorkerError` that ``error``, raised by ``inner``'s ``__next__``, stands for;
    ``None`` when it is no worker's death or silence (a dataset's own error passes as it is)."""
    workers = _torchdata.worker_processes(inner)
    if not workers:
        return None
    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None)
    named = {int(p) for match in _PIDS.finditer(text) for p in match.group(1).split(",")
             if p.strip()}
    raised_by_dataset = bool(_RAISED_IN_WORKER.match(str(error)))
    deadline = time.monotonic() + (0.0 if raised_by_dataset else _DEATH_GRACE_S)
    while True:
        for worker, process in enumerate(workers):
            process.join(timeout=0)  # reaps it if it is dead, which sets its exitcode
            if process.pid in named or process.exitcode not in (None, 0):
                code = process.exitcode
                if code is None:
                    process.join(timeout=1.0)  # torch saw it die before its exit was collected
                    code = process.exitcode
                return WorkerError(f"{_describe_exit(process.pid, code)} (worker {worker}); "
                                   "the loader stopped its other workers. Its state still ends "
                                   "at the last batch handed out: iter() again resumes there "
                                   "with fresh workers", worker, process.pid, code)
        if time.monotonic() >= deadline or str(error).startswith(_TORCH_TIMEOUT):
            break
        time.sleep(0.01)
    if str(error).startswith(_TORCH_TIMEOUT):
        waited = _torchdata.waited_worker(inner)
        if waited is not None:
            process = workers[waited]
            timeout = _torchdata.worker_timeout(inner)
            return WorkerError(f"DataLoader timed out after {timeout} seconds: worker "
                               f"{waited} (pid {process.pid}) sent no batch in time (stuck or "
                               "too slow); the loader stopped it and its other workers. Its "
                               "state still ends at the last batch handed out: iter() again "
                               "resumes there with fresh workers", waited, process.pid, None)
    return None


def _describe_exit(pid: int, code: int | None) -> str:
    """What happened to worker ``pid``, in torch's words first."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = signal.strsignal(-code) or name
        return f"DataLoader worker (pid {pid}) is killed by signal: {text}. ({name}, exit code " \
               f"{code})"
    known = "unknown" if code is None else code
    return f"DataLoader worker (pid(s) {pid}) exited unexpectedly (exit code {known})"


def stop_workers(inner: Any, stuck: int | None) -> None:
    """Shut ``inner``'s workers down now, rather than when it is collected, and make sure none
    outlives this call: worker ``stuck`` (one the loader timed out on) and any other that does
    not exit when asked are killed."""
    workers = _torchdata.worker_processes(inner)
    if not workers:
        return
    if stuck is not None and workers[stuck].is_alive():
        workers[stuck].kill()
    # torch's SIGCHLD handler may raise for a worker that exits while it shuts the rest down.
    with contextlib.suppress(RuntimeError):
        _torchdata.shutdown_workers(inner)
    for process in workers:
        process.join(timeout=5.0)
        if process.exitcode is None:
            process.kill()
            process.join(timeout=5.0)


# How often a loader waiting for a batch checks that its workers live.
_POLL_S = 0.1


def report_deaths_from_next(iterator: Any) -> None:
    """Have a dead worker reported by ``next()``, and only there.

    torch watches its workers with a SIGCHLD handler that raises ``RuntimeError`` in the main
    thread wherever it happens to be (in the training step, in a ``finally``, in an import),
    where no caller can catch it as a loader error. This takes the workers off that handler
    and instead has ``next()``, while it waits for a batch, check them every ``_POLL_S``
    seconds (torch's own check, which it otherwise makes every 5 s).
    """
    _torchdata.unwatch_workers(iterator)
    _torchdata.wrap_data_wait(iterator, _poll_workers)


def _poll_workers(wait: Callable[[float], tuple[bool, Any]],
                  timeout: float) -> tuple[bool, Any]:
    """Wait up to ``timeout`` seconds for a batch through torch's ``wait``, which checks the
    workers each time it returns, in steps of ``_POLL_S``."""
    deadline = time.monotonic() + timeout
    while True:
        step = min(_POLL_S, max(deadline - time.monotonic(), 0.0))
        success, data = wait(step)  # raises once a worker is dead
        if success or time.monotonic() >= deadline:
            return success, data


# How often a worker checks that the training process lives, where the system cannot say at
# once (no pidfd).
_WATCH_S = 0.5


def watch_training_process(pid: int) -> None:
    """Make this worker exit as soon as process ``pid`` (the training process) is gone.

    torch's workers watch their parent, which with ``forkserver`` is the fork server; and the
    fork server outlives a training process killed without cleanup (SIGKILL, a SIGTERM without
    a handler, ``os._exit``), because every worker holds its lifeline open. So each worker
    watches the training process itself, in a daemon thread (on Linux through a pidfd, woken
    the moment it exits; elsewhere by polling), and leaves with ``os._exit``: nothing of a
    process that nobody reads from is worth unwinding. Once the workers are gone, the fork
    server and the resource tracker see their last client go, exit, and remove the named
    semaphores they kept.
    """
    if pid == os.getpid():
        return
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # already gone
    except (AttributeError, OSError):
        handle = None
    threading.Thread(target=_watch, args=(pid, handle), name="torch_rlds-watch-training",
                     daemon=True).start()


def _watch(pid: int, handle: int | None) -> None:
    if handle is not None:
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        while not poller.poll():
            pass
    else:
        while _exists(pid):
            time.sleep(_WATCH_S)
    os._exit(1)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
