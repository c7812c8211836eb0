"""The trajectory transforms: what a recipe does to an episode's numbers and text before its
steps are sampled (see :mod:`torch_rlds.trajectory`).

Each is a frozen dataclass and a pure function ``Trajectory -> Trajectory``; none touches
pixels (a camera choice only changes which image feature a role reads). Arithmetic stays in
the dtype of the values (float32 after a key map), so results match a float32 tf.data
pipeline bit for bit where the operations are the same.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from torch_rlds._rules import Rule, choice_rule, field, int_rule, nullable
from torch_rlds._trajectory_base import (
    ACTION,
    DIM,
    DIMS,
    KEY,
    KEYS,
    KWARGS,
    LANGUAGE,
    NUMBER,
    STATE,
    TEXT_VALUE,
    Entry,
    Trajectory,
    TrajectoryError,
    flat,
    registered,
    resolve_dims,
    tag,
)

_PART = re.compile(r"^(?P<key>[^\[\]]+?)(?:\[(?P<dims>[^\[\]]*)\])?$")
_CAMERA_TAG = 0x43414D31
_INSTRUCTION_TAG = 0x494E5331


def _column_update(traj: Trajectory, key: str, dims: Any, where: str, fn) -> Trajectory:
    """``numeric[key]`` with ``fn`` applied to the selected dimensions (of its flat form)."""
    value = traj.numeric_value(key, where)
    out = flat(value).copy()
    rows = resolve_dims(dims, out.shape[1], where)
    out[:, rows] = fn(out[:, rows])
    return traj.replace(numeric={**traj.numeric, key: out.reshape(value.shape)})


class _ColumnEntry(Entry):
    """An entry that rewrites some dimensions of one numeric feature, ``self.key``."""

    key: str  # each subclass's dataclass field

    def reads(self) -> tuple[str, ...]:
        return (self.key,)

    def writes(self) -> tuple[str, ...]:
        return (self.key,)


@dataclasses.dataclass(frozen=True)
class RelabelActions(Entry):
    """Actions from state deltas, as Octo relabels bridge: ``action[t, action_dims] =
    state[t + 1, dims] - state[t, dims]``; the other action dimensions keep their values.

    The last step has no next state: ``last: drop`` removes it from the trajectory (every
    feature, and its frame; Octo's ``relabel_actions``), ``last: repeat`` keeps it with the
    previous step's delta (zero for a one-step episode). Computed in the state's dtype.
    """

    op = "relabel_actions"
    state: str = field(STATE, KEY, "the numeric feature whose deltas become actions")
    dims: Any = field("0:6", DIMS, "state dimensions to difference")
    action_dims: Any = field(None, nullable(DIMS), "action dimensions they replace (null: the "
                                                   "same positions as dims)")
    last: str = field("drop", choice_rule(("drop", "repeat")), "what the last step gets")

    def reads(self) -> tuple[str, ...]:
        return (self.state, ACTION)

    def writes(self) -> tuple[str, ...]:
        return (ACTION,)

    def __call__(self, traj: Trajectory) -> Trajectory:
        where = self.op
        state = flat(traj.numeric_value(self.state, where))
        action = flat(traj.numeric_value(ACTION, where)).copy()
        src = resolve_dims(self.dims, state.shape[1], f"{where}.dims")
        dst = resolve_dims(self.dims if self.action_dims is None else self.action_dims,
                           action.shape[1], f"{where}.action_dims")
        if len(src) != len(dst):
            raise TrajectoryError(f"{where}: dims select {len(src)} state dimensions, "
                                  f"action_dims {len(dst)} action dimensions")
        n = traj.num_steps
        if n == 0:
            return traj
        delta = (state[1:, src] - state[:-1, src]).astype(action.dtype)
        if self.last == "drop":
            kept = traj.take(np.arange(n - 1))
            action = action[:-1]
            action[:, dst] = delta
            return kept.replace(numeric={**kept.numeric, ACTION: action})
        action[:-1, dst] = delta
        action[-1, dst] = delta[-1] if n > 1 else 0
        return traj.replace(numeric={**traj.numeric, ACTION: action})


@dataclasses.dataclass(frozen=True)
class BinarizeGripper(_ColumnEntry):
    """A continuous gripper dimension made 0 or 1, as Octo binarises bridge's: values above
    ``open`` are 1, below ``closed`` are 0, and each value in between takes the value of the
    next step that is outside; in-between values at the end of the episode, with no such
    step, all take the episode's last (raw) value."""

    op = "binarize_gripper"
    key: str = field(ACTION, KEY, "the numeric feature")
    dim: int = field(-1, DIM, "the gripper dimension")
    open: float = field(0.95, NUMBER, "values above this are open (1)")
    closed: float = field(0.05, NUMBER, "values below this are closed (0)")

    def __call__(self, traj: Trajectory) -> Trajectory:
        def binarize(x: np.ndarray) -> np.ndarray:
            x = x[:, 0]
            n = len(x)
            if n == 0:
                return x[:, None]
            is_open, is_closed = x > self.open, x < self.closed
            decided = is_open | is_closed
            # For each step, the first decided step at or after it (n where there is none).
            index = np.where(decided, np.arange(n), n)
            following = np.minimum.accumulate(index[::-1])[::-1]
            out = np.where(following < n, is_open[np.minimum(following, n - 1)], x[-1])
            return out.astype(x.dtype)[:, None]

        return _column_update(traj, self.key, (self.dim,), self.op, binarize)


@dataclasses.dataclass(frozen=True)
class AbsoluteGripper(_ColumnEntry):
    """A relative gripper command (``> threshold``: close, ``< -threshold``: open, else no
    change) made absolute (1 open, 0 closed), as Octo's ``rel2abs_gripper_actions`` does for
    RT-1-style datasets: each step holds the last command given, and steps before the first
    command hold the opposite of it (open when the episode gives none)."""

    op = "absolute_gripper"
    key: str = field(ACTION, KEY, "the numeric feature")
    dim: int = field(-1, DIM, "the gripper dimension")
    threshold: float = field(0.1, NUMBER, "the dead band around zero")

    def __call__(self, traj: Trajectory) -> Trajectory:
        def absolute(x: np.ndarray) -> np.ndarray:
            x = x[:, 0]
            command = np.where(x < -self.threshold, 1, np.where(x > self.threshold, -1, 0))
            given = np.flatnonzero(command)
            start = -command[given[0]] if len(given) else 1
            # Forward-fill the last command given, starting from ``start``.
            last = np.maximum.accumulate(np.where(command != 0, np.arange(len(x)), -1))
            state = np.where(last >= 0, command[np.maximum(last, 0)], start)
            return (state.astype(np.float32) / 2 + 0.5).astype(x.dtype)[:, None]

        return _column_update(traj, self.key, (self.dim,), self.op, absolute)


@dataclasses.dataclass(frozen=True)
class InvertGripper(_ColumnEntry):
    """``1 - x`` on the selected dimensions (Octo's ``invert_gripper_actions``)."""

    op = "invert_gripper"
    key: str = field(ACTION, KEY, "the numeric feature")
    dims: Any = field("-1:", DIMS, "the dimensions to invert")

    def __call__(self, traj: Trajectory) -> Trajectory:
        return _column_update(traj, self.key, self.dims, self.op,
                              lambda x: (np.asarray(1, x.dtype) - x).astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class Clip(_ColumnEntry):
    """The selected dimensions clipped to ``[low, high]``."""

    op = "clip"
    key: str = field(ACTION, KEY, "the numeric feature")
    dims: Any = field("-1:", DIMS, "the dimensions to clip")
    low: float = field(0.0, NUMBER, "lower bound")
    high: float = field(1.0, NUMBER, "upper bound")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low > self.high:
            raise TrajectoryError(f"{self.op}: low {self.low} is above high {self.high}")

    def __call__(self, traj: Trajectory) -> Trajectory:
        return _column_update(traj, self.key, self.dims, self.op,
                              lambda x: np.clip(x, self.low, self.high).astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class Rescale(_ColumnEntry):
    """The selected dimensions mapped linearly from ``source`` ``[a, b]`` onto ``target``
    ``[c, d]`` (``c + (x - a) (d - c) / (b - a)``; not clipped)."""

    op = "rescale"
    key: str = field(ACTION, KEY, "the numeric feature")
    dims: Any = field("-1:", DIMS, "the dimensions to rescale")
    source: Any = field((0.0, 1.0), Rule("[a, b] with a != b", lambda v: _pair(v, True), tuple),
                        "the range values come in")
    target: Any = field((-1.0, 1.0), Rule("[c, d]", lambda v: _pair(v, False), tuple),
                        "the range they are mapped onto")

    def __call__(self, traj: Trajectory) -> Trajectory:
        (a, b), (c, d) = self.source, self.target
        return _column_update(traj, self.key, self.dims, self.op,
                              lambda x: (c + (x - a) * ((d - c) / (b - a))).astype(x.dtype))


def _pair(value: Any, distinct: bool) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and (not distinct or value[0] != value[1]))


def _is_parts(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value:
        return False
    for part in value:
        if isinstance(part, str):
            match = _PART.match(part)
            if match is None or not KEY.check(match["key"]) or (
                    match["dims"] is not None and not _dims_text(match["dims"])):
                return False
        elif isinstance(part, Mapping):
            if set(part) != {"const", "size"} or not NUMBER.check(part["const"]) or \
                    type(part["size"]) is not int or part["size"] < 1:
                return False
        else:
            return False
    return True


def _dims_text(text: str) -> Any:
    """The :data:`DIMS` value of the text between brackets (``0:6``, ``7``, ``0,2``), or
    ``None`` when it is none."""
    if DIMS.check(text):
        return DIMS.normalise(text)
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        return None
    return dims if DIMS.check(dims) else None


@dataclasses.dataclass(frozen=True)
class Concat(Entry):
    """``out`` (``state``, ``action`` or a new name) made of ``parts`` side by side.

    A part is a numeric feature (``observation/state``, or ``state``/``action``) with an
    optional selection of its flattened dimensions in brackets (``observation/state[0:6]``,
    ``action[-1]``, ``observation/robot_obs[7]``), or ``{const: 0.0, size: 3}`` for constant
    columns (Octo's zero padding). Values become float32, as a key map makes them. A single
    part selects: ``{op: concat, out: action, parts: ['action[:6]']}``.
    """

    op = "concat"
    out: str = field(ACTION, KEY, "the name the result gets")
    parts: Any = field((), Rule("a non-empty list of parts: 'key', 'key[start:stop]', "
                                "'key[i]', or {const: value, size: n}", _is_parts, tuple),
                       "what is concatenated, in order")

    def _parsed(self) -> list[tuple[str | None, Any, float, int]]:
        parsed = []
        for part in self.parts:
            if isinstance(part, str):
                # A part that is a string matches _PART: _is_parts checked it on construction.
                match = cast("re.Match[str]", _PART.match(part))
                dims = None if match["dims"] is None else _dims_text(match["dims"])
                parsed.append((match["key"], dims, 0.0, 0))
            else:
                parsed.append((None, None, float(part["const"]), int(part["size"])))
        return parsed

    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key for key, *_ in self._parsed() if key is not None))

    def writes(self) -> tuple[str, ...]:
        return (self.out,)

    def __call__(self, traj: Trajectory) -> Trajectory:
        columns = []
        for i, (key, dims, const, size) in enumerate(self._parsed()):
            if key is None:
                columns.append(np.full((traj.num_steps, size), const, np.float32))
                continue
            value = flat(traj.numeric_value(key, f"{self.op}.parts[{i}]"))
            if dims is not None:
                value = value[:, resolve_dims(dims, value.shape[1], f"{self.op}.parts[{i}]")]
            columns.append(value.astype(np.float32, copy=False))
        return traj.replace(numeric={**traj.numeric, self.out: np.concatenate(columns, axis=1)})


@dataclasses.dataclass(frozen=True)
class QuaternionToEuler(_ColumnEntry):
    """Four dimensions holding a quaternion ``(x, y, z, w)`` replaced by three Euler angles
    ``(roll, pitch, yaw)`` about the fixed x, y and z axes (``R = Rz(yaw) Ry(pitch)
    Rx(roll)``, the convention of tensorflow_graphics's ``euler.from_quaternion``, which Octo
    uses for furniture_bench and iamlab_cmu). The quaternion is normalised first; computed in
    float64, stored in the value's dtype."""

    op = "quaternion_to_euler"
    key: str = field(ACTION, KEY, "the numeric feature")
    dims: Any = field("3:7", DIMS, "the four quaternion dimensions, in x, y, z, w order")

    def __call__(self, traj: Trajectory) -> Trajectory:
        value = flat(traj.numeric_value(self.key, self.op))
        rows = resolve_dims(self.dims, value.shape[1], f"{self.op}.dims")
        if len(rows) != 4 or not np.array_equal(rows, np.arange(rows[0], rows[0] + 4)):
            raise TrajectoryError(f"{self.op}.dims must select 4 consecutive dimensions "
                                  f"(got {rows.tolist()})")
        q = value[:, rows].astype(np.float64)
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        x, y, z, w = (q / np.where(norm > 0, norm, 1.0)).T
        r00 = 1 - 2 * (y * y + z * z)
        r10 = 2 * (x * y + w * z)
        r20 = 2 * (x * z - w * y)
        r21 = 2 * (y * z + w * x)
        r22 = 1 - 2 * (x * x + y * y)
        euler = np.stack([np.arctan2(r21, r22), -np.arcsin(np.clip(r20, -1, 1)),
                          np.arctan2(r10, r00)], axis=1).astype(value.dtype)
        out = np.concatenate([value[:, :rows[0]], euler, value[:, rows[-1] + 1:]], axis=1)
        return traj.replace(numeric={**traj.numeric, self.key: out})


@dataclasses.dataclass(frozen=True)
class DropSteps(Entry):
    """The first ``first`` and the last ``last`` steps removed (every feature and frame); an
    episode with no more steps than that becomes empty and gives no samples."""

    op = "drop_steps"
    first: int = field(0, int_rule(0), "steps removed at the start")
    last: int = field(0, int_rule(0), "steps removed at the end")

    def __call__(self, traj: Trajectory) -> Trajectory:
        return traj.take(np.arange(self.first, max(self.first, traj.num_steps - self.last)))


@dataclasses.dataclass(frozen=True)
class Subsample(Entry):
    """Every ``every``-th step kept, from the first (Octo's ``x[::3]`` for 30 Hz data)."""

    op = "subsample"
    every: int = field(1, int_rule(1), "keep one step in this many")

    def __call__(self, traj: Trajectory) -> Trajectory:
        return traj.take(np.arange(0, traj.num_steps, self.every))


@dataclasses.dataclass(frozen=True)
class ChooseCamera(Entry):
    """Camera ``role`` reads one of the image features ``keys``, drawn uniformly per episode
    and epoch from ``(seed, epoch, episode_index, role)`` (openpi's DROID recipe: one of the
    two exterior cameras)."""

    op = "choose_camera"
    role: str = field("primary", Rule("a camera role", lambda v: isinstance(v, str)
                                      and re.match(r"^[a-z][a-z0-9_]*$", v) is not None),
                      "the camera role")
    keys: Any = field(("observation/image",), KEYS, "the image features to draw from")

    def reads_images(self) -> tuple[str, ...]:
        return tuple(self.keys)

    def choice(self, traj: Trajectory) -> str:
        """The feature drawn for ``traj``."""
        u = traj.uniform(_CAMERA_TAG, tag(self.role))
        return self.keys[min(int(u * len(self.keys)), len(self.keys) - 1)]

    def __call__(self, traj: Trajectory) -> Trajectory:
        return traj.replace(cameras={**traj.cameras, self.role: self.choice(traj)})


@dataclasses.dataclass(frozen=True)
class ChooseInstruction(Entry):
    """``out`` becomes one of the text features ``keys`` (each whole, for every step), drawn
    uniformly per episode and epoch from ``(seed, epoch, episode_index, out)``: openpi's DROID
    recipe draws one of three instructions. ``skip_empty`` draws only among the keys that are
    not empty for the whole episode (all of them when every one is)."""

    op = "choose_instruction"
    keys: Any = field((LANGUAGE,), KEYS, "the text features to draw from")
    out: str = field(LANGUAGE, KEY, "the name the drawn instruction gets")
    skip_empty: bool = field(False, Rule("true or false", lambda v: type(v) is bool),
                             "leave out instructions empty at every step")

    def reads_text(self) -> tuple[str, ...]:
        return tuple(self.keys)

    def writes_text(self) -> tuple[str, ...]:
        return (self.out,)

    def choice(self, traj: Trajectory) -> str:
        """The feature drawn for ``traj``."""
        keys = list(self.keys)
        for key in keys:
            traj.text_value(key, self.op)
        if self.skip_empty:
            keys = [k for k in keys if any(s != "" for s in traj.text[k])] or keys
        u = traj.uniform(_INSTRUCTION_TAG, tag(self.out))
        return keys[min(int(u * len(keys)), len(keys) - 1)]

    def __call__(self, traj: Trajectory) -> Trajectory:
        return traj.replace(text={**traj.text, self.out: traj.text[self.choice(traj)]})


@dataclasses.dataclass(frozen=True)
class SetText(Entry):
    """Text ``key`` set to ``value`` at every step (``""``: Octo's "delete uninformative
    language instruction")."""

    op = "set_text"
    key: str = field(LANGUAGE, KEY, "the text name")
    value: str = field("", TEXT_VALUE, "the text every step gets")

    def writes_text(self) -> tuple[str, ...]:
        return (self.key,)

    def __call__(self, traj: Trajectory) -> Trajectory:
        text = np.full(traj.num_steps, self.value, dtype=object)
        return traj.replace(text={**traj.text, self.key: text})


@dataclasses.dataclass(frozen=True)
class TextFromCodepoints(Entry):
    """Text ``out`` decoded from an integer feature of Unicode code points padded with zeros
    (language_table's ``instruction``): the characters before the first zero; a value that is
    no code point becomes U+FFFD, as ``tf.strings.unicode_encode`` does by default."""

    op = "text_from_codepoints"
    key: str = field("observation/instruction", KEY, "the integer feature")
    out: str = field(LANGUAGE, KEY, "the name the text gets")

    def reads(self) -> tuple[str, ...]:
        return (self.key,)

    def writes_text(self) -> tuple[str, ...]:
        return (self.out,)

    def __call__(self, traj: Trajectory) -> Trajectory:
        codes = flat(traj.numeric_value(self.key, self.op))
        if codes.dtype.kind not in "iu":
            raise TrajectoryError(f"{self.op}: {self.key!r} holds {codes.dtype} values, not "
                                  "integer code points")
        texts = np.empty(len(codes), dtype=object)
        for i, row in enumerate(codes):
            zeros = np.flatnonzero(row == 0)
            row = row[:zeros[0]] if len(zeros) else row
            texts[i] = "".join(chr(c) if 0 < c <= 0x10FFFF and not 0xD800 <= c < 0xE000
                               else "\ufffd" for c in row.tolist())
        return traj.replace(text={**traj.text, self.out: texts})


@dataclasses.dataclass(frozen=True)
class Call(Entry):
    """A Python function registered with :func:`torch_rlds.trajectory.register`, called as
    ``fn(trajectory, **kwargs)``; for what the other entries cannot say. ``reads`` names the
    raw step features it needs read (numeric or text)."""

    op = "call"
    name: str = field("", Rule("a registered function name", lambda v: isinstance(v, str)
                               and bool(v)), "the registered name")
    kwargs: Any = field(None, nullable(KWARGS), "keyword arguments passed to the function")
    features: Any = field((), Rule("a list of feature keys", lambda v: isinstance(v, (
        list, tuple)) and all(KEY.check(k) for k in v), tuple), "raw step features it reads")

    def reads(self) -> tuple[str, ...]:
        return tuple(self.features)

    def bind(self) -> BoundCall:
        """The callable, with the registered function looked up now."""
        return BoundCall(self.name, registered(self.name, f"{self.op} {self.name!r}"),
                         dict(self.kwargs or {}))


@dataclasses.dataclass(frozen=True)
class BoundCall:
    """A :class:`Call` with its function; pickles the function by reference."""

    name: str
    fn: Any
    kwargs: dict[str, Any]

    def __call__(self, traj: Trajectory) -> Any:
        return self.fn(traj, **self.kwargs)


TRANSFORMS: dict[str, type[Entry]] = {cls.op: cls for cls in (
    RelabelActions, BinarizeGripper, AbsoluteGripper, InvertGripper, Clip, Rescale, Concat,
    QuaternionToEuler, DropSteps, Subsample, ChooseCamera, ChooseInstruction, SetText,
    TextFromCodepoints, Call)}
