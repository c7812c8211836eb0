"""Elastic resume with real processes: a state saved by 2 JAX processes with 2 DataLoader
workers each loads on 1 process with 3 workers and on 3 processes with 1 worker, and the
global batches after it are bit-identical to the uninterrupted run's.

The save side is a real ``jax.distributed`` job (two OS processes on 127.0.0.1, 2 CPU devices
each, batches through ``JaxLoader`` as global arrays, each process's rows taken from its
addressable shards); the 3-process restore is a real ``torch.distributed`` gloo group; the
1-process restore is a lone process. Every process learns its index and count from its
runtime (``Config.make_loader``), not from the test; the workers are real processes too. The
order itself needs no communication: the runtimes only name each process. A global batch is
every host's rows concatenated in host order (tests/elastic_worker.py writes them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from elastic_worker import host_rows

import torch_rlds
from torch_rlds import synthetic

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")]

WORKER = Path(__file__).with_name("elastic_worker.py")
VARIED = dict(num_episodes=9, episode_lengths=(1, 5, 3, 12, 7, 2, 9, 4, 6), num_shards=3,
              cameras=(synthetic.Camera("image", 32, 32),))  # 49 steps
OTHER = dict(num_episodes=4, episode_lengths=(6, 3, 8, 5), num_shards=2,
             cameras=(synthetic.Camera("image", 32, 32),))  # 22 steps
# 12 divides among 2 hosts x 2 devices and among 3 hosts; 8 batches cross epochs of both.
GLOBAL_BATCH, SAVE_AT, BATCHES = 12, 3, 8
CONFIGS = ("single", "mixture")


def _free_port() -> int:
    from torch_rlds.adapters._multihost import free_port

    return free_port()


@pytest.fixture(scope="module")
def configs(write_dataset, tmp_path_factory):
    """YAML configs: one dataset in the global order, and a mixture of two such datasets."""
    root = tmp_path_factory.mktemp("elastic_configs")

    def data(path, seed):
        return {"path": os.fspath(path), "obs_window": 2, "action_horizon": 3, "seed": seed,
                "order": "global"}

    loader = {"batch_size": GLOBAL_BATCH, "num_workers": 0}
    paths = {}
    for name, spec, seed in (("a", VARIED, 7), ("b", OTHER, 3)):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"data": data(write_dataset(**spec), seed),
                                               "loader": loader}))
    mixture = root / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({
        "mixture": {"seed": 5, "datasets": [{"config": os.fspath(paths["a"]), "weight": 2.0},
                                            {"config": os.fspath(paths["b"]), "weight": 1.0}]},
        "loader": loader}))
    return {"single": paths["a"], "mixture": mixture}


def _phase(out: Path, phase: str, processes: int, launch: str, workers: int, configs,
           *extra: str, env=None, timeout: float = 240.0) -> list[subprocess.Popen]:
    """Start the ``processes`` hosts of one job (each reads every config)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        cmd = [sys.executable, os.fspath(WORKER), "--launch", launch, "--phase", phase,
               "--process-id", str(i), "--num-processes", str(processes), "--port", str(port),
               "--workers", str(workers), "--batches", str(BATCHES), "--out", os.fspath(out),
               *extra]
        for name in CONFIGS:
            cmd += ["--config", f"{name}={configs[name]}"]
        with open(out / f"{phase}_p{i}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        proc.phase, proc.index, proc.deadline = phase, i, time.monotonic() + timeout
        procs.append(proc)
    return procs


def _wait(out: Path, procs: list[subprocess.Popen]) -> None:
    """Wait for every process; on a failure or a timeout kill the rest and raise with the
    end of each failed process's log."""
    failed = []
    try:
        for proc in procs:
            try:
                code = proc.wait(max(1.0, proc.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = "timed out"
            if code != 0:
                failed.append((proc.phase, proc.index, code))
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    if failed:
        text = []
        for phase, i, code in failed:
            log = (out / f"{phase}_p{i}.log").read_text().splitlines()
            text.append(f"--- {phase} process {i}: {code} ---\n" + "\n".join(log[-30:]))
        raise RuntimeError("\n".join(text))


def _global(out: Path, phase: str, config: str, processes: int) -> dict[str, np.ndarray]:
    """The global batches a job read: every host's rows concatenated in host order."""
    hosts = [dict(np.load(out / f"{phase}_{config}_p{i}.npz")) for i in range(processes)]
    for i, host in enumerate(hosts):
        np.testing.assert_array_equal(host["batches"], hosts[0]["batches"], f"host {i}")
    joined = {key: np.concatenate([h[key] for h in hosts], axis=1)
              for key in hosts[0] if key != "batches"}
    joined["batches"] = hosts[0]["batches"]
    return joined


@pytest.fixture(scope="module")
def elastic(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    jax_env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_PLATFORMS": "cpu"}
    started = time.perf_counter()
    _wait(out, _phase(out, "saved", 2, "jax", 2, configs, "--save-at", str(SAVE_AT),
                      env=jax_env))
    saved = time.perf_counter()
    # Both restores at once: host p of 3 loads what host p % 2 saved.
    restores = (_phase(out, "one", 1, "none", 3, configs, "--restore", "2")
                + _phase(out, "three", 3, "gloo", 1, configs, "--restore", "2"))
    _wait(out, restores)
    return out, {"save_s": saved - started, "restore_s": time.perf_counter() - saved}


def _in_process(configs, config: str) -> dict[str, np.ndarray]:
    """The global batches of one host with no workers, read here: the reference run."""
    loader = torch_rlds.load_config(os.fspath(configs[config])).make_loader(0, 1,
                                                                            as_numpy=True)
    rows: dict[str, list[np.ndarray]] = {}
    iterator = iter(loader)
    for _ in range(BATCHES):
        batch = next(iterator)
        for key, part in host_rows(batch).items():
            rows.setdefault(key, []).append(part)
    return {key: np.stack(parts) for key, parts in rows.items()}


def _assert_bit_identical(got, want, where):
    assert sorted(k for k in got if k != "batches") == sorted(k for k in want
                                                              if k != "batches"), where
    for key in want:
        if key == "batches":
            continue
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where} {key}: {a.shape} {b.shape}"
        for i in range(len(a)):
            assert a[i].tobytes() == b[i].tobytes(), f"{where}: {key} of global batch {i}"


@pytest.mark.parametrize("config", CONFIGS)
def test_a_state_of_two_jax_processes_resumes_on_one_and_on_three_bit_for_bit(
        configs, elastic, config):
    out, _ = elastic
    uninterrupted = _global(out, "saved", config, 2)  # 2 JAX processes x 2 workers, no break
    assert uninterrupted["batches"].tolist() == list(range(BATCHES))
    # The 2 x 2 job read the global batches of one host without workers.
    _assert_bit_identical(uninterrupted, _in_process(configs, config), "2 JAX processes")
    states = [json.loads((out / f"state_{config}_p{i}.json").read_text()) for i in range(2)]
    assert [s["torch_rlds"]["batches_seen"] for s in states] == [SAVE_AT, SAVE_AT]
    after = {key: value[SAVE_AT:] for key, value in uninterrupted.items()}
    for phase, processes in (("one", 1), ("three", 3)):
        resumed = _global(out, phase, config, processes)
        assert resumed["batches"].tolist() == list(range(SAVE_AT, BATCHES)), phase
        assert resumed["action"].shape[1] == GLOBAL_BATCH
        _assert_bit_identical(resumed, after, f"{processes} process(es) after the restore")
    # What came after the restore is not trivially alike: it crosses an epoch, and a
    # mixture's batches hold samples of both datasets.
    epochs = after["meta/epoch"]
    assert epochs.min() == 0 and epochs.max() >= 1
    if config == "mixture":
        assert set(np.unique(after["meta/dataset_index"]).tolist()) == {0, 1}
