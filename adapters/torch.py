"""PyTorch checkpoint integration: the loader state in ``torch.save`` and
``torch.distributed.checkpoint`` checkpoints, with nothing unpickled on load.

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
torch.distributed). Loading under another world size raises ``ValueError`` naming both sizes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from torch_rlds.adapters._common import loader_processes

__all__ = ["dcp_key", "dcp_state", "dcp_template", "load_dcp_state", "load_loader_state",
           "loader_state"]

DCP_ITEM = "data_loader"
_RANK_KEY = re.compile(r"rank_(\d+)-of-(\d+)")


def loader_state(loader: Any) -> dict[str, Any]:
    """``loader``'s state as plain Python values, for a ``torch.save`` checkpoint that
    ``torch.load(..., weights_only=True)`` reads."""
    # The JSON round trip both checks the state and drops any non-plain type (numpy ints...).
    return json.loads(json.dumps(loader.state_dict(), allow_nan=False))


def load_loader_state(loader: Any, state: dict[str, Any]) -> None:
    """Resume ``loader`` from a state saved by :func:`loader_state`."""
    loader.load_state_dict(state)


def dcp_key(rank: int, world_size: int) -> str:
    """The key of one rank's state under the ``data_loader`` entry: ``rank_{i}-of-{n}``."""
    return f"rank_{rank}-of-{world_size}"


def dcp_state(loader: Any) -> dict[str, torch.Tensor]:
    """``{"rank_{i}-of-{n}": uint8 tensor of the state's JSON}`` for this rank, to save with
    ``torch.distributed.checkpoint`` under a ``data_loader`` entry."""
    rank, world = loader_processes(loader)
    data = json.dumps(loader.state_dict(), sort_keys=True, allow_nan=False).encode()
    return {dcp_key(rank, world): torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def dcp_template(checkpoint_id: str | os.PathLike, loader: Any,
                 item: str = DCP_ITEM) -> dict[str, torch.Tensor]:
    """The entry to pass to ``dcp.load`` for this rank's loader state: a tensor of the size
    saved in ``checkpoint_id`` (read from its metadata).

    Raises ``FileNotFoundError`` when the checkpoint holds no loader state, and ``ValueError``
    naming both world sizes when it was saved by another number of ranks.
    """
    from torch.distributed.checkpoint import FileSystemReader

    rank, world = loader_processes(loader)
    metadata = FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    prefix = f"{item}."
    saved = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        match = _RANK_KEY.fullmatch(fqn[len(prefix):]) if fqn.startswith(prefix) else None
        if match:
            saved[(int(match.group(1)), int(match.group(2)))] = entry
    if not saved:
        raise FileNotFoundError(f"{checkpoint_id} holds no data loader state (no "
                                f"'{prefix}rank_<i>-of-<n>' entry)")
    entry = saved.get((rank, world))
    if entry is None:
        worlds = sorted({n for _, n in saved})
        raise ValueError(
            f"{checkpoint_id} holds the data loader states of world size "
            f"{' and '.join(map(str, worlds))} (ranks {sorted(i for i, _ in saved)}), but this "
            f"is rank {rank} of {world}: resume with the world size the checkpoint was saved "
            "with"
        )
    return {dcp_key(rank, world): torch.empty(tuple(entry.size), dtype=torch.uint8)}


def load_dcp_state(loader: Any, entry: dict[str, torch.Tensor]) -> None:
    """Resume ``loader`` from the ``data_loader`` entry that ``dcp.load`` filled."""
    rank, world = loader_processes(loader)
    key = dcp_key(rank, world)
    if key not in entry:
        raise ValueError(f"no loader state for {key} in the loaded entry (keys: "
                         f"{sorted(entry)})")
    loader.load_state_dict(json.loads(bytes(entry[key].numpy()).decode()))
