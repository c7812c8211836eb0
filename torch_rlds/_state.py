"""The dataset state: its schema, and the checks that make an untrusted state safe to load.

A state is a flat-ish JSON object of ints and strings::

    {"version": 1,
     "fingerprint": {"dataset": "bridge", "dataset_version": "0.1.0", "split": "train", ...},
     "epoch": 3, "window": 12, "position": 517}

It never holds data, so its size is fixed (a few hundred bytes) whatever the dataset, the
shuffle window or the step count (ints are at most 19 digits). Loading checks every field's type and range and compares the
fingerprint field by field; nothing in it is ever evaluated, unpickled or used as a path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

STATE_VERSION = 1
MAX_INT = 2**63 - 1
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
CURSOR_FIELDS = ("epoch", "window", "position")


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a reader stands: the next step to emit is ``position`` of ``window`` of ``epoch``.

    Every window before ``window`` and the first ``position`` steps of ``window`` (in the order
    of :func:`torch_rlds._order.window_steps`) are consumed. ``window`` equal to the reader's
    window count means the whole epoch is consumed (where a one-pass dataset stops).
    """

    epoch: int = 0
    window: int = 0
    position: int = 0


def make_state(fingerprint: dict[str, Any], cursor: Cursor) -> dict[str, Any]:
    """The JSON-serialisable state of a reader."""
    return {"version": STATE_VERSION, "fingerprint": dict(fingerprint),
            **dataclasses.asdict(cursor)}


def _check_int(value: Any, field: str) -> int:
    if type(value) is not int:  # bool is an int subclass and must not pass
        raise ValueError(f"state field {field!r} must be an int (got {type(value).__name__} "
                         f"{value!r})")
    if not 0 <= value <= MAX_INT:
        raise ValueError(f"state field {field!r} must be in [0, 2**63 - 1] (got {value})")
    return value


def _check_str(value: Any, field: str) -> str:
    if type(value) is not str:
        raise ValueError(f"state field {field!r} must be a string (got {type(value).__name__} "
                         f"{value!r:.100})")
    if len(value) > MAX_STRING:
        raise ValueError(f"state field {field!r} is {len(value)} characters long (at most "
                         f"{MAX_STRING})")
    return value


def _check_keys(obj: Any, expected: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict (got {type(obj).__name__})")
    missing = sorted(expected - obj.keys())
    extra = sorted(str(k) for k in obj.keys() - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing fields {missing}")
        if extra:
            parts.append(f"unknown fields {extra}")
        raise ValueError(f"{where}: " + "; ".join(parts))


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
        raise ValueError(f"state field 'version': {version!r} is not a version this torch_rlds "
                         f"reads (expected {STATE_VERSION})")
    _check_keys(state, {"version", "fingerprint", *CURSOR_FIELDS}, "dataset state")
    fingerprint = state["fingerprint"]
    _check_keys(fingerprint, set(FINGERPRINT_FIELDS), "state field 'fingerprint'")
    for field, kind in FINGERPRINT_FIELDS.items():
        check = _check_int if kind is int else _check_str
        check(fingerprint[field], f"fingerprint.{field}")
    differ = [f"{field} in checkpoint: {fingerprint[field]!r} / in this dataset: "
              f"{expected[field]!r}"
              for field in FINGERPRINT_FIELDS if fingerprint[field] != expected[field]]
    if differ:
        raise ValueError("state belongs to another dataset or configuration: "
                         + "; ".join(differ))
    values = {field: _check_int(state[field], field) for field in CURSOR_FIELDS}
    return Cursor(**values)
