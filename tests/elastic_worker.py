"""One host of the elastic-resume test (tests/test_global_processes.py).

A host joins its job (``--launch jax``: ``jax.distributed`` on 127.0.0.1 with ``--devices`` CPU
devices, batches through :class:`~torch_rlds.adapters.jax.JaxLoader` as global arrays;
``--launch gloo``: a ``torch.distributed`` gloo group; ``--launch none``: the only process),
takes its process index and count from that runtime (``Config.make_loader`` asks it), and for
each ``--config`` reads global batches up to ``--batches`` with ``--workers`` DataLoader
workers: from the start, or with ``--restore N`` from the state that host ``i % N`` of a job
of ``N`` hosts saved in ``--out``. With ``--save-at S`` it saves the state after batch ``S``
to ``{out}/state_{config}_p{i}.json`` and reads on without a break (the uninterrupted run).

It writes ``{out}/{phase}_{config}_p{i}.npz``: ``batches`` (the batch numbers) and, for every
numeric leaf of the batch (``action``, ``observation/image``, ``meta/episode_index``...), this
host's rows of every batch stacked: ``[batches, local batch, ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any

import numpy as np


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): tree}


def host_rows(batch: Any) -> dict[str, np.ndarray]:
    """This process's rows of every numeric leaf of ``batch``, by leaf path (strings, which
    stay host-side lists, are left out)."""
    return {key: _rows(leaf) for key, leaf in _leaves(batch).items()
            if not isinstance(leaf, list)}


def _rows(leaf: Any) -> np.ndarray:
    """This process's rows of a leaf: a global jax array's addressable shards in row order,
    or the (numpy) leaf itself."""
    shards = getattr(leaf, "addressable_shards", None)
    if shards is None:
        return np.asarray(leaf)
    shards = sorted(shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _join(args: argparse.Namespace) -> Any:
    """Join the job; returns the sharding of the JAX launch (else ``None``)."""
    if args.launch == "jax":
        import jax

        jax.config.update("jax_platforms", "cpu")
        # int64 leaves (meta ids) stay int64 in the global arrays, so that the rows taken back
        # from them are the loader's bytes.
        jax.config.update("jax_enable_x64", True)
        address = f"127.0.0.1:{args.port}"
        jax.distributed.initialize(coordinator_address=address,
                                   coordinator_bind_address=address,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(jax.devices()), ("data",))
        return NamedSharding(mesh, PartitionSpec("data"))
    if args.launch == "gloo":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=args.process_id, world_size=args.num_processes,
                                timeout=timedelta(seconds=60))
    return None


def _read(args: argparse.Namespace, name: str, path: str, sharding: Any) -> dict[str, Any]:
    from torch_rlds.config import load_config

    config = load_config(path, [f"loader.num_workers={args.workers}"])
    loader = config.make_loader(as_numpy=True)  # this process's part, from the runtime
    rlds = loader.dataset.datasets[0] if config.mixture else loader.dataset
    if (rlds.process_index, rlds.process_count) != (args.process_id, args.num_processes):
        raise RuntimeError(f"process {args.process_id} of {args.num_processes} reads as "
                           f"{rlds.process_index} of {rlds.process_count}")
    if sharding is not None:
        from torch_rlds.adapters.jax import JaxLoader

        loader = JaxLoader(loader, sharding)
    if args.restore:
        saved = os.path.join(args.out, f"state_{name}_p{args.process_id % args.restore}.json")
        with open(saved) as f:
            loader.load_state_dict(json.load(f))
    first = loader.batches_seen
    rows: dict[str, list[np.ndarray]] = {}
    numbers = []
    iterator = iter(loader)
    for number in range(first, args.batches):
        batch = next(iterator)
        numbers.append(number)
        for key, part in host_rows(batch).items():
            rows.setdefault(key, []).append(part)
        if args.save_at == number + 1:
            state_file = os.path.join(args.out, f"state_{name}_p{args.process_id}.json")
            tmp = state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(loader.state_dict(), f)
            os.replace(tmp, state_file)
    if sharding is not None:
        loader.close()
    out = {key: np.stack(parts) for key, parts in rows.items()}
    out["batches"] = np.asarray(numbers, dtype=np.int64)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", choices=("jax", "gloo", "none"), required=True)
    parser.add_argument("--phase", required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", action="append", required=True,
                        help="NAME=PATH of a YAML config (repeatable)")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--restore", type=int, default=0,
                        help="the host count of the job whose states to load")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sharding = _join(args)
    for entry in args.config:
        name, _, path = entry.partition("=")
        record = _read(args, name, path, sharding)
        target = os.path.join(args.out, f"{args.phase}_{name}_p{args.process_id}.npz")
        np.savez(target + ".tmp.npz", **record)
        os.replace(target + ".tmp.npz", target)
    if args.launch == "jax":
        import jax

        jax.distributed.shutdown()
    elif args.launch == "gloo":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
