"""The ``torch-rlds demo`` walk-through (its dataset: :func:`torch_rlds.synthetic.demo_dataset`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from torch_rlds._trees import batch_digest
from torch_rlds.config import load_config
from torch_rlds.loader import dataset_states


def _shapes(batch: dict[str, Any]) -> str:
    obs = batch["observation"]
    parts = [f"obs.{key} shape={tuple(value.shape)}" for key, value in obs.items()]
    parts.append(f"actions shape={tuple(batch['action'].shape)}")
    return ", ".join(parts)


def _resume_child(config_name: str, overrides: list[str], state_file: str, count: int) -> None:
    """In a fresh process: restore the saved state and print the next batches' digests."""
    config = load_config(config_name, overrides)
    loader = config.make_loader()
    loader.load_state(state_file)
    iterator = iter(loader)
    digests = [batch_digest(next(iterator)) for _ in range(count)]
    print(json.dumps({"digests": digests, "batches_seen": loader.batches_seen}))


def run_demo(config_name: str = "demo", overrides: Sequence[str] = (), *, before: int = 3,
             after: int = 3) -> int:
    """The ``torch-rlds demo`` walk-through; returns the process exit code."""
    overrides = list(overrides)
    ok = True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        print(f"{'✓' if passed else '✗'} {text}", flush=True)

    config = load_config(config_name, overrides)
    t0 = time.perf_counter()
    path = config.dataset_path()
    check(True, f"dataset {path} ({time.perf_counter() - t0:.1f}s)")
    loader = config.make_loader()
    print(f"loader: batch {loader.batch_size}, {loader.num_workers} workers, "
          f"{len(loader.dataset.source)} episodes", flush=True)
    iterator = iter(loader)
    for i in range(before):
        batch = next(iterator)
        print(f"  batch {i}: {_shapes(batch)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        state_file = os.path.join(tmp, "loader_state.json")
        t0 = time.perf_counter()
        loader.save_state(state_file)
        save_ms = (time.perf_counter() - t0) * 1e3
        size = os.path.getsize(state_file)
        worker_states = _worker_state_sizes(loader.state_dict())
        check(True, f"state saved after batch {before}: {size} bytes in {save_ms:.1f} ms "
                    f"(dataset state per worker: {worker_states} bytes)")
        reference = [batch_digest(next(iterator)) for _ in range(after)]
        del iterator
        t0 = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-m", "torch_rlds.demo", config_name, state_file, str(after),
             *overrides],
            capture_output=True, text=True, timeout=600,
        )
        if child.returncode != 0:
            check(False, f"fresh process failed to resume (exit {child.returncode}):\n"
                         f"{child.stderr[-2000:]}")
        else:
            result = json.loads(child.stdout.strip().splitlines()[-1])
            check(result["batches_seen"] == before + after,
                  f"fresh process restored batches_seen={result['batches_seen'] - after} "
                  f"(expected {before})")
            same = result["digests"] == reference
            check(same, f"{after} batches after the restore in a fresh process equal the "
                        f"uninterrupted run's, bit for bit ({time.perf_counter() - t0:.1f}s)")
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


def _worker_state_sizes(state: dict[str, Any]) -> list[int]:
    return [len(json.dumps(s)) for s in dataset_states(state)]


if __name__ == "__main__":
    _resume_child(sys.argv[1], sys.argv[4:], sys.argv[2], int(sys.argv[3]))
