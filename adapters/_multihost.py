"""A real multi-host run on one machine: processes on 127.0.0.1 joined by jax.distributed.

Each worker process gets ``--devices`` CPU devices (``XLA_FLAGS`` set before jax starts),
calls ``jax.distributed.initialize``, builds a ``Mesh`` over all global devices and
``NamedSharding(mesh, P("data"))``, reads its part of the data through a
:class:`~torch_rlds.adapters.jax.JaxLoader`, runs a jitted step that reduces over the global
batch, and saves the train state and its loader state with orbax
(:func:`~torch_rlds.adapters.orbax.save_state`). A second phase starts fresh processes that
restore (:func:`~torch_rlds.adapters.orbax.restore_state`) and continue. Each process writes a
JSON record of what it saw: every global array's shape, a digest of each of its addressable
shards, and the sample ids of its rows. :func:`verify` compares the records.

Used by ``torch-rlds check --comprehensive`` and the tests. Run a worker with
``python -m torch_rlds.adapters._multihost`` (never as a file path: the folder holds modules
named ``jax`` and ``torch``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ID_FIELDS = ("epoch", "episode_index", "step_index")


# -- worker ---------------------------------------------------------------------------------
def _record(batch: dict[str, Any]) -> dict[str, Any]:
    """Shapes and per-shard digests of the global arrays; this process's sample ids."""
    import numpy as np

    from torch_rlds._trees import array_digest, flat_items

    leaves, ids = {}, {}
    for name, leaf in flat_items(batch).items():
        if not hasattr(leaf, "addressable_shards"):
            continue
        shards = {}
        for shard in leaf.addressable_shards:
            start = (shard.index[0].start or 0) if shard.index else 0
            shards[str(start)] = array_digest(shard.data)
        leaves[name] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "shards": shards}
        field = name.split("/")[-1]
        if name.startswith("meta/") and field in ID_FIELDS:
            parts = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start or 0)
            ids[field] = np.concatenate([np.asarray(s.data) for s in parts]).tolist()
    rows = [list(r) for r in zip(*(ids[f] for f in ID_FIELDS))] if ids else []
    return {"leaves": leaves, "ids": rows}


def _worker(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_platforms", "cpu")
    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(
        coordinator_address=address, coordinator_bind_address=address,
        num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout=args.timeout, shutdown_timeout_seconds=30)
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from torch_rlds._files import write_atomic
    from torch_rlds.adapters.jax import JaxLoader
    from torch_rlds.adapters.orbax import restore_state, save_state
    from torch_rlds.config import load_config

    config = load_config(args.config, args.override)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    started = time.perf_counter()
    loader = JaxLoader.from_config(config, sharding, prefetch=args.prefetch)
    manager = ocp.CheckpointManager(os.path.join(args.out, "checkpoints"))

    # A train state that depends on every sample of the global batch (a cross-host reduction).
    local_devices = len(mesh.local_devices)
    params = jax.make_array_from_process_local_data(
        sharding, np.zeros((local_devices,), np.float32), (len(mesh.devices.flat),))

    @jax.jit
    def train_step(w, action, step_index):
        return w + jnp.mean(action) + jnp.mean(step_index)

    record: dict[str, Any] = {"process_index": jax.process_index(),
                              "process_count": jax.process_count(),
                              "loader_process": [loader.process_index, loader.process_count],
                              "global_devices": jax.device_count(),
                              "local_devices": local_devices, "steps": {}}
    first = 0
    if args.phase == "resume":
        t0 = time.perf_counter()
        abstract = {"params": jax.ShapeDtypeStruct(params.shape, params.dtype,
                                                   sharding=sharding)}
        restored = restore_state(manager, abstract, loader)
        params = restored["params"]
        record["restore_s"] = time.perf_counter() - t0
        first = loader.batches_seen
        record["restored_batches_seen"] = first
    record["setup_s"] = time.perf_counter() - started
    t0 = time.perf_counter()
    iterator = iter(loader)
    record["first_iter_s"] = time.perf_counter() - t0
    step_times, train_times = [], []
    for step in range(first, args.steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        step_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        params = train_step(params, batch["action"], batch["meta"]["step_index"])
        params.block_until_ready()
        train_times.append(time.perf_counter() - t0)
        record["steps"][str(step)] = _record(batch)
        if step + 1 == args.save_at and args.phase == "run":
            t0 = time.perf_counter()
            save_state(manager, {"params": params}, loader, step + 1)
            manager.wait_until_finished()
            record["save_s"] = time.perf_counter() - t0
    record["final_params"] = {str(s.index[0].start or 0): np.asarray(s.data).tolist()
                              for s in params.addressable_shards}
    record["step_s"] = step_times
    record["train_s"] = train_times
    loader.close()
    manager.close()
    record["total_s"] = time.perf_counter() - started
    write_atomic(os.path.join(args.out, f"{args.phase}_p{args.process_id}.json"),
                 json.dumps(record).encode())
    jax.distributed.shutdown()
    return 0


# -- launcher -------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(devices: int) -> str:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def run_phase(phase: str, out: str, *, config: str, overrides: Sequence[str], steps: int,
              save_at: int, num_processes: int = 2, devices: int = 2, prefetch: int = 2,
              timeout: float = 180.0) -> list[dict[str, Any]]:
    """Run ``num_processes`` fresh worker processes for ``phase`` (``run`` or ``resume``) and
    return their records; raises ``RuntimeError`` with the end of their logs on any failure."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=_xla_flags(devices), JAX_PLATFORMS="cpu")
    procs = []
    failed = None
    with contextlib.ExitStack() as logs:
        for i in range(num_processes):
            cmd = [sys.executable, "-m", "torch_rlds.adapters._multihost", "--phase", phase,
                   "--process-id", str(i), "--num-processes", str(num_processes),
                   "--port", str(port), "--out", out, "--config", config,
                   "--steps", str(steps), "--save-at", str(save_at),
                   "--prefetch", str(prefetch), "--timeout", str(int(timeout))]
            for override in overrides:
                cmd += ["--override", override]
            log = logs.enter_context(open(os.path.join(out, f"{phase}_p{i}.log"), "w"))
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [proc.poll() for proc in procs]
                bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if bad:  # its peers would wait for it until jax's heartbeat timeout
                    failed = f"process {bad[0][0]} exited with code {bad[0][1]}"
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    late = [i for i, c in enumerate(codes) if c is None]
                    failed = f"process {late} did not finish within {timeout:.0f} s"
                    break
                time.sleep(0.1)
        finally:
            for proc in procs:  # a failed peer leaves the other waiting on the coordinator
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    if failed:
        tails = []
        for i in range(num_processes):
            with open(os.path.join(out, f"{phase}_p{i}.log")) as f:
                lines = [line for line in f.read().splitlines()
                         if not line.startswith(("I0", "W0"))]
            tails.append(f"--- process {i} ({phase}) ---\n" + "\n".join(lines[-25:]))
        raise RuntimeError(f"multi-host {phase}: {failed}\n" + "\n".join(tails))
    records = []
    for i in range(num_processes):
        with open(os.path.join(out, f"{phase}_p{i}.json")) as f:
            records.append(json.load(f))
    return records


def epoch_step_ids(config: Any) -> set[tuple[int, int]]:
    """Every ``(episode_index, step_index)`` of the config's split: what one epoch covers."""
    source = config.make_dataset(0, 1).source
    key = config.data.action_key
    return {(e, t) for e in range(len(source))
            for t in range(len(source.episode(e)["steps"][key]))}


def steps_for_epoch(num_steps: int, global_batch: int, num_processes: int,
                    num_workers: int = 0) -> int:
    """Global batches after which every reader has passed the end of epoch 0.

    A process's batches come from its workers in turn, one batch each, and a reader's share of
    an epoch is at most all of it: ``max(1, num_workers) * ceil(num_steps / local batch)``
    batches, plus one, are enough for any split of the episodes.
    """
    local = global_batch // num_processes
    return max(1, num_workers) * math.ceil(num_steps / local) + 1


def verify(runs: list[dict[str, Any]], resumes: list[dict[str, Any]], *, global_batch: int,
           save_at: int, steps: int, epoch_ids: set[tuple[int, int]] | None = None,
           ) -> list[tuple[bool, str]]:
    """``(passed, what)`` for each property of a two-phase multi-host run."""
    checks: list[tuple[bool, str]] = []
    n = len(runs)
    ok = all(r["process_count"] == n and r["loader_process"] == [i, n]
             and r["global_devices"] == n * r["local_devices"] for i, r in enumerate(runs))
    checks.append((ok, f"{n} processes x {runs[0]['local_devices']} devices, each loader reads "
                       "as its own jax process"))
    shapes_ok, bad = True, ""
    for r in runs + resumes:
        for step, rec in r["steps"].items():
            for name, leaf in rec["leaves"].items():
                if leaf["shape"][0] != global_batch:
                    shapes_ok, bad = False, f"step {step} {name}: {leaf['shape']}"
    checks.append((shapes_ok, f"every global array has the global batch {global_batch} as "
                              f"its first axis{': ' + bad if bad else ''}"))
    seen: list[dict[int, set]] = [{} for _ in range(n)]
    duplicates = 0
    for i, r in enumerate(runs):
        for rec in r["steps"].values():
            for epoch, episode, t in rec["ids"]:
                ids = seen[i].setdefault(epoch, set())
                duplicates += (episode, t) in ids
                ids.add((episode, t))
    overlap = sum(len(seen[i].get(e, set()) & seen[j].get(e, set()))
                  for i in range(n) for j in range(i + 1, n) for e in seen[i])
    checks.append((overlap == 0 and duplicates == 0,
                   f"the hosts' sample ids are disjoint ({overlap} shared, {duplicates} repeated "
                   "within a host)"))
    if epoch_ids is not None:
        covered = set().union(*(s.get(0, set()) for s in seen))
        checks.append((covered == epoch_ids,
                       f"together the hosts cover epoch 0: {len(covered)} of {len(epoch_ids)} "
                       "steps"))
    files = [r.get("restored_batches_seen") == save_at for r in resumes]
    checks.append((all(files), f"every fresh process restored its own state after batch "
                               f"{save_at}"))
    differ = [f"step {s} {name}" for i in range(n) for s in range(save_at, steps)
              for name, leaf in runs[i]["steps"][str(s)]["leaves"].items()
              if resumes[i]["steps"].get(str(s), {}).get("leaves", {}).get(name) != leaf]
    checks.append((not differ, f"global batches {save_at}..{steps - 1} after the restart equal "
                               f"the uninterrupted run's{': ' + differ[0] if differ else ''}"))
    same = all(a["final_params"] == b["final_params"] for a, b in zip(runs, resumes))
    checks.append((same, "the restored train state ends where the uninterrupted one does"))
    return checks


def run_two_hosts(out: str, *, config: str = "demo", overrides: Sequence[str] = (),
                  save_at: int = 5, steps: int | None = None, cover_epoch: bool = True,
                  devices: int = 2, timeout: float = 180.0) -> tuple[list[tuple[bool, str]],
                                                                   dict[str, Any]]:
    """Run the two phases with 2 processes and verify them; returns the checks and figures.

    ``steps=None`` runs until every host has passed the end of epoch 0 when ``cover_epoch``
    (reading every episode's length first), else ``save_at + 5`` batches.
    """
    from torch_rlds.config import load_config

    cfg = load_config(config, overrides)
    global_batch = cfg.loader.batch_size
    cfg.local_batch_size(2)
    ids = epoch_step_ids(cfg) if cover_epoch else None
    if steps is None:
        steps = (steps_for_epoch(len(ids), global_batch, 2, cfg.loader.num_workers or 0) if ids
                 else save_at + 5)
    steps = max(steps, save_at + 1)
    os.makedirs(out, exist_ok=True)
    common: dict[str, Any] = dict(config=config, overrides=overrides, steps=steps,
                                  save_at=save_at, devices=devices, timeout=timeout)
    t0 = time.perf_counter()
    runs = run_phase("run", out, **common)
    t1 = time.perf_counter()
    resumes = run_phase("resume", out, **common)
    t2 = time.perf_counter()
    checks = verify(runs, resumes, global_batch=global_batch, save_at=save_at, steps=steps,
                    epoch_ids=ids)
    state_dir = os.path.join(out, "checkpoints", str(save_at), "data_loader")
    sizes = {name: os.path.getsize(os.path.join(state_dir, name))
             for name in sorted(os.listdir(state_dir)) if name.endswith(".json")}
    checks.append((sorted(sizes) == ["process_0-of-2.json", "process_1-of-2.json"],
                   f"each host saved its own state: {sizes}"))
    figures = {"steps": steps, "save_at": save_at, "run_s": t1 - t0, "resume_s": t2 - t1,
               "state_bytes": sizes, "save_s": [r.get("save_s") for r in runs],
               "restore_s": [r.get("restore_s") for r in resumes]}
    return checks, figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phase", choices=("run", "resume"), required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=180)
    return _worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
