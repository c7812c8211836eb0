"""torch_rlds.DataLoader is torchdata's StatefulDataLoader for datasets that are not torch_rlds's.

Every check runs on both classes, side by side, and states what a training script written for
``StatefulDataLoader`` relies on: ``iter()`` after a peek or a ``break``, batches of torch's
``default_collate`` (types and values), a dataset's error that the loop catches and goes on,
the states ``StatefulDataLoader`` saves (under another ``snapshot_every_n_steps``, out of
order, with keys it does not read), ``state_dict()`` called only when a state is asked for,
the signature, generics, and torch's error types and words. Then what torch_rlds adds for its
own datasets, opt-in or exact: ``continue_passes``.

Datasets are tiny and module-level (workers started by forkserver or spawn pickle them).
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import signal
import sys
import typing
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.utils.data
from torch.utils.data import default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_rlds

LOADERS = [StatefulDataLoader, torch_rlds.DataLoader]
IDS = ["torchdata", "torch_rlds"]
both = pytest.mark.parametrize("Loader", LOADERS, ids=IDS)
N = 12

# Two workers on a two-core machine with other tests running make torch warn; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


# -- datasets -------------------------------------------------------------------------------
class Squares(torch.utils.data.Dataset):
    """Map-style: item i is ``{"i": i, "x": [i, i*i] as float32}``; ``bad`` indices raise."""

    def __init__(self, n: int = N, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i in self.bad:
            raise KeyError(f"item {i} is bad")
        return {"i": i, "x": np.array([i, i * i], np.float32)}


class Counting(torch.utils.data.IterableDataset):
    """Iterable without a state: each worker yields its share of range(n), as ints."""

    def __init__(self, n: int = N, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for i in range(worker, self.n, workers):
            if i == self.bad:
                raise ValueError(f"item {i} is bad")
            yield i


class Resumable(torch.utils.data.IterableDataset):
    """Iterable with a state (its position), counting its ``state_dict`` calls."""

    def __init__(self, n: int = N) -> None:
        self.n, self.position, self.state_calls = n, 0, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = list(range(worker, self.n, workers))
        while self.position < len(mine):
            self.position += 1
            yield mine[self.position - 1]

    def state_dict(self) -> dict:
        self.state_calls += 1
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _generator(n: int):
    yield from range(n)


class FromGenerator(torch.utils.data.IterableDataset):
    """An iterable dataset over a generator function (each worker takes every k-th)."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return itertools.islice(_generator(N), worker, None, workers)


Point = collections.namedtuple("Point", ["x", "label"])


class Frozen(Mapping):
    """A read-only Mapping subclass."""

    def __init__(self, data: dict) -> None:
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class Varied(torch.utils.data.Dataset):
    """Samples of every kind default_collate handles."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        if self.kind == "namedtuple":
            return Point(np.float32(i), i)
        if self.kind == "ordered":
            return collections.OrderedDict([("b", i), ("a", np.full(2, i, np.int16))])
        if self.kind == "mapping":
            return Frozen({"x": torch.tensor([i, i])})
        if self.kind == "numbers":  # ints and floats mixed
            return [i, float(i) / 2][i % 2], float(i), bool(i % 2)
        if self.kind == "bytes":
            return {"blob": bytes([i]) * 3, "text": f"t{i}"}
        if self.kind == "tuple":
            return (np.int64(i), (i, "s"))
        raise AssertionError(self.kind)


def _same(a, b, where: str = "batch") -> None:
    """``a`` and ``b`` of the same types all the way down, tensors equal in dtype, shape,
    values and ``requires_grad``."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} / {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} " \
                                                          f"/ {b.dtype}{tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad"
        assert torch.equal(a.detach(), b.detach()), f"{where}: values"
    elif isinstance(a, Mapping):
        assert list(a) == list(b), f"{where}: keys {list(a)} / {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} / {b!r}"


def _ids(batches) -> list[int]:
    out = []
    for b in batches:
        value = b["i"] if isinstance(b, dict) else b
        out += torch.as_tensor(value).reshape(-1).tolist()
    return out


def _options(workers: int, **extra) -> dict:
    options = dict(num_workers=workers, **extra)
    if workers:
        options.setdefault("prefetch_factor", 2)
    return options


WORKERS = pytest.mark.parametrize("workers", [0, 1, 2])


# -- 1. iter() ------------------------------------------------------------------------------
@both
@WORKERS
def test_a_peeked_batch_does_not_shorten_the_next_loop(Loader, workers):
    loader = Loader(Squares(), batch_size=3, **_options(workers))
    peek = next(iter(loader))
    assert _ids([peek]) == [0, 1, 2]
    assert _ids(loader) == list(range(N))  # a new pass, from the start


@both
@pytest.mark.parametrize("workers, persistent", [(0, False), (1, False), (2, False), (2, True)])
def test_a_loop_after_a_break_starts_a_new_pass(Loader, workers, persistent):
    loader = Loader(Squares(), batch_size=2, **_options(workers, persistent_workers=persistent))
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert _ids(loader) == list(range(N))


@both
@WORKERS
def test_a_non_stateful_random_sampler_gives_whole_permutations(Loader, workers):
    sampler = torch.utils.data.RandomSampler(range(N), generator=torch.Generator().manual_seed(3))
    loader = Loader(Squares(), batch_size=2, sampler=sampler, **_options(workers))
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert sorted(_ids(loader)) == list(range(N))  # every index once, none twice


@both
@WORKERS
def test_an_iterable_without_state_starts_over_and_does_not_replay(Loader, workers):
    loader = Loader(Counting(), batch_size=None, **_options(workers))
    iterator = iter(loader)
    first = [next(iterator) for _ in range(5)]
    again = list(loader)
    assert sorted(again) == list(range(N))
    assert first == again[:5]


@both
@pytest.mark.parametrize("in_order", [True, False])
def test_a_second_loop_after_a_break_works_in_or_out_of_order(Loader, in_order):
    loader = Loader(Squares(), batch_size=2, **_options(2, in_order=in_order))
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert sorted(_ids(loader)) == list(range(N))


@both
@WORKERS
def test_a_generator_dataset_is_read_once_per_pass(Loader, workers):
    loader = Loader(FromGenerator(), batch_size=4, **_options(workers))
    for _ in range(2):
        assert sorted(_ids(loader)) == list(range(N))


# -- 2. batches: default_collate ------------------------------------------------------------
@both
@pytest.mark.parametrize("kind", ["namedtuple", "ordered", "mapping", "numbers", "bytes",
                                  "tuple"])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_default_collates_in_type_and_value(Loader, kind, workers):
    dataset = Varied(kind)
    expected = [default_collate([dataset[i] for i in range(j, j + 3)]) for j in (0, 3)]
    got = list(Loader(dataset, batch_size=3, **_options(workers)))
    assert len(got) == 2
    for i, (a, b) in enumerate(zip(expected, got)):
        _same(a, b, f"batch {i}")


class _WithGrad(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return {"w": torch.full((2,), float(i), requires_grad=True), "label": i}


@both
def test_requires_grad_is_kept_without_workers(Loader):
    batch = next(iter(Loader(_WithGrad(), batch_size=2)))
    assert batch["w"].requires_grad and batch["w"].grad_fn is not None
    _same(default_collate([_WithGrad()[0], _WithGrad()[1]]), batch)


@both
@pytest.mark.parametrize("workers", [0, 1])
def test_a_kept_field_has_storage_of_its_own(Loader, workers):
    big = {"image": np.zeros((64, 64, 3), np.uint8), "label": 1}
    dataset = [big] * 8
    batch = next(iter(Loader(dataset, batch_size=8, **_options(workers))))
    label = batch["label"]
    del batch
    assert label.untyped_storage().nbytes() == 8 * 8  # eight int64, not the images too
    saved = io.BytesIO()
    torch.save(label, saved)
    assert len(saved.getvalue()) < 2048


class _Nested(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.nested.nested_tensor([torch.ones(i + 1), torch.ones(2)])


@both
@pytest.mark.parametrize("workers", [0, 1])
def test_nested_tensors_raise_torchs_error(Loader, workers):
    with pytest.raises(RuntimeError, match="not currently supported by the default collate_fn"):
        next(iter(Loader(_Nested(), batch_size=2, **_options(workers))))


def test_torch_rlds_collate_keeps_containers_and_numbers_as_default_collate_does():
    for kind in ("namedtuple", "ordered", "mapping", "bytes", "tuple"):
        samples = [Varied(kind)[i] for i in range(3)]
        _same(default_collate(samples), torch_rlds.collate(samples), kind)
    # Ints among floats become floats (torch's default_collate would pick by the first).
    assert torch_rlds.collate([1, 2.5]).dtype == torch.float64
    with pytest.raises(RuntimeError, match="not currently supported by the default collate_fn"):
        torch_rlds.collate([_Nested()[1], _Nested()[2]])


# -- 3. errors ------------------------------------------------------------------------------
def _catching(loader) -> list:
    """What a loop that catches a bad batch and goes on sees."""
    out, iterator = [], iter(loader)
    while True:
        try:
            out.append(_ids([next(iterator)])[0])
        except StopIteration:
            return out
        except (KeyError, ValueError) as e:
            out.append(type(e).__name__)


@both
@WORKERS
def test_a_loop_that_catches_a_bad_item_goes_on(Loader, workers):
    got = _catching(Loader(Squares(n=6, bad=(2,)), batch_size=None, **_options(workers)))
    assert got == [0, 1, "KeyError", 3, 4, 5]


@both
@pytest.mark.parametrize("workers", [0, 2])
def test_an_iterable_that_raises_ends_its_own_share_only(Loader, workers):
    got = _catching(Loader(Counting(n=8, bad=2), batch_size=None, **_options(workers)))
    expected = _catching(StatefulDataLoader(Counting(n=8, bad=2), batch_size=None,
                                            **_options(workers)))
    assert got == expected and "ValueError" in got


def _die(i: int) -> int:
    if i == 3 and torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


class _Dying(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return _die(i)


@both
def test_a_killed_worker_raises_torchs_runtime_error(Loader):
    loader = Loader(_Dying(), batch_size=None, **_options(1))
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(?s?\)? \d+\) (is killed "
                                           r"by signal: |exited unexpectedly)") as error:
        list(loader)
    if Loader is torch_rlds.DataLoader:
        assert isinstance(error.value, torch_rlds.WorkerError)
        assert "is killed by signal: Killed." in str(error.value)


# -- 4. states ------------------------------------------------------------------------------
def _run(loader, n: int) -> tuple[list[int], dict]:
    iterator = iter(loader)
    ids = _ids([next(iterator) for _ in range(n)])
    return ids, json.loads(json.dumps(loader.state_dict(), default=repr))


def _rest(loader) -> list[int]:
    return _ids(loader)


@pytest.mark.parametrize("saving, loading", [(StatefulDataLoader, torch_rlds.DataLoader),
                                             (torch_rlds.DataLoader, StatefulDataLoader),
                                             (torch_rlds.DataLoader, torch_rlds.DataLoader)],
                         ids=["torchdata-to-torch_rlds", "torch_rlds-to-torchdata",
                              "torch_rlds-to-torch_rlds"])
@pytest.mark.parametrize("dataset, workers", [(Squares, 0), (Squares, 2), (Resumable, 0),
                                              (Resumable, 2)])
def test_states_cross_between_the_two_classes(saving, loading, dataset, workers):
    reference = _rest(StatefulDataLoader(dataset(), batch_size=2, **_options(workers)))
    first, state = _run(saving(dataset(), batch_size=2, **_options(workers)), 3)
    assert first == reference[:6]
    resumed = loading(dataset(), batch_size=2, **_options(workers))
    resumed.load_state_dict(state)
    assert first + _rest(resumed) == reference


@both
@pytest.mark.parametrize("saving, loading", [(1, 1), (4, 1), (1, 4), (3, 5)])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_loads_under_another_snapshot_interval(Loader, saving, loading, workers):
    reference = _rest(StatefulDataLoader(Resumable(), batch_size=1, **_options(workers)))
    first, state = _run(Loader(Resumable(), batch_size=1,
                               **_options(workers, snapshot_every_n_steps=saving)), 5)
    resumed = Loader(Resumable(), batch_size=1, **_options(workers,
                                                           snapshot_every_n_steps=loading))
    resumed.load_state_dict(state)
    assert first + _rest(resumed) == reference


@both
def test_an_out_of_order_state_loads(Loader):
    """torchdata promises nothing of what an out-of-order state resumes (its snapshots lag
    the batches handed out); it loads it, and so must torch_rlds."""
    first, state = _run(Loader(Squares(), batch_size=1, **_options(2, in_order=False)), 4)
    resumed = Loader(Squares(), batch_size=1, **_options(2, in_order=False))
    resumed.load_state_dict(state)
    rest = _rest(resumed)
    assert rest and set(rest) <= set(range(N)) and len(first) == 4


@both
@pytest.mark.parametrize("workers", [0, 2])
def test_keys_a_state_does_not_need_are_ignored(Loader, workers):
    reference = _rest(StatefulDataLoader(Squares(), batch_size=2, **_options(workers)))
    first, state = _run(Loader(Squares(), batch_size=2, **_options(workers)), 2)
    state["annotation"] = {"saved_by": "a later version"}
    if workers:
        state["_snapshot"]["_main_snapshot"]["_later_field"] = 1
        state["_snapshot"]["_worker_snapshots"]["worker_0"]["_later_field"] = [1]
    resumed = Loader(Squares(), batch_size=2, **_options(workers))
    resumed.load_state_dict(state)
    assert first + _rest(resumed) == reference


@pytest.mark.parametrize("workers, where, value", [
    (0, ("_num_yielded",), True), (0, ("_sampler_iter_yielded",), -1),
    (2, ("_snapshot", "_main_snapshot", "_base_seed"), "7"),
    (2, ("_steps_since_snapshot",), 1.5), (0, ("torch_rlds", "batches_seen"), 2**70)])
def test_torch_rlds_still_refuses_wrong_types_and_ranges(workers, where, value):
    _, state = _run(torch_rlds.DataLoader(Squares(), batch_size=2, **_options(workers)), 2)
    parent = state
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    with pytest.raises(ValueError, match=where[-1]):
        torch_rlds.DataLoader(Squares(), batch_size=2, **_options(workers)).load_state_dict(state)


@both
def test_the_dataset_state_is_taken_only_when_a_state_is_asked_for(Loader):
    dataset = Resumable(n=200)
    loader = Loader(dataset, batch_size=1)
    assert len(list(loader)) == 200
    assert dataset.state_calls == 0
    loader.state_dict()
    assert dataset.state_calls == 1


# -- 5. start method ------------------------------------------------------------------------
@both
def test_jax_imported_without_a_backend_keeps_fork(Loader, monkeypatch):
    import types

    bridge = types.ModuleType("jax._src.xla_bridge")
    bridge.backends_are_initialized = lambda: False
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", bridge)

    class Local(torch.utils.data.Dataset):  # not picklable: only fork can start its workers
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

    loader = Loader(Local(), batch_size=2, num_workers=1, collate_fn=lambda b: sum(b))
    assert list(loader) == [1, 5]
    assert loader.multiprocessing_context is None


# -- 6. API ---------------------------------------------------------------------------------
@both
def test_signature_generics_and_duck_typed_datasets(Loader):
    assert Loader[typing.List[torch.Tensor]] is not None  # noqa: UP006 (the form in use)
    assert Loader[list[torch.Tensor]] is not None
    positional = Loader(Squares(), 4, True)  # dataset, batch_size, shuffle
    shuffled = StatefulDataLoader(Squares(), batch_size=4, shuffle=True)
    assert positional.batch_size == 4 and type(positional.sampler) is type(shuffled.sampler)
    assert type(positional.sampler) is not torch.utils.data.SequentialSampler
    assert sorted(_ids(positional)) == list(range(N))

    import inspect

    theirs = inspect.signature(StatefulDataLoader.__init__).parameters
    ours = inspect.signature(torch_rlds.DataLoader.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)  # the same names, in the same order...
    for name, parameter in theirs.items():  # ...kinds and defaults; what is added is by name
        assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
    assert all(p.kind is p.KEYWORD_ONLY for p in list(ours.values())[len(theirs):])

    class WithSource(Squares):
        source = "not an RLDSSource"

    assert _ids(Loader(WithSource(), batch_size=6)) == list(range(N))


# -- what torch_rlds adds for its own datasets ---------------------------------------------
def _rlds(path, **options):
    return torch_rlds.RLDSDataset(path, **{"obs_window": 1, "action_horizon": 2,
                                           "shuffle_window": 2, **options})


def _steps(batches) -> list[tuple[int, int]]:
    return [(int(e), int(t)) for b in batches
            for e, t in zip(b["meta"]["episode_index"], b["meta"]["step_index"])]


@pytest.mark.parametrize("workers", [0, 2])
def test_continue_passes_is_on_for_torch_rlds_datasets_and_documented(small_dataset, workers):
    loader = torch_rlds.DataLoader(_rlds(small_dataset), batch_size=3, **_options(workers))
    assert loader.continue_passes
    reference = _steps(itertools.islice(torch_rlds.DataLoader(
        _rlds(small_dataset), batch_size=3, **_options(workers)), 6))
    got = _steps(itertools.islice(loader, 2)) + _steps(itertools.islice(loader, 4))
    assert got == reference  # one stream: the second loop goes on after the first's batches
    off = torch_rlds.DataLoader(_rlds(small_dataset), batch_size=3,
                                **_options(workers, continue_passes=False))
    plain = StatefulDataLoader(_rlds(small_dataset).batched(3), batch_size=None,
                               **_options(workers))
    for loader in (off, plain):  # StatefulDataLoader's passes
        first = _steps(itertools.islice(loader, 2))
        assert first == reference[:6]
    assert _steps(itertools.islice(off, 2)) == _steps(itertools.islice(plain, 2))
    assert "continue_passes" in torch_rlds.DataLoader.__doc__
    assert not torch_rlds.DataLoader(Squares()).continue_passes
    assert not torch_rlds.DataLoader(_rlds(small_dataset), num_workers=2,
                                     in_order=False).continue_passes
    with pytest.raises(ValueError, match="continue_passes=True needs in_order=True"):
        torch_rlds.DataLoader(_rlds(small_dataset), num_workers=2, in_order=False,
                              continue_passes=True)


@pytest.mark.parametrize("persistent", [False, True])
def test_after_a_dead_worker_another_dataset_gets_a_new_pass(persistent, tmp_path):
    flag = tmp_path / "armed"
    flag.touch()
    loader = torch_rlds.DataLoader(_DyingOnce(str(flag)), batch_size=None,
                                   **_options(1, persistent_workers=persistent))
    with pytest.raises(torch_rlds.WorkerError):
        list(loader)
    assert list(loader) == list(range(8))  # fresh workers, from the start


class _DyingOnce(torch.utils.data.Dataset):
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 3 and os.path.exists(self.flag):
            os.unlink(self.flag)
            os.kill(os.getpid(), signal.SIGKILL)
        return i
