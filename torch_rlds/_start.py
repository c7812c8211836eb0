"""How the workers of a :class:`torch_rlds.DataLoader` start: the start method, and what each
worker does before the caller's ``worker_init_fn``."""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from collections.abc import Callable

import torch

from torch_rlds import _buffers
from torch_rlds._workers import watch_training_process

# Imported once by the fork server rather than by every worker it starts: a worker that
# imports torch itself takes seconds to start.
_FORKSERVER_PRELOAD = ("torch_rlds", "tensorflow_datasets")
_warned = False


def jax_backend_running() -> bool:
    """Whether jax has started a backend in this process (its threads then run; importing jax
    alone starts none). Never imports jax."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    started = getattr(bridge, "backends_are_initialized", None)
    if callable(started):
        try:
            return bool(started())
        except Exception:  # another jax's internals: judge by the table below
            pass
    return bool(getattr(bridge, "_backends", None))


def _platform_method() -> str:
    """The start method workers get when nobody chooses one (without fixing it: a later
    ``multiprocessing.set_start_method`` still works)."""
    return (multiprocessing.get_start_method(allow_none=True)
            or multiprocessing.get_all_start_methods()[0])


def default_start_method() -> str | None:
    """``"forkserver"`` where forking would copy a running jax backend into the workers (its
    threads and the locks they hold: the children can deadlock), else ``None`` (the platform's
    default stands).

    With ``forkserver`` it also asks the fork server, if it has not started yet, to import
    torch_rlds and tensorflow_datasets (neither imports jax or tensorflow) before it forks
    workers, keeping any modules already asked for.
    """
    if not jax_backend_running() or _platform_method() != "fork":
        return None
    from multiprocessing import forkserver

    asked = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    missing = [m for m in _FORKSERVER_PRELOAD if m not in asked]
    if missing:
        multiprocessing.set_forkserver_preload(asked + missing)
    return "forkserver"


def start_method_for(loader: torch.utils.data.DataLoader) -> str | None:
    """The start method for the workers ``loader`` is about to start, when torch_rlds picks
    one: only where the caller left ``multiprocessing_context`` at ``None`` and forking is
    unsafe (:func:`default_start_method`). Warns the first time."""
    if loader.num_workers == 0 or loader.multiprocessing_context is not None:
        return None
    method = default_start_method()
    global _warned
    if method is not None and not _warned:
        _warned = True
        warnings.warn(
            "torch_rlds.DataLoader: jax has started its backend in this process, and workers "
            "forked from it can deadlock; they start with 'forkserver' instead. Their dataset, "
            "collate_fn and worker_init_fn must pickle (module-level functions, not lambdas) "
            "and a script must guard its entry point with `if __name__ == \"__main__\":`. "
            "Pass multiprocessing_context to choose the start method yourself.",
            RuntimeWarning, stacklevel=5)
    return method


def init_worker(training_pid: int, buffers: tuple[torch.Tensor, int] | None,
                init: Callable[[int], None] | None, worker_id: int) -> None:
    """A worker's start: exit with the training process (:func:`watch_training_process`),
    install the worker's reused batch buffers (``buffers``:
    :meth:`torch_rlds._buffers.Leases.worker_args`),
    then run the caller's ``worker_init_fn``."""
    watch_training_process(training_pid)
    if buffers is not None:
        _buffers.install(*buffers, worker_id)
    if init is not None:
        init(worker_id)
