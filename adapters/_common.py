"""What the adapters share: which process a loader reads for, and per-process state files."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, Protocol

from etils import epath


class StatefulLoader(Protocol):
    """What the adapters ask of a loader: batches, and a state that resumes them
    (:class:`torch_rlds.DataLoader`, torchdata's ``StatefulDataLoader``, the adapters' own
    loaders around either)."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
# The item of an orbax checkpoint step that holds the loader states.
DATA_LOADER_ITEM = "data_loader"


def loader_processes(loader: Any) -> tuple[int, int]:
    """``(process_index, process_count)`` that ``loader`` reads its part of every epoch for.

    Taken from the loader itself when it says (an adapter's ``process_index``/``process_count``,
    or its ``dataset``'s, as :class:`torch_rlds.RLDSDataset` has, or a mixture's first
    dataset's), else from
    :func:`torch_rlds._process.process_info` (jax, then torch.distributed, then one process).
    The dataset's values are what its state's fingerprint holds, so they name the state file.
    """
    dataset = getattr(loader, "dataset", None)
    parts = getattr(dataset, "datasets", None)
    first = parts[0] if isinstance(parts, (list, tuple)) and parts else None
    for owner in (loader, dataset, first):
        index = getattr(owner, "process_index", None)
        count = getattr(owner, "process_count", None)
        if type(index) is int and type(count) is int:
            return index, count
    from torch_rlds._process import process_info

    return process_info()


def topology_free(loader: Any) -> bool:
    """Whether ``loader``'s state resumes under any number of processes: a loader (or an
    adapter around one, as ``.loader``) of a dataset in the global order, whose state names no
    host, so one process's state serves any process of a run of another size."""
    owner = loader
    for _ in range(4):  # an openpi-style loader around a JaxLoader around a DataLoader
        if owner is None:
            return False
        if getattr(getattr(owner, "dataset", None), "order", None) == "global":
            return True
        owner = getattr(owner, "loader", None)
    return False


def state_filename(process_index: int, process_count: int) -> str:
    """The name of the state file of one process: ``process_{i}-of-{n}.json``."""
    return f"process_{process_index}-of-{process_count}.json"


def saved_process_counts(directory: str | os.PathLike) -> dict[int, list[int]]:
    """``{process_count: [process_index, ...]}`` of the state files found in ``directory``."""
    folder = epath.Path(directory)
    found: dict[int, list[int]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        match = _STATE_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return {count: sorted(indices) for count, indices in sorted(found.items())}


def state_path(directory: str | os.PathLike, process_index: int,
               process_count: int, *, any_process: bool = False) -> epath.Path:
    """The state file of this process in ``directory``; raises when it is not there.

    ``FileNotFoundError`` when ``directory`` holds no state file at all; ``ValueError`` naming
    both process counts when it holds the states of another number of processes (each state
    of the window order belongs to one host's part of the data and cannot be split or
    merged). With ``any_process`` (a loader whose state names no host:
    :func:`topology_free`) any process's file serves: that of process 0 of the run saved.
    """
    path = epath.Path(directory) / state_filename(process_index, process_count)
    if path.exists():
        return path
    found = saved_process_counts(directory)
    if not found:
        raise FileNotFoundError(f"No checkpoint found in {directory}")
    if any_process:
        count, indices = max(found.items())
        return epath.Path(directory) / state_filename(indices[0], count)
    if process_count not in found:
        saved = "; ".join(f"{count} process{'es' if count > 1 else ''} (files "
                          f"{', '.join(state_filename(i, count) for i in indices)})"
                          for count, indices in found.items())
        raise ValueError(
            f"{directory} holds the data loader states of {saved}, but this run has "
            f"{process_count} process{'es' if process_count > 1 else ''} (process "
            f"{process_index}): resume with the process count the checkpoint was saved with"
        )
    raise FileNotFoundError(
        f"{directory} holds data loader states for processes {found[process_count]} of "
        f"{process_count} but none for process {process_index} ({path.name} is missing)"
    )


def latest_data_loader_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The latest step of an orbax ``CheckpointManager`` directory that holds a loader state
    item (``<step>/data_loader/``), or ``None``. Steps being written are not counted: orbax
    renames a step's directory to its number only once the step is complete."""
    root = epath.Path(checkpoint_dir)
    if not root.is_dir():
        return None
    steps = [int(p.name) for p in root.iterdir()
             if p.name.isdigit() and (p / DATA_LOADER_ITEM).is_dir()]
    return max(steps) if steps else None
