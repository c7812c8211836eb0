"""From an episode to step samples: observation windows and action chunks with pad masks.

The sample of step ``t`` of an episode of ``T`` steps holds the observations of steps
``t - obs_window + 1 .. t`` and the actions of steps ``t .. t + action_horizon - 1``. Indices
before the episode's start repeat step 0 and indices past its end repeat step ``T - 1``; the
``*_is_pad`` masks are ``True`` exactly there. Repeating real values (rather than zeros) keeps
padded entries in the data's range, so normalisation and image models see plausible inputs;
losses should use the masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from torch_rlds._images import EncodedImages


def observation_indices(t: int, num_steps: int, obs_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Step indices of the observation window ending at ``t``, and its pad mask."""
    raw = np.arange(t - obs_window + 1, t + 1)
    return np.clip(raw, 0, num_steps - 1), raw < 0


def action_indices(t: int, num_steps: int, action_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Step indices of the action chunk starting at ``t``, and its pad mask."""
    raw = np.arange(t, t + action_horizon)
    return np.clip(raw, 0, num_steps - 1), raw >= num_steps


class EpisodeSampler:
    """Makes the step samples of one decoded episode.

    Args:
      episode: a decoded episode (see :class:`torch_rlds.RLDSSource`).
      observation_keys: keys under ``steps/observation`` to emit.
      action_key: key under ``steps`` of the action tensor.
      language_key: key under ``steps`` of the language instruction (``None``: no instruction).
      episode_index: the episode's index in the source, for ``meta``.
      name: how to call the episode in errors (file and offset).
    """

    def __init__(self, episode: dict[str, Any], observation_keys: Sequence[str], action_key: str,
                 language_key: str | None, episode_index: int, name: str) -> None:
        steps = episode["steps"]
        observation = steps.get("observation", {})
        self.observation = {}
        for key in observation_keys:
            value = _lookup(observation, key)
            if value is None:
                raise KeyError(f"{name}: observation key {key!r} not in this episode (it has "
                               f"{sorted(_flat_keys(observation))})")
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
        self.language = None if language_key is None else _lookup(steps, language_key)
        self.episode_index = episode_index

    def sample(self, t: int, obs_window: int, action_horizon: int, epoch: int, *,
               fast_jpeg: bool = False) -> dict[str, Any]:
        """The sample of step ``t``; images of the window are decoded here."""
        obs_idx, obs_pad = observation_indices(t, self.num_steps, obs_window)
        act_idx, act_pad = action_indices(t, self.num_steps, action_horizon)
        observation = {}
        for key, value in self.observation.items():
            if isinstance(value, EncodedImages):
                observation[key] = value.decode(obs_idx, fast=fast_jpeg)
            else:
                observation[key] = value[obs_idx]
        language = "" if self.language is None else _text(self.language[t])
        return {
            "observation": observation,
            "observation_is_pad": obs_pad,
            "action": self.action[act_idx],
            "action_is_pad": act_pad,
            "language_instruction": language,
            "meta": {
                "episode_index": np.int64(self.episode_index),
                "step_index": np.int64(t),
                "epoch": np.int64(epoch),
            },
        }


def _text(value: Any) -> str:
    # Text features decode to str; several OXE datasets store the instruction as a string
    # Tensor, which decodes to bytes.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, f"{prefix}{k}/"))
        else:
            keys.append(prefix + k)
    return keys
