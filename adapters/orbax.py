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

:func:`initialize_checkpoint_dir`, :func:`save_state` and :func:`restore_state` have the
signatures of openpi's ``training/checkpoints.py``, and resume openpi's loop exactly (see
:mod:`torch_rlds.adapters.openpi`): its ``scripts/train.py`` runs with its two imports of
``openpi.training.data_loader`` and ``openpi.training.checkpoints`` replaced by
:mod:`torch_rlds.adapters.openpi` and this module. Their checkpoints hold the whole train state
as one item (openpi's own hold the parameters apart, for its policy server).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from torch_rlds import _torchdata
from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds.adapters._common import (
    DATA_LOADER_ITEM,
    StatefulLoader,
    loader_processes,
    state_filename,
    state_path,
    topology_free,
)

__all__ = [
    "DATA_LOADER_ITEM",
    "DataLoaderCheckpointHandler",
    "DataLoaderRestore",
    "DataLoaderSave",
    "initialize_checkpoint_dir",
    "restore_state",
    "save_state",
]

TRAIN_STATE_ITEM = "train_state"
_PERSISTENT_ONLY = "Dataloader must be created with persistent_iterator=True"


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
        path = state_path(directory, index, count, any_process=topology_free(args.loader))
        args.loader.load_state_dict(read_json(path))
        return args.loader


@ocp.args.register_with_handler(DataLoaderCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataLoaderSave(ocp.args.CheckpointArgs):
    """Save ``loader``'s state. The state is taken when these args are built, in the caller's
    thread, so batches the loader prefetches while orbax writes never leak into it.

    ``held=1``: the caller holds the last batch handed out, not yet used (openpi's loop fetches
    its next batch before it saves); the state before that batch is saved, so that a resume
    hands it out again first. A loader built with ``persistent_iterator=False`` (each
    ``iter()`` starts over) has no position to save and is refused.
    """

    loader: Any
    held: int = 0
    state: dict[str, Any] = dataclasses.field(init=False, repr=False)
    process_index: int = dataclasses.field(init=False)
    process_count: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if getattr(self.loader, "persistent_iterator", True) is False:
            raise ValueError(_PERSISTENT_ONLY)
        self.state = self.loader.state_dict(held=self.held) if self.held else (
            self.loader.state_dict())
        self.process_index, self.process_count = loader_processes(self.loader)


@ocp.args.register_with_handler(DataLoaderCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataLoaderRestore(ocp.args.CheckpointArgs):
    """Restore this process's state into ``loader`` (returned as the restored item)."""

    loader: Any


def initialize_checkpoint_dir(checkpoint_dir: str | epath.PathLike, *, keep_period: int | None,
                              overwrite: bool, resume: bool) -> tuple[ocp.CheckpointManager, bool]:
    """A ``CheckpointManager`` for :func:`save_state` / :func:`restore_state` over
    ``checkpoint_dir``, and whether to resume (openpi's signature and rules).

    An existing directory is emptied with ``overwrite``, resumed with ``resume``, and refused
    (``FileExistsError``) with neither; a directory without a checkpoint is not resumed. The
    manager keeps the latest step, and every ``keep_period``-th.
    """
    directory = epath.Path(checkpoint_dir).resolve()
    resuming = False
    if directory.exists():
        if overwrite:
            directory.rmtree()
        elif resume:
            resuming = True
        else:
            raise FileExistsError(f"checkpoint directory {directory} exists already: pass "
                                  "overwrite to start over there, or resume to continue")
    directory.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, keep_period=keep_period, create=False))
    return manager, resuming and manager.latest_step() is not None


def save_state(checkpoint_manager: ocp.CheckpointManager, train_state: Any,
               data_loader: StatefulLoader, step: int) -> None:
    """Save ``train_state`` (a pytree, ``StandardSave``) and ``data_loader``'s state as step
    ``step`` (openpi's ``save_state`` signature). Call it on every process.

    When ``train_state`` counts its steps (a ``step`` field, as openpi's ``TrainState``) and
    the loader has handed out one batch more than that (openpi's loop fetches its next batch
    before it saves), the loader's position before that batch is saved: the resumed run trains
    on it first, as the uninterrupted one would have (:class:`DataLoaderSave` ``held``).
    """
    held = _held(data_loader, train_state)
    checkpoint_manager.save(step, args=ocp.args.Composite(**{
        TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state),
        DATA_LOADER_ITEM: DataLoaderSave(data_loader, held=held),
    }))


def restore_state(checkpoint_manager: ocp.CheckpointManager, train_state: Any,
                  data_loader: StatefulLoader | None, step: int | None = None) -> Any:
    """Restore step ``step`` (default: the latest) into ``data_loader`` and return the train
    state, restored with ``train_state`` as its template (concrete or abstract arrays; openpi's
    ``restore_state`` signature). ``data_loader=None`` restores the train state only.

    A loader that resumed from this very step when it was made (the openpi adapter with a
    ``TrainConfig`` that resumes) is there already, and goes on with the batches it handed out
    since. Any other loader that has handed out batches is refused: the batch the caller holds
    is not one the checkpoint knows, so the resumed run would differ. A checkpoint without a
    loader state is refused naming ``data_loader=None``.
    """
    if step is None:
        step = checkpoint_manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint found in {checkpoint_manager.directory}")
    items: dict[str, Any] = {TRAIN_STATE_ITEM: ocp.args.StandardRestore(train_state)}
    if data_loader is not None and _loader_needs(checkpoint_manager, data_loader, step):
        items[DATA_LOADER_ITEM] = DataLoaderRestore(data_loader)
    restored = checkpoint_manager.restore(step, args=ocp.args.Composite(**items))
    return restored[TRAIN_STATE_ITEM]


def _loader_needs(manager: ocp.CheckpointManager, loader: StatefulLoader, step: int) -> bool:
    """Whether ``loader`` is to be restored from ``step``; raises where it cannot be."""
    step_dir = epath.Path(manager.directory) / str(step)
    if step_dir.is_dir() and not (step_dir / DATA_LOADER_ITEM).exists():
        raise FileNotFoundError(
            f"checkpoint step {step} in {manager.directory} holds no {DATA_LOADER_ITEM!r} item "
            "(it was saved without a data loader): restore the train state alone with "
            "restore_state(checkpoint_manager, train_state, None) and start the loader from "
            "its beginning, or restore another step (step=)")
    resumed = getattr(loader, "resumed_step", None)
    if resumed is not None:
        if resumed != step:
            raise ValueError(f"the data loader resumed from checkpoint step {resumed} when it "
                             f"was made, but step {step} is being restored: restore step "
                             f"{resumed}, or make the loader without resuming")
        return False  # there already
    handed = getattr(loader, "batches_received", None)
    if handed is None:
        handed = _torchdata.yielded_in_pass(loader)
    if handed:
        raise ValueError(
            f"the data loader has handed out {handed} batch(es) of a fresh stream before this "
            f"restore of step {step}: the batch the loop holds is not the one the checkpoint "
            "saved, so the resumed run would train on other batches than the uninterrupted "
            "one. Restore before the first batch, or make the loader resume from the "
            "checkpoint directory (torch_rlds.adapters.openpi.create_data_loader(..., "
            "resume_from=checkpoint_dir), or a TrainConfig with resume=True)")
    return True


def _held(loader: StatefulLoader, train_state: Any) -> int:
    """1 where ``loader`` has handed out one batch more than ``train_state`` counts as trained
    on (the caller holds it, not yet used), else 0."""
    trained = _trained_steps(train_state)
    if trained is None:
        return 0
    get = getattr(loader, "get_batches_seen", None)
    seen = get() if callable(get) else getattr(loader, "batches_seen", None)
    if type(seen) is not int or seen != trained + 1:
        return 0
    if "held" not in inspect.signature(loader.state_dict).parameters:
        raise ValueError(
            f"the data loader has handed out {seen} batches but the train state counts "
            f"{trained} steps: the loop holds a batch it has not trained on (openpi's loop "
            "fetches before it saves), and this loader keeps no state before that batch; wrap "
            "it in torch_rlds.adapters.jax.JaxLoader, or use the openpi adapter")
    return 1


def _trained_steps(train_state: Any) -> int | None:
    """How many steps ``train_state`` says it trained (its ``step`` field), or ``None``."""
    step = train_state.get("step") if isinstance(train_state, dict) else (
        getattr(train_state, "step", None))
    if step is None:
        return None
    try:
        value = np.asarray(step)
    except Exception:  # an abstract or remote array: nothing to count with
        return None
    if value.shape != () or value.dtype.kind not in "iu":
        return None
    return int(value)
