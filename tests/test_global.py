"""The global order: one stream of global batches whatever the hosts and workers, a state that
resumes under another topology, every step once per epoch, partial reads that are checked,
and i.i.d.-like shuffling."""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import torch_rlds
from torch_rlds import synthetic
from torch_rlds.loader import dataset_states
from torch_rlds.testing import assert_batches_equal, assert_resumes_exactly

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

VARIED = dict(num_episodes=9, episode_lengths=(1, 5, 3, 12, 7, 2, 9, 4, 6), num_shards=3,
              cameras=(synthetic.Camera("image", 32, 32),))
TINY = dict(num_episodes=3, episode_lengths=(2, 1, 4), num_shards=1, cameras=())


@pytest.fixture(scope="module")
def varied(write_dataset):
    return write_dataset(**VARIED)


@pytest.fixture(scope="module")
def tiny(write_dataset):
    return write_dataset(**TINY)


def _dataset(path, **options):
    return torch_rlds.RLDSDataset(path, **{"obs_window": 2, "action_horizon": 3, "seed": 7,
                                           "order": "global", **options})


def _ids(batch) -> list[tuple[int, int, int]]:
    meta = batch["meta"]
    return list(zip(meta["epoch"].tolist(), meta["episode_index"].tolist(),
                    meta["step_index"].tolist()))


class _Hosts:
    """``hosts`` loaders of one job, each with ``workers`` workers, as host ``p`` of ``hosts``
    would build them: their batches joined in host order are the global batches."""

    def __init__(self, path, hosts, workers, global_batch, **options):
        self.loaders = [torch_rlds.DataLoader(
            _dataset(path, process_index=p, process_count=hosts, **options),
            batch_size=global_batch // hosts, num_workers=workers) for p in range(hosts)]
        self._iterators = None

    def next(self):
        if self._iterators is None:
            self._iterators = [iter(loader) for loader in self.loaders]
        parts = [next(it) for it in self._iterators]
        return {"ids": [i for part in parts for i in _ids(part)],
                "action": np.concatenate([p["action"].numpy() for p in parts]),
                "image": np.concatenate([p["observation"]["image"].numpy() for p in parts])}

    def batches(self, count):
        return [self.next() for _ in range(count)]

    def states(self):
        return [json.loads(json.dumps(loader.state_dict())) for loader in self.loaders]

    def load(self, states):
        for p, loader in enumerate(self.loaders):
            loader.load_state_dict(states[p % len(states)])


def _same(a, b, where):
    assert a["ids"] == b["ids"], where
    assert a["action"].tobytes() == b["action"].tobytes(), where
    assert a["image"].tobytes() == b["image"].tobytes(), where


# -- one stream, whatever the topology -------------------------------------------------------
@pytest.mark.parametrize("hosts, workers", [(1, 0), (1, 3), (2, 2), (3, 1), (4, 0)])
def test_global_batches_do_not_depend_on_hosts_or_workers(varied, hosts, workers):
    reference = _Hosts(varied, 1, 0, 12).batches(12)  # crosses two epochs (49 steps)
    got = _Hosts(varied, hosts, workers, 12).batches(12)
    for i, (a, b) in enumerate(zip(reference, got)):
        _same(a, b, f"global batch {i}")
    epochs = {e for batch in reference for e, _, _ in batch["ids"]}
    assert epochs == {0, 1, 2}


@pytest.mark.parametrize("saved, restored", [((2, 2), (1, 3)), ((2, 2), (3, 1)),
                                             ((1, 0), (2, 1)), ((3, 1), (1, 0))])
def test_a_state_resumes_under_another_topology_bit_for_bit(varied, saved, restored):
    reference = _Hosts(varied, 1, 0, 12).batches(10)
    job = _Hosts(varied, *saved, 12)
    job.batches(4)
    states = job.states()
    # Every host saves the same dataset states: none names its host or workers.
    assert all(dataset_states(s) == dataset_states(states[0]) for s in states)
    resumed = _Hosts(varied, *restored, 12)
    resumed.load(states)
    for i, batch in enumerate(resumed.batches(6), 4):
        _same(reference[i], batch, f"global batch {i} after the restore")
    assert all(loader.batches_seen == 10 for loader in resumed.loaders)


def test_another_global_batch_size_continues_at_the_next_sample(varied):
    steps = sum(VARIED["episode_lengths"])
    job = _Hosts(varied, 2, 1, 8, repeat=False)
    first = [i for b in job.batches(3) for i in b["ids"]]  # 24 samples
    resumed = _Hosts(varied, 1, 2, 5, repeat=False)
    resumed.load(job.states())
    rest = []
    for loader in resumed.loaders:
        for batch in loader:
            rest += _ids(batch)
    every = [(0, e, t) for e, n in enumerate(VARIED["episode_lengths"]) for t in range(n)]
    assert len(first) + len(rest) == steps
    assert sorted(first + rest) == every  # every step of the epoch exactly once


@pytest.mark.parametrize("hosts, workers", list(itertools.product([1, 2, 3], [0, 1, 2, 3])))
def test_an_epoch_holds_every_step_once_even_with_more_readers_than_episodes(tiny, hosts,
                                                                            workers):
    steps = sum(TINY["episode_lengths"])
    seen = collections.Counter()
    for p in range(hosts):
        dataset = _dataset(tiny, repeat=False, process_index=p, process_count=hosts)
        for batch in torch_rlds.DataLoader(dataset, batch_size=1, num_workers=workers):
            seen.update(_ids(batch))
    assert sum(seen.values()) == steps
    assert seen == collections.Counter(
        (0, e, t) for e, n in enumerate(TINY["episode_lengths"]) for t in range(n))
    # Endless too: a reader with no episode of its own is no reader without work.
    endless = _dataset(tiny, process_index=hosts - 1, process_count=hosts)
    batch = next(iter(torch_rlds.DataLoader(endless, batch_size=2, num_workers=workers)))
    assert len(batch["action"]) == 2


def test_assert_resumes_exactly_across_a_topology_change(varied):
    def make(hosts=1, workers=2):
        return torch_rlds.DataLoader(_dataset(varied), batch_size=6, num_workers=workers)

    assert_resumes_exactly(make, 12, restore_points=[0, 3, 8, 11],
                           make_restored=lambda: make(workers=3))
    assert_resumes_exactly(make, 12, restore_points=[0, 5, 11],
                           make_restored=lambda: make(workers=0))


# -- the state -------------------------------------------------------------------------------
def test_the_state_is_small_and_names_no_topology(varied):
    one = torch_rlds.DataLoader(_dataset(varied), batch_size=4, num_workers=0)
    many = torch_rlds.DataLoader(_dataset(varied, process_index=1, process_count=2),
                                 batch_size=2, num_workers=3)
    for loader in (one, many):
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
    state = one.dataset.state_dict()
    assert set(state) == {"version", "order", "fingerprint", "start", "batch_size", "done",
                          "skipped"}
    assert "process_index" not in state["fingerprint"] and "num_workers" not in state[
        "fingerprint"]
    assert len(json.dumps(state)) < 400
    worst = json.loads(json.dumps(state))
    for key in ("start", "batch_size", "done", "skipped"):
        worst[key] = 2**62
    assert len(json.dumps(worst)) < 1024


@pytest.mark.parametrize("field, change, saved, current", [
    ("seed", {"seed": 1}, "7", "1"),
    ("obs_window", {"obs_window": 3}, "2", "3"),
    ("action_horizon", {"action_horizon": 8}, "3", "8"),
    ("shuffle", {"shuffle": False}, "1", "0"),
])
def test_a_state_of_another_configuration_is_refused(varied, field, change, saved, current):
    state = _dataset(varied).state_dict()
    with pytest.raises(ValueError, match=f"{field} in checkpoint: {saved} / in this dataset: "
                                         f"{current}"):
        _dataset(varied, **change).load_state_dict(state)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(version=1), "is not one of the global order"),
    (lambda s: s.update(order="window"), "is not one of the global order"),
    (lambda s: s.update(done=True), "'done' must be an int"),
    (lambda s: s.update(start=-1), r"'start' must be in \[0, 2\*\*62"),
    (lambda s: s.update(batch_size=0), "'batch_size' must be >= 1"),
    (lambda s: s.update(start=2**62, done=2), "past 2\\*\\*62 samples"),
    (lambda s: s.pop("done"), r"missing fields \['done'\]"),
    (lambda s: s.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda s: s["fingerprint"].update(num_steps=3), "num_steps in checkpoint: 3"),
])
def test_malformed_global_states_are_refused(varied, edit, message):
    dataset = _dataset(varied)
    state = json.loads(json.dumps(dataset.state_dict()))
    edit(state)
    with pytest.raises(ValueError, match=message):
        dataset.load_state_dict(state)


def test_a_window_state_is_refused_by_the_global_order_and_back(varied):
    window = torch_rlds.RLDSDataset(varied, order="window")
    with pytest.raises(ValueError, match="resumes only under it"):
        _dataset(varied, obs_window=1, action_horizon=16).load_state_dict(window.state_dict())
    with pytest.raises(ValueError, match="not a version this torch_rlds reads"):
        window.load_state_dict(_dataset(varied).state_dict())


def test_a_restore_reads_one_batch_of_samples(varied, monkeypatch):
    from torch_rlds._step_reader import StepReader

    reads = []
    read = StepReader.read
    monkeypatch.setattr(StepReader, "read",
                        lambda self, e, wants: reads.append(e) or read(self, e, wants))
    dataset = _dataset(varied, batch_size=4)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = dataset.state_dict()
    reads.clear()
    restored = _dataset(varied, batch_size=4)
    restored.load_state_dict(state)
    next(iter(restored))
    # One group of host batches (64 samples) and the one read ahead at most, never the epoch
    # before it.
    assert 1 <= len(reads) <= 128 and len(reads) < sum(VARIED["episode_lengths"]) * 7 / 4


def test_the_next_group_is_read_ahead_in_a_thread_and_its_error_raised_in_turn(varied,
                                                                               monkeypatch):
    import threading

    from torch_rlds._global_stream import GlobalStream

    threads, calls = [], []
    items = GlobalStream._items

    def recording(self, dataset, positions, *rest):
        threads.append(threading.current_thread().name)
        calls.append(len(calls))
        if len(calls) == 3:
            raise OSError("the third group does not read")
        return items(self, dataset, positions, *rest)

    reference = list(itertools.islice(iter(_dataset(varied, batch_size=8)), 16))
    monkeypatch.setattr(GlobalStream, "_items", recording)
    iterator = iter(_dataset(varied, batch_size=8))
    got = [next(iterator) for _ in range(16)]  # two groups of 8 host batches of 8
    for a, b in zip(reference, got):
        assert_batches_equal(a, b, "read ahead")
    assert threads[0] == threading.current_thread().name  # the first group: read in turn
    assert all(name.startswith("torch_rlds-read") for name in threads[1:])
    with pytest.raises(OSError, match="third group"):
        next(iterator)


# -- reading ---------------------------------------------------------------------------------
def test_samples_read_by_byte_range_equal_those_read_whole(varied, tmp_path, monkeypatch):
    from torch_rlds._step_reader import IndexBuilder, StepFiles

    whole = list(itertools.islice(_dataset(varied, batch_size=5), 8))
    monkeypatch.setenv("TORCH_RLDS_CACHE", str(tmp_path / "cache"))
    files = StepFiles(torch_rlds.RLDSSource(varied))
    files.lengths(progress=False)
    IndexBuilder(files, progress=False).start().join()
    assert files.missing() == []
    by_range = _dataset(varied, batch_size=5)
    reader = by_range._stream.reader
    assert all(reader.indexed(e) for e in range(len(by_range.source)))
    for i, (a, b) in enumerate(zip(whole, itertools.islice(by_range, 8))):
        assert_batches_equal(a, b, f"batch {i}")


def test_a_flipped_byte_a_sample_reads_is_found(varied, tmp_path, monkeypatch):
    import shutil

    from torch_rlds._step_reader import IndexBuilder, StepFiles

    monkeypatch.setenv("TORCH_RLDS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy" / varied.name
    shutil.copytree(varied, copy)
    files = StepFiles(torch_rlds.RLDSSource(copy))
    files.lengths(progress=False)
    IndexBuilder(files, progress=False).start().join()
    index = files.load_index(0)
    f = index.feature("steps/observation/image")
    start, end, _ = index.byte_range(0, f, 0, 0)  # record 0's first frame
    shard = files.shard(0)
    offset = shard.payload_offset(0) + (start + end) // 2
    data = bytearray(Path(shard.path).read_bytes())
    data[offset] ^= 0x20
    Path(shard.path).write_bytes(bytes(data))
    dataset = _dataset(copy, shuffle=False, obs_window=1, repeat=False)
    with pytest.raises(torch_rlds.CorruptRecordError, match=r"bad payload CRC of record 0"):
        list(dataset)


# -- shuffling --------------------------------------------------------------------------------
def test_a_batch_mixes_steps_of_as_many_episodes_as_independent_draws(write_dataset):
    # 200 episodes of 10 steps, batches of 20: drawing 20 steps independently gives 19.07
    # distinct episodes on average (20 minus the expected collisions); a window order of 16
    # episodes gives about 11.
    path = write_dataset(num_episodes=200, episode_lengths=(10,) * 200, num_shards=4,
                         cameras=())
    dataset = _dataset(path, repeat=False, batch_size=20)
    distinct = [len(set(b["meta"]["episode_index"].tolist())) for b in dataset]
    assert len(distinct) == 100
    assert 18.5 < np.mean(distinct) < 19.6
    window = torch_rlds.RLDSDataset(path, repeat=False, batch_size=20, order="window",
                                    shuffle_window=16)
    assert np.mean([len(set(b["meta"]["episode_index"].tolist())) for b in window]) < 14
