"""PyTorch checkpoint integration: the loader state in ``torch.save`` and
``torch.distributed.checkpoint`` checkpoints, with nothing unpickled by torch_rlds on load.

``torch.save``: put :func:`loader_state` into the checkpoint dict; it holds only dicts, lists,
strings, ints, floats, bools and None, so ``torch.load(path, weights_only=True)`` reads it::

    torch.save({"model": model.state_dict(), "data_loader": loader_state(loader)}, path)
    checkpoint = torch.load(path, weights_only=True)
    load_loader_state(loader, checkpoint["data_loader"])

``torch.distributed.checkpoint`` (DCP): every rank's state goes under its own key,
``data_loader.rank_{i}-of-{n}``, as a uint8 tensor of its JSON (DCP keeps one copy of equal keys
and unpickles non-tensor values, so a plain dict would be neither per rank nor safe)::

    dcp.save({"model": model.state_dict(), "data_loader": dcp_state(loader)}, checkpoint_id=d)
    state = {"model": model.state_dict(), "data_loader": dcp_template(d, loader)}
    dcp.load(state, checkpoint_id=d)
    load_dcp_state(loader, state["data_loader"])

The rank is the process the loader reads for (its dataset's ``process_index`` and
``process_count``, which :meth:`torch_rlds.config.Config.make_loader` takes from
torch.distributed). Loading under another world size raises ``ValueError`` naming both sizes,
but for a loader in the global order, whose state names no rank: any rank's state serves it.

What is unpickled, exactly: torch_rlds unpickles nothing. :func:`dcp_template` learns the saved
entry's size from the checkpoint's ``.metadata`` by reading that pickle's opcodes as data
(``torch_rlds.adapters._inert_pickle``: nothing imported, nothing called), and
:func:`load_dcp_state` reads the loaded bytes as strict JSON
(:func:`torch_rlds._state_file.loads_strict`: no NaN, no duplicate keys, bounded size and
nesting). ``dcp.load`` itself, which the caller runs, unpickles ``.metadata`` with Python's
``pickle`` (``FileSystemReader.read_metadata``) and reads tensors with ``torch.load(...,
weights_only=True)``; load DCP checkpoints only from where you would load the model's weights.
``torch.load(path, weights_only=True)`` of a ``torch.save`` checkpoint is torch's restricted
unpickler; the ``data_loader`` entry in it is plain values.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from torch_rlds import _files
from torch_rlds._state_file import loads_strict
from torch_rlds.adapters import _inert_pickle
from torch_rlds.adapters._common import StatefulLoader, loader_processes, topology_free

__all__ = ["dcp_key", "dcp_state", "dcp_template", "load_dcp_state", "load_loader_state",
           "loader_state"]

DCP_ITEM = "data_loader"
_RANK_KEY = re.compile(r"rank_(\d+)-of-(\d+)")
_METADATA = ".metadata"
# DCP's table of contents: a few hundred bytes per saved tensor chunk.
MAX_METADATA_BYTES = 1 << 30
_DCP_MODULE = "torch.distributed.checkpoint.metadata"


def loader_state(loader: StatefulLoader) -> dict[str, Any]:
    """``loader``'s state as plain Python values, for a ``torch.save`` checkpoint that
    ``torch.load(..., weights_only=True)`` reads."""
    # The JSON round trip both checks the state and drops any non-plain type (numpy ints...).
    return json.loads(json.dumps(loader.state_dict(), allow_nan=False))


def load_loader_state(loader: StatefulLoader, state: dict[str, Any]) -> None:
    """Resume ``loader`` from a state saved by :func:`loader_state`."""
    loader.load_state_dict(state)


def dcp_key(rank: int, world_size: int) -> str:
    """The key of one rank's state under the ``data_loader`` entry: ``rank_{i}-of-{n}``."""
    return f"rank_{rank}-of-{world_size}"


def dcp_state(loader: StatefulLoader) -> dict[str, torch.Tensor]:
    """``{"rank_{i}-of-{n}": uint8 tensor of the state's JSON}`` for this rank, to save with
    ``torch.distributed.checkpoint`` under a ``data_loader`` entry."""
    rank, world = loader_processes(loader)
    data = json.dumps(loader.state_dict(), sort_keys=True, allow_nan=False).encode()
    return {dcp_key(rank, world): torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def dcp_template(checkpoint_id: str | os.PathLike, loader: StatefulLoader,
                 item: str = DCP_ITEM) -> dict[str, torch.Tensor]:
    """The entry to pass to ``dcp.load`` for this rank's loader state: a tensor of the size
    saved in ``checkpoint_id`` (read from its ``.metadata`` without unpickling it; see the
    module's docstring).

    Raises ``FileNotFoundError`` when the checkpoint holds no loader state, and ``ValueError``
    naming both world sizes when it was saved by another number of ranks, or naming the file
    when its metadata is not DCP's.
    """
    rank, world = loader_processes(loader)
    path = os.path.join(os.fspath(checkpoint_id), _METADATA)
    prefix = f"{item}."
    saved = {}
    for fqn, nbytes in _saved_sizes(path).items():
        match = _RANK_KEY.fullmatch(fqn[len(prefix):]) if fqn.startswith(prefix) else None
        if match:
            saved[(int(match.group(1)), int(match.group(2)))] = nbytes
    if not saved:
        raise FileNotFoundError(f"{checkpoint_id} holds no data loader state (no "
                                f"'{prefix}rank_<i>-of-<n>' entry)")
    size = saved.get((rank, world))
    if size is None and topology_free(loader):
        # A state that names no rank (the global order's): any rank's serves this one.
        rank, world = min(saved, key=lambda key: (-key[1], key[0]))
        size = saved[(rank, world)]
    if size is None:
        worlds = sorted({n for _, n in saved})
        raise ValueError(
            f"{checkpoint_id} holds the data loader states of world size "
            f"{' and '.join(map(str, worlds))} (ranks {sorted(i for i, _ in saved)}), but this "
            f"is rank {rank} of {world}: resume with the world size the checkpoint was saved "
            "with"
        )
    return {dcp_key(rank, world): torch.empty((size,), dtype=torch.uint8)}


def _saved_sizes(path: str) -> dict[str, int]:
    """The fully qualified name and byte size of every 1-D uint8 tensor the DCP metadata file
    at ``path`` lists (other entries are left out), read inertly."""
    try:
        data = _files.read_regular(path, MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no DCP metadata (not a torch.distributed.checkpoint "
                                "folder)") from None
    except _files.SpecialFileError as e:
        raise ValueError(f"{e}; DCP metadata must be a regular file") from None
    if data is None:
        raise ValueError(f"{path}: larger than {MAX_METADATA_BYTES} bytes; not DCP metadata")
    try:
        root = _inert_pickle.read(data)
    except _inert_pickle.InertPickleError as e:
        raise ValueError(f"{path}: not DCP metadata torch_rlds can read ({e})") from None
    entries = _field(_dcp_object(root, "Metadata", path), "state_dict_metadata", path)
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: DCP metadata without a state_dict_metadata table")
    sizes = {}
    for fqn, entry in entries.items():
        if not isinstance(fqn, str) or not _is_dcp(entry, "TensorStorageMetadata"):
            continue
        size = _field(entry, "size", path)
        properties = _field(entry, "properties", path)
        dims = size.args[0] if isinstance(size, _inert_pickle.Call) and size.args else None
        dtype = properties.state[0] if (isinstance(properties, _inert_pickle.Call)
                                        and isinstance(properties.state, tuple)
                                        and properties.state) else None
        if (isinstance(dims, tuple) and len(dims) == 1 and isinstance(dims[0], int)
                and dims[0] >= 0 and dtype == _inert_pickle.Global("torch", "uint8")):
            sizes[fqn] = dims[0]
    return sizes


def _is_dcp(value: Any, cls: str) -> bool:
    return (isinstance(value, _inert_pickle.Call)
            and value.func == _inert_pickle.Global(_DCP_MODULE, cls))


def _dcp_object(value: Any, cls: str, path: str) -> _inert_pickle.Call:
    if not _is_dcp(value, cls):
        raise ValueError(f"{path}: not DCP metadata (expected a {_DCP_MODULE}.{cls})")
    return value


def _field(obj: _inert_pickle.Call, name: str, path: str) -> Any:
    """Field ``name`` of a dataclass the pickle rebuilds (its ``BUILD`` state)."""
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict, slots) as pickle's BUILD takes it
    if not isinstance(state, dict) or name not in state:
        raise ValueError(f"{path}: DCP metadata entry without its {name!r}")
    return state[name]


def load_dcp_state(loader: StatefulLoader, entry: dict[str, torch.Tensor]) -> None:
    """Resume ``loader`` from the ``data_loader`` entry that ``dcp.load`` filled."""
    rank, world = loader_processes(loader)
    key = dcp_key(rank, world)
    if key not in entry and topology_free(loader) and len(entry) == 1:
        key = next(iter(entry))  # dcp_template chose another rank's state, which serves
    if key not in entry:
        raise ValueError(f"no loader state for {key} in the loaded entry (keys: "
                         f"{sorted(entry)})")
    tensor = entry[key]
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"loader state {key}: expected a 1-D uint8 tensor of JSON")
    try:
        state = loads_strict(tensor.numpy().tobytes())
    except ValueError as e:
        raise ValueError(f"loader state {key}: not a JSON state ({e})") from None
    loader.load_state_dict(state)
