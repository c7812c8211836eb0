"""The filters: which episodes a recipe keeps, and which of their steps may be sampled (see
:mod:`torch_rlds.trajectory`).

An episode filter is ``Trajectory -> bool``; a sample filter is ``Trajectory -> bool[T]``, one
flag per step of the (transformed) trajectory. Both are pure functions of the trajectory's
numbers, text and metadata: no image is decoded, so their verdicts can be computed once and
cached with the dataset's index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import string
from typing import Any

import numpy as np

from torch_rlds._features import text_value
from torch_rlds._rules import Rule, choice_rule, field, int_rule, nullable
from torch_rlds._trajectory_base import (
    ACTION,
    DIMS,
    KEY,
    LANGUAGE,
    NUMBER,
    Entry,
    Trajectory,
    TrajectoryError,
    flat,
    resolve_dims,
)
from torch_rlds._trajectory_ops import Call

# A ranges file is a JSON object of at most this many bytes (openpi's DROID file is ~60 MB).
MAX_RANGES_BYTES = 1 << 30


def _is_metadata_key(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith("/")
            and not value.endswith("/") and not value.startswith("episode_metadata/"))


METADATA_KEY = Rule("a path under episode_metadata (e.g. 'file_path'; drop "
                    "'episode_metadata/')", _is_metadata_key)


def _is_pattern(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def metadata_text(traj: Trajectory, key: str, where: str) -> str:
    """The metadata value ``key`` as text (bytes decoded as UTF-8, numbers written out)."""
    if key not in traj.metadata:
        raise TrajectoryError(f"{where}: the episode has no metadata {key!r} (it has "
                              f"{sorted(traj.metadata)})")
    value = traj.metadata[key]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return text_value(value, f"{where}: metadata {key!r}")
    if isinstance(value, (str, int, float, bool, np.generic)):
        return str(value)
    raise TrajectoryError(f"{where}: metadata {key!r} is a {type(value).__name__}, not text "
                          "or a number")


# -- episode filters ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MetadataMatch(Entry):
    """Keep episodes whose metadata ``key`` contains a match of the regular expression
    ``pattern`` (``re.search``; anchor it with ``^...$`` for a full match). openpi keeps the
    DROID episodes whose ``file_path`` matches ``.*success.*``. ``negate`` keeps the others."""

    op = "metadata_match"
    key: str = field("file_path", METADATA_KEY, "the metadata value")
    pattern: str = field("", Rule("a non-empty regular expression", _is_pattern),
                         "what it must contain")
    negate: bool = field(False, Rule("true or false", lambda v: type(v) is bool),
                         "keep the episodes that do not match instead")

    def __call__(self, traj: Trajectory) -> bool:
        found = re.search(self.pattern, metadata_text(traj, self.key, self.op)) is not None
        return found != self.negate


@dataclasses.dataclass(frozen=True)
class MinLength(Entry):
    """Keep episodes of at least ``steps`` steps (after the trajectory transforms)."""

    op = "min_length"
    steps: int = field(1, int_rule(1), "the fewest steps kept")

    def __call__(self, traj: Trajectory) -> bool:
        return traj.num_steps >= self.steps


@dataclasses.dataclass(frozen=True)
class HasLanguage(Entry):
    """Keep episodes where text ``key`` is not empty at some step (Octo's
    ``skip_unlabeled``). A trajectory without that text at all is an error, not a skip."""

    op = "has_language"
    key: str = field(LANGUAGE, KEY, "the text name")

    def reads_text(self) -> tuple[str, ...]:
        return (self.key,)

    def __call__(self, traj: Trajectory) -> bool:
        return any(s != "" for s in traj.text_value(self.key, self.op))


@dataclasses.dataclass(frozen=True)
class MaxAbs(Entry):
    """Keep episodes where every value of numeric ``key`` is at most ``limit`` in absolute
    value (Octo's ``max_action`` and ``max_proprio``)."""

    op = "max_abs"
    key: str = field(ACTION, KEY, "the numeric name")
    limit: float = field(1.0, NUMBER, "the largest absolute value kept")

    def reads(self) -> tuple[str, ...]:
        return (self.key,)

    def __call__(self, traj: Trajectory) -> bool:
        value = traj.numeric_value(self.key, self.op)
        return bool(np.all(np.abs(value) <= self.limit))


# -- sample filters -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IdleChunk(Entry):
    """Drop the steps whose action chunk does not move in its first half: openpi's DROID
    idle filter.

    The chunk of step ``t`` is ``key[min(t + i, T - 1)]`` for ``i < horizon`` (the last action
    repeated past the end, as openpi chunks); only its first ``horizon // 2`` rows count. With
    ``mode: position`` (absolute joint positions) a step is kept when some dimension of those
    rows differs from row 0 by more than ``threshold``; with ``mode: velocity`` when some
    value exceeds ``threshold`` in absolute value. Strict comparisons, every dimension (or
    those of ``dims``), in the actions' dtype. ``horizon: null`` is the config's
    ``data.action_horizon``.
    """

    op = "idle_chunk"
    horizon: int | None = field(None, nullable(int_rule(2)), "the action chunk length")
    threshold: float = field(1e-3, NUMBER, "movement above this counts")
    mode: str = field("position", choice_rule(("position", "velocity")),
                      "what the actions are")
    key: str = field(ACTION, KEY, "the numeric name")
    dims: Any = field(None, nullable(DIMS), "dimensions compared (null: all)")

    def reads(self) -> tuple[str, ...]:
        return (self.key,)

    def with_horizon(self, horizon: int | None) -> IdleChunk:
        """This filter with ``horizon`` filled in when it is ``null``."""
        if self.horizon is not None:
            return self
        if horizon is None:
            raise TrajectoryError(f"{self.op}: horizon is null and no action_horizon was given")
        return dataclasses.replace(self, horizon=horizon)

    def __call__(self, traj: Trajectory) -> np.ndarray:
        if self.horizon is None:
            raise TrajectoryError(f"{self.op}: horizon is null; build the filters with the "
                                  "config's action_horizon")
        actions = flat(traj.numeric_value(self.key, self.op))
        n = len(actions)
        if n == 0:
            return np.zeros(0, bool)
        if self.dims is not None:
            actions = actions[:, resolve_dims(self.dims, actions.shape[1], f"{self.op}.dims")]
        rows = np.minimum(np.arange(n)[:, None] + np.arange(self.horizon // 2), n - 1)
        chunk = actions[rows]  # [T, horizon // 2, A]
        if self.mode == "position":
            chunk = chunk - chunk[:, :1]
        threshold = np.asarray(self.threshold, actions.dtype)
        return np.any(np.abs(chunk) > threshold, axis=(1, 2))


def _is_template(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError:
        return False
    return bool(fields) and all(_is_metadata_key(f) for f in fields)


@dataclasses.dataclass(frozen=True)
class StepRanges(Entry):
    """Keep the steps listed in a JSON file of ranges per episode: openpi's current DROID
    filter (``droid_sample_ranges_v1_0_1.json``).

    The file maps an episode key to ``[[start, end], ...]``; a step is kept when its dataset
    step index (``Trajectory.frame_steps``) lies in some ``[start, end)``. The key of an
    episode is ``key`` with ``{name}`` replaced by its metadata (openpi:
    ``{recording_folderpath}--{file_path}``); an episode the file does not list keeps no step,
    as openpi's table does. The file is read when the filters are built.
    """

    op = "step_ranges"
    path: str = field("", Rule("a path to a JSON file", lambda v: isinstance(v, str)
                               and bool(v)), "the ranges file")
    key: str = field("{recording_folderpath}--{file_path}",
                     Rule("a template naming metadata paths in braces", _is_template),
                     "how an episode's key is made from its metadata")

    def fields(self) -> tuple[str, ...]:
        """The metadata paths the key template uses."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.key) if f)

    def bind(self) -> BoundStepRanges:
        """The filter with its file read."""
        ranges, digest = read_ranges(self.path)
        return BoundStepRanges(self.key, self.fields(), ranges, digest)


@dataclasses.dataclass(frozen=True)
class BoundStepRanges:
    """A :class:`StepRanges` with its file read: episode key -> int64 ``[k, 2]`` ranges."""

    key: str
    fields: tuple[str, ...]
    ranges: dict[str, np.ndarray]
    digest: str

    def episode_key(self, traj: Trajectory) -> str:
        """The key of ``traj`` in the ranges file."""
        values = {f: metadata_text(traj, f, StepRanges.op) for f in self.fields}
        return self.key.format(**values)

    def __call__(self, traj: Trajectory) -> np.ndarray:
        ranges = self.ranges.get(self.episode_key(traj))
        if ranges is None or traj.num_steps == 0:
            return np.zeros(traj.num_steps, bool)
        steps = traj.frame_steps[:, None]
        return np.any((steps >= ranges[:, 0]) & (steps < ranges[:, 1]), axis=1)


def read_ranges(path: str) -> tuple[dict[str, np.ndarray], str]:
    """The ranges file at ``path`` (see :class:`StepRanges`) and the SHA-256 of its bytes."""
    from torch_rlds._files import SpecialFileError, read_regular
    from torch_rlds._state_file import loads_strict

    try:
        data = read_regular(os.fspath(path), MAX_RANGES_BYTES)
    except (OSError, SpecialFileError) as e:
        raise TrajectoryError(f"{StepRanges.op}: cannot read {path} ({e})") from None
    if data is None:
        raise TrajectoryError(f"{StepRanges.op}: {path} is larger than {MAX_RANGES_BYTES} "
                              "bytes")
    try:
        raw = loads_strict(data)
    except ValueError as e:
        raise TrajectoryError(f"{StepRanges.op}: {path} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise TrajectoryError(f"{StepRanges.op}: {path} must hold an object of episode key -> "
                              f"[[start, end], ...] (got a {type(raw).__name__})")
    ranges = {}
    for key, value in raw.items():
        ok = isinstance(value, list) and all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int and v >= 0 for v in r)
            and r[0] <= r[1] for r in value)
        if not ok:
            raise TrajectoryError(f"{StepRanges.op}: {path}: episode {key[:200]!r} must map to "
                                  f"a list of [start, end] with 0 <= start <= end (got "
                                  f"{str(value)[:200]})")
        ranges[key] = np.asarray(value, dtype=np.int64).reshape(-1, 2)
    return ranges, hashlib.sha256(data).hexdigest()


EPISODE_FILTERS: dict[str, type[Entry]] = {cls.op: cls for cls in (
    MetadataMatch, MinLength, HasLanguage, MaxAbs, Call)}
SAMPLE_FILTERS: dict[str, type[Entry]] = {cls.op: cls for cls in (
    IdleChunk, StepRanges, Call)}
