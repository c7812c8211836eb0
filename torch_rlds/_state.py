"""The states: their schemas, and the checks that make an untrusted state safe to load.

A dataset state is a flat-ish JSON object of ints and strings::

    {"version": 1,
     "fingerprint": {"dataset": "bridge", "dataset_version": "0.1.0", "split": "train", ...},
     "epoch": 3, "window": 12, "position": 517, "skipped": 0}

It never holds data, so its size is fixed (a few hundred bytes) whatever the dataset, the
shuffle window or the step count (ints are at most 19 digits). Loading checks every field's type
and range and compares the fingerprint field by field; nothing in it is ever evaluated,
unpickled or used as a path. Counters that grow as a run goes on (epochs, positions, batches)
load up to :data:`MAX_COUNT`, half of the format's range, so that a loaded state can be
iterated, and saved again, for longer than any run lasts. ``skipped`` came within version 1: a state written before it
existed loads with ``skipped`` 0.

A DataLoader state is what torchdata's ``StatefulDataLoader`` saves around one dataset state per
worker, plus ``{"torch_rlds": {"version", "batches_seen"}}``. :func:`check_loader_state` checks
its whole structure before torchdata reads it, so that a malformed state is a ``ValueError``
naming the field rather than a ``KeyError`` or ``AssertionError`` inside torchdata or a worker;
it accepts what torchdata accepts (keys it does not read, in its own parts of the state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch_rlds._torchdata import (
    BASE_SEED,
    DATASET_ITER_STATE,
    DATASET_STATE,
    FETCHER_ENDED,
    FETCHER_STATE,
    INDEX_SAMPLER_STATE,
    ITERABLE_LEN_CALLED,
    ITERATOR_FINISHED,
    LAST_YIELDED_WORKER_ID,
    MAIN_SNAPSHOT,
    NUM_WORKERS,
    NUM_YIELDED,
    SAMPLER_ITER_STATE,
    SAMPLER_ITER_YIELDED,
    SAMPLES_YIELDED,
    SHARED_SEED,
    SNAPSHOT,
    SNAPSHOT_STEP,
    STEPS_SINCE_SNAPSHOT,
    WORKER_ID,
    WORKER_SNAPSHOTS,
    worker_key,
)

STATE_VERSION = 1
MAX_INT = 2**63 - 1
# The most a growing counter may hold in a state that loads: 2**62 batches (or epochs) of
# headroom before the format's limit, MAX_INT.
MAX_COUNT = 2**62
MAX_STRING = 1024

FINGERPRINT_FIELDS: dict[str, type] = {
    "dataset": str,
    "dataset_version": str,
    "split": str,
    "num_episodes": int,
    "seed": int,
    "shuffle": int,
    "obs_window": int,
    "action_horizon": int,
    "shuffle_window": int,
    "process_index": int,
    "process_count": int,
    "num_workers": int,
    "worker_index": int,
}
CURSOR_FIELDS = ("epoch", "window", "position", "skipped")
# Cursor fields added within a version: a state written before them loads with the default.
_ADDED_CURSOR_FIELDS = frozenset({"skipped"})


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a reader stands: the next step to emit is ``position`` of ``window`` of ``epoch``.

    Every window before ``window`` and the first ``position`` steps of ``window`` (in the order
    of :func:`torch_rlds._order.window_steps`) are consumed. ``window`` equal to the reader's
    window count means the whole epoch is consumed (where a one-pass dataset stops).
    ``skipped`` counts the episodes this reader skipped as corrupt (``on_corrupt="skip"``).
    """

    epoch: int = 0
    window: int = 0
    position: int = 0
    skipped: int = 0


def make_state(fingerprint: dict[str, Any], cursor: Cursor) -> dict[str, Any]:
    """The JSON-serialisable state of a reader."""
    return {"version": STATE_VERSION, "fingerprint": dict(fingerprint),
            **dataclasses.asdict(cursor)}


def _check_int(value: Any, field: str, what: str = "state field", limit: int = MAX_INT) -> int:
    if type(value) is not int:  # bool is an int subclass and must not pass
        raise ValueError(f"{what} {field!r} must be an int (got {type(value).__name__} "
                         f"{value!r:.100})")
    if not 0 <= value <= limit:
        bound = "2**62 (a counter)" if limit == MAX_COUNT else "2**63 - 1"
        raise ValueError(f"{what} {field!r} must be in [0, {bound}] (got {value})")
    return value


def _check_str(value: Any, field: str) -> str:
    if type(value) is not str:
        raise ValueError(f"state field {field!r} must be a string (got {type(value).__name__} "
                         f"{value!r:.100})")
    if len(value) > MAX_STRING:
        raise ValueError(f"state field {field!r} is {len(value)} characters long (at most "
                         f"{MAX_STRING})")
    if not value.isprintable():  # NUL, newlines, escapes: nothing a name or a version holds
        raise ValueError(f"state field {field!r} holds unprintable characters ({value!r:.100})")
    return value


def _check_keys(obj: Any, expected: set[str], where: str,
                optional: frozenset[str] = frozenset(), extra_ok: bool = False) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict (got {type(obj).__name__})")
    missing = sorted(expected - optional - obj.keys())
    extra = [] if extra_ok else sorted(repr(k) for k in obj if k not in expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing fields {missing}")
        if extra:
            parts.append(f"unknown fields [{', '.join(extra)}]")
        raise ValueError(f"{where}: " + "; ".join(parts))


def _check_fingerprint(fingerprint: Any, fields: dict[str, type],
                       expected: dict[str, Any]) -> None:
    """Check a state's fingerprint field by field, then against ``expected``, naming every
    field that differs with both values."""
    _check_keys(fingerprint, set(fields), "state field 'fingerprint'")
    for field, kind in fields.items():
        check = _check_int if kind is int else _check_str
        check(fingerprint[field], f"fingerprint.{field}")
    differ = [f"{field} in checkpoint: {fingerprint[field]!r} / in this dataset: "
              f"{expected[field]!r}"
              for field in fields if fingerprint[field] != expected[field]]
    if differ:
        raise ValueError("state belongs to another dataset or configuration: "
                         + "; ".join(differ))


def data_fingerprint(dataset: Any) -> dict[str, Any]:
    """The fingerprint fields of either order that name the data and the sample: dataset,
    version, split, episodes, seed, shuffle, observation window and action horizon."""
    info = dataset.source.info
    return {
        "dataset": info.name,
        "dataset_version": info.version,
        "split": dataset.source.split,
        "num_episodes": len(dataset.source),
        "seed": dataset.seed,
        "shuffle": int(dataset.shuffle),
        "obs_window": dataset.obs_window,
        "action_horizon": dataset.action_horizon,
    }


def load_cursor(state: Any, expected: dict[str, Any]) -> Cursor:
    """Validate ``state`` against this reader's fingerprint and return its cursor.

    Raises ``ValueError`` naming the field for a wrong type, range, key set or version, and
    naming every fingerprint field that differs with both values.
    """
    if not isinstance(state, dict):
        raise ValueError(f"dataset state must be a dict (got {type(state).__name__})")
    if "version" not in state:
        raise ValueError("state field 'version' is missing")
    version = state["version"]
    if type(version) is not int or version != STATE_VERSION:
        raise ValueError(f"state field 'version': {version!r:.100} is not a version this "
                         f"torch_rlds reads (expected {STATE_VERSION})")
    _check_keys(state, {"version", "fingerprint", *CURSOR_FIELDS}, "dataset state",
                optional=_ADDED_CURSOR_FIELDS)
    _check_fingerprint(state["fingerprint"], FINGERPRINT_FIELDS, expected)
    values = {field: _check_int(state[field], field, limit=MAX_COUNT) for field in CURSOR_FIELDS
              if field in state}
    return Cursor(**values)


# -- the global order's state ------------------------------------------------------------------
# The global order's position does not depend on the hosts or workers that reached it, so its
# fingerprint names none of them: a state loads under any other topology.
GLOBAL_STATE_VERSION = 2
GLOBAL_FINGERPRINT_FIELDS: dict[str, type] = {
    "dataset": str,
    "dataset_version": str,
    "split": str,
    "num_episodes": int,
    "num_steps": int,
    "seed": int,
    "shuffle": int,
    "obs_window": int,
    "action_horizon": int,
    "recipe": str,
}
GLOBAL_CURSOR_FIELDS = ("start", "batch_size", "done", "skipped")


@dataclasses.dataclass(frozen=True)
class GlobalCursor:
    """Where a reader of the global order stands.

    The stream it reads starts at stream position ``start`` and is cut into global batches of
    ``batch_size`` samples; ``done`` is the host batch after the last one this reader handed
    out (0: none yet), so the loader's position is ``start + done * batch_size`` for the reader
    that handed out the last batch. ``skipped`` counts the samples this reader replaced because
    their episode was corrupt (``on_corrupt="skip"``).
    """

    start: int = 0
    batch_size: int = 1
    done: int = 0
    skipped: int = 0

    @property
    def position(self) -> int:
        """The stream position after this reader's last batch."""
        return self.start + self.done * self.batch_size


def make_global_state(fingerprint: dict[str, Any], cursor: GlobalCursor) -> dict[str, Any]:
    """The JSON-serialisable state of a reader of the global order."""
    return {"version": GLOBAL_STATE_VERSION, "order": "global", "fingerprint": dict(fingerprint),
            **dataclasses.asdict(cursor)}


def is_global_state(state: Any) -> bool:
    """Whether ``state`` claims to be a global-order dataset state (it is checked on load)."""
    return isinstance(state, dict) and state.get("order") == "global"


def load_global_cursor(state: Any, expected: dict[str, Any]) -> GlobalCursor:
    """Validate a global-order ``state`` against the dataset's fingerprint and return its
    cursor; raises ``ValueError`` naming the field, or every fingerprint field that differs
    with both values."""
    if not isinstance(state, dict):
        raise ValueError(f"dataset state must be a dict (got {type(state).__name__})")
    version = state.get("version")
    if type(version) is not int or version != GLOBAL_STATE_VERSION or not is_global_state(state):
        raise ValueError(f"state of version {version!r:.100} and order "
                         f"{state.get('order')!r:.100} is not one of the global order "
                         f"(expected version {GLOBAL_STATE_VERSION}, order 'global'): a state "
                         "saved under the window order resumes only under it")
    _check_keys(state, {"version", "order", "fingerprint", *GLOBAL_CURSOR_FIELDS},
                "dataset state")
    _check_fingerprint(state["fingerprint"], GLOBAL_FINGERPRINT_FIELDS, expected)
    values = {field: _check_int(state[field], field, limit=MAX_COUNT)
              for field in GLOBAL_CURSOR_FIELDS}
    if values["batch_size"] < 1:
        raise ValueError(f"state field 'batch_size' must be >= 1 (got {values['batch_size']})")
    cursor = GlobalCursor(**values)
    if cursor.position > MAX_COUNT:
        raise ValueError(f"state fields 'start' + 'done' * 'batch_size' = {cursor.position}: "
                         "past 2**62 samples")
    return cursor


# -- a mixture's in the global order -------------------------------------------------------------
MIXTURE_ORDER = "global-mixture"
MIXTURE_CURSOR_FIELDS = ("start", "batch_size", "done", "skipped")
_MAX_DATASETS = 4096


@dataclasses.dataclass(frozen=True)
class MixtureCursor:
    """Where a reader of a mixture in the global order stands: as :class:`GlobalCursor`, with
    ``counts[d]``, the samples drawn from dataset ``d`` before its :attr:`position`."""

    start: int = 0
    batch_size: int = 1
    done: int = 0
    counts: tuple[int, ...] = ()
    skipped: int = 0

    @property
    def position(self) -> int:
        """The stream position after this reader's last batch."""
        return self.start + self.done * self.batch_size


def make_mixture_state(fingerprint: dict[str, Any], cursor: MixtureCursor,
                       weights: Any) -> dict[str, Any]:
    """The JSON-serialisable state of a reader of a mixture in the global order (``weights``
    are recorded for reference; they may change on restore)."""
    return {"version": GLOBAL_STATE_VERSION, "order": MIXTURE_ORDER,
            "fingerprint": fingerprint, "start": cursor.start, "batch_size": cursor.batch_size,
            "done": cursor.done, "counts": list(cursor.counts), "skipped": cursor.skipped,
            "weights": [repr(float(w)) for w in weights]}


def load_mixture_cursor(state: Any, expected: dict[str, Any]) -> MixtureCursor:
    """Validate a mixture state against the mixture's fingerprint (its seed, dataset count and
    each dataset's own fingerprint) and return its cursor; raises ``ValueError`` naming the
    field."""
    if not isinstance(state, dict):
        raise ValueError(f"mixture state must be a dict (got {type(state).__name__})")
    version, order = state.get("version"), state.get("order")
    if type(version) is not int or version != GLOBAL_STATE_VERSION or order != MIXTURE_ORDER:
        raise ValueError(f"state of version {version!r:.100} and order {order!r:.100} is not "
                         f"one of a mixture in the global order (expected version "
                         f"{GLOBAL_STATE_VERSION}, order {MIXTURE_ORDER!r})")
    _check_keys(state, {"version", "order", "fingerprint", "counts", "weights",
                        *MIXTURE_CURSOR_FIELDS}, "mixture state")
    fingerprint = state["fingerprint"]
    _check_keys(fingerprint, {"num_datasets", "seed", "datasets"}, "state field 'fingerprint'")
    for field in ("num_datasets", "seed"):
        _check_int(fingerprint[field], f"fingerprint.{field}")
        if fingerprint[field] != expected[field]:
            raise ValueError(f"state belongs to another mixture: {field} in checkpoint: "
                             f"{fingerprint[field]} / in this mixture: {expected[field]}")
    n = expected["num_datasets"]
    datasets, counts = fingerprint["datasets"], state["counts"]
    if not isinstance(datasets, list) or len(datasets) != n:
        raise ValueError(f"state field 'fingerprint.datasets' must be a list of {n} "
                         "fingerprints")
    for i, (saved, mine) in enumerate(zip(datasets, expected["datasets"])):
        try:
            _check_fingerprint(saved, GLOBAL_FINGERPRINT_FIELDS, mine)
        except ValueError as e:
            raise ValueError(f"mixture dataset {i}: {e}") from None
    if not isinstance(counts, list) or len(counts) != n or n > _MAX_DATASETS:
        raise ValueError(f"state field 'counts' must be a list of {n} counts")
    counts = tuple(_check_int(c, f"counts[{i}]", limit=MAX_COUNT) for i, c in enumerate(counts))
    weights = state["weights"]
    if not isinstance(weights, list) or len(weights) != n or not all(
            isinstance(w, str) and len(w) < 40 for w in weights):
        raise ValueError(f"state field 'weights' must be a list of {n} numbers as strings")
    values = {field: _check_int(state[field], field, limit=MAX_COUNT)
              for field in MIXTURE_CURSOR_FIELDS}
    if values["batch_size"] < 1:
        raise ValueError(f"state field 'batch_size' must be >= 1 (got {values['batch_size']})")
    cursor = MixtureCursor(counts=counts, **values)
    if cursor.position > MAX_COUNT or sum(counts) != cursor.position:
        raise ValueError(f"state fields 'counts' (sum {sum(counts)}) and the position "
                         f"{cursor.position} do not agree: every sample before the position "
                         "was drawn from one dataset")
    return cursor


# -- the DataLoader's state ---------------------------------------------------------------------
# The layout of a StatefulDataLoader state is torchdata's (its keys: torch_rlds._torchdata).
LOADER_STATE_KEY = "torch_rlds"
LOADER_STATE_VERSION = 1
_SAMPLER_FIELDS = (INDEX_SAMPLER_STATE, SAMPLER_ITER_STATE)
# Field kinds: "count" grows with the run (at most MAX_COUNT), "seed" is any int of the format,
# a trailing "?" allows None.
_COMMON_MAIN_FIELDS = {SAMPLER_ITER_YIELDED: "count", ITERABLE_LEN_CALLED: "count?",
                       SHARED_SEED: "seed?", **dict.fromkeys(_SAMPLER_FIELDS, "sampler")}
_SINGLE_FIELDS = {**_COMMON_MAIN_FIELDS, NUM_YIELDED: "count", FETCHER_STATE: "fetcher",
                  DATASET_STATE: "dataset", ITERATOR_FINISHED: "bool"}
_MULTI_FIELDS = {SNAPSHOT: "snapshot", STEPS_SINCE_SNAPSHOT: "count",
                 ITERATOR_FINISHED: "bool"}
_SNAPSHOT_FIELDS = {SNAPSHOT_STEP: "count", LAST_YIELDED_WORKER_ID: "seed",
                    MAIN_SNAPSHOT: "main", WORKER_SNAPSHOTS: "workers"}
_MAIN_FIELDS = {NUM_WORKERS: "seed", BASE_SEED: "seed", **_COMMON_MAIN_FIELDS}
_WORKER_FIELDS = {WORKER_ID: "seed", DATASET_STATE: "dataset", FETCHER_STATE: "fetcher"}
_FETCHER_FIELDS = {DATASET_ITER_STATE: "iter", FETCHER_ENDED: "bool"}
# What an RLDSDataset's loader saves as its sampler states: none (batch_size=None), or the
# count of torchdata's batch sampler over torch's infinite constant sampler.
_RLDS_SAMPLER_FIELDS = {SAMPLES_YIELDED: "count"}


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """What :func:`check_loader_state` found in a DataLoader state.

    Attributes:
      batches_seen: the ``torch_rlds`` entry's count, ``None`` in a plain ``StatefulDataLoader``
        state.
      datasets: the dataset states, one per worker in worker order (one without workers).
      ended: per worker (or the one fetcher), whether its iterator had ended.
      multi: whether it was saved with workers.
    """

    batches_seen: int | None
    datasets: list[Any]
    ended: list[bool]
    multi: bool = False

    @property
    def num_workers(self) -> int:
        """The worker count the state was saved with (0: none)."""
        return len(self.datasets) if self.multi else 0


def saved_num_workers(state: dict[str, Any]) -> int:
    """The ``num_workers`` of the ``StatefulDataLoader`` that saved ``state``; raises
    ``ValueError`` when ``state`` has neither layout."""
    if SNAPSHOT in state:
        try:
            workers = state[SNAPSHOT][MAIN_SNAPSHOT][NUM_WORKERS]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"loader state: {SNAPSHOT!r} has no {MAIN_SNAPSHOT}.{NUM_WORKERS} "
                             "(not a StatefulDataLoader state)") from None
        if type(workers) is not int or workers < 1:
            raise ValueError(f"loader state field '{SNAPSHOT}.{MAIN_SNAPSHOT}.{NUM_WORKERS}' "
                             f"must be an int >= 1 (got {workers!r:.100})")
        return workers
    if NUM_YIELDED in state:
        return 0
    raise ValueError(f"loader state has neither {SNAPSHOT!r} (with workers) nor "
                     f"{NUM_YIELDED!r} (without): not a StatefulDataLoader state (keys: "
                     f"{sorted(map(str, state))[:10]})")


def check_loader_state(state: Any, *, num_workers: int | None, rlds: bool) -> LoaderState:
    """Check the structure of a whole DataLoader state before torchdata reads it.

    ``state`` must have the layout torchdata saves for ``num_workers`` (``None``: for the
    worker count it was saved with, see :attr:`LoaderState.num_workers`): every key torchdata
    reads present, counters ints in [0, 2**62], seeds in [0, 2**63 - 1], flags bools, worker
    ids in range. Keys torchdata does not read are accepted in its parts, as torchdata itself
    accepts them (a state of another torchdata version, or one a caller annotated); the
    ``torch_rlds`` entry is checked exactly. With ``rlds`` (the dataset is a torch_rlds one)
    the sampler and iterator states must also be what such a loader saves; otherwise they are
    the dataset's business and pass as they are. The dataset states are not checked here (each
    torch_rlds dataset checks its own, exactly). The batches since the last snapshot, which
    torchdata replays on load, may be more than this loader's ``snapshot_every_n_steps`` (the
    saving loader's interval counts, or an out-of-order loader's lag), but not more than the
    state's ``batches_seen`` says were handed out.

    Raises ``ValueError`` naming the field and the value found.
    """
    if not isinstance(state, dict):
        raise ValueError(f"loader state must be a dict (got {type(state).__name__})")
    state = dict(state)
    batches_seen = None
    if LOADER_STATE_KEY in state:
        batches_seen = _check_ours(state.pop(LOADER_STATE_KEY))
    saved = saved_num_workers(state)
    if num_workers is None:
        num_workers = saved  # a state of any worker count (the global order's)
    elif saved != num_workers:
        raise ValueError(f"num_workers in checkpoint: {saved} / in this loader: {num_workers}")
    checker = _LoaderStateChecker(num_workers, rlds)
    if num_workers == 0:
        checker.check(state, _SINGLE_FIELDS, "")
        return LoaderState(batches_seen, [state[DATASET_STATE]], [_ended(state[FETCHER_STATE])])
    checker.check(state, _MULTI_FIELDS, "")
    steps = state[STEPS_SINCE_SNAPSHOT]
    if batches_seen is not None and steps > batches_seen:
        # torchdata replays these on load: never more than were handed out
        raise ValueError(f"loader state field {STEPS_SINCE_SNAPSHOT!r}: {steps} batches to "
                         f"replay, but 'batches_seen' says {batches_seen} were handed out")
    workers = state[SNAPSHOT][WORKER_SNAPSHOTS]
    snapshots = [workers[worker_key(i)] for i in range(num_workers)]
    return LoaderState(batches_seen, [w[DATASET_STATE] for w in snapshots],
                       [_ended(w[FETCHER_STATE]) for w in snapshots], multi=True)


def _ended(fetcher: Any) -> bool:
    return isinstance(fetcher, dict) and fetcher.get(FETCHER_ENDED) is True


def _check_ours(ours: Any) -> int:
    where = f"loader state field {LOADER_STATE_KEY!r}"
    if not isinstance(ours, dict):
        raise ValueError(f"{where} must be a dict (got {type(ours).__name__})")
    version = ours.get("version")
    if type(version) is not int or version != LOADER_STATE_VERSION:
        raise ValueError(f"{where}: expected version {LOADER_STATE_VERSION}, got "
                         f"{ours!r:.200}")
    _check_keys(ours, {"version", "batches_seen"}, where)
    return _check_int(ours["batches_seen"], "batches_seen", "loader state field", MAX_COUNT)


class _LoaderStateChecker:
    """Walks a StatefulDataLoader state against the field kinds above."""

    def __init__(self, num_workers: int, rlds: bool) -> None:
        self.num_workers = num_workers
        self.rlds = rlds

    def check(self, obj: Any, fields: dict[str, str], prefix: str, *,
              exact: bool = False) -> None:
        where = f"loader state field {prefix[:-1]!r}" if prefix else "loader state"
        _check_keys(obj, set(fields), where, extra_ok=not exact)
        for name, kind in fields.items():
            getattr(self, f"_{kind.rstrip('?')}")(obj[name], f"{prefix}{name}",
                                                   kind.endswith("?"))

    def _fail(self, field: str, expected: str, value: Any) -> None:
        raise ValueError(f"loader state field {field!r} must be {expected} (got "
                         f"{type(value).__name__} {value!r:.100})")

    def _count(self, value: Any, field: str, optional: bool) -> None:
        if value is None and optional:
            return
        _check_int(value, field, "loader state field", MAX_COUNT)

    def _seed(self, value: Any, field: str, optional: bool) -> None:
        if value is None and optional:
            return
        _check_int(value, field, "loader state field")

    def _bool(self, value: Any, field: str, optional: bool) -> None:
        if type(value) is not bool:
            self._fail(field, "a bool", value)

    def _dataset(self, value: Any, field: str, optional: bool) -> None:
        pass  # checked by the dataset itself, which knows its fingerprint

    def _sampler(self, value: Any, field: str, optional: bool) -> None:
        if not self.rlds or value is None:
            return
        if field.endswith(INDEX_SAMPLER_STATE):
            self._fail(field, "None for a torch_rlds dataset", value)
        self.check(value, _RLDS_SAMPLER_FIELDS, f"{field}.")

    def _iter(self, value: Any, field: str, optional: bool) -> None:
        if self.rlds and value is not None:
            self._fail(field, "None for a torch_rlds dataset (its iterator keeps no state)",
                       value)

    def _fetcher(self, value: Any, field: str, optional: bool) -> None:
        if value is None and not self.rlds:
            return  # a map-style dataset's fetcher keeps no state
        self.check(value, _FETCHER_FIELDS, f"{field}.")

    def _snapshot(self, value: Any, field: str, optional: bool) -> None:
        self.check(value, _SNAPSHOT_FIELDS, f"{field}.")
        last = value[LAST_YIELDED_WORKER_ID]
        if last >= self.num_workers:
            raise ValueError(f"loader state field '{field}.{LAST_YIELDED_WORKER_ID}' must be in "
                             f"[0, {self.num_workers - 1}] (got {last})")

    def _main(self, value: Any, field: str, optional: bool) -> None:
        self.check(value, _MAIN_FIELDS, f"{field}.")

    def _workers(self, value: Any, field: str, optional: bool) -> None:
        # Worker ids, not fields: torchdata refuses any other set of them.
        self.check(value, {worker_key(i): "worker" for i in range(self.num_workers)},
                   f"{field}.", exact=True)

    def _worker(self, value: Any, field: str, optional: bool) -> None:
        self.check(value, _WORKER_FIELDS, f"{field}.")
        expected = int(field.rsplit("_", 1)[1])
        if value[WORKER_ID] != expected:
            raise ValueError(f"loader state field '{field}.{WORKER_ID}' must be {expected} (got "
                             f"{value[WORKER_ID]})")
