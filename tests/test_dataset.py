"""RLDSDataset: exactly-once epochs over hosts and workers, passes, state checks, state size,
resume cost and shuffle quality."""

from __future__ import annotations

import collections
import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _images, _order, synthetic
from torch_rlds.loader import dataset_states
from torch_rlds.testing import assert_batches_equal, assert_resumes_exactly

# Lengths vary and several are shorter than the action horizon of 4 (one is a single step).
VARIED = dict(num_episodes=11, episode_lengths=(1, 2, 3, 7, 12, 5, 3, 9, 2, 6, 4),
              cameras=(synthetic.Camera("image", 32, 32),), num_shards=2)
# Equal lengths, no cameras: cheap, and the expected share of same-episode pairs is exact.
EQUAL = dict(num_episodes=24, episode_lengths=(10,) * 24, cameras=(), num_shards=2)


@pytest.fixture(scope="module")
def varied(write_dataset):
    return write_dataset(**VARIED)


@pytest.fixture(scope="module")
def equal(write_dataset):
    return write_dataset(**EQUAL)


def _window(*args, **options):
    """A dataset in the window order, whose mechanics (windows, readers) the test checks."""
    return torch_rlds.RLDSDataset(*args, order="window", **options)


def _ids(samples) -> list[tuple[int, int]]:
    return [(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])) for s in samples]


def _all_steps(lengths) -> list[tuple[int, int]]:
    return [(e, t) for e, n in enumerate(lengths) for t in range(n)]


@pytest.mark.parametrize("hosts, workers", list(itertools.product([1, 2, 3], [0, 1, 2])))
def test_one_epoch_has_every_step_exactly_once(varied, hosts, workers):
    lengths = VARIED["episode_lengths"]
    seen = []
    for host in range(hosts):
        dataset = torch_rlds.RLDSDataset(
            varied, obs_window=2, action_horizon=4, shuffle_window=2, repeat=False, seed=3,
            process_index=host, process_count=hosts)
        loader = torch_rlds.DataLoader(dataset, batch_size=5, num_workers=workers)
        host_ids = []
        for batch in loader:
            meta = batch["meta"]
            episode, step = meta["episode_index"], meta["step_index"]
            # The ids agree with the values the synthetic data encodes: the last observation
            # of the window is the sample's own step, the first action too.
            state = batch["observation"]["state"][:, -1]
            assert state[:, 0].tolist() == episode.tolist()
            assert state[:, 1].tolist() == step.tolist()
            assert batch["action"][:, 0, :2].tolist() == state[:, :2].tolist()
            assert meta["epoch"].tolist() == [0] * len(episode)
            host_ids += list(zip(episode.tolist(), step.tolist()))
        assert host_ids, f"host {host} read nothing"
        seen += host_ids
    assert collections.Counter(seen) == collections.Counter(_all_steps(lengths))


def test_more_readers_than_episodes_in_one_pass(write_dataset):
    path = write_dataset(num_episodes=3, episode_lengths=(2, 1, 3), cameras=(), num_shards=1)
    seen = []
    for host in range(2):
        dataset = torch_rlds.RLDSDataset(path, repeat=False, process_index=host,
                                         process_count=2)
        for batch in torch_rlds.DataLoader(dataset, batch_size=2, num_workers=2):
            seen += list(zip(batch["meta"]["episode_index"].tolist(),
                             batch["meta"]["step_index"].tolist()))
    assert sorted(seen) == _all_steps([2, 1, 3])


def test_repeat_with_more_readers_than_episodes_is_refused(write_dataset):
    path = write_dataset(num_episodes=3, episode_lengths=(2, 1, 3), cameras=(), num_shards=1)
    dataset = _window(path, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="4 readers .* 3 episodes"):
        iter(dataset)


def test_passes_of_a_one_pass_dataset_are_successive_epochs(varied):
    lengths = VARIED["episode_lengths"]
    dataset = torch_rlds.RLDSDataset(varied, shuffle_window=3, repeat=False, seed=1)
    passes = [list(dataset) for _ in range(3)]
    for epoch, samples in enumerate(passes):
        assert sorted(_ids(samples)) == _all_steps(lengths)
        assert {int(s["meta"]["epoch"]) for s in samples} == {epoch}
    assert _ids(passes[0]) != _ids(passes[1])
    dataset.set_epoch(1)
    assert _ids(dataset) == _ids(passes[1])


def test_a_restored_pass_ends_where_the_uninterrupted_one_does(varied):
    def make():
        return torch_rlds.RLDSDataset(varied, shuffle_window=3, repeat=False, seed=1)

    reference = list(make())
    total = len(reference)
    dataset = make()
    iterator = iter(dataset)
    for _ in range(total):
        next(iterator)
    finished = dataset.state_dict()  # after the last step of epoch 0, before StopIteration
    for k in [0, 5, total - 1]:
        dataset = make()
        iterator = iter(dataset)
        for _ in range(k):
            next(iterator)
        restored = make()
        restored.load_state_dict(json.loads(json.dumps(dataset.state_dict())))
        assert _ids(restored) == _ids(reference[k:])
    restored = make()
    restored.load_state_dict(finished)
    assert list(restored) == []  # the saved pass had nothing left...
    second = list(restored)  # ...and the next pass is epoch 1
    assert {int(s["meta"]["epoch"]) for s in second} == {1}
    assert len(second) == total


def test_repeat_crosses_epochs_and_resumes_across_the_boundary(varied):
    def make():
        return torch_rlds.RLDSDataset(varied, shuffle_window=4, seed=2)

    total = sum(VARIED["episode_lengths"])
    stream = list(itertools.islice(make(), 2 * total + 5))
    assert sorted(_ids(stream[:total])) == sorted(_ids(stream[total:2 * total]))
    assert [int(s["meta"]["epoch"]) for s in stream] == [0] * total + [1] * total + [2] * 5
    for k in [total - 1, total, total + 1]:
        dataset = make()
        iterator = iter(dataset)
        for _ in range(k):
            next(iterator)
        state = dataset.state_dict()
        restored = make()
        restored.load_state_dict(state)
        assert _ids(itertools.islice(restored, 2 * total + 5 - k)) == _ids(stream[k:])


def _other_dataset(write_dataset):
    return write_dataset(**{**VARIED, "name": "other_rlds"})


@pytest.mark.parametrize("field, change, saved, current", [
    ("seed", {"seed": 1}, "0", "1"),
    ("shuffle_window", {"shuffle_window": 5}, "2", "5"),
    ("obs_window", {"obs_window": 3}, "1", "3"),
    ("action_horizon", {"action_horizon": 8}, "16", "8"),
    ("shuffle", {"shuffle": False}, "1", "0"),
    ("process_count", {"process_index": 1, "process_count": 2}, "1", "2"),
    ("dataset", {"source": "other"}, "'synthetic_rlds'", "'other_rlds'"),
])
def test_a_state_of_another_configuration_is_refused(varied, write_dataset, field, change,
                                                     saved, current):
    options = dict(source=varied, seed=0, shuffle_window=2)
    state = _window(**options).state_dict()
    if change.get("source") == "other":
        change = {"source": _other_dataset(write_dataset)}
    dataset = _window(**{**options, **change})
    with pytest.raises(ValueError, match=f"{field} in checkpoint: {saved} / in this dataset: "
                                         f"{current}"):
        dataset.load_state_dict(state)


def test_every_differing_field_is_named(varied):
    state = _window(varied, seed=0, shuffle_window=2).state_dict()
    dataset = _window(varied, seed=4, shuffle_window=3)
    with pytest.raises(ValueError) as error:
        dataset.load_state_dict(state)
    assert "seed in checkpoint: 0 / in this dataset: 4" in str(error.value)
    assert "shuffle_window in checkpoint: 2 / in this dataset: 3" in str(error.value)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(version=2), "'version': 2 is not a version"),
    (lambda s: s.update(epoch=True), "'epoch' must be an int"),
    (lambda s: s.update(position=-1), r"'position' must be in \[0, 2\*\*62 \(a counter\)\]"),
    (lambda s: s.pop("window"), r"missing fields \['window'\]"),
    (lambda s: s.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda s: s["fingerprint"].update(seed="0"), "'fingerprint.seed' must be an int"),
    (lambda s: s.update(window=99), "'window': 99 .* past the end"),
])
def test_malformed_states_are_refused(varied, edit, message):
    dataset = _window(varied, shuffle_window=2)
    state = json.loads(json.dumps(dataset.state_dict()))
    edit(state)
    with pytest.raises(ValueError, match=message):
        dataset.load_state_dict(state)


def test_a_position_past_the_window_is_refused_on_load(varied, monkeypatch):
    dataset = _window(varied, shuffle_window=2)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = dataset.state_dict()
    steps = sum(VARIED["episode_lengths"][e] for e in _order.window_episodes(
        _order.reader_episodes(len(VARIED["episode_lengths"]), seed=0, epoch=0, shuffle=True,
                               reader=0, num_readers=1), 0, 2))
    for position in (steps + 1, 10_000):
        with pytest.raises(ValueError, match=f"'position': {position} is past the end of "
                                             f"window 0 of epoch 0 \\({steps} steps\\)"):
            dataset.load_state_dict({**state, "position": position})
    # The last position of the window loads, and the pass goes on with the next window.
    reference = _window(varied, shuffle_window=2)
    reference.load_state_dict({**state, "window": 1, "position": 0})
    expected = next(iter(reference))
    # Checking the position reads the window once: the pass that resumes there reuses it.
    reads = []
    from torch_rlds._window_stream import WindowStream

    read = WindowStream.read_window
    monkeypatch.setattr(WindowStream, "read_window",
                        lambda self, ds, episodes, epoch=0: reads.append(list(episodes))
                        or read(self, ds, episodes, epoch))
    dataset.load_state_dict({**state, "position": steps})
    assert len(reads) == 1
    assert_batches_equal(expected, next(iter(dataset)), "the first step of window 1")
    assert len(reads) == 2  # window 1 only


def test_state_is_small_and_does_not_grow(varied, write_dataset):
    dataset = _window(varied, shuffle_window=2)
    small = json.dumps(dataset.state_dict())
    wide = json.dumps(_window(varied, shuffle_window=4000).state_dict())
    iterator = iter(dataset)
    for _ in range(5 * sum(VARIED["episode_lengths"])):  # five epochs in
        next(iterator)
    later = json.dumps(dataset.state_dict())
    assert json.loads(later)["epoch"] == 5
    # Only digits change: the same fields, and no more bytes than the extra digits.
    assert json.loads(small).keys() == json.loads(later).keys() == json.loads(wide).keys()
    assert len(wide) - len(small) == len("4000") - len("2")
    assert len(later) - len(small) <= 3
    # The bound: every int at its largest value (19 digits) still fits in 1 KiB.
    worst = json.loads(small)
    for key in ("epoch", "window", "position"):
        worst[key] = 2**63 - 1
    for key, value in worst["fingerprint"].items():
        if isinstance(value, int):
            worst["fingerprint"][key] = 2**63 - 1
    assert len(json.dumps(worst)) < 1024
    assert len(small) < 400


class _CountingSource:
    """Wraps a source and counts episode reads."""

    def __init__(self, source):
        self._source = source
        self.reads = 0

    def episode(self, index, **kwargs):
        self.reads += 1
        return self._source.episode(index, **kwargs)

    def read_many(self, indices):
        self.reads += len(indices)
        return self._source.read_many(indices)

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __len__(self):
        return len(self._source)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 2.3])
def test_resume_reads_at_most_one_window(varied, fraction, monkeypatch):
    window = 3
    total = sum(VARIED["episode_lengths"])
    dataset = _window(varied, shuffle_window=window, seed=5)
    iterator = iter(dataset)
    for _ in range(int(fraction * total)):
        next(iterator)
    state = dataset.state_dict()
    expected = next(iterator)

    restored = _window(varied, shuffle_window=window, seed=5)
    counting = _CountingSource(restored.source)
    monkeypatch.setattr(restored, "source", counting)
    restored.load_state_dict(state)
    first = next(iter(restored))
    assert _ids([first]) == _ids([expected])
    assert 1 <= counting.reads <= window


def _same_episode_share(samples, batch_size):
    episodes = [int(s["meta"]["episode_index"]) for s in samples]
    same = total = 0
    for b in range(0, len(episodes), batch_size):
        for x, y in itertools.combinations(episodes[b:b + batch_size], 2):
            same += x == y
            total += 1
    return same / total


def test_seeds_set_the_order(equal):
    def order(**options):
        return _ids(torch_rlds.RLDSDataset(equal, repeat=False, shuffle_window=4, **options))

    assert order(seed=0) == order(seed=0)
    assert order(seed=0) != order(seed=1)
    assert sorted(order(seed=0)) == sorted(order(seed=1))
    assert order(shuffle=False) == _all_steps(EQUAL["episode_lengths"])


@pytest.mark.parametrize("window", [4, 8])
def test_batches_mix_about_shuffle_window_episodes(equal, window):
    # 24 episodes of n = 10 steps, batches of 8 from one reader. A window of K episodes holds
    # 10K steps, a multiple of 8, so every batch lies inside one window, and two samples of a
    # batch are a uniformly random pair of distinct steps of that window: they come from the
    # same episode with probability (n - 1) / (K n - 1), which is 1/K up to the n - 1 / n
    # factor. Over the 840 pairs of an epoch the observed share has a standard deviation of
    # about 0.014 (K = 4) and 0.011 (K = 8), measured over 300 seeds, so 0.07 is a 5-sigma
    # bound: this fails only if the steps are not mixed across the window. (The order is a
    # pure function of the seed, so the test is deterministic, not flaky.)
    n, batch = 10, 8
    expected = (n - 1) / (window * n - 1)
    for seed in (0, 1):
        samples = list(_window(equal, repeat=False, shuffle_window=window,
                                              seed=seed))
        assert abs(_same_episode_share(samples, batch) - expected) < 0.07
    # Without shuffling, or with a window of one episode, batches are mostly one episode.
    unshuffled = list(_window(equal, repeat=False, shuffle=False))
    single = list(_window(equal, repeat=False, shuffle_window=1))
    assert _same_episode_share(unshuffled, batch) > 0.7
    assert _same_episode_share(single, batch) > 0.7


def test_steps_of_a_window_are_emitted_in_a_shuffled_order(equal):
    samples = list(itertools.islice(_window(equal, shuffle_window=4), 40))
    steps = [int(s["meta"]["step_index"]) for s in samples]
    assert steps != sorted(steps)
    assert len({int(s["meta"]["episode_index"]) for s in samples}) == 4


def test_fingerprint_and_repr(varied):
    dataset = _window(varied, seed=7, shuffle_window=2)
    fingerprint = dataset.fingerprint()
    assert fingerprint["dataset"] == "synthetic_rlds"
    assert fingerprint["num_episodes"] == VARIED["num_episodes"]
    assert fingerprint["seed"] == 7 and fingerprint["num_workers"] == 0
    assert "seed=7" in repr(dataset)


@pytest.mark.parametrize("option, value, message", [
    ("obs_window", 0, r"obs_window must be an int >= 1 \(got 0\)"),
    ("shuffle_window", 1.5, r"shuffle_window must be an int >= 1 \(got 1.5\)"),
    ("seed", -1, r"seed must be an int in \[0, 2\*\*63 - 1\] \(got -1\)"),
    ("seed", 2**64, r"seed must be an int in \[0, 2\*\*63 - 1\]"),
    ("process_index", 2, r"process_index must be in \[0, 1\) \(got 2\)"),
])
def test_bad_options_are_named(varied, option, value, message):
    with pytest.raises(ValueError, match=message):
        torch_rlds.RLDSDataset(varied, **{option: value})


def test_set_epoch_checks_its_argument(varied):
    with pytest.raises(ValueError, match=r"epoch must be an int >= 0 \(got -1\)"):
        torch_rlds.RLDSDataset(varied).set_epoch(-1)


def test_samples_hold_numpy_values(varied):
    sample = next(iter(torch_rlds.RLDSDataset(varied, observation_keys=["image"])))
    assert isinstance(sample["observation"]["image"], np.ndarray)
    assert sample["meta"]["episode_index"].dtype == np.int64


# -- corrupt episodes ----------------------------------------------------------------------
def _corrupt_copy(path, tmp_path):
    """A copy of dataset ``path`` whose train episode 0 (record 0 of shard 0) has one payload
    byte flipped, so its CRC fails."""
    copy = tmp_path / "corrupt"
    shutil.copytree(path, copy)
    shard = next(copy.glob("*-train.tfrecord-00000-of-*"))
    data = bytearray(shard.read_bytes())
    data[12 + 40] ^= 0xFF  # 12 header bytes, then the payload
    shard.write_bytes(bytes(data))
    return copy, shard


def test_a_corrupt_episode_raises_naming_file_and_offset(varied, tmp_path):
    corrupt, shard = _corrupt_copy(varied, tmp_path)
    dataset = torch_rlds.RLDSDataset(corrupt, repeat=False, shuffle=False)
    with pytest.raises(torch_rlds.CorruptRecordError,
                       match=f"{shard}: bad payload CRC of record 0 at offset 0"):
        next(iter(dataset))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_leaves_out_a_corrupt_episode_and_counts_it(varied, tmp_path, workers, caplog):
    corrupt, shard = _corrupt_copy(varied, tmp_path)
    dataset = _window(corrupt, repeat=False, shuffle_window=3, seed=2,
                                     on_corrupt="skip")
    loader = torch_rlds.DataLoader(dataset, batch_size=4, num_workers=workers)
    with caplog.at_level("WARNING", logger="torch_rlds.dataset"):
        seen = [pair for batch in loader for pair in zip(
            batch["meta"]["episode_index"].tolist(), batch["meta"]["step_index"].tolist())]
    expected = [(e, t) for e, t in _all_steps(VARIED["episode_lengths"]) if e != 0]
    assert collections.Counter(seen) == collections.Counter(expected)
    assert sum(s["skipped"] for s in dataset_states(loader.state_dict())) == 1
    if workers == 0:  # (a worker logs in its own process)
        # (an index build that an earlier test started may log from its thread meanwhile)
        [record] = [r for r in caplog.records if r.name == "torch_rlds._window_stream"]
        assert f"episode 0 of synthetic_rlds ({shard} record 0 @ byte 0)" in record.message
        assert "bad payload CRC" in record.message


@pytest.mark.parametrize("workers, batch_size", [(0, 3), (2, 4)])
@pytest.mark.parametrize("order", ["window", "global"])
def test_skip_resumes_exactly(varied, tmp_path, workers, batch_size, order):
    corrupt, _ = _corrupt_copy(varied, tmp_path)

    def make():
        return torch_rlds.DataLoader(
            torch_rlds.RLDSDataset(corrupt, shuffle_window=3, seed=1, on_corrupt="skip",
                                   order=order),
            batch_size=batch_size, num_workers=workers)

    epoch = sum(VARIED["episode_lengths"]) - 1  # steps left in an epoch
    num_batches = 3 * epoch // batch_size  # three epochs
    # the start, around the first epoch's end (one reader's, with workers), the last batch
    points = sorted({0, 3, epoch // batch_size - 1, epoch // batch_size, num_batches - 1})
    reference = assert_resumes_exactly(make, num_batches, restore_points=points)
    assert 0 not in {e for b in reference for e in b["meta"]["episode_index"].tolist()}
    loader = make()
    iterator = iter(loader)
    for _ in range(num_batches):
        next(iterator)
    assert sum(s["skipped"] for s in dataset_states(loader.state_dict())) >= 2  # per epoch


def test_skip_checks_every_frame_header(varied, monkeypatch):
    bad = set(torch_rlds.RLDSSource(varied).episode(4)["steps"]["observation"]["image"].encoded)
    check = _images.check_header

    def failing(data, shape, name="image", **declared):
        if bytes(data) in bad:
            raise torch_rlds.ImageDecodeError(f"{name}: JPEG header does not parse")
        check(data, shape, name, **declared)

    monkeypatch.setattr(_images, "check_header", failing)
    lengths = VARIED["episode_lengths"]
    skipping = _window(varied, repeat=False, on_corrupt="skip")
    assert sorted(_ids(skipping)) == [(e, t) for e, t in _all_steps(lengths) if e != 4]
    assert skipping.state_dict()["skipped"] == 1
    # "raise" reads headers only to decode, and these decode.
    assert sorted(_ids(_window(varied, repeat=False))) == _all_steps(lengths)


def test_on_corrupt_is_checked(varied):
    with pytest.raises(ValueError, match=r"on_corrupt must be one of \['raise', 'skip'\] "
                                         r"\(got 'ignore'\)"):
        torch_rlds.RLDSDataset(varied, on_corrupt="ignore")


def test_an_iterator_left_open_at_exit_closes_quietly(small_dataset):
    # Its generator closes while the interpreter tears the modules down.
    script = (
        "import sys, torch_rlds\n"
        "data = torch_rlds.RLDSDataset(sys.argv[1], 'train', obs_window=2, action_horizon=4,\n"
        "                              shuffle_window=2, decode_threads=2, repeat=True)\n"
        "samples = iter(data)\n"
        "for _ in range(5):\n"
        "    next(samples)\n"
        "batches = iter(data.batching_view(3))\n"
        "next(batches)\n"
        "print('served')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(small_dataset)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "served"
    assert "Exception ignored" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
