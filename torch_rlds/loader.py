"""``DataLoader``: torchdata's ``StatefulDataLoader`` with torch_rlds defaults and file I/O."""

from __future__ import annotations

import json
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from etils import epath
from torchdata.stateful_dataloader import StatefulDataLoader

from torch_rlds.collate import collate

LOADER_STATE_KEY = "torch_rlds"
LOADER_STATE_VERSION = 1
_TMP_MARK = ".tmp-"

# torchdata 0.11 calls a torch API that newer torch deprecates, once per iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def default_start_method() -> str | None:
    """``forkserver`` once jax is imported (forking a process in which jax has started its
    backend threads can deadlock the child), else the platform default."""
    return "forkserver" if "jax" in sys.modules else None


class DataLoader(StatefulDataLoader):
    """A drop-in ``StatefulDataLoader`` with defaults for RLDS training.

    Differences from ``StatefulDataLoader``:

    * ``collate_fn`` defaults to :func:`torch_rlds.collate` (tensors in shared memory, strings
      as lists);
    * ``as_numpy=True`` hands out numpy views of the batch tensors, without a copy;
    * workers start with ``forkserver`` when jax is imported in the parent
      (:func:`default_start_method`), unless ``multiprocessing_context`` is given;
    * :attr:`batches_seen` counts the batches handed to the caller and is restored with the
      state; :meth:`save_state` / :meth:`load_state` write and read the state as JSON,
      atomically (temporary file, then rename), locally or on ``gs://``.

    The state is what ``StatefulDataLoader`` saves (each worker's dataset state gathered with
    the batch it produced, so prefetched batches never leak into it) plus
    ``{"torch_rlds": {"version", "batches_seen"}}``. It survives a JSON round trip.
    Not thread-safe: one thread iterates and saves.
    """

    def __init__(self, dataset, batch_size: int | None = 1, *, as_numpy: bool = False,
                 collate_fn=None, multiprocessing_context=None, **kwargs: Any) -> None:
        if multiprocessing_context is None and kwargs.get("num_workers", 0) > 0:
            multiprocessing_context = default_start_method()
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn or collate,
                         multiprocessing_context=multiprocessing_context, **kwargs)
        self.as_numpy = as_numpy
        self.batches_seen = 0

    def __iter__(self) -> Iterator[Any]:
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        """The loader's state (see the class docstring)."""
        state = dict(super().state_dict())
        state[LOADER_STATE_KEY] = {"version": LOADER_STATE_VERSION,
                                   "batches_seen": self.batches_seen}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"loader state must be a dict (got {type(state_dict).__name__})")
        state = dict(state_dict)
        ours = state.pop(LOADER_STATE_KEY, None)
        if ours is not None:
            if not isinstance(ours, dict) or ours.get("version") != LOADER_STATE_VERSION:
                raise ValueError(f"loader state field {LOADER_STATE_KEY!r}: expected version "
                                 f"{LOADER_STATE_VERSION}, got {ours!r:.200}")
            seen = ours.get("batches_seen")
            if type(seen) is not int or seen < 0:
                raise ValueError(f"loader state field 'batches_seen' must be an int >= 0 "
                                 f"(got {seen!r})")
            self.batches_seen = seen
        super().load_state_dict(state)

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


class _CountingIterator:
    def __init__(self, loader: DataLoader, inner: Iterator[Any]) -> None:
        self._loader = loader
        self._inner = inner

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._inner)
        self._loader.batches_seen += 1
        return to_numpy(batch) if self._loader.as_numpy else batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


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
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
    tmp = path.parent / f".{path.name}{_TMP_MARK}{uuid.uuid4().hex}"
    if "://" in os.fspath(tmp):  # object stores have no fsync; the rename is a copy there
        tmp.write_text(data)
    else:
        with open(os.fspath(tmp), "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    tmp.rename(path)


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
