"""Untrusted states: every malformed field is a ValueError naming it, for the dataset state and
for the whole DataLoader state (torchdata's parts too); nothing is ever unpickled; the golden
state files of this version load; long runs (epoch 10**6, counters past 2**40) round-trip.

The golden files under ``tests/golden/`` are what this version saves for :data:`GOLDEN` after
:data:`GOLDEN_BATCHES` batches: a dataset state, and a whole DataLoader state at 0 and at 2
workers; ``sample_batching/`` holds the loader states of the same version saved before the
dataset made the loader's batches. A later version must load them or refuse them clearly.
Regenerate them (only when the format changes on purpose, with a new version) with::

    TORCH_RLDS_WRITE_GOLDEN=1 python -m pytest tests/test_state.py -k golden
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from etils import epath

import torch_rlds
from torch_rlds import synthetic
from torch_rlds._state_file import write_json_atomic
from torch_rlds.loader import dataset_states
from torch_rlds.testing import assert_batches_equal

GOLDEN_DIR = Path(__file__).with_name("golden")
GOLDEN = dict(num_episodes=6, episode_lengths=(4, 7, 3, 9, 5, 6), num_shards=2,
              cameras=(synthetic.Camera("image", 32, 32),))
GOLDEN_BATCHES = 5
# The golden files are states of the window order; the global order's are in test_global.py.
DATASET_OPTIONS = dict(obs_window=2, action_horizon=4, shuffle_window=2, order="window")
DELETE = object()


@pytest.fixture(scope="module")
def path(write_dataset):
    return write_dataset(**GOLDEN)


@pytest.fixture(scope="module")
def other_path(write_dataset):
    return write_dataset(**{**GOLDEN, "name": "other_rlds"})


def _dataset(path, **options):
    return torch_rlds.RLDSDataset(path, **{**DATASET_OPTIONS, **options})


def _loader(path, workers, **options):
    return torch_rlds.DataLoader(_dataset(path), batch_size=3, num_workers=workers, **options)


def _json(obj):
    return json.loads(json.dumps(obj))


_STATES: dict[tuple, str] = {}


def _state_after(path, workers, batches=GOLDEN_BATCHES):
    """The loader's state after ``batches`` batches (computed once; a fresh copy each call)."""
    key = (str(path), workers, batches)
    if key not in _STATES:
        loader = _loader(path, workers)
        iterator = iter(loader)
        for _ in range(batches):
            next(iterator)
        _STATES[key] = json.dumps(loader.state_dict())
        del iterator, loader
    return json.loads(_STATES[key])


def _dataset_state(path, steps=7):
    dataset = _dataset(path)
    iterator = iter(dataset)
    for _ in range(steps):
        next(iterator)
    return _json(dataset.state_dict())


def _edit(state, where: tuple, value):
    state = copy.deepcopy(state)
    parent = state
    for key in where[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    return state


# -- the dataset state ----------------------------------------------------------------------
DATASET_EDITS = [
    (("version",), True, "'version'"),
    (("version",), 1.0, "'version'"),
    (("version",), 2, "'version': 2 is not a version"),
    (("version",), DELETE, "'version' is missing"),
    (("epoch",), True, "'epoch' must be an int"),
    (("epoch",), 3.0, "'epoch' must be an int"),
    (("epoch",), -1, r"'epoch' must be in \[0, 2\*\*62 \(a counter\)\]"),
    (("epoch",), 2**70, r"'epoch' must be in \[0, 2\*\*62 \(a counter\)\]"),
    # Counters load with 2**62 of headroom: a loaded state can run on and be saved again.
    (("epoch",), 2**62 + 1, r"'epoch' must be in \[0, 2\*\*62 \(a counter\)\]"),
    (("position",), 10_000, "'position': 10000 is past the end of window 0 of epoch 0"),
    (("epoch",), "/etc/passwd", "'epoch' must be an int"),
    (("epoch",), None, "'epoch' must be an int"),
    (("window",), False, "'window' must be an int"),
    (("position",), 2**63, "'position' must be in"),
    (("skipped",), True, "'skipped' must be an int"),
    (("skipped",), -3, "'skipped' must be in"),
    (("skipped",), 2**70, "'skipped' must be in"),
    (("position",), DELETE, r"missing fields \['position'\]"),
    (("extra",), 1, r"unknown fields \['extra'\]"),
    (("__reduce__",), "os.system", r"unknown fields \['__reduce__'\]"),
    (("fingerprint",), "synthetic_rlds", "'fingerprint' must be a dict"),
    (("fingerprint", "seed"), DELETE, r"'fingerprint': missing fields \['seed'\]"),
    (("fingerprint", "path"), "/data", r"'fingerprint': unknown fields \['path'\]"),
    (("fingerprint", "seed"), True, "'fingerprint.seed' must be an int"),
    (("fingerprint", "num_workers"), 0.0, "'fingerprint.num_workers' must be an int"),
    (("fingerprint", "split"), 7, "'fingerprint.split' must be a string"),
    (("fingerprint", "dataset"), "../../etc/passwd", "dataset in checkpoint: '../../etc/passwd'"),
    (("fingerprint", "split"), "/tmp/train", "split in checkpoint: '/tmp/train'"),
    (("fingerprint", "dataset_version"), "C:\\1.0.0", "dataset_version in checkpoint"),
    (("fingerprint", "dataset"), "synthetic_rlds\0", "'fingerprint.dataset' holds unprintable"),
    (("fingerprint", "dataset"), "x" * 5000, "'fingerprint.dataset' is 5000 characters long"),
    (("fingerprint", "seed"), 1, "seed in checkpoint: 1 / in this dataset: 0"),
    (("window",), 99, "'window': 99 .* past the end"),
]


def _ids(edits):
    return [f"{'.'.join(where)}={'DELETE' if value is DELETE else repr(value)[:16]}"
            for where, value, _ in edits]


@pytest.mark.parametrize("where, value, message", DATASET_EDITS, ids=_ids(DATASET_EDITS))
def test_a_malformed_dataset_state_names_the_field(path, where, value, message):
    dataset = _dataset(path)
    with pytest.raises(ValueError, match=message):
        dataset.load_state_dict(_edit(_dataset_state(path), where, value))
    # The same inside a DataLoader state: refused on load, not in a worker later.
    for workers, key in [(0, ("dataset_state",)),
                         (2, ("_snapshot", "_worker_snapshots", "worker_1", "dataset_state"))]:
        state = _state_after(path, workers, 2)
        loader = _loader(path, workers)
        with pytest.raises(ValueError, match=message):
            loader.load_state_dict(_edit(state, (*key, *where), value))


def test_a_state_of_another_dataset_names_every_difference(path, other_path):
    state = _dataset_state(other_path)
    with pytest.raises(ValueError) as raised:
        _dataset(path).load_state_dict(state)
    assert "dataset in checkpoint: 'other_rlds' / in this dataset: 'synthetic_rlds'" in str(
        raised.value)
    loader_state = _state_after(other_path, 2, 1)
    with pytest.raises(ValueError, match="worker 0: .*dataset in checkpoint: 'other_rlds'"):
        _loader(path, 2).load_state_dict(loader_state)


def test_a_state_without_skipped_loads_as_skipped_zero(path):
    """``skipped`` came within version 1: states written before it still load."""
    state = _dataset_state(path)
    assert state["skipped"] == 0
    del state["skipped"]
    dataset = _dataset(path)
    dataset.load_state_dict(state)
    assert dataset.state_dict()["skipped"] == 0
    reference = _dataset(path)
    iterator = iter(reference)
    for _ in range(7):
        next(iterator)
    assert_batches_equal(next(iterator), next(iter(dataset)))


def test_skipped_round_trips(path):
    from torch_rlds._state import Cursor, load_cursor

    state = _dataset_state(path)
    state["skipped"] = 2**41
    cursor = load_cursor(_json(state), _dataset(path).fingerprint())
    assert cursor == Cursor(state["epoch"], state["window"], state["position"], 2**41)
    assert Cursor(1, 2, 3) == Cursor(epoch=1, window=2, position=3, skipped=0)


# -- the whole DataLoader state -------------------------------------------------------------
LOADER_EDITS_0 = [
    (("_num_yielded",), DELETE, r"loader state: missing fields \['_num_yielded'\]|neither"),
    (("_sampler_iter_yielded",), DELETE, r"missing fields \['_sampler_iter_yielded'\]"),
    (("fetcher_state",), DELETE, r"missing fields \['fetcher_state'\]"),
    (("dataset_state",), DELETE, r"missing fields \['dataset_state'\]"),
    (("_iterator_finished",), DELETE, r"missing fields \['_iterator_finished'\]"),
    (("_num_yielded",), True, "'_num_yielded' must be an int"),
    (("_num_yielded",), -1, "'_num_yielded' must be in"),
    (("_num_yielded",), 2**70, "'_num_yielded' must be in"),
    (("_sampler_iter_yielded",), 1.5, "'_sampler_iter_yielded' must be an int"),
    (("_shared_seed",), "0", "'_shared_seed' must be an int"),
    (("_IterableDataset_len_called",), [], "'_IterableDataset_len_called' must be an int"),
    (("_iterator_finished",), 0, "'_iterator_finished' must be a bool"),
    (("_index_sampler_state",), {"a": 1}, "'_index_sampler_state' must be None"),
    (("_sampler_iter_state",), "x", "'_sampler_iter_state' must be a dict"),
    # The layout of a loader that batches samples itself (this one leaves batching to the
    # dataset and saves None there).
    (("_sampler_iter_state",), {"samples_yielded": 1.5},
     "'_sampler_iter_state.samples_yielded'"),
    (("fetcher_state",), [], "'fetcher_state' must be a dict"),
    (("fetcher_state", "fetcher_ended"), "no", "'fetcher_state.fetcher_ended' must be a bool"),
    (("fetcher_state", "dataset_iter_state"), {"x": 1}, "'fetcher_state.dataset_iter_state'"),
    (("fetcher_state", "fetcher_ended"), True, "'fetcher_ended' is true, but the stream of "
                                               "a repeat=True dataset never ends"),
    (("torch_rlds",), None, "'torch_rlds' must be a dict"),
    (("torch_rlds", "version"), 2, "'torch_rlds': expected version 1"),
    (("torch_rlds", "version"), True, "'torch_rlds': expected version 1"),
    (("torch_rlds", "batches_seen"), True, "'batches_seen' must be an int"),
    (("torch_rlds", "batches_seen"), 2**64, r"'batches_seen' must be in \[0, 2\*\*62"),
    (("torch_rlds", "batches_seen"), DELETE, r"missing fields \['batches_seen'\]"),
    (("torch_rlds", "path"), "/x", r"'torch_rlds': unknown fields \['path'\]"),
]
S, M, W = "_snapshot", "_main_snapshot", "_worker_snapshots"
LOADER_EDITS_2 = [
    ((S,), DELETE, "neither '_snapshot'"),
    ((S, M, "_num_workers"), 2.0, "'_snapshot._main_snapshot._num_workers' must be an int"),
    ((S, M, "_num_workers"), 3, "num_workers in checkpoint: 3 / in this loader: 2"),
    ((S, M, "_base_seed"), DELETE, r"'_snapshot._main_snapshot': missing fields \['_base_seed'\]"),
    ((S, M, "_base_seed"), -1, "'_snapshot._main_snapshot._base_seed' must be in"),
    ((S, M, "_base_seed"), True, "'_snapshot._main_snapshot._base_seed' must be an int"),
    ((S, M, "_sampler_iter_yielded"), 2**70, "'_snapshot._main_snapshot._sampler_iter_yielded'"),
    ((S, "_snapshot_step"), "3", "'_snapshot._snapshot_step' must be an int"),
    ((S, "_last_yielded_worker_id"), 2, r"'_snapshot._last_yielded_worker_id' must be in \[0, 1\]"),
    ((S, "_last_yielded_worker_id"), -1, "'_snapshot._last_yielded_worker_id' must be in"),
    ((S, W), [], "'_snapshot._worker_snapshots' must be a dict"),
    ((S, W, "worker_1"), DELETE, r"'_snapshot._worker_snapshots': missing fields \['worker_1'\]"),
    ((S, W, "worker_2"), {}, r"'_snapshot._worker_snapshots': unknown fields \['worker_2'\]"),
    ((S, W, "worker_1", "worker_id"), 0, "'_snapshot._worker_snapshots.worker_1.worker_id' must "
                                         "be 1"),
    ((S, W, "worker_0", "fetcher_state"), None, "'_snapshot._worker_snapshots.worker_0."
                                                "fetcher_state' must be a dict"),
    ((S, W, "worker_0", "dataset_state"), None, "worker 0: dataset state must be a dict"),
    # torchdata replays the batches since its last snapshot: never more than were handed out.
    (("_steps_since_snapshot",), 3, "'_steps_since_snapshot': 3 batches to replay, but "
                                    "'batches_seen' says 2"),
    (("_steps_since_snapshot",), 2**62, "'_steps_since_snapshot'"),
    (("_steps_since_snapshot",), 2**70, "'_steps_since_snapshot' must be in"),
    (("_iterator_finished",), "false", "'_iterator_finished' must be a bool"),
    ((S, W, "worker_1", "fetcher_state", "fetcher_ended"), True,
     "worker 1: state field 'fetcher_ended' is true, but the stream of a repeat=True dataset"),
    ((S, W, "worker_0", "dataset_state", "position"), 9_999,
     "worker 0: state field 'position': 9999 is past the end of window 0 of epoch 0"),
]
# What StatefulDataLoader accepts, torch_rlds does too: keys torchdata does not read.
LOADER_ADDITIONS = [
    (0, ("_sampler_iter_state",), {"samples_yielded": 6, "sampler_state": {}}),
    (0, ("fetcher_state", "extra"), 1),
    (0, ("extra",), None),
    (2, (S, "_extra"), 0),
    (2, (S, M, "_extra"), [1, 2]),
    (2, (S, W, "worker_0", "_extra"), "x"),
    (2, ("_num_yielded",), 0),
]


@pytest.mark.parametrize("workers, where, value, message",
                         [(0, *e) for e in LOADER_EDITS_0] + [(2, *e) for e in LOADER_EDITS_2],
                         ids=[f"0-{i}" for i in _ids(LOADER_EDITS_0)]
                         + [f"2-{i}" for i in _ids(LOADER_EDITS_2)])
def test_a_malformed_loader_state_names_the_field(path, workers, where, value, message):
    state = _edit(_state_after(path, workers, 2), where, value)
    loader = _loader(path, workers)
    with pytest.raises(ValueError, match=message):
        loader.load_state_dict(state)
    assert loader.next_iter_state is None and loader.batches_seen == 0  # nothing half-loaded


@pytest.mark.parametrize("workers, where, value", LOADER_ADDITIONS,
                         ids=[f"{w}-{'.'.join(k)}" for w, k, _ in LOADER_ADDITIONS])
def test_keys_torchdata_does_not_read_are_accepted(path, workers, where, value):
    batches = 2
    reference = _loader(path, workers)
    reference.load_state_dict(_state_after(path, workers, batches))
    expected = next(iter(reference))
    loader = _loader(path, workers)
    loader.load_state_dict(_edit(_state_after(path, workers, batches), where, value))
    assert loader.batches_seen == batches
    assert_batches_equal(expected, next(iter(loader)), "the batch after the state")


def test_a_malformed_state_is_refused_before_torchdata_sees_it(path, monkeypatch):
    """Without the checks torchdata fails deep inside (KeyError, AssertionError) or hangs
    replaying batches; here it is never reached."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def must_not_run(self, state):
        raise AssertionError("torchdata got a state that was not checked")

    monkeypatch.setattr(StatefulDataLoader, "load_state_dict", must_not_run)
    state = _state_after(path, 2, 2)
    for where, value, _ in LOADER_EDITS_2:
        with pytest.raises(ValueError):
            _loader(path, 2).load_state_dict(_edit(state, where, value))


@pytest.mark.parametrize("saving, loading", [(4, 4), (4, 1), (1, 3), (5, None)])
def test_a_state_resumes_under_another_snapshot_interval(path, saving, loading):
    """torchdata replays the batches since the saving loader's last snapshot, whatever the
    loading loader's interval."""
    loader = _loader(path, 2, snapshot_every_n_steps=saving)
    iterator = iter(loader)
    for _ in range(6):
        next(iterator)
    state = _json(loader.state_dict())
    assert state["_steps_since_snapshot"] == 6 % saving
    expected = [next(iterator) for _ in range(3)]
    restored = _loader(path, 2, snapshot_every_n_steps=loading)
    restored.load_state_dict(state)
    for i, batch in enumerate(itertools.islice(restored, 3)):
        assert_batches_equal(expected[i], batch, f"batch {6 + i}")


# -- nothing is unpickled -------------------------------------------------------------------
class _Canary:
    def __reduce__(self):
        return (_CANARY.append, ("unpickled",))


_CANARY: list[str] = []


def _refuse_unpickling(monkeypatch) -> list[str]:
    """Make every way to unpickle raise, and record the attempts."""
    import multiprocessing.reduction

    calls: list[str] = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while loading a state")
        return refused

    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    monkeypatch.setattr(pickle, "_loads", refuse("pickle._loads"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(multiprocessing.reduction.ForkingPickler, "loads",
                        refuse("ForkingPickler.loads"))
    return calls


PAYLOADS = [pickle.dumps(_Canary(), protocol=p) for p in (0, 2, 5)]


@pytest.mark.parametrize("workers", [0, 2])
def test_no_load_path_unpickles(path, tmp_path, monkeypatch, workers):
    state = _state_after(path, workers, 3)
    dataset_key = (("_snapshot", "_worker_snapshots", "worker_0", "dataset_state") if workers
                   else ("dataset_state",))
    fetcher_key = (("_snapshot", "_worker_snapshots", "worker_0", "fetcher_state") if workers
                   else ("fetcher_state",))
    sampler_key = ("_snapshot", "_main_snapshot") if workers else ()
    places = [(*dataset_key, "fingerprint", "dataset"), (*dataset_key, "epoch"), dataset_key,
              (*fetcher_key, "dataset_iter_state"), (*sampler_key, "_sampler_iter_state"),
              (*sampler_key, "_shared_seed"), ("torch_rlds", "batches_seen")]
    file = tmp_path / "bad.json"
    calls = _refuse_unpickling(monkeypatch)
    for payload in PAYLOADS:
        text = payload.decode("latin-1")
        for where, value in itertools.product(places, (text, payload, {"__reduce__": text})):
            bad = _edit(state, where, value)
            with pytest.raises(ValueError):
                _loader(path, workers).load_state_dict(bad)
            if isinstance(value, bytes):
                continue  # not JSON: only load_state_dict can be handed bytes
            file.write_text(json.dumps(bad))
            with pytest.raises(ValueError, match="bad.json"):
                _loader(path, workers).load_state(file)
        file.write_bytes(payload)  # a pickle where the JSON should be
        with pytest.raises(ValueError, match="not a JSON state"):
            _loader(path, workers).load_state(file)
    # A key torchdata does not read is accepted, as torchdata accepts it, and never read.
    file.write_text(json.dumps({**state, "extra": PAYLOADS[0].decode("latin-1")}))
    _loader(path, workers).load_state(file)
    # A good state loads with every unpickler refused; without workers, so does the next batch.
    file.write_text(json.dumps(state))
    loader = _loader(path, workers)
    loader.load_state(file)
    loader.load_state_dict(state)
    if not workers:
        next(iter(loader))
    assert calls == [] and _CANARY == []


# -- golden files ---------------------------------------------------------------------------
def _golden_states(path) -> dict[str, dict]:
    """What this version saves for GOLDEN after GOLDEN_BATCHES batches (batches of 3)."""
    states = {"dataset_state.json": _dataset_state(path, 3 * GOLDEN_BATCHES)}
    for workers in (0, 2):
        states[f"loader_state_{workers}_workers.json"] = _state_after(path, workers)
    return states


def _without_base_seed(state: dict) -> dict:
    state = copy.deepcopy(state)
    if "_snapshot" in state:
        state["_snapshot"]["_main_snapshot"]["_base_seed"] = None  # random in every run
    return state


def test_golden_files_are_what_this_version_saves(path, tmp_path):
    states = _golden_states(path)
    if os.environ.get("TORCH_RLDS_WRITE_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        for name, state in states.items():
            write_json_atomic(epath.Path(GOLDEN_DIR / name), state)  # what save_state writes
    for name, state in states.items():
        golden = json.loads((GOLDEN_DIR / name).read_text())
        assert _without_base_seed(golden) == _without_base_seed(state), (
            f"the state format changed ({name}): bump the state version, keep loading (or "
            "clearly refusing) the old golden files, and regenerate them (see the module "
            "docstring)")


@pytest.mark.parametrize("workers", [0, 2])
def test_golden_loader_states_load_and_resume(path, workers):
    reference = list(itertools.islice(_loader(path, workers), GOLDEN_BATCHES + 2))
    loader = _loader(path, workers)
    loader.load_state(GOLDEN_DIR / f"loader_state_{workers}_workers.json")
    assert loader.batches_seen == GOLDEN_BATCHES
    for i, batch in enumerate(itertools.islice(loader, 2)):
        assert_batches_equal(reference[GOLDEN_BATCHES + i], batch, f"batch {i}")


@pytest.mark.parametrize("workers", [0, 2])
def test_states_of_loaders_that_batched_samples_load_and_resume(path, workers):
    # Saved by loaders that left the dataset emitting samples and collated them (torchdata's
    # batch sampler then saves a sample count): the same stream resumes.
    reference = list(itertools.islice(_loader(path, workers), GOLDEN_BATCHES + 2))
    loader = _loader(path, workers)
    loader.load_state(GOLDEN_DIR / "sample_batching" / f"loader_state_{workers}_workers.json")
    assert loader.batches_seen == GOLDEN_BATCHES
    for i, batch in enumerate(itertools.islice(loader, 2)):
        assert_batches_equal(reference[GOLDEN_BATCHES + i], batch, f"batch {i}")


def test_golden_dataset_state_loads_and_resumes(path):
    state = json.loads((GOLDEN_DIR / "dataset_state.json").read_text())
    assert state["version"] == 1 and state["skipped"] == 0
    dataset = _dataset(path)
    dataset.load_state_dict(state)
    reference = iter(_dataset(path))
    for _ in range(3 * GOLDEN_BATCHES):
        next(reference)
    assert_batches_equal(next(reference), next(iter(dataset)))


@pytest.mark.parametrize("name, where", [
    ("dataset_state.json", ("version",)),
    ("loader_state_0_workers.json", ("dataset_state", "version")),
    ("loader_state_0_workers.json", ("torch_rlds", "version")),
    ("loader_state_2_workers.json", ("_snapshot", "_worker_snapshots", "worker_1",
                                     "dataset_state", "version")),
    ("loader_state_2_workers.json", ("torch_rlds", "version")),
])
def test_golden_files_of_another_version_are_refused(path, tmp_path, name, where):
    state = _edit(json.loads((GOLDEN_DIR / name).read_text()), where, 2)
    file = tmp_path / name
    file.write_text(json.dumps(state))
    if name == "dataset_state.json":
        with pytest.raises(ValueError, match=r"'version': 2 is not a version this torch_rlds "
                                             r"reads \(expected 1\)"):
            _dataset(path).load_state_dict(state)
        return
    loader = _loader(path, int(name.split("_")[2]))
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*version"):
        loader.load_state(file)


# -- long runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [10**6, 2**41, 2**62])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_late_epoch_round_trips_and_resumes(path, workers, epoch):
    state = _state_after(path, workers, 0)
    datasets = ([state["_snapshot"]["_worker_snapshots"][f"worker_{i}"]["dataset_state"]
                 for i in range(workers)] if workers else [state["dataset_state"]])
    for dataset_state in datasets:
        dataset_state["epoch"] = epoch
    state = _json(state)
    loader = _loader(path, workers)
    loader.load_state_dict(state)
    batches = list(itertools.islice(loader, 4))
    assert {e for b in batches for e in b["meta"]["epoch"].tolist()} == {epoch}
    # The same steps as a loader started at that epoch: the order is a pure function of it.
    fresh = _loader(path, workers)
    fresh.dataset.set_epoch(epoch)
    for i, (a, b) in enumerate(zip(batches, itertools.islice(fresh, 4))):
        assert_batches_equal(a, b, f"batch {i}")
    saved = _json(loader.state_dict())
    epochs = [s["epoch"] for s in dataset_states(saved)]
    assert set(epochs) == {epoch}


@pytest.mark.parametrize("workers", [0, 2])
def test_counters_past_2_40_round_trip(path, workers):
    big = 2**41 + 7
    state = _state_after(path, workers, 3)
    reference = _loader(path, workers)
    reference.load_state_dict(state)
    expected = list(itertools.islice(reference, 3))
    state["torch_rlds"]["batches_seen"] = big
    if workers:
        state["_snapshot"]["_snapshot_step"] = big
        main = state["_snapshot"]["_main_snapshot"]
    else:
        state["_num_yielded"] = big
        main = state
    main["_sampler_iter_yielded"] = big
    main["_sampler_iter_state"] = {"samples_yielded": 3 * big}  # a sample-batching loader's
    for dataset_state in dataset_states(state):
        dataset_state["skipped"] = big
    loader = _loader(path, workers)
    loader.load_state_dict(_json(state))
    assert loader.batches_seen == big
    for i, batch in enumerate(itertools.islice(loader, 3)):
        assert_batches_equal(expected[i], batch, f"batch {i}")
    saved = _json(loader.state_dict())
    assert saved["torch_rlds"]["batches_seen"] == big + 3
    assert {s["skipped"] for s in dataset_states(saved)} == {big}
    if workers:
        assert saved["_snapshot"]["_snapshot_step"] == big + 3
        assert saved["_snapshot"]["_main_snapshot"]["_sampler_iter_yielded"] >= big + 3
    else:
        assert saved["_num_yielded"] == big + 3
        assert saved["_sampler_iter_yielded"] == big + 3
        assert saved["_sampler_iter_state"] is None  # the dataset makes the batches
    restored = _loader(path, workers)
    restored.load_state_dict(saved)
    assert restored.batches_seen == big + 3


@pytest.mark.parametrize("workers", [0, 2])
def test_every_state_that_loads_iterates_and_saves_again(path, tmp_path, workers):
    """Counters load up to 2**62, so a loaded state has 2**62 batches of headroom before the
    format's 2**63 - 1: it iterates, and what it saves loads again. Past 2**62 it is refused
    on load, rather than loading and failing at the next save."""
    near = 2**62 - 10
    state = _state_after(path, workers, 2)
    state["torch_rlds"]["batches_seen"] = near
    main = state["_snapshot"]["_main_snapshot"] if workers else state
    main["_sampler_iter_yielded"] = near
    if workers:
        state["_snapshot"]["_snapshot_step"] = near
    else:
        state["_num_yielded"] = near
    for dataset_state in dataset_states(state):
        dataset_state["epoch"] = near
    loader = _loader(path, workers)
    loader.load_state_dict(_json(state))
    assert len(list(itertools.islice(loader, 3))) == 3
    file = loader.save_state(tmp_path / "state.json")
    again = _loader(path, workers)
    again.load_state(file)
    assert again.batches_seen == near + 3
    assert len(list(itertools.islice(again, 2))) == 2
    for dataset_state in dataset_states(state):
        dataset_state["epoch"] = 2**62 + 1
    with pytest.raises(ValueError, match=r"'epoch' must be in \[0, 2\*\*62 \(a counter\)\]"):
        _loader(path, workers).load_state_dict(_json(state))
