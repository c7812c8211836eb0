"""``DataLoader``: torchdata's ``StatefulDataLoader`` with torch_rlds defaults and file I/O."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.data
from etils import epath
from torchdata.stateful_dataloader import StatefulDataLoader

from torch_rlds._loader_stats import LoaderStats, StatsTracker
from torch_rlds.collate import collate
from torch_rlds.dataset import RLDSDataset

LOADER_STATE_KEY = "torch_rlds"
LOADER_STATE_VERSION = 1
_TMP_MARK = ".tmp-"

# torchdata 0.11 calls a torch API that newer torch deprecates, once per iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


# Imported once by the fork server rather than by every worker it starts: a worker that
# imports torch itself takes seconds to start.
_FORKSERVER_PRELOAD = ("torch_rlds", "tensorflow_datasets")


def default_start_method() -> str | None:
    """``forkserver`` once jax is imported (forking a process in which jax has started its
    backend threads can deadlock the child), else the platform default.

    With ``forkserver`` it also asks the fork server, if it has not started yet, to import
    torch_rlds and tensorflow_datasets (neither imports jax or tensorflow) before it forks
    workers, keeping any modules already asked for.
    """
    if "jax" not in sys.modules:
        return None
    from multiprocessing import forkserver

    asked = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    missing = [m for m in _FORKSERVER_PRELOAD if m not in asked]
    if missing:
        multiprocessing.set_forkserver_preload(asked + missing)
    return "forkserver"


class DataLoader(StatefulDataLoader):
    """A drop-in ``StatefulDataLoader`` with defaults for RLDS training.

    Differences from ``StatefulDataLoader``:

    * ``collate_fn`` defaults to :func:`torch_rlds.collate` (a batch is one buffer of shared
      memory that crosses from a worker as one handle; strings as lists); with
      ``batch_size=None`` to torch's, which turns each sample's arrays into tensors;
    * ``as_numpy=True`` hands out numpy views of the batch tensors, without a copy;
    * workers start with ``forkserver`` when jax is imported in the parent
      (:func:`default_start_method`, decided again at every ``iter()``), unless
      ``multiprocessing_context`` is given;
    * :attr:`batches_seen` counts the batches handed to the caller and is restored with the
      state; :meth:`save_state` / :meth:`load_state` write and read the state as JSON,
      atomically (temporary file, then rename), locally or on ``gs://``;
    * a state of another worker count, or one that does not belong to the dataset, raises
      ``ValueError`` naming the field in :meth:`load_state_dict` rather than in a worker later;
    * iteration is one stream whatever ``num_workers`` and ``persistent_workers``: an
      ``iter()`` after an unfinished pass (a ``break``) continues right after the last batch
      handed out (``StatefulDataLoader`` would drop what its workers had prefetched, or start
      over); an ``iter()`` after a finished pass of a one-pass :class:`~torch_rlds.RLDSDataset`
      starts the next epoch (``StatefulDataLoader`` without persistent workers would repeat the
      first one);
    * :meth:`stats` reports throughput, the time the caller waited for data, epoch progress
      and what was served per dataset.

    The state is what ``StatefulDataLoader`` saves (each worker's dataset state gathered with
    the batch it produced, so prefetched batches never leak into it) plus
    ``{"torch_rlds": {"version", "batches_seen"}}``. It survives a JSON round trip.
    Not thread-safe: one thread iterates and saves.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int | None = 1, *,
                 as_numpy: bool = False, collate_fn: Callable[[list[Any]], Any] | None = None,
                 multiprocessing_context: Any = None, **kwargs: Any) -> None:
        self._choose_start_method = multiprocessing_context is None
        if multiprocessing_context is None and kwargs.get("num_workers", 0) > 0:
            multiprocessing_context = default_start_method()
        if collate_fn is None and batch_size is not None:
            collate_fn = collate  # without batching torch's default converts each sample
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn,
                         multiprocessing_context=multiprocessing_context, **kwargs)
        self.as_numpy = as_numpy
        self.batches_seen = 0
        self._stats = StatsTracker(_episodes_per_epoch(dataset))

    def __iter__(self) -> Iterator[Any]:
        if (self._choose_start_method and self.num_workers > 0
                and self.multiprocessing_context is None and "jax" in sys.modules):
            # jax was imported after this loader was built: workers must not be forked now.
            self.multiprocessing_context = default_start_method()
        self._prepare_pass()
        return _CountingIterator(self, super().__iter__())

    def _prepare_pass(self) -> None:
        """Make the iterator ``StatefulDataLoader.__iter__`` is about to build continue the
        stream (see the class docstring)."""
        previous = self._iterator
        if self.next_iter_state is not None:
            pending = self.next_iter_state  # a loaded state: the next iterator resumes it
        elif previous is None:
            return
        elif self._initial_iter_for_state_dict:
            pending = previous.state_dict()  # an iterator built by state_dict(), not yet used
        elif previous._finished:
            pending = previous.state_dict()
        else:
            # An unfinished pass: resume it from the batches handed out, not from what the
            # workers had already fetched.
            self.load_state_dict(self.state_dict())
            return
        if (pending.get(_ITERATOR_FINISHED) is True and self.num_workers > 0
                and not self.persistent_workers and isinstance(self.dataset, RLDSDataset)
                and not self.dataset.repeat):
            # StatefulDataLoader would start fresh workers from this process's copy of the
            # dataset, which never advanced: move that copy to the epoch after the finished one.
            epochs = [s["epoch"] for s in dataset_states(pending) if isinstance(s, dict)]
            self.dataset.set_epoch(max(epochs) + 1 if epochs else 0)
            self.next_iter_state = None
            self._iterator = None
            self._initial_iter_for_state_dict = False

    def stats(self) -> LoaderStats:
        """Throughput, time the caller waited for data, epoch progress and steps and episodes
        served per dataset, since this loader was built (see :class:`LoaderStats`)."""
        return self._stats.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """The loader's state (see the class docstring)."""
        state = dict(super().state_dict())
        state[LOADER_STATE_KEY] = {"version": LOADER_STATE_VERSION,
                                   "batches_seen": self.batches_seen}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``.

        Raises ``ValueError`` for a state of another worker count or, for an
        :class:`~torch_rlds.RLDSDataset`, one whose dataset states do not match it (every
        differing field is named, with both values).
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"loader state must be a dict (got {type(state_dict).__name__})")
        state = dict(state_dict)
        ours = state.pop(LOADER_STATE_KEY, None)
        seen = self.batches_seen
        if ours is not None:
            if not isinstance(ours, dict) or ours.get("version") != LOADER_STATE_VERSION:
                raise ValueError(f"loader state field {LOADER_STATE_KEY!r}: expected version "
                                 f"{LOADER_STATE_VERSION}, got {ours!r:.200}")
            seen = ours.get("batches_seen")
            if type(seen) is not int or seen < 0:
                raise ValueError(f"loader state field 'batches_seen' must be an int >= 0 "
                                 f"(got {seen!r})")
        if state:
            self._check_state(state)
        super().load_state_dict(state)
        self.batches_seen = seen

    def _check_state(self, state: dict[str, Any]) -> None:
        saved = saved_num_workers(state)
        if saved != self.num_workers:
            raise ValueError(f"num_workers in checkpoint: {saved} / in this loader: "
                             f"{self.num_workers}")
        if isinstance(self.dataset, RLDSDataset):
            for worker, dataset_state in enumerate(dataset_states(state)):
                try:
                    self.dataset._check_state(dataset_state, self.num_workers, worker)
                except ValueError as e:
                    where = f"worker {worker}: " if self.num_workers else ""
                    raise ValueError(f"{where}{e}") from None

    def save_state(self, path: str | os.PathLike) -> epath.Path:
        """Write the state as JSON to ``path`` atomically; returns the path.

        The JSON goes to a temporary file beside ``path`` that is renamed over it, so a save that
        is killed leaves the previous state intact; leftover temporary files of killed saves are
        removed by the next save.
        """
        path = epath.Path(path)
        write_json_atomic(path, self.state_dict())
        return path

    def load_state(self, path: str | os.PathLike) -> None:
        """Load a state written by :meth:`save_state`."""
        self.load_state_dict(read_json(path))


# The layout of a StatefulDataLoader state (torchdata 0.10, 0.11): without workers the dataset
# state sits at the top; with workers each worker's sits in the last snapshot.
_ITERATOR_FINISHED = "_iterator_finished"
_DATASET_STATE = "dataset_state"
_SNAPSHOT = "_snapshot"
_MAIN_SNAPSHOT = "_main_snapshot"
_WORKER_SNAPSHOTS = "_worker_snapshots"
_NUM_WORKERS = "_num_workers"
_NUM_YIELDED = "_num_yielded"


def saved_num_workers(state: dict[str, Any]) -> int:
    """The ``num_workers`` of the ``StatefulDataLoader`` that saved ``state``."""
    if _SNAPSHOT in state:
        try:
            workers = state[_SNAPSHOT][_MAIN_SNAPSHOT][_NUM_WORKERS]
        except (KeyError, TypeError):
            raise ValueError(f"loader state: {_SNAPSHOT!r} has no {_MAIN_SNAPSHOT}."
                             f"{_NUM_WORKERS} (not a StatefulDataLoader state)") from None
        if type(workers) is not int or workers < 1:
            raise ValueError(f"loader state field {_NUM_WORKERS!r} must be an int >= 1 (got "
                             f"{workers!r})")
        return workers
    if _NUM_YIELDED in state:
        return 0
    raise ValueError(f"loader state has neither {_SNAPSHOT!r} (with workers) nor "
                     f"{_NUM_YIELDED!r} (without): not a StatefulDataLoader state (keys: "
                     f"{sorted(map(str, state))[:10]})")


def dataset_states(state: dict[str, Any]) -> list[Any]:
    """The dataset states inside a ``StatefulDataLoader`` state, one per worker in worker
    order (one without workers); ``None`` where a worker saved none."""
    if saved_num_workers(state) == 0:
        return [state.get(_DATASET_STATE)]
    workers = state[_SNAPSHOT].get(_WORKER_SNAPSHOTS)
    if not isinstance(workers, dict):
        raise ValueError(f"loader state field {_WORKER_SNAPSHOTS!r} must be a dict (got "
                         f"{type(workers).__name__})")
    count = state[_SNAPSHOT][_MAIN_SNAPSHOT][_NUM_WORKERS]
    out = []
    for i in range(count):
        worker = workers.get(f"worker_{i}")
        if not isinstance(worker, dict):
            raise ValueError(f"loader state: {_WORKER_SNAPSHOTS}.worker_{i} is missing ("
                             f"{count} workers saved)")
        out.append(worker.get(_DATASET_STATE))
    return out


class _CountingIterator:
    def __init__(self, loader: DataLoader, inner: Iterator[Any]) -> None:
        self._loader = loader
        self._inner = inner

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        tracker = self._loader._stats
        started = tracker.started()
        batch = next(self._inner)
        self._loader.batches_seen += 1
        tracker.served(batch, started)
        return to_numpy(batch) if self._loader.as_numpy else batch

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _episodes_per_epoch(dataset: Any) -> int | None:
    source = getattr(dataset, "source", None)
    count = getattr(dataset, "process_count", 1)
    if source is None or not isinstance(count, int) or count < 1:
        return None
    return -(-len(source) // count)


def to_numpy(tree: Any) -> Any:
    """Replace every tensor in ``tree`` with a numpy view of it (no copy)."""
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], torch.Tensor):
        return type(tree)(to_numpy(v) for v in tree)
    return tree


def write_json_atomic(path: epath.Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    data = json.dumps(obj, sort_keys=True, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError):  # another save removed it first
            stale.unlink()
    tmp = path.parent / f".{path.name}{_TMP_MARK}{uuid.uuid4().hex}"
    if "://" in os.fspath(tmp):  # object stores have no fsync; the rename is a copy there
        tmp.write_text(data)
    else:
        with open(os.fspath(tmp), "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)  # atomic on a local disk; rename() refuses an existing target


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON state file; the error names the file when it is missing or malformed."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no state file")
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON state ({e})") from e
