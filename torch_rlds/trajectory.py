"""Trajectory transforms and filters: what a recipe does to each episode before its steps are
sampled, written as config (``data.trajectory``, ``data.filters``).

Octo standardises every Open X-Embodiment dataset (bridge: actions relabelled from state deltas,
the gripper binarised, the last step dropped); openpi's DROID recipe keeps the successful
episodes, draws one of two cameras and one of three instructions per episode and drops idle
action chunks. Here each such step is a small, named entry:

* a :class:`Trajectory` holds one episode's numbers, text and metadata, with its cameras as
  the image features they read (pixels are decoded later, only for the frames sampled, at the
  dataset steps ``Trajectory.frame_steps``);
* a **trajectory transform** is a pure function ``Trajectory -> Trajectory`` (``concat``,
  ``relabel_actions``, ``binarize_gripper``, ``absolute_gripper``, ``invert_gripper``, ``clip``,
  ``rescale``, ``quaternion_to_euler``, ``drop_steps``, ``subsample``, ``choose_camera``,
  ``choose_instruction``, ``set_text``, ``text_from_codepoints``, ``call``);
* an **episode filter** is ``Trajectory -> bool`` (``metadata_match``, ``min_length``,
  ``has_language``, ``max_abs``, ``call``); a **sample filter** is ``Trajectory -> bool[T]``,
  which steps may be sampled (``idle_chunk``, ``step_ranges``, ``call``).

A config lists them::

    data:
      trajectory:
        - {op: binarize_gripper, key: action, dim: 6}
        - {op: relabel_actions, dims: "0:6", last: drop}
      filters:
        episode: [{op: metadata_match, key: file_path, pattern: success}]
        sample: [{op: idle_chunk, horizon: 16, threshold: 0.001}]

and :meth:`TrajectoryConfig.build` / :meth:`FilterConfig.build` give the callables. They run in
that order on every episode: the transforms, then the episode filters, then the sample filters,
each seeing the transformed trajectory. Every random choice is a pure function of ``(seed,
epoch, episode_index)`` (:meth:`Trajectory.uniform`), so a stream using them resumes exactly;
nothing here holds state. What YAML cannot say is a Python function registered by name
(:func:`register`) and named by a ``call`` entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from torch_rlds._features import text_value
from torch_rlds._trajectory_base import (
    ACTION,
    LANGUAGE,
    STANDARD,
    STATE,
    Entry,
    Trajectory,
    TrajectoryError,
    build_entry,
    qualified_name,
    register,
)
from torch_rlds._trajectory_filters import (
    EPISODE_FILTERS,
    SAMPLE_FILTERS,
    IdleChunk,
    MetadataMatch,
    StepRanges,
)
from torch_rlds._trajectory_ops import TRANSFORMS, Call

TRANSFORM_OPS = tuple(sorted(TRANSFORMS))
EPISODE_FILTER_OPS = tuple(sorted(EPISODE_FILTERS))
SAMPLE_FILTER_OPS = tuple(sorted(SAMPLE_FILTERS))


def trajectory_from_episode(episode: Mapping[str, Any], key_map: Any, *,
                            keys: Iterable[str] = (), episode_index: int = 0, seed: int = 0,
                            epoch: int = 0, name: str = "episode") -> Trajectory:
    """The :class:`Trajectory` of a decoded RLDS episode (``RLDSSource.episode``'s output;
    its image features may be left out or still encoded: none is read).

    ``state``, ``action`` and ``language_instruction`` are the key map's (see
    :meth:`torch_rlds.KeyMap.apply`); every other feature key in ``keys`` (what
    :func:`read_keys` lists for a config) is read from the episode's steps, numeric features
    as decoded (``[T, ...]``, their own dtype) into ``numeric``, text features into ``text``
    as ``str``. Those three names always mean the key map's values: a raw step feature of the
    same name is read only through the key map. ``frame_steps`` starts as ``0..T-1``.
    """
    from torch_rlds._features import flat_keys
    from torch_rlds.keymap import KeyMap, lookup

    key_map = KeyMap.from_dict(key_map)
    standard = key_map.apply(episode, name=name, images=False)
    steps = standard["steps"]
    numeric: dict[str, np.ndarray] = {ACTION: steps[ACTION]}
    if STATE in steps["observation"]:
        numeric[STATE] = steps["observation"][STATE]
    text: dict[str, np.ndarray] = {}
    if LANGUAGE in steps:
        text[LANGUAGE] = steps[LANGUAGE]
    raw_steps = episode["steps"]
    for key in dict.fromkeys(keys):
        if key in STANDARD:
            continue
        node = lookup(raw_steps, key)
        if node is None:
            raise TrajectoryError(f"{name}: {key!r} is not a step feature of this episode "
                                  f"(its steps hold {sorted(flat_keys(raw_steps))})")
        if isinstance(node, Mapping):
            raise TrajectoryError(f"{name}: {key!r} is a group of features; name the ones to "
                                  "use")
        value = np.asarray(node)
        if value.dtype == object or value.dtype.kind in "SU":
            text[key] = np.array([text_value(v, f"{name}: {key}")
                                  for v in value], dtype=object)
        elif value.dtype.kind in "biuf":
            numeric[key] = value
        else:
            raise TrajectoryError(f"{name}: {key!r} holds {value.dtype} values, neither numbers "
                                  "nor text")
    return Trajectory(numeric=numeric, text=text, cameras={
        role: key_map.image_keys[role] for role in key_map.cameras()},
        frame_steps=np.arange(len(numeric[ACTION]), dtype=np.int64),
        metadata=_metadata(episode.get("episode_metadata")), episode_index=episode_index,
        seed=seed, epoch=epoch)


def _metadata(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``episode_metadata`` flattened to ``path -> value``: text as ``str``, scalars as numbers."""
    out: dict[str, Any] = {}
    if not isinstance(tree, Mapping):
        return out
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_metadata(value, path + "/"))
            continue
        array = np.asarray(value)
        if array.ndim == 0:
            value = array.item()
            if isinstance(value, bytes):
                value = text_value(value, f"episode_metadata/{path}")
        out[path] = value
    return out


# -- what a config reads --------------------------------------------------------------------------
def _flow(entries: Sequence[Entry], numeric: set[str], text: set[str]
          ) -> tuple[dict[str, None], dict[str, None]]:
    """The raw features ``entries`` read that nothing before them wrote (numeric-or-any, text),
    updating ``numeric`` and ``text`` (the names present) as they write."""
    raw: dict[str, None] = {}
    raw_text: dict[str, None] = {}
    for entry in entries:
        for key in entry.reads():
            if key not in numeric and key not in STANDARD:
                raw[key] = None
        for key in entry.reads_text():
            if key not in text and key not in STANDARD:
                raw_text[key] = None
        numeric.update(entry.writes())
        text.update(entry.writes_text())
    return raw, raw_text


def read_keys(trajectory: TrajectoryConfig | None, filters: FilterConfig | None = None
              ) -> tuple[str, ...]:
    """The raw step features (besides the key map's) that these sections read: what
    :func:`trajectory_from_episode` must be given as ``keys``."""
    numeric, text = set(STANDARD), set(STANDARD)
    raw: dict[str, None] = {}
    for entries in ((trajectory.transforms if trajectory else ()),
                    (filters.episode + filters.sample if filters else ())):
        got, got_text = _flow(entries, numeric, text)
        raw.update(got)
        raw.update(got_text)
    return tuple(raw)


# -- the built callables --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrajectoryTransform:
    """The trajectory transforms of a config, applied in order. Picklable; pure."""

    steps: tuple[Callable[[Trajectory], Any], ...]
    names: tuple[str, ...]

    def __call__(self, traj: Trajectory) -> Trajectory:
        for i, (step, name) in enumerate(zip(self.steps, self.names)):
            out = step(traj)
            if not isinstance(out, Trajectory):
                raise TrajectoryError(f"data.trajectory[{i}] ({name}) returned a "
                                      f"{type(out).__name__}, not a Trajectory")
            traj = out
        return traj


@dataclasses.dataclass(frozen=True)
class Filters:
    """The filters of a config. :meth:`rejected_by` / :meth:`keep_episode` judge an episode,
    :meth:`sample_mask` its steps. Picklable; pure."""

    episode: tuple[Callable[[Trajectory], Any], ...]
    episode_names: tuple[str, ...]
    sample: tuple[Callable[[Trajectory], Any], ...]
    sample_names: tuple[str, ...]

    def rejecting(self, traj: Trajectory) -> int | None:
        """``None`` when every episode filter keeps ``traj``, else the index of the first that
        does not."""
        for i, (keep, name) in enumerate(zip(self.episode, self.episode_names)):
            verdict = keep(traj)
            if not isinstance(verdict, (bool, np.bool_)):
                raise TrajectoryError(f"data.filters.episode[{i}] ({name}) returned "
                                      f"{verdict!r}, not a bool")
            if not verdict:
                return i
        return None

    def rejected_by(self, traj: Trajectory) -> str | None:
        """``None`` when every episode filter keeps ``traj``, else ``"episode[i] (op)"`` of the
        first that does not (what a count of skipped episodes is keyed by)."""
        i = self.rejecting(traj)
        return None if i is None else f"episode[{i}] ({self.episode_names[i]})"

    def keep_episode(self, traj: Trajectory) -> bool:
        """Whether every episode filter keeps ``traj``."""
        return self.rejected_by(traj) is None

    def sample_mask(self, traj: Trajectory) -> np.ndarray:
        """bool ``[T]``: the steps of ``traj`` every sample filter keeps."""
        mask = np.ones(traj.num_steps, bool)
        for i, (keep, name) in enumerate(zip(self.sample, self.sample_names)):
            verdict = np.asarray(keep(traj))
            if verdict.dtype != np.bool_ or verdict.shape != mask.shape:
                raise TrajectoryError(f"data.filters.sample[{i}] ({name}) returned "
                                      f"{verdict.dtype} of shape {verdict.shape}, not bool of "
                                      f"shape {mask.shape}")
            mask &= verdict
        return mask


# -- the config sections --------------------------------------------------------------------------
def _entries(raw: Any, ops: Mapping[str, type], where: str) -> tuple[Entry, ...]:
    if raw is None:
        return ()
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise TrajectoryError(f"{where} must be a list of entries {{op: ..., ...}} (ops: "
                              f"{sorted(ops)}; got {raw!r})")
    return tuple(build_entry(item, ops, f"{where}[{i}]") for i, item in enumerate(raw))


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _names(entries: Sequence[Entry]) -> tuple[str, ...]:
    return tuple(f"call {e.name}" if isinstance(e, Call) else e.op for e in entries)


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """The ``data.trajectory`` section: trajectory transforms, applied in order to every
    episode (the YAML form is the list itself, each entry ``{op: NAME, argument: value}``;
    ops: :data:`TRANSFORM_OPS`). Entries are checked on construction: an error names
    ``data.trajectory[i]``, the op, the argument, the value found and what is allowed."""

    transforms: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms",
                           _entries(self.transforms, TRANSFORMS, "data.trajectory"))

    @classmethod
    def from_value(cls, raw: Any, where: str = "data.trajectory") -> TrajectoryConfig | None:
        """The section from its config value, a list of entries (``None`` stays ``None``)."""
        if raw is None or isinstance(raw, TrajectoryConfig):
            return raw
        try:
            return cls(tuple(raw) if isinstance(raw, list) else raw)
        except TrajectoryError as e:
            raise TrajectoryError(str(e).replace("data.trajectory", where, 1)) from None

    def build(self) -> TrajectoryTransform:
        """The transform (registered functions looked up now)."""
        return TrajectoryTransform(tuple(e.bind() for e in self.transforms),
                                   _names(self.transforms))

    def to_list(self) -> list[dict[str, Any]]:
        """The YAML form."""
        return [e.to_dict() for e in self.transforms]

    def image_keys(self) -> tuple[str, ...]:
        """The image features a camera may be pointed at (beyond the key map's)."""
        return tuple(dict.fromkeys(k for e in self.transforms for k in e.reads_images()))

    def digest(self) -> str:
        """A short hash of the entries and the functions they call, for cache keys (a changed
        body of a registered function is not seen: rename it when it changes)."""
        calls = [qualified_name(e.name) for e in self.transforms if isinstance(e, Call)]
        return _digest([self.to_list(), calls])


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """The ``data.filters`` section: ``episode`` filters (ops :data:`EPISODE_FILTER_OPS`) and
    ``sample`` filters (ops :data:`SAMPLE_FILTER_OPS`), each a list of ``{op: NAME, ...}``
    entries. Checked on construction; errors name ``data.filters.episode[i]`` and the field."""

    episode: tuple[Entry, ...] = ()
    sample: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "episode", _entries(self.episode, EPISODE_FILTERS,
                                                     "data.filters.episode"))
        object.__setattr__(self, "sample", _entries(self.sample, SAMPLE_FILTERS,
                                                    "data.filters.sample"))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "data.filters") -> FilterConfig | None:
        """The section from its config mapping ``{episode: [...], sample: [...]}`` (``None``
        stays ``None``)."""
        if raw is None or isinstance(raw, FilterConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise TrajectoryError(f"{where} must be a mapping with lists 'episode' and "
                                  f"'sample' (got {raw!r})")
        unknown = sorted(str(k) for k in set(raw) - {"episode", "sample"})
        if unknown:
            raise TrajectoryError(f"{where}: unknown fields {unknown} (allowed: ['episode', "
                                  "'sample'])")
        try:
            return cls(raw.get("episode") or (), raw.get("sample") or ())
        except TrajectoryError as e:
            raise TrajectoryError(str(e).replace("data.filters", where, 1)) from None

    def build(self, *, action_horizon: int | None = None) -> Filters:
        """The filters; ``action_horizon`` fills an ``idle_chunk`` whose horizon is null.
        Ranges files are read now."""
        sample = tuple(e.with_horizon(action_horizon) if isinstance(e, IdleChunk) else e
                       for e in self.sample)
        return Filters(tuple(e.bind() for e in self.episode), _names(self.episode),
                       tuple(e.bind() for e in sample), _names(sample))

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The YAML form."""
        return {"episode": [e.to_dict() for e in self.episode],
                "sample": [e.to_dict() for e in self.sample]}

    def metadata_keys(self) -> tuple[str, ...]:
        """The ``episode_metadata`` paths the filters read."""
        keys: list[str] = []
        for entry in self.episode + self.sample:
            if isinstance(entry, StepRanges):
                keys += entry.fields()
            elif isinstance(entry, MetadataMatch):
                keys.append(entry.key)
        return tuple(dict.fromkeys(keys))

    def digest(self) -> str:
        """A short hash of the entries, the functions they call and the bytes of the ranges
        files they name (read now), for cache keys."""
        extra = []
        for entry in self.episode + self.sample:
            if isinstance(entry, Call):
                extra.append(qualified_name(entry.name))
            elif isinstance(entry, StepRanges):
                extra.append(entry.bind().digest)
        return _digest([self.to_dict(), extra])


# -- checking a config against a dataset's features -----------------------------------------------
def validate_sections(source_or_features: Any, key_map: Any,
                      trajectory: TrajectoryConfig | None,
                      filters: FilterConfig | None = None) -> None:
    """Check what the sections read against a dataset's feature tree, reading no episode:
    every raw feature exists with the right kind (numbers, text, images), every metadata path
    exists, and every standard name read is one the key map provides. Raises
    :class:`TrajectoryError` naming the section entry and what the dataset has."""
    from torch_rlds.keymap import KeyMap

    key_map = KeyMap.from_dict(key_map)
    leaves, dataset = _leaves(source_or_features)
    steps = {"/".join(leaf.path[1:]): leaf for leaf in leaves
             if leaf.per_step and leaf.path[0] == "steps"}
    numeric = {ACTION} | ({STATE} if key_map.state_keys else set())
    text = {LANGUAGE} if key_map.language_key else set()
    sections = [("data.trajectory", trajectory.transforms if trajectory else ())]
    if filters is not None:
        sections += [("data.filters.episode", filters.episode),
                     ("data.filters.sample", filters.sample)]
    for where, entries in sections:
        for i, entry in enumerate(entries):
            at = f"{dataset}: {where}[{i}] ({entry.op})"
            numbers = ("tensor", "text") if isinstance(entry, Call) else ("tensor",)
            for keys, present, kinds in ((entry.reads(), numeric, numbers),
                                         (entry.reads_text(), text, ("text",))):
                for key in keys:
                    if key in present:
                        continue
                    if key in STANDARD:
                        raise TrajectoryError(f"{at}: reads {key!r}, which the key map does "
                                              "not provide")
                    _check_leaf(steps, key, kinds, at, dataset)
            for key in entry.reads_images():
                _check_leaf(steps, key, ("image",), at, dataset)
            numeric.update(entry.writes())
            text.update(entry.writes_text())
    if filters is not None:
        meta = {"/".join(leaf.path[1:]) for leaf in leaves
                if not leaf.per_step and leaf.path[0] == "episode_metadata"}
        for key in filters.metadata_keys():
            if key not in meta:
                raise TrajectoryError(f"{dataset}: data.filters read episode_metadata/{key}, "
                                      f"which {dataset} does not have (its metadata: "
                                      f"{sorted(meta)})")


def _leaves(source_or_features: Any) -> tuple[list[Any], str]:
    from torch_rlds._features import FeatureLeaf, iter_leaves

    if hasattr(source_or_features, "leaves") and hasattr(source_or_features, "info"):
        return list(source_or_features.leaves()), source_or_features.info.name
    if hasattr(source_or_features, "get_serialized_info"):
        return list(iter_leaves(source_or_features)), "dataset"
    leaves = list(source_or_features)
    if not all(isinstance(leaf, FeatureLeaf) for leaf in leaves):
        raise TypeError("validate_sections() takes an RLDSSource, a FeaturesDict or "
                        "FeatureLeafs")
    return leaves, "dataset"


def _check_leaf(steps: Mapping[str, Any], key: str, kinds: tuple[str, ...], at: str,
                dataset: str) -> None:
    leaf = steps.get(key)
    if leaf is None:
        raise TrajectoryError(f"{at}: {key!r} is not a step feature of {dataset}; its step "
                              f"features are {sorted(steps)}")
    kind = "text" if leaf.kind == "tensor" and leaf.dtype == object else leaf.kind
    if kind == "tensor" and leaf.dtype.kind not in "biuf":
        kind = "other"
    if kind not in kinds:
        want = " or ".join({"tensor": "numbers", "text": "text", "image": "an image"}[k]
                           for k in kinds)
        raise TrajectoryError(f"{at}: {key!r} is a {kind} feature of {dataset}, not {want}")


__all__ = [
    "EPISODE_FILTER_OPS",
    "FilterConfig",
    "Filters",
    "SAMPLE_FILTER_OPS",
    "TRANSFORM_OPS",
    "Trajectory",
    "TrajectoryConfig",
    "TrajectoryError",
    "TrajectoryTransform",
    "read_keys",
    "register",
    "trajectory_from_episode",
    "validate_sections",
]
