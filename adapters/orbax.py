"""Orbax checkpoint integration: the loader state as one JSON file per process.

Save a loader with the train state, in one ``CheckpointManager`` step::

    import orbax.checkpoint as ocp
    from torch_rlds.adapters.orbax import DataLoaderRestore, DataLoaderSave

    manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state),
        data_loader=DataLoaderSave(loader)))
    restored = manager.restore(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(abstract_train_state),
        data_loader=DataLoaderRestore(loader)))

Every process writes ``<step>/data_loader/process_{i}-of-{n}.json``, the state of its own part of
the data (the file a :class:`torch_rlds.DataLoader` reads with ``load_state``), and restores
from its own file. The states of ``n`` processes cannot be split or merged: restoring under
another process count raises ``ValueError`` naming both counts. Nothing is pickled.

:func:`save_state` / :func:`restore_state` have the signatures of openpi's
``training/checkpoints.py``, so an openpi-style script changes two lines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds.adapters._common import loader_processes, state_filename, state_path

__all__ = [
    "DATA_LOADER_ITEM",
    "DataLoaderCheckpointHandler",
    "DataLoaderRestore",
    "DataLoaderSave",
    "restore_state",
    "save_state",
]

DATA_LOADER_ITEM = "data_loader"
TRAIN_STATE_ITEM = "train_state"


class DataLoaderCheckpointHandler(ocp.CheckpointHandler):
    """Writes and reads one loader state per process: ``process_{i}-of-{n}.json``.

    ``i`` and ``n`` are the process the loader reads for (its dataset's ``process_index`` and
    ``process_count``, else jax, else torch.distributed, else 0 of 1). Works with any loader
    with ``state_dict``/``load_state_dict`` and a JSON-safe state: a torch_rlds
    ``DataLoader``, a :class:`~torch_rlds.adapters.jax.JaxLoader`, an openpi-style loader.
    Saving is synchronous and writes a few hundred bytes per process; the file is written
    through a temporary file and a rename.
    """

    def save(self, directory: epath.Path, args: DataLoaderSave) -> None:
        path = epath.Path(directory) / state_filename(args.process_index, args.process_count)
        write_json_atomic(path, args.state)

    def restore(self, directory: epath.Path, args: DataLoaderRestore) -> Any:
        """Load this process's state into ``args.loader`` and return the loader."""
        index, count = loader_processes(args.loader)
        args.loader.load_state_dict(read_json(state_path(directory, index, count)))
        return args.loader


@ocp.args.register_with_handler(DataLoaderCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataLoaderSave(ocp.args.CheckpointArgs):
    """Save ``loader``'s state. The state is taken when these args are built, in the caller's
    thread, so batches the loader prefetches while orbax writes never leak into it."""

    loader: Any
    state: dict[str, Any] = dataclasses.field(init=False, repr=False)
    process_index: int = dataclasses.field(init=False)
    process_count: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.state = self.loader.state_dict()
        self.process_index, self.process_count = loader_processes(self.loader)


@ocp.args.register_with_handler(DataLoaderCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataLoaderRestore(ocp.args.CheckpointArgs):
    """Restore this process's state into ``loader`` (returned as the restored item)."""

    loader: Any


def save_state(checkpoint_manager: ocp.CheckpointManager, train_state: Any, data_loader: Any,
               step: int) -> None:
    """Save ``train_state`` (a pytree, ``StandardSave``) and ``data_loader``'s state as step
    ``step`` (openpi's ``save_state`` signature). Call it on every process."""
    checkpoint_manager.save(step, args=ocp.args.Composite(**{
        TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state),
        DATA_LOADER_ITEM: DataLoaderSave(data_loader),
    }))


def restore_state(checkpoint_manager: ocp.CheckpointManager, train_state: Any, data_loader: Any,
                  step: int | None = None) -> Any:
    """Restore step ``step`` (default: the latest) into ``data_loader`` and return the train
    state, restored with ``train_state`` as its template (concrete or abstract arrays; openpi's
    ``restore_state`` signature). ``data_loader=None`` restores the train state only."""
    if step is None:
        step = checkpoint_manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint found in {checkpoint_manager.directory}")
    items: dict[str, Any] = {TRAIN_STATE_ITEM: ocp.args.StandardRestore(train_state)}
    if data_loader is not None:
        items[DATA_LOADER_ITEM] = DataLoaderRestore(data_loader)
    restored = checkpoint_manager.restore(step, args=ocp.args.Composite(**items))
    return restored[TRAIN_STATE_ITEM]
