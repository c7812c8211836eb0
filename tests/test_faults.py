"""Faults: workers that die or hang, transforms that raise, corrupt shards seen through workers,
SIGTERM and SIGKILL of the training process, saves killed at random points, preemption with
restarts, and a soak of save/restore cycles and worker restarts.

The subprocess tests fork their "training runs" from a zygote (``tests/preempt_worker.py``)
that imported torch_rlds once, so a run starts in milliseconds rather than the seconds an
import of torch takes. Lengths are set by environment variables, with short defaults for CI:

* ``TORCH_RLDS_PREEMPT_KILLS``: random SIGKILLs of the training run (default 20);
* ``TORCH_RLDS_SAVE_KILLS``: saves killed at random points (default 50);
* ``TORCH_RLDS_SOAK_SECONDS``: length of the soak (default 6);
* ``TORCH_RLDS_FAULT_SEED``: the seed of the random kill points (default: a fresh one, printed
  in every failure message so that a failing run can be replayed).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.utils.data

import torch_rlds
from torch_rlds import synthetic
from torch_rlds._state_file import MAX_STATE_BYTES
from torch_rlds.loader import WorkerError, dataset_states

HELPER = Path(__file__).with_name("preempt_worker.py")
LENGTHS = (4, 7, 3, 9, 5, 6)  # 34 steps per epoch
SEED = int(os.environ.get("TORCH_RLDS_FAULT_SEED", random.SystemRandom().randrange(2**32)))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@pytest.fixture(scope="module")
def dataset_path(write_dataset):
    return write_dataset(num_episodes=len(LENGTHS), episode_lengths=LENGTHS, num_shards=2,
                         cameras=(synthetic.Camera("image", 32, 32),))


def _dataset(path, **options):
    return torch_rlds.RLDSDataset(path, **{"obs_window": 2, "action_horizon": 4,
                                           "shuffle_window": 2, **options})


def _ids(batch) -> list[tuple[int, int, int]]:
    meta = batch["meta"]
    return list(zip(meta["episode_index"].tolist(), meta["step_index"].tolist(),
                    meta["epoch"].tolist()))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(pids, timeout: float) -> list[int]:
    """The processes of ``pids`` still running after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


# -- transforms that fail on purpose (module level, so they pickle for forkserver workers) ----
def _die_once(flag: str, how: str, worker: int | None, sample):
    """Kill this worker (``worker``, or any when None) the first time it sees ``flag``."""
    info = torch.utils.data.get_worker_info()
    if info is None or (worker is not None and info.id != worker) or not os.path.exists(flag):
        return sample
    try:
        os.unlink(flag)  # one worker wins; the flag makes the fault happen once
    except FileNotFoundError:
        return sample
    if how == "exit":
        os._exit(3)
    if how == "hang":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)
    return sample


class TransformError(Exception):
    pass


def _raise_at(error: type[Exception], episode: int, step: int, sample):
    if (int(sample["meta"]["episode_index"]), int(sample["meta"]["step_index"])) == (
            episode, step):
        raise error(f"cannot transform episode {episode} step {step}")
    return sample


# -- worker faults ---------------------------------------------------------------------------
# torch's own words first (code matching them keeps working), then which worker it was.
@pytest.mark.parametrize("how, says, code", [
    ("exit", "DataLoader worker (pid(s) {pid}) exited unexpectedly (exit code 3) (worker 1)", 3),
    ("sigkill", "DataLoader worker (pid {pid}) is killed by signal: Killed. (SIGKILL, exit code "
                "-9) (worker 1)", -9)])
def test_a_dead_worker_is_named_and_the_stream_resumes(dataset_path, tmp_path, how, says, code):
    flag = tmp_path / "armed"

    def make():
        transform = functools.partial(_die_once, str(flag), how, 1)
        return torch_rlds.DataLoader(_dataset(dataset_path, sample_transform=transform),
                                     batch_size=3, num_workers=2)

    reference = [_ids(b) for b in itertools.islice(make(), 30)]
    loader = make()
    iterator = iter(loader)
    got = [_ids(next(iterator)) for _ in range(4)]
    pids = [w.pid for w in iterator._workers]
    flag.touch()
    started = time.monotonic()
    with pytest.raises(WorkerError) as error:
        for batch in iterator:
            got.append(_ids(batch))
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert message.startswith(says.format(pid=pids[1])), message
    assert isinstance(error.value, RuntimeError)
    assert (error.value.worker, error.value.pid, error.value.exitcode) == (1, pids[1], code)
    assert _survivors(pids, 5) == []  # the other worker was shut down with it
    with pytest.raises(WorkerError, match="this pass already ended"):
        next(iterator)
    # iter() again starts fresh workers right after the last batch handed out.
    for batch in loader:
        got.append(_ids(batch))
        if len(got) == len(reference):
            break
    assert got == reference
    assert loader.batches_seen == len(reference)


def test_a_stuck_worker_times_out_naming_it(dataset_path, tmp_path):
    flag = tmp_path / "armed"
    transform = functools.partial(_die_once, str(flag), "hang", 1)
    loader = torch_rlds.DataLoader(_dataset(dataset_path, sample_transform=transform),
                                   batch_size=3, num_workers=2, timeout=2)
    iterator = iter(loader)
    next(iterator)
    pids = [w.pid for w in iterator._workers]
    flag.touch()
    started = time.monotonic()
    with pytest.raises(WorkerError, match=rf"^DataLoader timed out after 2 seconds: worker 1 "
                                          rf"\(pid {pids[1]}\) sent no batch in time"):
        for _ in iterator:
            pass
    assert time.monotonic() - started < 15
    assert _survivors(pids, 5) == []  # the stuck worker was killed, not left behind
    next(iter(loader))  # fresh workers; the flag is gone, so nothing hangs


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("error", [ValueError, TransformError])
def test_a_transform_error_reaches_the_caller_and_ends_the_pass(dataset_path, workers, error):
    def make(transform):
        return torch_rlds.DataLoader(_dataset(dataset_path, sample_transform=transform),
                                     batch_size=3, num_workers=workers)

    reference = [_ids(b) for b in itertools.islice(make(None), 16)]
    loader = make(functools.partial(_raise_at, error, 3, 5))
    iterator = iter(loader)
    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    got = []
    with pytest.raises(error, match="cannot transform episode 3 step 5") as raised:
        for batch in iterator:
            got.append(_ids(batch))
    assert type(raised.value) is error
    if workers:
        assert "in DataLoader worker process" in str(raised.value)  # torch names the worker
    assert _survivors(pids, 2) == []  # stopped at once, not when the iterator is collected
    # torchdata would go on without the reader that raised, silently short of its steps.
    with pytest.raises(RuntimeError, match="already ended with .*cannot transform"):
        next(iterator)
    assert loader.batches_seen == len(got) < len(reference)
    state = json.loads(json.dumps(loader.state_dict()))
    loader.dataset.sample_transform = None  # the transform is fixed; iter() resumes
    for batch in loader:
        got.append(_ids(batch))
        if len(got) == len(reference):
            break
    assert got == reference
    restored = make(None)  # and the state saved after the error resumes the same way
    restored.load_state_dict(state)
    assert [_ids(b) for b in itertools.islice(restored, len(reference) - state["torch_rlds"][
        "batches_seen"])] == reference[state["torch_rlds"]["batches_seen"]:]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage, error, says", [
    ("flip", torch_rlds.CorruptRecordError, r"bad payload CRC of record \d at offset \d+"),
    ("truncate", torch_rlds.TruncatedShardError, r"truncated record \d at offset \d+"),
    ("delete", FileNotFoundError, r"No such file"),
])
def test_damage_after_opening_surfaces_through_the_loader(dataset_path, tmp_path, workers,
                                                          damage, error, says):
    # tests/test_source.py covers damage found when a source opens; here the shard changes
    # under an open dataset, and the error crosses from a worker with file and offset intact.
    copy = tmp_path / "copy" / dataset_path.name
    shutil.copytree(dataset_path, copy)
    # The window order reads whole records: any damaged byte of a record it reads is found.
    # (The global order reads byte ranges and checks what it reads: tests/test_global.py.)
    dataset = _dataset(copy, shuffle=False, repeat=False, order="window")
    shard = sorted(copy.glob("*train.tfrecord-*"))[1]
    data = bytearray(shard.read_bytes())
    second = int(dataset.source._readers["train"].indexes[1].offsets[1])
    if damage == "flip":
        data[second + 20] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:second + 20]))
    else:
        shard.unlink()
    loader = torch_rlds.DataLoader(dataset, batch_size=3, num_workers=workers)
    with pytest.raises(error, match=says) as raised:
        for _ in loader:
            pass
    assert shard.name in str(raised.value)


def test_cached_record_indexes_load_without_parsing_python(dataset_path, tmp_path,
                                                          monkeypatch):
    """Threads load cached indexes without ast: CPython's AST constructor fails at random
    when threads compile at once (gh-106905), which np.load's header parsing does."""
    import ast

    import numpy as np

    from torch_rlds import _tfrecord

    shards = sorted(dataset_path.glob("*train.tfrecord-*"))
    built = _tfrecord.build_indexes(shards, cache_dir=tmp_path)
    real_build = _tfrecord.build_index

    def refused(*args, **kwargs):
        raise AssertionError("called while loading cached indexes")

    monkeypatch.setattr(ast, "literal_eval", refused)
    monkeypatch.setattr(_tfrecord, "build_index", refused)  # so: from the cache, or fail
    again = _tfrecord.build_indexes(shards * 4, cache_dir=tmp_path, num_threads=8)
    assert [i.offsets.tolist() for i in again] == [i.offsets.tolist() for i in built] * 4
    # A cache file of any other layout is rebuilt, never misread.
    monkeypatch.setattr(_tfrecord, "build_index", real_build)
    (cached,) = [p for p in tmp_path.glob("*.npy") if p.name.startswith(shards[0].name)]
    for other in (built[0].offsets.astype(">i8"), built[0].offsets.astype(np.float64),
                  built[0].offsets[:-1], np.asfortranarray(built[0].offsets[None, :])):
        np.save(cached, other)
        rebuilt = _tfrecord.RecordIndex.load(shards[0], cache_dir=tmp_path)
        assert rebuilt.offsets.tolist() == built[0].offsets.tolist()
    cached.write_bytes(cached.read_bytes()[:-3])  # torn
    assert _tfrecord.RecordIndex.load(shards[0], cache_dir=tmp_path).offsets.tolist() == (
        built[0].offsets.tolist())


# -- the training process killed or stopped ------------------------------------------------
class Zygote:
    """Drives ``tests/preempt_worker.py zygote``: forks training runs and reaps them."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(HELPER), "zygote"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def _ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited ({self.process.wait()})")
        return json.loads(line)

    def run(self, *argv) -> int:
        return self._ask({"run": [str(a) for a in argv]})["pid"]

    def wait(self, pid: int, timeout: float = 60.0) -> int:
        answer = self._ask({"wait": pid, "timeout": timeout})
        assert not answer.get("timed_out"), f"run {pid} did not end within {timeout} s"
        return answer["status"]

    def close(self) -> None:
        self.process.stdin.write(json.dumps({"quit": True}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def _pids(path: Path) -> dict:
    _wait_for(lambda: path.exists() and path.read_text().endswith("\n"), 60,
              f"the run to write {path.name}")
    return json.loads(path.read_text().splitlines()[-1])


def test_sigterm_with_a_handler_shuts_the_workers_down(dataset_path, tmp_path, zygote):
    pids_file = tmp_path / "pids"
    pid = zygote.run("train", "--dataset", dataset_path, "--state", tmp_path / "state.json",
                     "--log", tmp_path / "log", "--pids", pids_file, "--sleep", 0.01,
                     "--on-sigterm", "exit")
    workers = _pids(pids_file)["workers"]
    assert len(workers) == 2 and all(map(_alive, workers))
    os.kill(pid, signal.SIGTERM)
    assert zygote.wait(pid) == 143
    assert _survivors(workers, 2) == []  # shut down as the process exited, not later


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_or_sigkill_without_a_handler_leaves_no_orphans(dataset_path, tmp_path, zygote,
                                                                target):
    # A killed process cannot shut its workers down; torch's workers notice their parent is
    # gone within its status interval (5 s) and exit. Kill both ways at once, waiting once.
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids_file = tmp_path / f"pids-{sig.name}"
        pid = zygote.run("train", "--dataset", dataset_path, "--state",
                         tmp_path / f"state-{sig.name}.json", "--log", tmp_path / f"log-{sig.name}",
                         "--pids", pids_file, "--sleep", 0.01)
        runs[sig] = pid, _pids(pids_file)["workers"]
    for sig, (pid, _) in runs.items():
        if target == "group":  # what a scheduler or a shell does: every process of the run
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    for sig, (pid, _) in runs.items():
        assert zygote.wait(pid) == -sig
    workers = [w for _, pids in runs.values() for w in pids]
    assert _survivors(workers, 15) == []


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_training_process_that_dies_without_cleanup_leaves_nothing(dataset_path, tmp_path,
                                                                     zygote, method):
    """Under forkserver (what a process running jax gets) torch's workers watch only the fork
    server, which outlives the training process. Killed (SIGKILL, SIGTERM without a handler)
    or gone with os._exit, the training process takes its workers, the fork server, the
    resource tracker and the named semaphores in /dev/shm with it, within seconds."""
    runs = {}
    for how in ("SIGKILL", "SIGTERM", "exit"):
        pids_file = tmp_path / f"pids-{how}"
        extra = ("--exit-after", 12) if how == "exit" else ()
        pid = zygote.run("train", "--dataset", dataset_path, "--state", tmp_path / f"s-{how}",
                         "--log", tmp_path / f"log-{how}", "--pids", pids_file, "--sleep", 0.05,
                         "--start-method", method, *extra)
        runs[how] = pid, _pids(pids_file)
    for how, (pid, pids) in runs.items():
        assert len(pids["workers"]) == 2 and set(pids["workers"]) < set(pids["below"])
        assert len(pids["below"]) >= 3  # the workers, a fork server or resource tracker
        assert any(p.startswith("/dev/shm/sem.") for p in pids["shm"]), pids["shm"]
        if how != "exit":
            os.kill(pid, getattr(signal, how))
    for how, (pid, _) in runs.items():
        assert zygote.wait(pid) == {"SIGKILL": -9, "SIGTERM": -15, "exit": 3}[how]
    started = time.monotonic()
    below = [p for _, pids in runs.values() for p in pids["below"]]
    assert _survivors(below, 10) == [], "processes outlived the training process"
    shm = [p for _, pids in runs.values() for p in pids["shm"]]
    _wait_for(lambda: not any(map(os.path.exists, shm)), 10, f"{shm} to go")
    assert time.monotonic() - started < 10


def _lines(path: Path) -> list[str]:
    """The complete lines of a log (a run killed mid-write leaves a partial last line)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text.splitlines()[:text.count("\n")]


def _saved_batches(state: Path) -> int:
    if not state.exists():
        return 0
    return json.loads(state.read_text())["torch_rlds"]["batches_seen"]


def test_preemption_resumes_exactly(dataset_path, tmp_path, zygote):
    """A training run killed with SIGKILL at random points after its last save and restarted
    from it, again and again, logs exactly the batches of the uninterrupted run."""
    kills = _env_int("TORCH_RLDS_PREEMPT_KILLS", 20)
    save_every = 4
    rng = random.Random(SEED)
    state, log, pids_file = tmp_path / "state.json", tmp_path / "run.log", tmp_path / "pids"
    common = ("--dataset", dataset_path, "--save-every", save_every)
    history = []
    for kill in range(kills):
        saved = _saved_batches(state)
        # The batches after the last save are consumed again after the restart: forget them.
        log.write_text("".join(line + "\n" for line in _lines(log)[:saved]))
        pid = zygote.run("train", *common, "--state", state, "--log", log, "--pids", pids_file)
        target = saved + rng.randint(1, 2 * save_every)  # a step after its last save
        _wait_for(lambda t=target: _count_lines(log) >= t, 60, f"batch {target} (seed {SEED})")
        time.sleep(rng.uniform(0, 0.01))  # anywhere: logging, saving, between batches
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL, f"seed {SEED}, kill {kill}"
        history.append((saved, _count_lines(log), _saved_batches(state)))
    # Run on to a few batches past the last save, then compare with an uninterrupted run.
    total = _saved_batches(state) + 2 * save_every
    log.write_text("".join(line + "\n" for line in _lines(log)[:_saved_batches(state)]))
    pid = zygote.run("train", *common, "--state", state, "--log", log, "--batches", total,
                     "--pids", pids_file)
    assert zygote.wait(pid) == 0, f"seed {SEED}: the last run failed"
    reference = tmp_path / "reference.log"
    pid = zygote.run("train", *common, "--state", tmp_path / "reference.json", "--log",
                     reference, "--batches", total)
    assert zygote.wait(pid) == 0
    expected = _lines(reference)
    assert len(expected) == total
    assert _lines(log) == expected, f"seed {SEED}, (saved, logged, saved after) {history}"
    assert sum(after > before for before, _, after in history) >= kills // 4  # runs progressed
    workers = [w for line in pids_file.read_text().splitlines()
               for w in json.loads(line)["workers"]]
    assert len(workers) == 2 * (kills + 1)
    assert _survivors(workers, 15) == []


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


# -- killed saves -----------------------------------------------------------------------------
def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_killed_saves_leave_the_previous_state_intact(dataset_path, tmp_path, zygote):
    runs = _env_int("TORCH_RLDS_SAVE_KILLS", 50)
    rng = random.Random(SEED)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = folder / "loader.json"
    loader = torch_rlds.DataLoader(_dataset(dataset_path), batch_size=3)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    expected = json.loads(json.dumps(loader.state_dict()))
    previous, left_behind = -1, 0
    for run in range(runs):
        ready, go = tmp_path / f"ready-{run}", tmp_path / f"go-{run}"
        pid = zygote.run("save-loop", "--dataset", dataset_path, "--state", state,
                         "--ready", ready, "--go", go)
        _wait_for(ready.exists, 60, f"run {run} to save once")
        # Its first save removed what the save killed before it left behind.
        assert _temporaries(folder) == [], f"seed {SEED}, run {run}"
        go.touch()
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL
        left_behind += bool(_temporaries(folder))
        restored = torch_rlds.DataLoader(_dataset(dataset_path), batch_size=3)
        restored.load_state(state)  # whole, never a partial file
        saved = json.loads(state.read_text())
        assert saved == {**expected, "torch_rlds": saved["torch_rlds"]}, f"seed {SEED}"
        assert restored.batches_seen == saved["torch_rlds"]["batches_seen"] > previous
        previous = restored.batches_seen
    loader.save_state(state)
    assert sorted(p.name for p in folder.iterdir()) == ["loader.json"]
    print(f"{runs} killed saves, {left_behind} left a temporary file behind (seed {SEED})")


def test_a_save_killed_between_write_and_rename(dataset_path, tmp_path, zygote):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = folder / "loader.json"
    ready, go, stuck = tmp_path / "ready", tmp_path / "go", tmp_path / "stuck"
    pid = zygote.run("save-loop", "--dataset", dataset_path, "--state", state, "--ready", ready,
                     "--go", go, "--stuck", stuck)
    _wait_for(ready.exists, 60, "the first save")
    before = state.read_text()
    go.touch()
    _wait_for(stuck.exists, 60, "the second save to write its temporary file")
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid) == -signal.SIGKILL
    (leftover,) = _temporaries(folder)  # written in full, never renamed
    assert json.loads((folder / leftover).read_text())["torch_rlds"]["batches_seen"] == 4
    assert state.read_text() == before  # the previous state, untouched
    loader = torch_rlds.DataLoader(_dataset(dataset_path), batch_size=3)
    loader.load_state(state)
    assert loader.batches_seen == 3
    loader.save_state(state)  # the next save cleans up
    assert _temporaries(folder) == []


def test_partial_or_garbage_state_files_are_refused(dataset_path, tmp_path):
    loader = torch_rlds.DataLoader(_dataset(dataset_path), batch_size=3, num_workers=2)
    path = tmp_path / "loader.json"
    loader.save_state(path)
    whole = path.read_bytes()
    bad = tmp_path / "bad.json"
    for cut in range(len(whole)):  # every torn write: each prefix of the file
        bad.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"bad\.json: ") as raised:
            loader.load_state(bad)
        assert "not a JSON state" in str(raised.value) or cut == 0, cut
    state = json.loads(whole)
    garbage = {
        "zeros": b"\0" * 64,
        "latin-1": "{\"torch_rlds\": \"\xe9\"}".encode("latin-1"),
        "nan": whole.replace(b'"batches_seen": 0', b'"batches_seen": NaN'),
        "duplicate": b'{"_iterator_finished": true, ' + whole[1:],
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "huge": b" " * (MAX_STATE_BYTES + 1),
        "a list": b"[]",
        "null": b"null",
        "empty object": b"{}",
        "another loader": json.dumps({**state, "_steps_since_snapshot": "3"}).encode(),
        "long digits": whole.replace(b'"batches_seen": 0', b'"batches_seen": ' + b"9" * 5000),
    }
    for name, data in garbage.items():
        assert data != whole, name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=r"bad\.json: ") as raised:
            loader.load_state(bad)
        assert len(str(raised.value)) < 2000, name  # names the problem, does not echo the file
    assert loader.batches_seen == 0 and loader.next_iter_state is None  # nothing half-loaded
    with pytest.raises(FileNotFoundError, match="missing.json: no state file"):
        loader.load_state(tmp_path / "missing.json")


# -- soak -------------------------------------------------------------------------------------
def _rss(iterator) -> int:
    """Resident memory of this process and the loader's current workers, in bytes."""
    total = psutil.Process().memory_info().rss
    for worker in getattr(iterator, "_workers", []):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(worker.pid).memory_info().rss
    return total


RSS_GROWTH_BOUND = 64 << 20


@pytest.mark.parametrize("order", ["window", "global"])
def test_soak_exactly_once_per_epoch_and_flat_memory(dataset_path, tmp_path, order):
    """An endless stream under periodic save/restore cycles (through a file) and workers
    killed at random: every epoch holds every step exactly once, and memory stays flat."""
    seconds = float(os.environ.get("TORCH_RLDS_SOAK_SECONDS", 6))
    rng = random.Random(SEED)
    flag, state_file = tmp_path / "kill", tmp_path / "state.json"

    def make():
        transform = functools.partial(_die_once, str(flag), "sigkill", None)
        return torch_rlds.DataLoader(_dataset(dataset_path, sample_transform=transform,
                                              order=order), batch_size=3, num_workers=2)

    loader = make()
    iterator = iter(loader)
    ids, samples = [], []
    cycles = restarts = batches = 0
    next_cycle, next_kill = rng.randint(10, 40), rng.randint(5, 40)
    started = time.monotonic()
    while time.monotonic() - started < seconds or not (cycles and restarts):
        try:
            batch = next(iterator)
        except WorkerError:
            restarts += 1
            iterator = iter(loader)
            continue
        ids += _ids(batch)
        batches += 1
        if batches == next_kill:
            flag.touch()  # a worker kills itself at its next step
            next_kill += rng.randint(5, 40)
        if batches == next_cycle:
            loader.save_state(state_file)
            del iterator, loader
            loader = make()
            loader.load_state(state_file)
            iterator = iter(loader)
            cycles += 1
            next_cycle += rng.randint(10, 40)
        if batches % 5 == 0:
            samples.append(_rss(iterator))
        assert time.monotonic() - started < seconds + 120, "the soak does not end"
    assert loader.batches_seen == batches
    if order == "window":
        epochs = [s["epoch"] for s in dataset_states(loader.state_dict())]
        complete = min(epochs)  # every reader is past these epochs
    else:  # one stream: every epoch before the last one seen is complete
        complete = max(epoch for _, _, epoch in ids)
    by_epoch = collections.defaultdict(collections.Counter)
    for episode, step, epoch in ids:
        by_epoch[epoch][(episode, step)] += 1
    every_step = collections.Counter((e, t) for e, n in enumerate(LENGTHS) for t in range(n))
    report = (f"seed {SEED}: {batches} batches, {cycles} save/restore cycles, {restarts} "
              f"worker restarts, {complete} complete epochs")
    assert complete >= 2, report
    for epoch in range(complete):
        assert by_epoch[epoch] == every_step, f"epoch {epoch}: {report}"
    for epoch in range(complete, max(by_epoch) + 1):  # under way: nothing twice, nothing alien
        assert max(by_epoch[epoch].values(), default=1) == 1, f"epoch {epoch}: {report}"
        assert set(by_epoch[epoch]) <= set(every_step), report
    warm = samples[len(samples) // 4:]  # after warm-up: caches filled, workers started
    growth = max(warm[len(warm) // 2:]) - max(warm[:len(warm) // 2])
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth >> 20} MiB: {report}"
    print(f"{report}; RSS {min(warm) >> 20}..{max(warm) >> 20} MiB, growth {growth >> 20} MiB")
