"""Key maps: from a dataset's own feature keys to the standard episode every transform expects.

RLDS datasets name the same things differently: bridge keeps its language under
``observation/natural_language_instruction`` and splits its action into ``world_vector``,
``rotation_delta`` and ``open_gripper``; DROID stores joint and gripper state apart. A
:class:`KeyMap` says, for one dataset, which step features make up the state, which image feature
plays which camera role, which make up the action and where the language instruction is.
:meth:`KeyMap.apply` turns a decoded episode into the **standard episode**::

    {"steps": {"observation": {"state": float32 [T, S],            # state keys, concatenated
                               "image_<role>": EncodedImages [T]},  # one per camera role
               "action": float32 [T, A],                           # action keys, concatenated
               "language_instruction": str [T],                    # only with a language key
               "is_first", "is_last", ...},                        # RLDS step fields, as found
     "episode_metadata": {...}}                                    # as found, when present

Images stay encoded, so the rest of the pipeline (windows, decoding only the frames a sample
uses, sample transforms) is the same for every dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np

from torch_rlds._features import flat_keys, text_value

STATE = "state"
ACTION = "action"
LANGUAGE = "language_instruction"
IMAGE_PREFIX = "image_"
_PASSTHROUGH = ("is_first", "is_last", "is_terminal", "reward", "discount")
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
_FIELDS = {"state": "state_keys", "images": "image_keys", "action": "action_keys",
           "language": "language_key"}


class KeyMapError(ValueError):
    """A key map that does not fit a dataset, or a key map field with a bad value."""


def image_key(role: str) -> str:
    """The standard observation key of camera ``role`` (``primary`` -> ``image_primary``)."""
    return IMAGE_PREFIX + role


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Which step features of one dataset make up the standard episode.

    Every key is a path under ``steps``, its parts joined with ``/`` as TFDS names features
    (``observation/state``, ``action/world_vector``).

    Attributes:
      state_keys: tensors concatenated, in this order, into ``observation/state``; scalars count
        as one value and ``[a, b]`` tensors as ``a * b``. Empty: no state.
      image_keys: camera role -> image feature; each becomes ``observation/image_<role>``. A
        role mapped to ``None`` is a camera this dataset lacks: nothing is emitted for it, and
        a transform that selects it (:class:`~torch_rlds.transforms.SelectCameras`) fills it
        with zeros and masks it, so that datasets with and without it batch together.
      action_keys: tensors concatenated, in this order, into ``action`` (at least one).
      language_key: the text feature that becomes ``language_instruction`` (``None``: none).

    Immutable and hashable; :meth:`apply` and :meth:`validate` are pure, so one key map may be
    shared by threads and pickled to worker processes.
    """

    state_keys: tuple[str, ...] = ()
    image_keys: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    action_keys: tuple[str, ...] = (ACTION,)
    language_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_keys", _keys("key_map.state", self.state_keys))
        object.__setattr__(self, "action_keys", _keys("key_map.action", self.action_keys))
        if not self.action_keys:
            raise KeyMapError("key_map.action must name at least one step feature (got [])")
        if not isinstance(self.image_keys, Mapping):
            raise KeyMapError("key_map.images must be a mapping of camera role to image feature "
                              f"(got {self.image_keys!r})")
        images = {}
        for role, key in self.image_keys.items():
            if not isinstance(role, str) or not _ROLE.match(role):
                raise KeyMapError(f"key_map.images: camera role {role!r} must be lower-case "
                                  "letters, digits and '_', starting with a letter (e.g. primary)")
            images[role] = None if key is None else _keys(f"key_map.images.{role}", (key,))[0]
        object.__setattr__(self, "image_keys", images)
        if self.language_key is not None:
            object.__setattr__(self, "language_key",
                               _keys("key_map.language", (self.language_key,))[0])

    def __hash__(self) -> int:
        return hash((self.state_keys, tuple(self.image_keys.items()), self.action_keys,
                     self.language_key))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | KeyMap, where: str = "key_map") -> KeyMap:
        """A key map from its config form ``{"state": [...], "images": {role: key},
        "action": [...], "language": key}``; a single key may stand for a one-item list."""
        if isinstance(raw, KeyMap):
            return raw
        if not isinstance(raw, Mapping):
            raise KeyMapError(f"{where} must be a mapping with fields {sorted(_FIELDS)} "
                              f"(got {raw!r})")
        unknown = sorted(str(k) for k in set(raw) - set(_FIELDS))
        if unknown:
            raise KeyMapError(f"{where}: unknown fields {unknown} (allowed: {sorted(_FIELDS)})")
        values: dict[str, Any] = {}
        for name, field in _FIELDS.items():
            if name not in raw:
                continue
            value = raw[name]
            if name in ("state", "action") and isinstance(value, str):
                value = (value,)
            if name == "images" and value is None:
                value = {}
            if name == "state" and value is None:
                value = ()
            values[field] = value
        try:
            return cls(**values)
        except KeyMapError as e:
            raise KeyMapError(str(e).replace("key_map", where, 1)) from None

    def to_dict(self) -> dict[str, Any]:
        """The config form (see :meth:`from_dict`), JSON-serialisable."""
        return {"state": list(self.state_keys), "images": dict(self.image_keys),
                "action": list(self.action_keys), "language": self.language_key}

    def digest(self) -> str:
        """A short hash of the key map, for cache keys."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- what it produces ----------------------------------------------------------------------
    def observation_keys(self) -> tuple[str, ...]:
        """The standard observation keys this key map produces (``state`` first, then the
        cameras in role order)."""
        keys = (STATE,) if self.state_keys else ()
        return keys + tuple(image_key(role) for role in self.cameras())

    def cameras(self) -> tuple[str, ...]:
        """The camera roles the dataset has (those mapped to a feature), in role order."""
        return tuple(role for role, key in self.image_keys.items() if key is not None)

    def validate(self, source_or_features: Any) -> dict[str, tuple[int | None, ...]]:
        """Check every key against a dataset's feature tree, reading no episode.

        ``source_or_features`` is an :class:`~torch_rlds.RLDSSource`, a TFDS ``FeaturesDict``
        or an iterable of :class:`~torch_rlds._features.FeatureLeaf`. Returns the per-step shape
        of every standard feature: ``{"state": (S,), "action": (A,), "image_primary":
        (H, W, C), ...}`` (``None`` where the dataset declares a variable size). Raises
        :class:`KeyMapError` naming the key, the field of the key map and the step features
        the dataset does have.
        """
        leaves, dataset = _step_leaves(source_or_features)
        shapes: dict[str, tuple[int | None, ...]] = {}
        for field, keys, out in (("state", self.state_keys, STATE),
                                 ("action", self.action_keys, ACTION)):
            if not keys:
                continue
            size: int | None = 0
            for key in keys:
                leaf = _find(leaves, key, f"key_map.{field}", dataset)
                if leaf.kind != "tensor" or leaf.dtype.kind not in "biuf":
                    raise KeyMapError(
                        f"{dataset}: key_map.{field}: {key!r} is a {_describe(leaf)}; state and "
                        "action keys must be numeric tensors")
                n = _size(leaf.shape)
                size = None if size is None or n is None else size + n
            shapes[out] = (size,)
        for role in self.cameras():
            key = cast(str, self.image_keys[role])  # cameras(): the roles that name a key
            leaf = _find(leaves, key, f"key_map.images.{role}", dataset)
            if leaf.kind != "image":
                raise KeyMapError(f"{dataset}: key_map.images.{role}: {key!r} is a "
                                  f"{_describe(leaf)}, not an image feature")
            shapes[image_key(role)] = tuple(leaf.shape)
        if self.language_key is not None:
            leaf = _find(leaves, self.language_key, "key_map.language", dataset)
            if leaf.kind != "text" and not (leaf.kind == "tensor" and leaf.dtype == object):
                raise KeyMapError(f"{dataset}: key_map.language: {self.language_key!r} is a "
                                  f"{_describe(leaf)}, not text")
            shapes[LANGUAGE] = ()
        return shapes

    # -- the episode-level transform -----------------------------------------------------------
    def apply(self, episode: Mapping[str, Any], *, name: str = "episode",
              images: bool = True) -> dict[str, Any]:
        """The standard episode (see the module docstring) of a decoded ``episode``.

        Images are passed through as they are (still encoded when the source left them so);
        ``images=False`` leaves the cameras out, so an episode read without its image features
        maps too. ``name`` labels errors (the file and offset of the episode).
        """
        steps = episode.get("steps")
        if not isinstance(steps, Mapping):
            raise KeyMapError(f"{name}: episode has no 'steps' (it has {sorted(episode)})")
        observation: dict[str, Any] = {}
        if self.state_keys:
            observation[STATE] = self._concat(steps, self.state_keys, "state", name)
        for role in self.cameras() if images else ():
            observation[image_key(role)] = _get(steps, cast(str, self.image_keys[role]),
                                                f"key_map.images.{role}", name)
        out_steps: dict[str, Any] = {
            "observation": observation,
            ACTION: self._concat(steps, self.action_keys, "action", name),
        }
        if self.language_key is not None:
            text = _get(steps, self.language_key, "key_map.language", name)
            out_steps[LANGUAGE] = np.array(
                [text_value(v, f"{name}: key_map.language") for v in text],
                dtype=object)
        for key in _PASSTHROUGH:
            if key in steps and not isinstance(steps[key], Mapping):
                out_steps[key] = steps[key]
        num_steps = len(out_steps[ACTION])
        for key, value in [*observation.items(), *out_steps.items()]:
            if key != "observation" and len(value) != num_steps:
                raise KeyMapError(f"{name}: {key} has {len(value)} steps, the action {num_steps}")
        standard: dict[str, Any] = {"steps": out_steps}
        if isinstance(episode.get("episode_metadata"), Mapping):
            standard["episode_metadata"] = episode["episode_metadata"]
        return standard

    def _concat(self, steps: Mapping[str, Any], keys: tuple[str, ...], field: str,
                name: str) -> np.ndarray:
        parts = []
        for key in keys:
            value = np.asarray(_get(steps, key, f"key_map.{field}", name))
            if value.dtype == object or value.dtype.kind not in "biuf":
                raise KeyMapError(f"{name}: key_map.{field}: {key!r} holds {value.dtype} values; "
                                  "state and action keys must be numeric")
            width = int(np.prod(value.shape[1:], dtype=np.int64))
            parts.append(value.reshape(len(value), width).astype(np.float32, copy=False))
        lengths = {len(p) for p in parts}
        if len(lengths) > 1:
            raise KeyMapError(f"{name}: key_map.{field}: the keys {list(keys)} have different "
                              f"numbers of steps {[len(p) for p in parts]}")
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0].copy()


def _keys(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise KeyMapError(f"{where} must be a list of step feature keys (got {value!r})")
    keys = tuple(value)
    for key in keys:
        if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
            raise KeyMapError(f"{where}: {key!r} is not a feature key (a path under steps such "
                              "as 'observation/state')")
        if key.startswith("steps/"):
            raise KeyMapError(f"{where}: {key!r}: keys are paths under steps; drop 'steps/'")
    if len(set(keys)) != len(keys):
        raise KeyMapError(f"{where}: keys repeat ({list(keys)})")
    return keys


def _step_leaves(source_or_features: Any) -> tuple[dict[str, Any], str]:
    from torch_rlds._features import FeatureLeaf, iter_leaves

    dataset = "dataset"
    if hasattr(source_or_features, "leaves") and hasattr(source_or_features, "info"):
        leaves = source_or_features.leaves()
        dataset = source_or_features.info.name
    elif hasattr(source_or_features, "get_serialized_info"):
        leaves = iter_leaves(source_or_features)
    else:
        leaves = list(source_or_features)
        if not all(isinstance(leaf, FeatureLeaf) for leaf in leaves):
            raise TypeError("validate() takes an RLDSSource, a FeaturesDict or FeatureLeafs")
    steps = {"/".join(leaf.path[1:]): leaf for leaf in leaves
             if leaf.per_step and leaf.path[0] == "steps"}
    return steps, dataset


def _find(leaves: dict[str, Any], key: str, field: str, dataset: str):
    leaf = leaves.get(key)
    if leaf is not None:
        return leaf
    group = sorted(k for k in leaves if k.startswith(key + "/"))
    if group:
        raise KeyMapError(f"{dataset}: {field}: {key!r} is a group of features {group}; name "
                          "the ones to use")
    raise KeyMapError(f"{dataset}: {field}: {key!r} is not a step feature of {dataset}; its step "
                      f"features are {sorted(leaves)}")


def _describe(leaf) -> str:
    dtype = "str" if leaf.dtype == object else str(leaf.dtype)
    return f"{leaf.kind} feature ({dtype}, shape {tuple(leaf.shape)})"


def _size(shape: tuple[int | None, ...]) -> int | None:
    if any(d is None for d in shape):
        return None
    return int(np.prod(cast(tuple[int, ...], shape), dtype=np.int64))


_MISSING = object()


def lookup(tree: Mapping[str, Any], key: str) -> Any:
    """The value at feature key ``key`` (parts joined with ``/``) in a decoded feature tree,
    or :data:`None` when there is none. A feature's own name may hold ``/`` (kuka's
    ``clip_function_input/base_pose_tool_reached``, bc_z's ``future/xyz_residual``), so at
    each level the longest name that matches is tried first."""
    found = _lookup(tree, key.split("/"))
    return None if found is _MISSING else found


def _lookup(node: Any, parts: list[str]) -> Any:
    if not parts:
        return node
    if not isinstance(node, Mapping):
        return _MISSING
    for n in range(len(parts), 0, -1):
        head = "/".join(parts[:n])
        if head in node:
            found = _lookup(node[head], parts[n:])
            if found is not _MISSING:
                return found
    return _MISSING


def _get(steps: Mapping[str, Any], key: str, field: str, name: str) -> Any:
    node = _lookup(steps, key.split("/"))
    if node is _MISSING:
        raise KeyMapError(f"{name}: {field}: {key!r} is not in this episode's steps; they "
                          f"hold {sorted(flat_keys(steps))}")
    if isinstance(node, Mapping):
        raise KeyMapError(f"{name}: {field}: {key!r} is a group of features "
                          f"{sorted(key + '/' + k for k in flat_keys(node))}; name the ones to use")
    return node


def check_plain_keys(observation_keys: Any, action_key: Any, language_key: Any,
                     where: str = "") -> None:
    """With a key map, the key map names the observations, the action and the instruction:
    the plain key arguments (``where``-prefixed in errors, ``data.`` for a config) must be
    left unset. Raises :class:`KeyMapError` otherwise."""
    if observation_keys is not None:
        raise KeyMapError(f"{where}observation_keys must be null with a key map (the key map "
                          "names the observations)")
    if action_key != ACTION or language_key != LANGUAGE:
        raise KeyMapError(f"{where}action_key and {where}language_key must stay at their "
                          "defaults with a key map (the key map names them)")


def key_map_from_config(data: Any) -> KeyMap:
    """The key map of a ``DataConfig``: its ``key_map`` field when it has one; else the plain
    fields' equivalent, state ``observation/state`` and action ``data.action_key`` (no cameras,
    no language: what statistics need)."""
    key_map = getattr(data, "key_map", None)
    if key_map is not None:
        return KeyMap.from_dict(key_map, "data.key_map")
    return KeyMap(state_keys=(f"observation/{STATE}",),
                  action_keys=(getattr(data, "action_key", ACTION),))


__all__ = ["KeyMap", "KeyMapError", "check_plain_keys", "image_key", "key_map_from_config"]
