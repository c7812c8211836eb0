"""Every private part of torchdata (and of torch's DataLoader) that torch_rlds relies on.

torch_rlds extends ``StatefulDataLoader`` where torchdata offers no public hook: it builds the
iterators itself (counting what they hand out, freeing shared buffers, naming dead workers),
continues passes, reads the saved state's layout, and watches the worker processes. Those
reach names torchdata and torch keep private, and a release may rename any of them. They are
reached here only, so that a new release is checked in one module:

* :data:`SUPPORTED_VERSIONS` lists the torchdata releases whose internals this module was
  checked against (``setup.cfg`` bounds the dependency to them, :data:`REQUIREMENT`;
  ``.ci/constraints.txt`` pins the release CI tests). Importing torch_rlds under another release warns, naming both; under one
  that lacks a name the classes here need, it raises ``ImportError``, naming the names.
* ``tests/test_torchdata.py`` checks that every name listed in :data:`CLASS_NAMES`,
  :data:`LOADER_ATTRIBUTES`, :data:`ITERATOR_ATTRIBUTES` and :data:`WORKER_ITERATOR_ATTRIBUTES`
  exists on the installed torchdata and torch, and that the layout constants below are the
  keys torchdata saves.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.utils.data
import torch.utils.data._utils
import torch.utils.data._utils.signal_handling
import torchdata.stateful_dataloader.stateful_dataloader as _stateful
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata releases (major.minor) whose private names and saved layout this module matches
# (0.10 lacks StatefulDataLoader's in_order argument), and the requirement setup.cfg states.
SUPPORTED_VERSIONS = ("0.11",)
REQUIREMENT = "torchdata>=0.11,<0.12"

# -- the layout of a StatefulDataLoader state -----------------------------------------------------
# Without workers the dataset state sits at the top; with workers each worker's sits in the last
# snapshot, under WORKER_SNAPSHOTS[worker_key(i)].
ITERATOR_FINISHED = "_iterator_finished"
DATASET_STATE = "dataset_state"
NUM_YIELDED = "_num_yielded"
FETCHER_STATE = "fetcher_state"
FETCHER_ENDED = "fetcher_ended"
DATASET_ITER_STATE = "dataset_iter_state"
INDEX_SAMPLER_STATE = "_index_sampler_state"
SAMPLER_ITER_STATE = "_sampler_iter_state"
SAMPLER_ITER_YIELDED = "_sampler_iter_yielded"
ITERABLE_LEN_CALLED = "_IterableDataset_len_called"
SHARED_SEED = "_shared_seed"
SNAPSHOT = "_snapshot"
STEPS_SINCE_SNAPSHOT = "_steps_since_snapshot"
SNAPSHOT_STEP = "_snapshot_step"
LAST_YIELDED_WORKER_ID = "_last_yielded_worker_id"
MAIN_SNAPSHOT = "_main_snapshot"
WORKER_SNAPSHOTS = "_worker_snapshots"
NUM_WORKERS = "_num_workers"
BASE_SEED = "_base_seed"
WORKER_ID = "worker_id"
# The state of torchdata's batch sampler over torch's infinite sampler (an IterableDataset's).
SAMPLES_YIELDED = "samples_yielded"


def worker_key(worker: int) -> str:
    """The key of worker ``worker``'s snapshot in :data:`WORKER_SNAPSHOTS`."""
    return f"worker_{worker}"


# -- the private names used, for the version check and its test ----------------------------------
SingleProcessIterBase: type = getattr(_stateful, "_StatefulSingleProcessDataLoaderIter", object)
MultiProcessIterBase: type = getattr(_stateful, "_StatefulMultiProcessingDataLoaderIter", object)
_signals = torch.utils.data._utils.signal_handling

# (where, name, owner): a name ``owner`` has without an instance.
CLASS_NAMES: tuple[tuple[str, str, Any], ...] = (
    ("torchdata.stateful_dataloader.stateful_dataloader", "_StatefulSingleProcessDataLoaderIter",
     _stateful),
    ("torchdata.stateful_dataloader.stateful_dataloader",
     "_StatefulMultiProcessingDataLoaderIter", _stateful),
    ("StatefulDataLoader", "_get_iterator", StatefulDataLoader),
    ("StatefulDataLoader", "check_worker_number_rationality", StatefulDataLoader),
    ("_StatefulMultiProcessingDataLoaderIter", "_try_get_data", MultiProcessIterBase),
    ("_StatefulMultiProcessingDataLoaderIter", "_shutdown_workers", MultiProcessIterBase),
    ("torch.utils.data._utils.signal_handling", "_remove_worker_pids", _signals),
    ("torch.utils.data._utils", "MP_STATUS_CHECK_INTERVAL", torch.utils.data._utils),
    ("torch.UntypedStorage", "_new_shared", torch.UntypedStorage),
)
# Attributes a StatefulDataLoader instance has.
LOADER_ATTRIBUTES = ("_iterator", "_initial_iter_for_state_dict", "next_iter_state")
# Attributes every StatefulDataLoader iterator has, and those of one with workers.
ITERATOR_ATTRIBUTES = ("_finished", "_dataset", "_num_yielded")
WORKER_ITERATOR_ATTRIBUTES = ("_workers", "_index_queues", "_task_info", "_rcvd_idx", "_timeout",
                              "_worker_pids_set")


def installed_version() -> str:
    """The installed torchdata's version string (``"0.11.0"``, local suffixes kept)."""
    try:
        return importlib.metadata.version("torchdata")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        return str(getattr(_stateful, "__version__", "unknown"))


def missing_class_names() -> list[str]:
    """The names of :data:`CLASS_NAMES` that the installed torchdata and torch lack, and
    ``StatefulDataLoader``'s ``in_order`` argument where it lacks that."""
    missing = [f"{where}.{name}" for where, name, owner in CLASS_NAMES
               if not hasattr(owner, name)]
    if "in_order" not in inspect.signature(StatefulDataLoader.__init__).parameters:
        missing.append("StatefulDataLoader's in_order argument")
    return missing


def check_version(version: str, missing: list[str]) -> None:
    """Refuse a torchdata that lacks a private name torch_rlds needs (``ImportError``); warn
    for one outside :data:`SUPPORTED_VERSIONS` that has them all."""
    supported = ", ".join(SUPPORTED_VERSIONS)
    if missing:
        raise ImportError(f"torch_rlds works with torchdata {supported} (found torchdata "
                          f"{version}, which lacks {', '.join(missing)}); install "
                          f"{REQUIREMENT!r}")
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or f"{found[1]}.{found[2]}" not in SUPPORTED_VERSIONS:
        warnings.warn(f"torch_rlds is tested with torchdata {supported} (found torchdata "
                      f"{version}); exact resume relies on its internals, so install "
                      f"{REQUIREMENT!r}", RuntimeWarning, stacklevel=3)


check_version(installed_version(), missing_class_names())

_T_co = TypeVar("_T_co", covariant=True)


# -- the loader ----------------------------------------------------------------------------------
class LoaderBase(StatefulDataLoader[_T_co]):
    """``StatefulDataLoader`` with its iterator factory (torch's private ``_get_iterator``) as
    the hook :meth:`_new_iterator`, which a subclass overrides to build its own iterators."""

    def _get_iterator(self) -> Any:
        return self._new_iterator()

    def _new_iterator(self) -> Any:
        return super()._get_iterator()


def live_iterator(loader: StatefulDataLoader) -> Any:
    """The iterator ``loader`` keeps between ``iter()`` calls (``None`` before the first)."""
    return loader._iterator


def forget_iterator(loader: StatefulDataLoader) -> None:
    """Make the next ``iter(loader)`` build a fresh iterator."""
    loader._iterator = None
    loader._initial_iter_for_state_dict = False


def iterator_unused(loader: StatefulDataLoader) -> bool:
    """Whether ``loader``'s iterator was built by ``state_dict()`` and not yet iterated."""
    return bool(loader._initial_iter_for_state_dict)


def pending_state(loader: StatefulDataLoader) -> dict[str, Any] | None:
    """The state ``loader`` loaded that its next iterator will resume (``None``: none)."""
    return loader.next_iter_state


def set_pending_state(loader: StatefulDataLoader, state: dict[str, Any] | None) -> None:
    """Set the state the next iterator of ``loader`` resumes."""
    loader.next_iter_state = state


def check_worker_count(loader: StatefulDataLoader) -> None:
    """torch's warning for more workers than CPUs, as its own iterator factory gives it."""
    loader.check_worker_number_rationality()


def report_batching(loader: StatefulDataLoader, batch_size: int | None,
                    drop_last: bool) -> None:
    """Set ``loader.batch_size`` and ``drop_last``, which torch's DataLoader refuses to change
    after construction (the loader reports what was asked for while its dataset batches)."""
    object.__setattr__(loader, "batch_size", batch_size)
    object.__setattr__(loader, "drop_last", drop_last)


def yielded_in_pass(loader: Any) -> int:
    """The batches the current iterator of ``loader`` has yielded (0: no iterator)."""
    return getattr(getattr(loader, "_iterator", None), "_num_yielded", 0)


# -- its iterators -------------------------------------------------------------------------------
def pass_finished(iterator: Any) -> bool:
    """Whether ``iterator`` has raised ``StopIteration``."""
    return bool(iterator._finished)


def iterator_dataset(iterator: Any) -> Any:
    """The dataset a single-process iterator reads."""
    return iterator._dataset


def index_queues(iterator: Any) -> list[Any]:
    """The queues through which ``iterator`` sends its workers their tasks."""
    return iterator._index_queues


def worker_processes(iterator: Any) -> list[Any]:
    """The worker processes of ``iterator`` (none without workers)."""
    return list(getattr(iterator, "_workers", None) or ())


def waited_worker(iterator: Any) -> int | None:
    """The worker whose batch ``iterator`` waits for next, where it knows."""
    task = getattr(iterator, "_task_info", {}).get(getattr(iterator, "_rcvd_idx", None))
    return task[0] if task else None


def worker_timeout(iterator: Any) -> float:
    """The loader's ``timeout`` as ``iterator`` applies it."""
    return iterator._timeout


def shutdown_workers(iterator: Any) -> None:
    """torch's own shutdown of ``iterator``'s workers."""
    iterator._shutdown_workers()


def watched_by_sigchld(iterator: Any) -> bool:
    """Whether torch's SIGCHLD handler watches ``iterator``'s workers."""
    return bool(getattr(iterator, "_worker_pids_set", False))


def unwatch_workers(iterator: Any) -> None:
    """Take ``iterator``'s workers off torch's SIGCHLD handler (which raises in the main
    thread, anywhere, once one dies)."""
    _signals._remove_worker_pids(id(iterator))
    iterator._worker_pids_set = False


# torch's default wait for a batch, in seconds, between checks that the workers live.
STATUS_CHECK_INTERVAL: float = torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL


def wrap_data_wait(iterator: Any,
                   wait: Callable[[Callable[[float], tuple[bool, Any]], float],
                                  tuple[bool, Any]]) -> None:
    """Have ``iterator`` wait for each batch through ``wait(torch_wait, timeout)``, where
    ``torch_wait(seconds)`` is torch's own wait (``(success, data)``; it raises once a worker
    is dead). The wrapper holds ``iterator`` weakly: it still dies with its owner."""
    ref = weakref.ref(iterator)
    method = type(iterator)._try_get_data

    def try_get_data(timeout: float = STATUS_CHECK_INTERVAL) -> tuple[bool, Any]:
        return wait(lambda seconds: method(ref(), seconds), timeout)

    iterator._try_get_data = try_get_data


# -- torch's storage -----------------------------------------------------------------------------
def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A new storage of ``nbytes`` in shared memory, as torch makes them for its workers."""
    return torch.UntypedStorage._new_shared(nbytes)
