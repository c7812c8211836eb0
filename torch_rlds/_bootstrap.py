"""Worker processes that run the main script again: the ``if __name__ == "__main__":`` guard.

Under the ``forkserver`` and ``spawn`` start methods (torch_rlds uses ``forkserver`` once jax
is running), each DataLoader worker imports the main script before it starts working. A
script that builds and iterates a loader at its top level would start workers from inside a
worker: Python refuses with a message about the "bootstrapping phase" that names neither the
loader nor the cure, and the training process only sees its workers exit. These say what to do.
"""

from __future__ import annotations

import copy
import multiprocessing
from typing import Any

GUARD_ADVICE = (
    "put the script's training code under `if __name__ == \"__main__\":` (a DataLoader "
    "worker started by {method} imports the main script again, and top-level code that "
    "iterates a loader runs again there)")


def refuse_inside_bootstrap() -> None:
    """Raise ``RuntimeError`` with :data:`GUARD_ADVICE` when this process is a worker still
    importing the main script (its loader's workers would be workers' workers)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        method = "forkserver or spawn"
        raise RuntimeError("torch_rlds: a DataLoader was iterated while this worker process "
                           "was still importing the main script: "
                           + GUARD_ADVICE.format(method=method))


def explain_start_failure(error: RuntimeError, context: Any) -> RuntimeError | None:
    """A clearer error for torch's "worker exited unexpectedly" raised while workers start
    under ``forkserver`` or ``spawn`` (where a missing main guard is the common cause);
    ``None`` when that is not what ``error`` is."""
    method = _method_name(context)
    if method not in ("forkserver", "spawn") or "exited unexpectedly" not in str(error):
        return None
    explained = copy.copy(error)  # the same type (a WorkerError stays one), a longer message
    explained.args = (f"{error}: the DataLoader's workers died while starting, before their "
                      "first batch (their own errors are printed above). If the main script "
                      "has no main guard: " + GUARD_ADVICE.format(method=repr(method)),)
    return explained


def _method_name(context: Any) -> str | None:
    if context is None:
        return multiprocessing.get_start_method(allow_none=True) or "fork"
    if isinstance(context, str):
        return context
    return context.get_start_method()
