"""What every trajectory transform and filter shares: the :class:`Trajectory`, the entry base
class with its argument rules, seeded draws, dimension selections and the function registry.

Nothing here reads a dataset or decodes an image; see :mod:`torch_rlds.trajectory` for the
public face and the config sections.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from torch_rlds._bijection import derive_key
from torch_rlds._rules import Rule, check_fields

# Names a trajectory always uses for the standard episode's parts (see torch_rlds.keymap).
STATE = "state"
ACTION = "action"
LANGUAGE = "language_instruction"
STANDARD = (STATE, ACTION, LANGUAGE)
_NAME = re.compile(r"^[a-z][a-z0-9_.]*$")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$")


class TrajectoryError(ValueError):
    """A trajectory transform or filter with a bad argument, or one that does not fit the
    trajectory it is given (a missing key, a dimension outside a value's width)."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One episode's numeric and text step features, with its cameras still unread.

    Attributes:
      numeric: name -> ``[T, ...]`` array: ``state`` (when the key map has one), ``action``,
        and raw step features under their feature keys (``observation/joint_position``).
      text: name -> object ``[T]`` array of ``str``: ``language_instruction`` (when the key map
        has one) and raw text step features under their keys (``language_instruction_2``).
      cameras: camera role -> the image feature it reads (``observation/image_0``).
      frame_steps: int64 ``[T]``, the dataset's step index of each row: images are read at
        these steps, and a transform that drops or selects steps updates them.
      metadata: the episode's ``episode_metadata`` under paths relative to it (``file_path``),
        text as ``str``, scalars as Python numbers, other values as arrays.
      episode_index, seed, epoch: what seeded choices are drawn from (:meth:`uniform`).

    Immutable by convention: transforms return a new trajectory (:meth:`replace`,
    :meth:`take`) and never write into the arrays of their input. Picklable.
    """

    numeric: Mapping[str, np.ndarray]
    text: Mapping[str, np.ndarray]
    cameras: Mapping[str, str]
    frame_steps: np.ndarray
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    episode_index: int = 0
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        steps = np.asarray(self.frame_steps)
        if steps.ndim != 1 or steps.dtype.kind not in "iu":
            raise TrajectoryError(f"frame_steps must be a 1-d integer array (got {steps.dtype} "
                                  f"of shape {steps.shape})")
        object.__setattr__(self, "frame_steps", steps.astype(np.int64, copy=False))
        for kind in ("numeric", "text"):
            for name, value in getattr(self, kind).items():
                if len(value) != len(steps):
                    raise TrajectoryError(f"{kind}[{name!r}] has {len(value)} steps, "
                                          f"frame_steps {len(steps)}")
        for name in ("episode_index", "seed", "epoch"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise TrajectoryError(f"{name} must be an int >= 0 (got {value!r})")

    @property
    def num_steps(self) -> int:
        """The number of steps ``T``."""
        return len(self.frame_steps)

    def replace(self, **changes: Any) -> Trajectory:
        """A copy with ``changes`` (``numeric=...``, ``text=...``, ``cameras=...``)."""
        return dataclasses.replace(self, **changes)

    def take(self, rows: np.ndarray | Sequence[int]) -> Trajectory:
        """The trajectory of the steps at ``rows`` (indices into this one), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.replace(numeric={k: v[rows] for k, v in self.numeric.items()},
                            text={k: v[rows] for k, v in self.text.items()},
                            frame_steps=self.frame_steps[rows])

    def uniform(self, *tags: int) -> float:
        """A number in ``[0, 1)`` that is a pure function of ``(seed, epoch, episode_index,
        *tags)`` (splitmix64 mixing, the same on every platform)."""
        key = derive_key(self.seed, self.epoch, self.episode_index, *tags)
        return (key >> 11) * 2.0 ** -53

    def numeric_value(self, key: str, where: str) -> np.ndarray:
        """``numeric[key]``, or an error naming ``where`` and the keys there are."""
        if key not in self.numeric:
            raise TrajectoryError(f"{where}: no numeric step feature {key!r} in this "
                                  f"trajectory (it has {sorted(self.numeric)}); raw features "
                                  "are read when a config entry names them")
        return self.numeric[key]

    def text_value(self, key: str, where: str) -> np.ndarray:
        """``text[key]``, or an error naming ``where`` and the keys there are."""
        if key not in self.text:
            raise TrajectoryError(f"{where}: no text step feature {key!r} in this trajectory "
                                  f"(it has {sorted(self.text)})")
        return self.text[key]


def tag(text: str) -> int:
    """A stable non-negative integer for a name, to separate draws (CRC-32)."""
    return zlib.crc32(text.encode())


# -- argument rules ------------------------------------------------------------------------------
def _is_key(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith(("/", "steps/"))
            and not value.endswith("/"))


def _is_dims(value: Any) -> bool:
    if isinstance(value, str):
        return _SLICE.match(value) is not None
    return (isinstance(value, Sequence) and len(value) > 0
            and all(type(d) is int for d in value) and len(set(value)) == len(value))


def _is_strings(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(v, str) and v for v in value) and len(set(value)) == len(value))


KEY = Rule("a feature key (a path under steps, e.g. 'observation/state'), or state, action, "
           "language_instruction", _is_key)
DIMS = Rule("a list of distinct dimension indices, or a slice 'start:stop' (negative counts "
            "from the end)", _is_dims,
            lambda v: v.replace(" ", "") if isinstance(v, str) else tuple(v))
DIM = Rule("a dimension index (an int, negative counts from the end)", lambda v: type(v) is int)
KEYS = Rule("a non-empty list of distinct feature keys", lambda v: _is_strings(v) and all(
    _is_key(k) for k in v), tuple)
NUMBER = Rule("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and np.isfinite(v), float)
TEXT_VALUE = Rule("a string", lambda v: isinstance(v, str))
KWARGS = Rule("a mapping of keyword arguments", lambda v: isinstance(v, Mapping)
              and all(isinstance(k, str) for k in v), dict)


def resolve_dims(spec: str | tuple[int, ...], width: int, where: str) -> np.ndarray:
    """The indices that a :data:`DIMS` value selects among ``width`` dimensions."""
    if isinstance(spec, str):
        match = _SLICE.match(spec)
        if match is None:
            raise TrajectoryError(f"{where}: {spec!r} is not a slice 'start:stop'")
        start, stop = (None if g is None else int(g) for g in match.groups())
        rows = np.arange(width)[slice(start, stop)]
        if rows.size == 0:
            raise TrajectoryError(f"{where}: the slice {spec!r} selects none of {width} "
                                  "dimensions")
        return rows
    rows = np.asarray(spec, dtype=np.int64)
    bad = [int(d) for d in rows if not -width <= d < width]
    if bad:
        raise TrajectoryError(f"{where}: dimensions {bad} are outside the value's {width} "
                              "dimensions")
    return rows % width


def flat(value: np.ndarray) -> np.ndarray:
    """``value`` ``[T, ...]`` as ``[T, D]``."""
    return value.reshape(len(value), -1)


class Entry:
    """A vocabulary entry: a frozen dataclass whose fields carry :class:`Rule` metadata.

    ``op`` is the name an entry has in YAML (``{op: clip, key: action, ...}``). Subclasses say
    which step features they read and write, so a config can list what must be read and
    check it against a dataset's features before any episode is.
    """

    op: ClassVar[str] = ""
    # Declared for the type checker: every entry class is a dataclass.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        check_fields(self, self.op, TrajectoryError)

    def reads(self) -> tuple[str, ...]:
        """Numeric step features (or standard names) this entry reads."""
        return ()

    def reads_text(self) -> tuple[str, ...]:
        """Text step features (or standard names) this entry reads."""
        return ()

    def reads_images(self) -> tuple[str, ...]:
        """Image features this entry may point a camera at."""
        return ()

    def writes(self) -> tuple[str, ...]:
        """Numeric names this entry creates or replaces in the trajectory."""
        return ()

    def writes_text(self) -> tuple[str, ...]:
        """Text names this entry creates or replaces in the trajectory."""
        return ()

    def bind(self) -> Callable[[Trajectory], Any]:
        """The callable this entry runs as (itself, unless it must look something up first:
        a registered function, a ranges file)."""
        if not callable(self):
            raise TypeError(f"{type(self).__name__} defines neither __call__ nor bind()")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, ``{"op": ..., field: value, ...}`` (lists for tuples)."""
        out: dict[str, Any] = {"op": self.op}
        for f in dataclasses.fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def build_entry(raw: Any, ops: Mapping[str, type], where: str) -> Entry:
    """The entry of ``ops`` that the mapping ``raw`` (``{op: name, **arguments}``) describes.
    Errors name ``where``, the entry and its field."""
    if isinstance(raw, Entry):
        if type(raw).op not in ops:
            raise TrajectoryError(f"{where}: {type(raw).op} does not belong here (allowed: "
                                  f"{sorted(ops)})")
        return raw
    if not isinstance(raw, Mapping) or "op" not in raw:
        raise TrajectoryError(f"{where} must be a mapping with an 'op' (one of {sorted(ops)}) "
                              f"and its arguments (got {raw!r})")
    name = raw["op"]
    if name not in ops:
        raise TrajectoryError(f"{where}: unknown op {name!r} (allowed: {sorted(ops)})")
    cls = ops[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    args = {k: v for k, v in raw.items() if k != "op"}
    unknown = sorted(str(k) for k in set(args) - fields)
    if unknown:
        raise TrajectoryError(f"{where}: {name}: unknown arguments {unknown} (allowed: "
                              f"{sorted(fields)})")
    try:
        return cls(**args)
    except TrajectoryError as e:
        raise TrajectoryError(f"{where}: {e}") from None


# -- Python functions by name ---------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, fn: Callable[..., Any] | None = None) -> Any:
    """Register ``fn`` under ``name`` for config entries ``{op: call, name: NAME}``; usable
    as a decorator (``@register("my_fix")``).

    In ``data.trajectory`` the function takes a :class:`Trajectory` (and the entry's
    ``kwargs``) and returns a new one; in ``data.filters.episode`` it returns a bool; in
    ``data.filters.sample`` a bool array ``[T]``. It must be a pure function of its arguments
    (draw randomness with :meth:`Trajectory.uniform`), or resume is no longer exact; and a
    module-level function, so that worker processes can unpickle it (which imports its module,
    which registers it again). Registering another function under a taken name raises.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise TrajectoryError(f"register: {name!r} is not a function name (lower-case letters, "
                              "digits, '_' and '.', starting with a letter)")

    def add(function: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(function):
            raise TrajectoryError(f"register({name!r}): {function!r} is not callable")
        known = _REGISTRY.get(name)
        if known is not None and _qualified(known) != _qualified(function):
            raise TrajectoryError(f"register: {name!r} is already registered to "
                                  f"{_qualified(known)}")
        _REGISTRY[name] = function
        return function

    return add if fn is None else add(fn)


def registered(name: str, where: str) -> Callable[..., Any]:
    """The function registered under ``name``, or an error naming ``where``."""
    if name not in _REGISTRY:
        raise TrajectoryError(
            f"{where}: no function is registered as {name!r} (registered: {sorted(_REGISTRY)}); "
            f"import the module that calls torch_rlds.trajectory.register({name!r}) first")
    return _REGISTRY[name]


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def qualified_name(name: str) -> str:
    """``module.qualname`` of the function registered under ``name`` (for cache digests)."""
    return _qualified(_REGISTRY[name]) if name in _REGISTRY else "?"
