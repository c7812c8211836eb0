"""DataLoader and StatefulDataLoader over RLDSDataset: exact resume (the matrix), passes,
state files, state checks and numpy views."""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_rlds
from torch_rlds import _order, synthetic
from torch_rlds.loader import dataset_states, default_start_method, to_numpy
from torch_rlds.testing import assert_batches_equal, assert_resumes_exactly

# Three workers on a two-core machine make torch warn; that is what these tests want.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

STEPS = 42  # steps in small_dataset's train split (episodes of 11, 9, 8, 5, 6, 3)
# The resume matrix runs on 15 steps so that even batches of one pass the end of an epoch
# in a few batches per worker.
TINY = dict(num_episodes=6, episode_lengths=(4, 2, 3, 1, 3, 2),
            cameras=(synthetic.Camera("image", 32, 32),), num_shards=2)
VARIED = dict(num_episodes=7, episode_lengths=(1, 9, 2, 12, 3, 2, 6),
              cameras=(synthetic.Camera("image", 32, 32),), num_shards=2)


@pytest.fixture(scope="module")
def tiny(write_dataset):
    return write_dataset(**TINY)


@pytest.fixture(scope="module")
def varied(write_dataset):
    return write_dataset(**VARIED)


def _dataset(path, **options):
    """A dataset in the window order unless ``order`` says otherwise: most tests here check
    its per-reader states; those marked with ``order`` run in both."""
    return torch_rlds.RLDSDataset(path, **{"obs_window": 2, "action_horizon": 4,
                                           "shuffle_window": 2, "order": "window", **options})


def _maker(path, *, loader=torch_rlds.DataLoader, dataset=None, **options):
    def make():
        return loader(_dataset(path, **(dataset or {})), **options)
    return make


def _epochs(batch) -> list[int]:
    return batch["meta"]["epoch"].tolist()


def _first_epoch1_batches(lengths, workers, batch_size, shuffle, order="window"):
    """For each worker, the loader batch in which its first step of epoch 1 arrives.

    Window order: worker w's share of epoch 0 has ``n_w`` steps (the order is a pure
    function), its batches reach the loader in turn (batch i comes from worker i mod W), so its
    j-th batch is loader batch ``j * W + w`` and the first to hold an epoch-1 step is
    ``j = n_w // batch_size``. Global order: loader batch j holds samples ``j B .. (j+1) B - 1``
    of one stream, whatever the workers, so the first to hold one of epoch 1 is ``N // B``.
    """
    if order == "global":
        return [sum(lengths) // batch_size]
    readers = max(workers, 1)
    firsts = []
    for w in range(readers):
        share = _order.reader_episodes(len(lengths), seed=0, epoch=0, shuffle=shuffle,
                                       reader=w, num_readers=readers)
        steps = sum(lengths[e] for e in share)
        firsts.append(steps // batch_size * readers + w)
    return firsts


@pytest.mark.parametrize("workers, batch_size, shuffle, order",
                         list(itertools.product([0, 1, 2, 3], [1, 7, 32], [True, False],
                                                ["window", "global"])))
def test_resume_matrix(tiny, workers, batch_size, shuffle, order):
    lengths = TINY["episode_lengths"]
    firsts = _first_epoch1_batches(lengths, workers, batch_size, shuffle, order)
    num_batches = max(firsts) + max(workers, 1) + 1  # every worker passes the end of epoch 0
    make = _maker(tiny, dataset={"shuffle": shuffle, "order": order}, batch_size=batch_size,
                  num_workers=workers)
    if workers == 0:
        points = None  # without workers a restore is cheap: restore after every batch
    else:
        # The first and the last batch, and around the end of epoch 0: just before the first
        # worker passes it, as it does, and as the last worker does.
        points = sorted({0, min(firsts) - 1, min(firsts), max(firsts), num_batches - 1}
                        - {-1})
    reference = assert_resumes_exactly(make, num_batches, restore_points=points)
    before = max(workers, 1) if order == "window" else 1  # the batch before, of that reader
    for first in firsts:  # the run does cross the epoch where predicted
        assert max(_epochs(reference[first])) >= 1
        if first >= before:
            assert max(_epochs(reference[first - before])) == 0


@pytest.mark.parametrize("workers, options", [
    (0, {}),
    (2, {}),
    (2, {"persistent_workers": True}),
    (3, {"prefetch_factor": 1}),
    (2, {"prefetch_factor": 4, "persistent_workers": True}),
])
def test_several_save_load_cycles_in_one_run(small_dataset, workers, options):
    make = _maker(small_dataset, batch_size=3, num_workers=workers, **options)
    # save, continue, save again, restore... across the end of epoch 0 (42 steps, 14 batches)
    assert_resumes_exactly(make, 40, restore_points=[0, 9, 14, 15, 31, 39], chained=True)


@pytest.mark.parametrize("workers, options", [
    (0, {}),
    (1, {}),
    (2, {"persistent_workers": True, "prefetch_factor": 3}),
    (3, {}),
])
def test_snapshot_every_n_steps(small_dataset, workers, options):
    make = _maker(small_dataset, batch_size=4, num_workers=workers, snapshot_every_n_steps=3,
                  **options)
    # Snapshots are taken every third batch: restore on, just after and just before one.
    points = list(range(24)) if workers == 0 else [0, 4, 8, 12, 23]
    assert_resumes_exactly(make, 24, restore_points=points)
    assert_resumes_exactly(make, 24, restore_points=[1, 5, 10, 17], chained=True)


def test_plain_stateful_dataloader_with_collate(small_dataset):
    # (forkserver when an earlier test imported jax: forking a jax process can deadlock)
    make = _maker(small_dataset, loader=StatefulDataLoader, batch_size=7, num_workers=2,
                  collate_fn=torch_rlds.collate, multiprocessing_context=default_start_method())
    reference = assert_resumes_exactly(make, 16, restore_points=[0, 6, 7, 15])
    assert isinstance(reference[0]["action"], np.ndarray)  # compared as arrays...
    batch = next(iter(make()))
    assert isinstance(batch["action"], torch.Tensor)  # ...handed out as tensors


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_resumes_and_ends_where_it_should(varied, workers):
    lengths = VARIED["episode_lengths"]
    make = _maker(varied, dataset={"repeat": False}, batch_size=2, num_workers=workers)
    num_batches = len(list(make()))
    if workers == 0:
        points = None
    else:
        # The two workers' shares differ (episodes of 1 to 12 steps): once the smaller share
        # is out, that worker's state is at the end of the epoch while the other's is not, and
        # a restore must not make it start over (nor end the pass early).
        batches = [-(-sum(lengths[e] for e in _order.reader_episodes(
            len(lengths), seed=0, epoch=0, shuffle=True, reader=w, num_readers=2)) // 2)
            for w in range(2)]
        assert abs(batches[0] - batches[1]) >= 3
        done = 2 * min(batches)
        points = [0, done - 1, done, done + 1, num_batches - 1]
    reference = assert_resumes_exactly(make, num_batches, restore_points=points, ends=True)
    ids = [(e, t) for b in reference
           for e, t in zip(b["meta"]["episode_index"].tolist(), b["meta"]["step_index"].tolist())]
    assert sorted(ids) == [(e, t) for e, n in enumerate(lengths) for t in range(n)]


def _pass_ids(loader):
    ids, epochs = [], set()
    for batch in loader:
        ids += list(zip(batch["meta"]["episode_index"].tolist(),
                        batch["meta"]["step_index"].tolist()))
        epochs |= set(_epochs(batch))
    return ids, epochs


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
@pytest.mark.parametrize("order", ["window", "global"])
def test_passes_are_successive_epochs(varied, workers, persistent, order):
    lengths = VARIED["episode_lengths"]
    loader = torch_rlds.DataLoader(_dataset(varied, repeat=False, order=order), batch_size=3,
                                   num_workers=workers, persistent_workers=persistent)
    orders = []
    for epoch in range(3):
        ids, epochs = _pass_ids(loader)
        assert epochs == {epoch}
        assert sorted(ids) == [(e, t) for e, n in enumerate(lengths) for t in range(n)]
        orders.append(ids)
    assert orders[0] != orders[1] != orders[2]
    # The same passes whatever the worker setup: the order is a function of (seed, epoch, reader).
    single = torch_rlds.DataLoader(_dataset(varied, repeat=False, order=order), batch_size=3,
                                   num_workers=workers)
    assert [_pass_ids(single)[0] for _ in range(3)] == orders


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
@pytest.mark.parametrize("order", ["window", "global"])
def test_a_finished_pass_restores_into_the_next_epoch(varied, workers, persistent, order):
    def make():
        return torch_rlds.DataLoader(_dataset(varied, repeat=False, order=order), batch_size=3,
                                     num_workers=workers, persistent_workers=persistent)

    loader = make()
    first = list(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    second = list(loader)
    assert {e for b in second for e in _epochs(b)} == {1}
    restored = make()
    restored.load_state_dict(state)
    assert restored.batches_seen == len(first)
    resumed = list(restored)
    assert len(resumed) == len(second)
    for i, (a, b) in enumerate(zip(second, resumed)):
        assert_batches_equal(a, b, f"batch {i} of epoch 1")
    # get_state right after loading a finished state, then iterate: still the next epoch
    # (the window order keeps torchdata's finished iterator; the global order moves to the
    # next epoch's start at once).
    again = make()
    again.load_state_dict(state)
    if order == "window":
        assert again.state_dict()["_iterator_finished"] is True
    assert {e for b in again for e in _epochs(b)} == {1}


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
def test_iter_after_a_break_continues_after_the_last_batch(small_dataset, workers, persistent):
    options = dict(batch_size=3, num_workers=workers, persistent_workers=persistent)
    if workers:
        options["prefetch_factor"] = 4  # the workers run well ahead of the caller
    reference = list(itertools.islice(torch_rlds.DataLoader(_dataset(small_dataset),
                                                            **options), 20))
    loader = torch_rlds.DataLoader(_dataset(small_dataset), **options)
    got = []
    for stop in (3, 4, 11, 20):
        for batch in loader:
            got.append(batch)
            if len(got) == stop:
                break
    assert loader.batches_seen == 20
    for i, (a, b) in enumerate(zip(reference, got)):
        assert_batches_equal(a, b, f"batch {i}")


@pytest.mark.parametrize("workers", [0, 2])
def test_get_set_get_gives_the_same_state(small_dataset, workers):
    make = _maker(small_dataset, batch_size=5, num_workers=workers)
    loader = make()
    untouched = json.loads(json.dumps(loader.state_dict()))
    fresh = make()
    fresh.load_state_dict(untouched)
    assert json.loads(json.dumps(fresh.state_dict())) == untouched

    iterator = iter(loader)
    for _ in range(6):
        next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))
    assert json.loads(json.dumps(loader.state_dict())) == state  # no batch, no change
    restored = make()
    restored.load_state_dict(state)
    assert json.loads(json.dumps(restored.state_dict())) == state
    restored.load_state_dict(restored.state_dict())
    assert json.loads(json.dumps(restored.state_dict())) == state
    next_batch = next(iterator)
    assert_batches_equal(next_batch, next(iter(restored)), "the batch after the state")


def test_state_loads_with_torch_load_weights_only(small_dataset, tmp_path):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=2)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    expected = next(iterator)
    path = tmp_path / "checkpoint.pt"
    state = loader.state_dict()
    torch.save({"data_loader": state}, path)
    del iterator
    loaded = torch.load(path, weights_only=True)["data_loader"]
    assert loaded == state
    restored = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=2)
    restored.load_state_dict(loaded)
    # The state was saved after the 4th batch: the restored loader starts at the 5th.
    reference = list(itertools.islice(
        torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=2), 5))
    assert_batches_equal(reference[3], expected)
    assert_batches_equal(reference[4], next(iter(restored)))


def test_save_state_and_load_state(small_dataset, tmp_path):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4)
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    path = tmp_path / "run" / "loader.json"
    (tmp_path / "run").mkdir()
    stale = tmp_path / "run" / ".loader.json.tmp-0123"  # left by a killed save
    stale.write_text("{")
    returned = loader.save_state(path)
    assert os.fspath(returned) == os.fspath(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["loader.json"]
    assert json.loads(path.read_text()) == json.loads(json.dumps(loader.state_dict()))
    next(iterator)
    loader.save_state(path)  # overwrites
    assert sorted(p.name for p in path.parent.iterdir()) == ["loader.json"]
    expected = next(iterator)

    restored = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4)
    restored.load_state(path)
    assert restored.batches_seen == 6
    assert_batches_equal(expected, next(iter(restored)), "the batch after the saved state")


def test_state_files_name_the_problem(small_dataset, tmp_path):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4)
    with pytest.raises(FileNotFoundError, match="missing.json: no state file"):
        loader.load_state(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON state"):
        loader.load_state(bad)


def test_batches_seen_counts_handed_out_batches_and_is_restored(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=1,
                                   prefetch_factor=4)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    assert loader.batches_seen == 3  # not what the worker prefetched
    state = loader.state_dict()
    assert state["torch_rlds"] == {"version": 1, "batches_seen": 3}
    restored = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=1)
    restored.load_state_dict(state)
    assert restored.batches_seen == 3
    next(iter(restored))
    assert restored.batches_seen == 4
    with pytest.raises(ValueError, match=r"'batches_seen' must be in \[0, 2\*\*62"):
        restored.load_state_dict({**state, "torch_rlds": {"version": 1, "batches_seen": -1}})
    with pytest.raises(ValueError, match="'torch_rlds': expected version 1"):
        restored.load_state_dict({**state, "torch_rlds": {"version": 9, "batches_seen": 1}})


@pytest.mark.parametrize("workers", [0, 1])
def test_as_numpy_hands_out_views_without_a_copy(small_dataset, workers):
    tensors = next(iter(torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4,
                                              num_workers=workers)))
    arrays = next(iter(torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4,
                                             num_workers=workers, as_numpy=True)))
    assert_batches_equal(tensors, arrays)
    image = arrays["observation"]["image"]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert not image.flags.owndata and isinstance(image.base, torch.Tensor)  # a view, no copy
    assert isinstance(arrays["meta"]["episode_index"].base, torch.Tensor)
    assert isinstance(arrays["language_instruction"], list)
    views = to_numpy(tensors)
    for key in ("action", "action_is_pad"):
        assert np.shares_memory(views[key], tensors[key].numpy())
    assert np.shares_memory(views["observation"]["image"], tensors["observation"]["image"])


def test_without_batching_samples_come_one_by_one(small_dataset):
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=None)
    sample = next(iter(loader))
    assert isinstance(sample["action"], torch.Tensor) and sample["action"].shape == (4, 7)
    assert isinstance(sample["language_instruction"], str)


@pytest.mark.parametrize("saved, loading", [(1, 2), (0, 2), (2, 0), (3, 2)])
def test_a_state_of_another_worker_count_is_refused(small_dataset, saved, loading):
    state = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4,
                                  num_workers=saved).state_dict()
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=loading)
    with pytest.raises(ValueError, match=f"num_workers in checkpoint: {saved} / in this "
                                         f"loader: {loading}"):
        loader.load_state_dict(state)


@pytest.mark.parametrize("field, change, values", [
    ("seed", {"seed": 1}, "0 / in this dataset: 1"),
    ("shuffle_window", {"shuffle_window": 3}, "2 / in this dataset: 3"),
])
def test_a_state_of_another_dataset_configuration_is_refused_on_load(small_dataset, field,
                                                                      change, values):
    state = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4,
                                  num_workers=2).state_dict()
    loader = torch_rlds.DataLoader(_dataset(small_dataset, **change), batch_size=4,
                                   num_workers=2)
    with pytest.raises(ValueError, match=f"worker 0: .*{field} in checkpoint: {values}"):
        loader.load_state_dict(state)


def test_plain_stateful_dataloader_refuses_another_seed_in_the_worker(small_dataset):
    options = dict(batch_size=4, num_workers=1, collate_fn=torch_rlds.collate,
                   multiprocessing_context=default_start_method())
    state = StatefulDataLoader(_dataset(small_dataset), **options).state_dict()
    loader = StatefulDataLoader(_dataset(small_dataset, seed=1), **options)
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="seed in checkpoint: 0 / in this dataset: 1"):
        next(iter(loader))


def test_dataset_states_of_a_loader_state(small_dataset):
    for workers in (0, 2):
        loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4,
                                       num_workers=workers)
        iterator = iter(loader)
        next(iterator)
        states = dataset_states(loader.state_dict())
        assert len(states) == max(workers, 1)
        assert [s["fingerprint"]["worker_index"] for s in states] == list(range(len(states)))
        del iterator
    with pytest.raises(ValueError, match="not a StatefulDataLoader state"):
        dataset_states({"something": 1})


def _fake_jax(monkeypatch, running: bool) -> None:
    """jax imported, with its backend started (``running``) or not."""
    import types

    bridge = types.ModuleType("jax._src.xla_bridge")
    bridge.backends_are_initialized = lambda: running
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", bridge)


def test_workers_start_with_forkserver_once_jax_runs_a_backend(small_dataset, monkeypatch):
    import multiprocessing
    from multiprocessing import forkserver

    from torch_rlds import _start

    monkeypatch.setattr(_start, "_warned", False)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: None)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods",
                        lambda: ["fork", "spawn", "forkserver"])
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.delitem(sys.modules, "jax._src.xla_bridge", raising=False)
    assert default_start_method() is None
    _fake_jax(monkeypatch, running=False)  # imported only: forking is safe
    assert default_start_method() is None
    _fake_jax(monkeypatch, running=True)
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__", "users_own"])
    assert default_start_method() == "forkserver"
    # The fork server imports torch_rlds once, and keeps what was asked for before.
    assert forkserver._forkserver._preload_modules == [
        "__main__", "users_own", "torch_rlds", "tensorflow_datasets"]
    loader = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=1)
    with pytest.warns(RuntimeWarning, match="they start with 'forkserver' instead") as caught:
        iterator = iter(loader)
    assert len(caught) == 1
    assert [w._start_method for w in iterator._workers] == ["forkserver"]
    assert loader.multiprocessing_context is None  # still the caller's choice
    assert next(iterator)["action"].shape == (4, 4, 7)
    del iterator
    fork = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=1,
                                 multiprocessing_context="fork")
    assert fork.multiprocessing_context.get_start_method() == "fork"
    spawn = torch_rlds.DataLoader(_dataset(small_dataset), batch_size=4, num_workers=1)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert default_start_method() is None  # the caller chose a safe method for the process
    del spawn


def test_every_step_once_per_epoch_through_the_loader(small_dataset, small_spec):
    lengths = small_spec.lengths()[:small_spec.num_episodes]
    loader = torch_rlds.DataLoader(_dataset(small_dataset, repeat=False), batch_size=7,
                                   num_workers=3)
    ids, _ = _pass_ids(loader)
    assert collections.Counter(ids) == collections.Counter(
        (e, t) for e, n in enumerate(lengths) for t in range(n))


class _Counting:
    """A stand-in loader whose batches are 0, 1, 2...; a restore lands ``skew`` batches off,
    and a stream of ``length`` ends there."""

    def __init__(self, skew=0, length=None):
        self.next, self.skew, self.length = 0, skew, length

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"] + self.skew

    def __iter__(self):
        while self.length is None or self.next < self.length:
            self.next += 1
            yield {"x": np.array([self.next - 1])}


def test_the_resume_helper_catches_a_wrong_resume():
    assert_resumes_exactly(_Counting, 6)
    assert_resumes_exactly(lambda: _Counting(length=6), 6, ends=True, chained=True,
                           restore_points=[0, 2, 5])
    with pytest.raises(AssertionError, match="restored after 0, batch 0/x: values differ"):
        assert_resumes_exactly(lambda: _Counting(skew=1), 6)
    made = []

    def shorter_after_the_first():
        made.append(None)
        return _Counting(length=6 if len(made) == 1 else 4)

    with pytest.raises(AssertionError, match="chained restore at 3: stream ended at batch 4"):
        assert_resumes_exactly(shorter_after_the_first, 6, chained=True, restore_points=[3])
    with pytest.raises(AssertionError, match="the stream goes on after batch 4"):
        assert_resumes_exactly(lambda: _Counting(length=6), 5, ends=True)
    with pytest.raises(ValueError, match="restore point 6 outside"):
        assert_resumes_exactly(_Counting, 6, restore_points=[6])


def _freeze_count(_worker: int) -> None:
    import gc

    info = torch.utils.data.get_worker_info()
    info.dataset.frozen_in_worker = gc.get_freeze_count()


class _ReportsFreeze(torch.utils.data.IterableDataset):
    """Yields how many of the parent's objects its worker found frozen."""

    frozen_in_worker = -1

    def __iter__(self):
        yield self.frozen_in_worker


@pytest.mark.parametrize("method, frozen", [("fork", True), ("spawn", False)])
def test_forked_workers_inherit_the_parent_s_objects_frozen(method, frozen):
    import gc

    held = [(i, str(i)) for i in range(20_000)]  # the parent's objects a collection would visit
    loader = torch_rlds.DataLoader(_ReportsFreeze(), batch_size=None, num_workers=1,
                                   worker_init_fn=_freeze_count, multiprocessing_context=method)
    (count,) = [int(x) for x in loader]
    assert (count >= len(held)) is frozen
    assert gc.get_freeze_count() == 0  # the parent collects its own objects as before
