"""A background thread that runs a loader ahead of its caller without leaking into the state."""

from __future__ import annotations

import atexit
import copy
import queue
import threading
from collections.abc import Callable
from typing import Any, cast

from torch_rlds.adapters._common import StatefulLoader

_END = object()
_POLL_S = 0.1
_JOIN_TIMEOUT_S = 300.0
# At interpreter exit, how long each prefetch thread still running gets to stop.
_EXIT_JOIN_S = 10.0
# The prefetch threads running now, with their stop events: stopped at interpreter exit,
# before the libraries they call into (jax's runtime) are torn down under them; a daemon thread
# still inside XLA at that point aborts the process ("terminate called without an active
# exception").
_running: dict[threading.Thread, threading.Event] = {}
_running_lock = threading.Lock()


def _stop_running() -> None:
    with _running_lock:
        running = list(_running.items())
    for _, stop in running:
        stop.set()
    for thread, _ in running:
        thread.join(_EXIT_JOIN_S)


atexit.register(_stop_running)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _produce(loader: Any, transform: Callable[[Any], Any], iterator: Any, out: queue.Queue,
             stop: threading.Event) -> None:
    try:
        _run(loader, transform, iterator, out, stop)
    finally:
        with _running_lock:
            _running.pop(threading.current_thread(), None)


def _run(loader: Any, transform: Callable[[Any], Any], iterator: Any, out: queue.Queue,
         stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            batch = next(iterator)
        except StopIteration:
            _put(out, stop, _END)
            return
        except BaseException as e:  # handed to the caller's thread
            _put(out, stop, _Failure(e))
            return
        try:
            # Captured before the next pull, so it is exactly "after this batch".
            state = loader.state_dict()
            item = (transform(batch), state)
        except BaseException as e:
            _put(out, stop, _Failure(e))
            return
        if not _put(out, stop, item):
            return


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class StatefulPrefetcher:
    """Iterates a stateful loader ``prefetch`` batches ahead in a thread, transforming each.

    Each batch travels through the queue with the loader's state captured right after the
    loader produced it, so :meth:`state_dict` is the state after the last batch the caller
    received, however far the thread has run ahead (contract 3 of torch_rlds/DESIGN.md), and
    ``state_dict(held=1)`` the state before it (for a loop that fetches its next batch before
    it saves, as openpi's does: the batch it holds is handed out again first). That state is
    the wrapped loader's own format: it can be loaded into the loader directly, and vice versa.

    Iteration is one continuing stream: ``iter()`` again while a pass is under way continues it
    (batches already prefetched are not dropped); once the loader's pass ends, the next
    ``iter()`` starts a new pass of the loader. :meth:`load_state_dict` stops the thread and the
    next batch comes from the restored state. ``prefetch=0`` runs everything in the caller's
    thread. Errors of the loader or the transform are raised in the caller's thread.

    Not thread-safe: one thread iterates, saves and restores.
    """

    def __init__(self, loader: StatefulLoader, transform: Callable[[Any], Any], prefetch: int = 2,
                 *, name: str = "prefetch") -> None:
        if type(prefetch) is not int or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (got {prefetch!r})")
        self.loader = loader
        self.prefetch = prefetch
        self._transform = transform
        self._name = name
        self._iterator: Any = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._state: dict[str, Any] | None = None
        self._before: dict[str, Any] | None = None  # the state before the last batch received
        self._received = 0

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> StatefulPrefetcher:
        if self._iterator is None:
            self._start()
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start()
        if self._queue is None:
            try:
                batch = next(self._iterator)
            except BaseException:
                self._iterator = None
                raise
            state = self.loader.state_dict()
            item = (self._transform(batch), state)
        else:
            item = self._get()
        if item is _END:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            raise item.error
        out, state = item
        self._before, self._state = self._state, state
        self._received += 1
        return out

    def _start(self) -> None:
        self._iterator = iter(self.loader)
        # The state before the first batch of this pass (it may be a restored one).
        state = self.loader.state_dict()
        if self._state is None or state != self._state:
            self._before = None
        self._state = state
        if self.prefetch == 0:
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        # The thread holds no reference to self, so an abandoned prefetcher is collected and
        # its __del__ stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(self.loader, self._transform, self._iterator, self._queue, self._stop),
            name=f"torch_rlds-{self._name}", daemon=True)
        with _running_lock:
            _running[self._thread] = self._stop
        self._thread.start()

    def _get(self) -> Any:
        items = cast(queue.Queue, self._queue)  # a pass with a thread is under way
        while True:
            try:
                return items.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    try:
                        return items.get_nowait()
                    except queue.Empty:
                        raise RuntimeError(f"{self._name}: the prefetch thread ended without "
                                           "a batch or an error") from None

    def _finish(self) -> None:
        """End the current pass: stop the thread, drop prefetched batches."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._name}: the prefetch thread did not stop within "
                                   f"{_JOIN_TIMEOUT_S:.0f} s (the loader is blocked)")
        self._thread = self._queue = self._stop = None
        self._iterator = None

    def close(self) -> None:
        """Stop the prefetch thread and drop the batches it prefetched; the next ``iter()``
        continues right after the last batch received."""
        ahead = self._queue is not None and self._state is not None
        self._finish()
        if ahead:  # the loader itself has run ahead: rewind it
            self.loader.load_state_dict(copy.deepcopy(self._state))

    # -- state -----------------------------------------------------------------------------
    def state_dict(self, *, held: int = 0) -> dict[str, Any]:
        """The loader's state after the last batch handed to the caller; with ``held=1``, the
        state before that batch (a loop that holds it, not yet used, when it saves), so that
        a resume hands it out again first."""
        if held not in (0, 1):
            raise ValueError(f"held must be 0 or 1 (got {held!r}): the state is kept for the "
                             "last batch handed out and the one before")
        if held:
            if self._before is None:
                raise ValueError(f"{self._name}: no state before the last batch handed out "
                                 "(no batch handed out since the start or the last restore)")
            return copy.deepcopy(self._before)
        if self._state is None:  # nothing iterated or restored yet
            return self.loader.state_dict()
        return copy.deepcopy(self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue after the batch ``state_dict`` was saved after, on the next batch (also
        for an iterator of this object already handed out: it is the object itself)."""
        self._finish()
        self.loader.load_state_dict(state_dict)
        self._state = copy.deepcopy(state_dict)
        self._before = None

    @property
    def batches_received(self) -> int:
        """Batches handed to the caller by this object (not restored with the state)."""
        return self._received

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
