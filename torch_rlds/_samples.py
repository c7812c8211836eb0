"""From an episode to step samples: observation windows and action chunks with pad masks.

The sample of step ``t`` of an episode of ``T`` steps holds the observations of steps
``t - obs_window + 1 .. t`` and the actions of steps ``t .. t + action_horizon - 1``. Indices
before the episode's start repeat step 0 and indices past its end repeat step ``T - 1``; the
``*_is_pad`` masks are ``True`` exactly there. Repeating real values (rather than zeros) keeps
padded entries in the data's range, so normalisation and image models see plausible inputs;
losses should use the masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from torch_rlds._bijection import derive_key
from torch_rlds._features import flat_keys, text_value
from torch_rlds._images import EncodedImages, ImageDecodeError, decode_image


def observation_indices(t: int, num_steps: int, obs_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Step indices of the observation window ending at ``t``, and its pad mask."""
    raw = np.arange(t - obs_window + 1, t + 1)
    return np.clip(raw, 0, num_steps - 1), raw < 0


def action_indices(t: int, num_steps: int, action_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Step indices of the action chunk starting at ``t``, and its pad mask."""
    raw = np.arange(t, t + action_horizon)
    return np.clip(raw, 0, num_steps - 1), raw >= num_steps


def window_action_indices(t: int, num_steps: int, obs_window: int,
                          action_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Step indices ``[obs_window, action_horizon]`` of the action chunk of every row of the
    observation window ending at ``t`` (row ``i`` is step ``t - obs_window + 1 + i``), and the
    pad mask: ``True`` past the episode's end and on every row whose observation is padded."""
    rows = np.arange(t - obs_window + 1, t + 1)[:, None]
    raw = rows + np.arange(action_horizon)[None, :]
    return np.clip(raw, 0, num_steps - 1), (raw >= num_steps) | (rows < 0)


def goal_step(seed: int, epoch: int, episode: int, t: int, num_steps: int) -> int:
    """The goal step of the sample of step ``t``: drawn uniformly from ``t .. num_steps - 1``,
    a pure function of ``(seed, epoch, episode, t)`` (so a resumed stream draws the same)."""
    u = (derive_key(seed, epoch, episode, t, _GOAL_TAG) >> 11) * 2.0 ** -53
    return t + min(int(u * (num_steps - t)), num_steps - t - 1)


_GOAL_TAG = 0x474F414C


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a dataset makes its samples from its episodes: the windows, the JPEG mode, the
    sample transform, and, in a mixture, the dataset's index (``meta["dataset_index"]``).

    ``window_actions``: an action chunk for every row of the observation window
    (``[obs_window, action_horizon, A]``, see :func:`window_action_indices`) instead of the
    current step's only (``[action_horizon, A]``). ``goal_seed``: with a seed, every sample
    gets ``task``: each camera's frame at a goal step drawn by :func:`goal_step` (Octo's
    uniform goal relabelling) and that ``goal_step``. ``decode_sizes``: ``(observation key,
    (height, width))`` pairs of JPEG cameras decoded at the smallest of libjpeg's reduced
    scales that is at least that size (the size a later resize makes of them).

    Immutable; one is shared by every EpisodeSamples of a dataset."""

    obs_window: int
    action_horizon: int
    fast_jpeg: bool
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None
    dataset_index: int | None
    window_actions: bool = False
    goal_seed: int | None = None
    decode_sizes: tuple[tuple[str, tuple[int, int]], ...] = ()

    @classmethod
    def of(cls, dataset: Any, dataset_index: int | None = None) -> Recipe:
        """How ``dataset`` (an :class:`~torch_rlds.RLDSDataset`, or a stream without the
        sample options, which then take their defaults) makes its samples."""
        return cls(dataset.obs_window, dataset.action_horizon, dataset.fast_jpeg,
                   dataset.sample_transform, dataset_index,
                   getattr(dataset, "window_actions", False),
                   getattr(dataset, "goal_seed", None), getattr(dataset, "decode_sizes", ()))

    def finish(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample`` (as :meth:`EpisodeSamples.sample` makes it) transformed, and marked with
        the dataset's index in a mixture."""
        if self.transform is not None:
            sample = self.transform(sample)
        if self.dataset_index is not None:
            sample = {**sample, "meta": {**sample["meta"],
                                         "dataset_index": np.int64(self.dataset_index)}}
        return sample

    def same_sampling(self, other: Recipe) -> bool:
        """Whether samples of both are made alike but for the dataset index (no transform)."""
        return (self.transform is None and other.transform is None
                and not self.decode_sizes and not other.decode_sizes
                and (self.obs_window, self.action_horizon, self.fast_jpeg, self.window_actions,
                     self.goal_seed)
                == (other.obs_window, other.action_horizon, other.fast_jpeg,
                    other.window_actions, other.goal_seed))


class EpisodeSamples:
    """Makes the step samples of one decoded episode.

    Immutable after construction but for a cache of recently decoded frames (see
    ``keep_recent``), so samples of one episode may be made from several threads at once.

    Args:
      episode: a decoded episode (see :class:`torch_rlds.RLDSSource`).
      observation_keys: keys under ``steps/observation`` to emit.
      action_key: key under ``steps`` of the action tensor.
      language_key: key under ``steps`` of the language instruction (``None``: no instruction).
      episode_index: the episode's index in the source, for ``meta``.
      name: how to call the episode in errors (file and offset).
      check_images: check the header of every frame now (:meth:`EncodedImages.check_headers`),
        so that an episode with a broken image fails here rather than at one of its samples.
      keep_recent: keep a copy of the frames of the last sample, for the next one to reuse:
        worth it where consecutive samples come from consecutive steps (no shuffling) and
        observation windows overlap.
    """

    def __init__(self, episode: dict[str, Any], observation_keys: Sequence[str], action_key: str,
                 language_key: str | None, episode_index: int, name: str, *,
                 check_images: bool = False, keep_recent: bool = False) -> None:
        steps = episode["steps"]
        observation = steps.get("observation", {})
        self.name = name
        self.observation = {}
        for key in observation_keys:
            value = _lookup(observation, key)
            if value is None:
                raise KeyError(f"{name}: observation key {key!r} not in this episode (it has "
                               f"{sorted(flat_keys(observation))})")
            if check_images and isinstance(value, EncodedImages):
                try:
                    value.check_headers()
                except ImageDecodeError as e:
                    raise ImageDecodeError(f"{name}: {e}") from e
            self.observation[key] = value
        action = _lookup(steps, action_key)
        if action is None or isinstance(action, dict):
            raise KeyError(
                f"{name}: steps/{action_key} is "
                + ("missing" if action is None else f"a dict of {sorted(action)}")
                + "; the action must be one tensor (see the config's action keys)"
            )
        self.action = np.asarray(action, dtype=np.float32)
        self.num_steps = len(self.action)
        # The steps that may be sampled (all but where a dataset's filters say otherwise).
        self.sample_steps = np.arange(self.num_steps, dtype=np.int64)
        self.language = None if language_key is None else _lookup(steps, language_key)
        self.episode_index = episode_index
        self.keep_recent = keep_recent
        # How a mixture's samples of this episode are made (set by the mixture; None: as
        # the dataset that reads it says).
        self.recipe: Recipe | None = None
        self._recent: dict[str, dict[int, np.ndarray]] = {}
        self._layout = self._make_layout()

    def layout(self) -> tuple[tuple[tuple[str, tuple[int, ...], np.dtype, bool], ...],
                              tuple[int, ...]] | None:
        """What one step of a sample holds: ``((key, shape, dtype, is image) per observation
        key, action shape)``; ``None`` when an image's declared shape leaves a dimension open
        (its size is known only once decoded). Samples of episodes with equal layouts stack."""
        return self._layout

    def _make_layout(self):
        observations = []
        for key, value in self.observation.items():
            if isinstance(value, EncodedImages):
                if None in value.shape:
                    return None
                observations.append((key, value.shape, value.dtype, True))
            elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                observations.append((key, tuple(value.shape[1:]), value.dtype, False))
            else:  # text or anything else collate decides about
                return None
        return tuple(observations), tuple(self.action.shape[1:])

    def text(self, t: int) -> str:
        """The language instruction of step ``t`` (``""`` without one)."""
        # Text features decode to str; several OXE datasets store the instruction as a string
        # tensor, which decodes to bytes.
        return "" if self.language is None else text_value(
            self.language[t], f"{self.name}: step {t}'s instruction")

    def sample(self, t: int, obs_window: int, action_horizon: int, epoch: int, *,
               fast_jpeg: bool = False, window_actions: bool = False,
               goal_seed: int | None = None,
               decode_sizes: tuple[tuple[str, tuple[int, int]], ...] = ()) -> dict[str, Any]:
        """The sample of step ``t``; images of the window are decoded here. With
        ``window_actions`` the action chunk of every window row, with ``goal_seed`` the goal
        frames (see :class:`Recipe`)."""
        obs_idx, obs_pad = observation_indices(t, self.num_steps, obs_window)
        scales = dict(decode_sizes)
        if window_actions:
            act_idx, act_pad = window_action_indices(t, self.num_steps, obs_window,
                                                     action_horizon)
        else:
            act_idx, act_pad = action_indices(t, self.num_steps, action_horizon)
        observation = {}
        for key, value in self.observation.items():
            if isinstance(value, EncodedImages):
                try:
                    if (self.keep_recent and obs_window > 1 and None not in value.shape
                            and key not in scales):
                        observation[key] = self._decode_reusing(key, value, obs_idx, fast_jpeg)
                    else:
                        observation[key] = value.decode(obs_idx, fast=fast_jpeg,
                                                        scale_to=scales.get(key))
                except ImageDecodeError as e:
                    raise ImageDecodeError(f"{self.name}: {e}") from e
            else:
                observation[key] = value[obs_idx]
        sample = {
            "observation": observation,
            "observation_is_pad": obs_pad,
            "action": self.action[act_idx],
            "action_is_pad": act_pad,
            "language_instruction": self.text(t),
            "meta": {
                "episode_index": np.int64(self.episode_index),
                "step_index": np.int64(t),
                "epoch": np.int64(epoch),
            },
        }
        if goal_seed is not None:
            goal = goal_step(goal_seed, epoch, self.episode_index, t, self.num_steps)
            task: dict[str, Any] = {}
            for key, value in self.observation.items():
                if isinstance(value, EncodedImages):
                    try:
                        task[key] = value.decode([goal], fast=fast_jpeg,
                                                 scale_to=scales.get(key))[0]
                    except ImageDecodeError as e:
                        raise ImageDecodeError(f"{self.name}: {e}") from e
            task["goal_step"] = np.int64(goal)
            sample["task"] = task
        return sample

    def _decode_reusing(self, key: str, images: EncodedImages, indices: np.ndarray,
                        fast_jpeg: bool) -> np.ndarray:
        """``images.decode(indices)``, copying the frames the previous sample decoded. Only
        for frames of a known shape (no ``None`` in ``images.shape``: the caller checks)."""
        recent = self._recent.get(key, {})
        shape = cast("tuple[int, ...]", images.shape)
        out = np.empty((len(indices), *shape), images.dtype)
        rows: dict[int, int] = {}
        for row, t in enumerate(indices.tolist()):
            if t in rows:
                out[row] = out[rows[t]]
                continue
            frame = recent.get(t)
            if frame is not None:
                out[row] = frame
            else:
                decode_image(images.encoded[t], images.shape, images.dtype, fast=fast_jpeg,
                             out=out[row], name=f"{images.name}[{t}]", format=images.format)
            rows[t] = row
        # Copies: the sample's own arrays are the caller's to change.
        self._recent[key] = {t: out[row].copy() for t, row in rows.items()}
        return out


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
