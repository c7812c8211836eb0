"""One rank of the torch.distributed.checkpoint test (tests/test_adapters_torch.py).

Joins a gloo process group on 127.0.0.1, reads its part of the data, saves a model and its
loader state with DCP after ``--save-at`` batches, reads on; then restores into a fresh loader
from the checkpoint and reads the same batches again. Writes what it saw as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torch_rlds.adapters.torch import dcp_state, dcp_template, load_dcp_state
from torch_rlds.config import load_config


def _digest(batch) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in ("action", "action_is_pad"):
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    for value in batch["observation"].values():
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _ids(batch) -> list[list[int]]:
    meta = batch["meta"]
    return [list(map(int, row)) for row in zip(meta["epoch"], meta["episode_index"],
                                               meta["step_index"])]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-at", type=int, required=True)
    parser.add_argument("--after", type=int, required=True)
    parser.add_argument("--override", action="append", default=[])
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=args.rank, world_size=args.world_size,
                            timeout=timedelta(seconds=60))
    config = load_config("demo", args.override)
    # Replicated weights, as under DDP: DCP keeps one copy of a key that every rank saves,
    # which is why each rank's loader state needs a key of its own.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)

    loader = config.make_loader(as_numpy=True)  # this rank's part: from torch.distributed
    iterator = iter(loader)
    for _ in range(args.save_at):
        next(iterator)
    dcp.save({"model": model.state_dict(), "data_loader": dcp_state(loader)},
             checkpoint_id=args.checkpoint)
    reference = [next(iterator) for _ in range(args.after)]

    fresh = config.make_loader(as_numpy=True)
    restored_model = torch.nn.Linear(4, 2)
    state = {"model": restored_model.state_dict(),
             "data_loader": dcp_template(args.checkpoint, fresh)}
    dcp.load(state, checkpoint_id=args.checkpoint)
    restored_model.load_state_dict(state["model"])
    load_dcp_state(fresh, state["data_loader"])
    iterator = iter(fresh)
    resumed = [next(iterator) for _ in range(args.after)]

    record = {
        "rank": args.rank,
        "loader_process": [fresh.dataset.process_index, fresh.dataset.process_count],
        "model_restored": all(torch.equal(a, b) for a, b in zip(
            model.state_dict().values(), restored_model.state_dict().values())),
        "batches_seen": fresh.batches_seen,
        "reference": [_digest(b) for b in reference],
        "resumed": [_digest(b) for b in resumed],
        "ids": [_ids(b) for b in reference],
    }
    with open(args.out, "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
