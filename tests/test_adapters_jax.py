"""torch_rlds.adapters.jax: global arrays, prefetch that never leaks into the state, and a real
two-process jax.distributed run on 127.0.0.1."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import types

import numpy as np
import pytest

from torch_rlds.config import ConfigError, load_config
from torch_rlds.testing import assert_batches_equal, assert_resumes_exactly

# jax is imported inside the fixture, not at collection: once jax is in sys.modules every
# later loader with workers starts them with forkserver.


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    with contextlib.suppress(RuntimeError):  # a backend already up keeps its devices
        jax.config.update("jax_num_cpu_devices", 2)
    from torch_rlds.loader import default_start_method

    default_start_method()  # the fork server that later workers use preloads torch_rlds
    return jax


@pytest.fixture(scope="module")
def sharding(jax):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def _config(path, *overrides):
    return load_config("demo", [f"data.path={path}", "data.action_horizon=4",
                                "data.shuffle_window=2", "loader.batch_size=4",
                                "loader.num_workers=0", *overrides])


class _Host:
    """A JaxLoader seen as numpy (so the resume helpers can compare its batches)."""

    def __init__(self, jax_loader) -> None:
        import jax

        self.inner = jax_loader
        self._get = jax.device_get

    def __iter__(self):
        for batch in self.inner:
            yield self._get(batch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_numeric_leaves_become_global_arrays_and_strings_stay(jax, sharding, small_dataset):
    from torch_rlds.adapters.jax import to_global

    loader = _config(small_dataset).make_loader(as_numpy=True)
    local = next(iter(loader))
    out = to_global(local, sharding)
    assert isinstance(out["action"], jax.Array)
    assert out["action"].sharding == sharding
    assert out["action"].shape == local["action"].shape  # one process: global == local
    assert out["observation"]["image"].dtype == np.uint8
    assert out["language_instruction"] == local["language_instruction"]
    assert all(isinstance(s, str) for s in out["language_instruction"])
    np.testing.assert_array_equal(np.asarray(out["observation"]["state"]),
                                  local["observation"]["state"])
    np.testing.assert_array_equal(np.asarray(out["meta"]["episode_index"]),
                                  local["meta"]["episode_index"])


def test_a_global_batch_that_does_not_divide_names_the_numbers(jax, sharding, small_dataset):
    from torch_rlds.adapters.jax import JaxLoader

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    loader = JaxLoader(_config(small_dataset, "loader.batch_size=3").make_loader(), sharding)
    with pytest.raises(ValueError, match=r"global batch 3 .*1 process.*multiple of 2"):
        next(iter(loader))
    # Across processes the config says which numbers to change before anything is read.
    config = _config(small_dataset, "loader.batch_size=6", "process_count=4", "process_index=1")
    with pytest.raises(ConfigError, match="batch_size 6 does not divide among 4 processes; use "
                                          "a multiple of 4"):
        JaxLoader.from_config(config, sharding)


def test_a_sharding_over_other_processes_than_the_loader_is_refused(jax, small_dataset):
    from torch_rlds.adapters.jax import JaxLoader

    class Device:
        def __init__(self, process_index):
            self.process_index = process_index

    fake = types.SimpleNamespace(device_set={Device(0), Device(1)}, spec=None, mesh=None)
    with pytest.raises(ValueError, match="spans devices of 2 processes, but the loader reads "
                                         "as process 0 of 1"):
        JaxLoader(_config(small_dataset).make_loader(), fake)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resumes_exactly_after_every_batch(jax, sharding, small_dataset, prefetch):
    from torch_rlds.adapters.jax import JaxLoader

    config = _config(small_dataset, "data.obs_window=2")
    assert_resumes_exactly(
        lambda: _Host(JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch)), 7)


def test_the_state_is_that_of_the_last_batch_received_not_of_the_prefetched(
        jax, sharding, small_dataset):
    from torch_rlds.adapters.jax import JaxLoader

    config = _config(small_dataset)
    plain = config.make_loader(as_numpy=True)
    expected = [json.dumps(plain.state_dict())]
    iterator = iter(plain)
    for _ in range(6):
        next(iterator)
        expected.append(json.dumps(plain.state_dict()))
    ahead = JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch=3)
    assert json.dumps(ahead.state_dict()) == expected[0]
    iterator = iter(ahead)
    for n in range(1, 4):
        next(iterator)
        deadline = time.monotonic() + 10
        while not ahead._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)  # let the thread run as far ahead as it may
        assert ahead.loader.batches_seen >= n + 3  # the loader is 3+ batches ahead ...
        assert json.dumps(ahead.state_dict()) == expected[n]  # ... the state is not
        assert ahead.batches_seen == n
    ahead.close()
    assert json.dumps(ahead.state_dict()) == expected[3]


def test_iter_again_continues_and_a_restore_discards_the_prefetched(jax, sharding,
                                                                    small_dataset):
    from torch_rlds.adapters.jax import JaxLoader

    config = _config(small_dataset)
    reference = [jax.device_get(b) for b in itertools.islice(
        JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch=0), 8)]
    loader = JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch=2)
    got = [jax.device_get(b) for b in itertools.islice(loader, 2)]
    got += [jax.device_get(b) for b in itertools.islice(loader, 2)]  # a new iter() continues
    for i, batch in enumerate(got):
        assert_batches_equal(reference[i], batch, f"batch {i}")
    state = loader.state_dict()
    next(iter(loader))
    loader.load_state_dict(state)  # rewinds past the batch received and those prefetched
    for i, batch in zip(range(4, 6), loader):
        assert_batches_equal(reference[i], jax.device_get(batch), f"batch {i}")
    loader.close()  # drops what the thread fetched ahead; iter() goes on after batch 5
    for i, batch in zip(range(6, 8), loader):
        assert_batches_equal(reference[i], jax.device_get(batch), f"batch {i}")


def test_errors_reach_the_caller_and_leave_the_state_alone(jax, sharding):
    from torch_rlds.adapters.jax import JaxLoader

    class Failing:
        num_workers = 0
        process_index, process_count = 0, 1

        def __init__(self):
            self.n = 0

        def __iter__(self):
            for self.n in range(1, 10):
                if self.n == 3:
                    raise OSError("shard 2 unreadable")
                yield {"x": np.full((2, 3), self.n, np.float32)}

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    loader = JaxLoader(Failing(), sharding, prefetch=2)
    iterator = iter(loader)
    assert float(next(iterator)["x"][0, 0]) == 1
    assert float(next(iterator)["x"][0, 0]) == 2
    with pytest.raises(OSError, match="shard 2 unreadable"):
        next(iterator)
    assert loader.state_dict() == {"n": 2}


def test_device_put_collator(jax, sharding, small_dataset, monkeypatch):
    import torch.utils.data

    from torch_rlds import DataLoader
    from torch_rlds.adapters.jax import device_put_collator

    dataset = _config(small_dataset).make_dataset()
    collate = device_put_collator(sharding)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))
    assert isinstance(batch["action"], jax.Array) and batch["action"].shape == (4, 4, 7)
    assert isinstance(batch["language_instruction"], list)
    samples = list(itertools.islice(dataset, 2))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    with pytest.raises(RuntimeError, match="cannot run in a DataLoader worker"):
        collate(samples)


def test_workers_never_fork_from_a_jax_process(jax, sharding, small_dataset):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from torch_rlds.adapters.jax import JaxLoader

    jax.devices()  # the backend is up: forking now could deadlock the child
    config = _config(small_dataset, "loader.num_workers=1")
    loader = config.make_loader()
    iterator = iter(loader)
    assert [w._start_method for w in iterator._workers] == ["forkserver"]
    assert loader.multiprocessing_context is None  # the caller's choice stays the caller's
    del iterator
    forked = config.make_loader(multiprocessing_context="fork")
    JaxLoader(forked, sharding)
    assert forked.multiprocessing_context.get_start_method() == "fork"
    plain = StatefulDataLoader(config.make_loader().dataset, batch_size=None, num_workers=1)
    JaxLoader(plain, sharding)  # another loader, left to the platform's fork: switched
    assert plain.multiprocessing_context.get_start_method() == "forkserver"
    assert_resumes_exactly(lambda: _Host(JaxLoader(config.make_loader(as_numpy=True),
                                                   sharding)), 3, restore_points=[1])


# -- the real multi-host run ---------------------------------------------------------------
SAVE_AT = 4


@pytest.fixture(scope="module")
def two_hosts(jax, small_dataset, small_spec, tmp_path_factory):
    from torch_rlds.adapters import _multihost

    out = tmp_path_factory.mktemp("multihost")
    overrides = [f"data.path={small_dataset}", "data.action_horizon=4", "data.shuffle_window=2",
                 "loader.batch_size=4", "loader.num_workers=0"]
    lengths = small_spec.lengths()[:small_spec.num_episodes]
    epoch = {(e, t) for e, n in enumerate(lengths) for t in range(n)}
    steps = _multihost.steps_for_epoch(len(epoch), 4, 2)
    checks, figures = _multihost.run_two_hosts(
        os.fspath(out), config="demo", overrides=overrides, save_at=SAVE_AT, steps=steps,
        cover_epoch=True, timeout=150)
    runs = [json.loads((out / f"run_p{i}.json").read_text()) for i in range(2)]
    resumes = [json.loads((out / f"resume_p{i}.json").read_text()) for i in range(2)]
    return types.SimpleNamespace(out=out, checks=checks, figures=figures, runs=runs,
                                 resumes=resumes, epoch=epoch, steps=steps,
                                 overrides=overrides)


@pytest.mark.slow
def test_two_processes_read_disjoint_parts_and_resume_exactly(two_hosts):
    failed = [text for ok, text in two_hosts.checks if not ok]
    assert not failed, failed
    runs, resumes = two_hosts.runs, two_hosts.resumes
    for i, record in enumerate(runs):
        assert record["process_count"] == 2 and record["process_index"] == i
        assert record["global_devices"] == 4 and record["local_devices"] == 2
        assert record["loader_process"] == [i, 2]
    # Every step's global arrays have the global batch; each host holds half of the rows.
    for record in runs + resumes:
        for step in record["steps"].values():
            assert step["leaves"]["action"]["shape"] == [4, 4, 7]
            assert step["leaves"]["observation/image"]["shape"] == [4, 1, 64, 64, 3]
            assert len(step["ids"]) == 2
    # Disjoint hosts that together cover epoch 0, each step exactly once.
    per_host = [[tuple(r[1:]) for s in rec["steps"].values() for r in s["ids"] if r[0] == 0]
                for rec in runs]
    assert not set(per_host[0]) & set(per_host[1])
    assert sorted(per_host[0] + per_host[1]) == sorted(two_hosts.epoch)
    # Fresh processes restored after batch SAVE_AT and saw the same global batches after it.
    for run, resume in zip(runs, resumes):
        assert resume["restored_batches_seen"] == SAVE_AT
        assert sorted(map(int, resume["steps"])) == list(range(SAVE_AT, two_hosts.steps))
        for step in range(SAVE_AT, two_hosts.steps):
            assert resume["steps"][str(step)] == run["steps"][str(step)], step
        assert resume["final_params"] == run["final_params"]
    state_dir = two_hosts.out / "checkpoints" / str(SAVE_AT) / "data_loader"
    states = [json.loads((state_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert [s["torch_rlds"]["batches_seen"] for s in states] == [SAVE_AT, SAVE_AT]
    # The global order's state names no host: the hosts save the same state.
    assert states[0] == states[1]


@pytest.mark.slow
def test_the_multihost_verification_catches_a_wrong_resume(two_hosts):
    from torch_rlds.adapters._multihost import verify

    runs, resumes = two_hosts.runs, json.loads(json.dumps(two_hosts.resumes))
    step = resumes[1]["steps"][str(SAVE_AT + 1)]
    step["leaves"]["action"]["shards"] = {k: "0" * 32 for k in step["leaves"]["action"]["shards"]}
    runs = json.loads(json.dumps(runs))
    runs[1]["steps"]["0"]["ids"][0] = runs[0]["steps"]["0"]["ids"][0]  # a sample on both hosts
    checks = dict((text.split(" (")[0].split(":")[0], ok) for ok, text in verify(
        runs, resumes, global_batch=4, save_at=SAVE_AT, steps=two_hosts.steps,
        epoch_ids=two_hosts.epoch))
    assert not checks["the hosts' sample ids are disjoint"]
    assert not checks[f"global batches {SAVE_AT}..{two_hosts.steps - 1} after the restart "
                      "equal the uninterrupted run's"]
    assert checks["every global array has the global batch 4 as its first axis"]


@pytest.mark.slow
def test_a_single_process_restores_a_two_process_checkpoint(two_hosts):
    # The global order's state names no host: one process takes the states two saved, and
    # its batches are the two hosts' global batches, each host's rows in host order.
    import itertools

    import orbax.checkpoint as ocp

    from torch_rlds.adapters.orbax import DataLoaderRestore

    config = load_config("demo", two_hosts.overrides)
    manager = ocp.CheckpointManager(two_hosts.out / "checkpoints")
    loader = config.make_loader(0, 1)
    manager.restore(SAVE_AT, args=ocp.args.Composite(data_loader=DataLoaderRestore(loader)))
    assert loader.batches_seen == SAVE_AT
    for step, batch in zip(range(SAVE_AT, two_hosts.steps), itertools.islice(loader, 3)):
        got = [list(row) for row in zip(batch["meta"]["epoch"].tolist(),
                                        batch["meta"]["episode_index"].tolist(),
                                        batch["meta"]["step_index"].tolist())]
        hosts = [run["steps"][str(step)]["ids"] for run in two_hosts.runs]
        assert got == hosts[0] + hosts[1], step


def test_prefetch_threads_stop_at_interpreter_exit(tmp_path):
    # A daemon thread still inside jax when the interpreter tears jax down aborts the
    # process; the prefetcher stops its threads first. An exit hook registered before the
    # prefetcher's own (so it runs after it) reports whether the thread still runs.
    import subprocess
    import sys

    code = (
        "import atexit, threading, time\n"
        "def report():\n"
        "    alive = [t.name for t in threading.enumerate() if t.name.startswith('torch_rlds')]\n"
        "    print('alive' if alive else 'stopped', flush=True)\n"
        "atexit.register(report)\n"
        "from torch_rlds.adapters._prefetch import StatefulPrefetcher\n"
        "class Slow:\n"
        "    def __iter__(self):\n"
        "        for i in range(10**6):\n"
        "            time.sleep(0.02)\n"
        "            yield i\n"
        "    def state_dict(self): return {}\n"
        "p = StatefulPrefetcher(Slow(), lambda b: b, prefetch=2)\n"
        "print(next(iter(p)), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "stopped"]
