"""Observation windows, action chunks and pad masks, checked against the values the synthetic
data encodes (state[t] = [episode, t, 2, ...], action[t] = [episode, t, -2, ...], frames
spelling (episode, t))."""

from __future__ import annotations

import numpy as np
import pytest

import torch_rlds
from torch_rlds import synthetic
from torch_rlds._samples import action_indices, observation_indices


def test_observation_indices_repeat_the_first_step():
    idx, pad = observation_indices(1, num_steps=5, obs_window=4)
    assert idx.tolist() == [0, 0, 0, 1]
    assert pad.tolist() == [True, True, False, False]
    idx, pad = observation_indices(4, num_steps=5, obs_window=2)
    assert idx.tolist() == [3, 4] and pad.tolist() == [False, False]


def test_action_indices_repeat_the_last_step():
    idx, pad = action_indices(3, num_steps=5, action_horizon=4)
    assert idx.tolist() == [3, 4, 4, 4]
    assert pad.tolist() == [False, False, True, True]
    idx, pad = action_indices(0, num_steps=1, action_horizon=3)
    assert idx.tolist() == [0, 0, 0] and pad.tolist() == [False, True, True]


@pytest.mark.parametrize("obs_window, action_horizon", [(1, 1), (3, 4), (5, 16)])
def test_every_sample_matches_the_encoded_values(small_dataset, small_spec, obs_window,
                                                 action_horizon):
    spec = small_spec
    lengths = spec.lengths()[:spec.num_episodes]
    dataset = torch_rlds.RLDSDataset(small_dataset, obs_window=obs_window,
                                     action_horizon=action_horizon, shuffle=False, repeat=False)
    samples = list(dataset)
    # shuffle=False and one reader: episodes in order, steps in order.
    assert [(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])) for s in samples] \
        == [(e, t) for e, n in enumerate(lengths) for t in range(n)]
    for sample in samples:
        e, t = int(sample["meta"]["episode_index"]), int(sample["meta"]["step_index"])
        n = lengths[e]
        assert int(sample["meta"]["epoch"]) == 0
        obs_steps = list(range(t - obs_window + 1, t + 1))
        seen = [max(s, 0) for s in obs_steps]
        observation = sample["observation"]
        assert sorted(observation) == ["image", "state", "wrist_image"]
        np.testing.assert_array_equal(
            observation["state"], np.stack([synthetic.state_value(spec, e, s) for s in seen]))
        assert observation["state"].dtype == np.float32
        assert sample["observation_is_pad"].dtype == np.bool_
        assert sample["observation_is_pad"].tolist() == [s < 0 for s in obs_steps]
        assert observation["image"].shape == (obs_window, 64, 64, 3)
        assert observation["image"].dtype == np.uint8
        assert observation["wrist_image"].shape == (obs_window, 32, 48, 3)
        assert [synthetic.image_ids(f) for f in observation["image"]] == [(e, s) for s in seen]
        assert [synthetic.image_ids(f) for f in observation["wrist_image"]] == [
            (e, s) for s in seen]
        act_steps = list(range(t, t + action_horizon))
        np.testing.assert_array_equal(
            sample["action"],
            np.stack([synthetic.action_value(spec, e, min(s, n - 1)) for s in act_steps]))
        assert sample["action"].dtype == np.float32
        assert sample["action"].shape == (action_horizon, spec.action_dim)
        assert sample["action_is_pad"].dtype == np.bool_
        assert sample["action_is_pad"].tolist() == [s >= n for s in act_steps]
        assert sample["language_instruction"] == synthetic.instruction(e)


def test_window_at_the_start_and_chunk_past_the_end(small_dataset, small_spec):
    # Episode 5 has 3 steps, fewer than the action horizon of 4.
    dataset = torch_rlds.RLDSDataset(small_dataset, obs_window=3, action_horizon=4,
                                     shuffle=False, repeat=False)
    samples = {(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])): s
               for s in dataset}
    assert small_spec.lengths()[5] == 3
    first = samples[(5, 0)]
    assert first["observation"]["state"][:, :2].tolist() == [[5, 0]] * 3
    assert first["observation_is_pad"].tolist() == [True, True, False]
    assert [synthetic.image_ids(f) for f in first["observation"]["image"]] == [(5, 0)] * 3
    assert first["action"][:, :2].tolist() == [[5, 0], [5, 1], [5, 2], [5, 2]]
    assert first["action_is_pad"].tolist() == [False, False, False, True]
    last = samples[(5, 2)]
    assert last["observation"]["state"][:, :2].tolist() == [[5, 0], [5, 1], [5, 2]]
    assert last["observation_is_pad"].tolist() == [False, False, False]
    assert last["action"][:, :2].tolist() == [[5, 2]] * 4
    assert last["action_is_pad"].tolist() == [False, True, True, True]


def test_observation_keys_select_what_is_emitted(small_dataset):
    dataset = torch_rlds.RLDSDataset(small_dataset, observation_keys=["state"], shuffle=False)
    sample = next(iter(dataset))
    assert list(sample["observation"]) == ["state"]


@pytest.mark.parametrize("field, value", [("observation_keys", ["nope"]),
                                          ("action_key", "nope")])
def test_unknown_keys_are_named(small_dataset, field, value):
    with pytest.raises(ValueError, match="'nope'"):
        torch_rlds.RLDSDataset(small_dataset, **{field: value})


def test_text_that_is_not_utf8_is_refused_naming_where_it_is():
    from torch_rlds import EpisodeDecodeError
    from torch_rlds._features import text_value
    from torch_rlds._samples import EpisodeSamples

    assert text_value(b"pick up the cup", "x") == "pick up the cup"
    assert text_value("already text", "x") == "already text"
    episode = {"steps": {"observation": {}, "action": np.zeros((2, 3), np.float32),
                         "language_instruction": np.array([b"ok", b"\xff\xfe"], dtype=object)}}
    sampler = EpisodeSamples(episode, (), "action", "language_instruction", 0, "shard record 4")
    assert sampler.text(0) == "ok"
    with pytest.raises(EpisodeDecodeError, match=r"shard record 4: step 1's instruction: text "
                                                 r"is not UTF-8"):
        sampler.text(1)
