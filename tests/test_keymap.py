"""Key maps: the standard episode from a dataset's own keys, and errors that list the keys."""

from __future__ import annotations

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds._samples import EpisodeSamples
from torch_rlds.keymap import KeyMap, KeyMapError, key_map_from_config

SYNTHETIC = KeyMap(state_keys=("observation/state",),
                   image_keys={"primary": "observation/image", "wrist": "observation/wrist_image"},
                   action_keys=("action",), language_key="language_instruction")


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    return torch_rlds.RLDSSource(_published.write_published(tmp_path_factory.mktemp("pub"),
                                                            "bridge"))


def test_apply_gives_the_standard_episode(small_dataset, small_spec):
    source = torch_rlds.RLDSSource(small_dataset)
    lengths = small_spec.lengths()
    for e in range(len(source)):
        standard = SYNTHETIC.apply(source.episode(e))
        steps = standard["steps"]
        n = lengths[e]
        assert set(steps["observation"]) == {"state", "image_primary", "image_wrist"}
        np.testing.assert_array_equal(
            steps["observation"]["state"],
            np.stack([synthetic.state_value(small_spec, e, t) for t in range(n)]))
        np.testing.assert_array_equal(
            steps["action"], np.stack([synthetic.action_value(small_spec, e, t) for t in range(n)]))
        assert steps["action"].dtype == np.float32
        assert list(steps["language_instruction"]) == [synthetic.instruction(e)] * n
        np.testing.assert_array_equal(steps["is_first"], np.arange(n) == 0)
        images = steps["observation"]["image_wrist"]
        assert isinstance(images, torch_rlds.EncodedImages)  # still encoded
        assert synthetic.image_ids(images[n - 1]) == (e, n - 1)
        assert int(standard["episode_metadata"]["episode_id"]) == e


def test_state_keys_are_concatenated_in_order(write_dataset):
    spec = synthetic.SyntheticSpec(num_episodes=2, min_steps=3, max_steps=4, zlib_tensor=True,
                                   cameras=(), texture=False)
    source = torch_rlds.RLDSSource(write_dataset(num_episodes=2, min_steps=3, max_steps=4,
                                                 zlib_tensor=True, cameras=()))
    key_map = KeyMap(state_keys=("observation/joint_zlib", "observation/state"))
    assert key_map.validate(source)["state"] == (10,)
    steps = key_map.apply(source.episode(1))["steps"]
    t = np.arange(spec.lengths()[1], dtype=np.float64)
    zlib_part = np.stack([np.ones_like(t), t, np.full_like(t, 0.5)], axis=1)
    state_part = np.stack([synthetic.state_value(spec, 1, int(i)) for i in t])
    expected = np.concatenate([zlib_part, state_part], axis=1)
    np.testing.assert_array_equal(steps["observation"]["state"], expected.astype(np.float32))
    assert steps["observation"]["state"].dtype == np.float32  # float64 in the dataset


def test_split_action_scalars_and_string_tensors(bridge):
    key_map = KeyMap(state_keys=("observation/state",), image_keys={"primary": "observation/image"},
                     action_keys=("action/world_vector", "action/rotation_delta",
                                  "action/open_gripper"),
                     language_key="observation/natural_language_instruction")
    assert key_map.validate(bridge) == {"state": (7,), "action": (7,),
                                        "image_primary": (480, 640, 3),
                                        "language_instruction": ()}
    raw = bridge.episode(1)["steps"]
    steps = key_map.apply(bridge.episode(1))["steps"]
    action = raw["action"]
    np.testing.assert_array_equal(steps["action"], np.concatenate(
        [action["world_vector"], action["rotation_delta"],
         action["open_gripper"][:, None].astype(np.float32)], axis=1))
    np.testing.assert_array_equal(steps["action"][:, 6], [0, 1, 0, 1])  # bool -> 0/1
    # The dataset stores the instruction as a string tensor (bytes); the key map gives str.
    assert isinstance(raw["observation"]["natural_language_instruction"][0], bytes)
    assert list(steps["language_instruction"]) == [synthetic.instruction(1)] * 4


def test_missing_key_names_the_keys_the_dataset_has(bridge):
    with pytest.raises(KeyMapError) as e:
        KeyMap(state_keys=("observation/proprio",)).validate(bridge)
    message = str(e.value)
    assert "bridge" in message and "key_map.state" in message and "'observation/proprio'" in message
    for key in ("observation/state", "action/world_vector", "observation/image"):
        assert key in message
    with pytest.raises(KeyMapError, match=r"'action' is a group of features \['action/open_"):
        KeyMap(action_keys=("action",)).validate(bridge)
    with pytest.raises(KeyMapError, match="key_map.images.wrist: 'observation/state' is a tensor"):
        KeyMap(action_keys=("action/world_vector",),
               image_keys={"wrist": "observation/state"}).validate(bridge)
    with pytest.raises(KeyMapError, match="must be numeric tensors"):
        KeyMap(action_keys=("observation/natural_language_instruction",)).validate(bridge)
    with pytest.raises(KeyMapError, match="not text"):
        KeyMap(action_keys=("action/world_vector",), language_key="reward").validate(bridge)


def test_an_empty_episode_maps_to_empty_arrays():
    episode = {"steps": {"observation": {"state": np.zeros((0, 7), np.float64)},
                         "action": {"a": np.zeros((0, 2, 3), np.float32),
                                    "b": np.zeros((0,), np.bool_)},
                         "language_instruction": np.array([], dtype=object)}}
    key_map = KeyMap(state_keys=("observation/state",), action_keys=("action/a", "action/b"),
                     language_key="language_instruction")
    steps = key_map.apply(episode)["steps"]
    assert steps["observation"]["state"].shape == (0, 7)
    assert steps["action"].shape == (0, 7) and steps["action"].dtype == np.float32
    assert steps["language_instruction"].shape == (0,)


def test_validate_reads_no_episode(bridge, monkeypatch):
    monkeypatch.setattr(type(bridge), "read", lambda *a: pytest.fail("read an episode"))
    key_map = KeyMap(action_keys=("action/world_vector",))
    assert key_map.validate(bridge) == {"action": (3,)}
    assert key_map.validate(_published.published("bridge").features()) == {"action": (3,)}


def test_apply_names_the_missing_key_and_the_episode_keys(small_dataset):
    episode = torch_rlds.RLDSSource(small_dataset).episode(0)
    with pytest.raises(KeyMapError) as e:
        KeyMap(action_keys=("act",)).apply(episode, name="shard-0 @ 12")
    assert "shard-0 @ 12: key_map.action: 'act'" in str(e.value)
    assert "'observation/state'" in str(e.value) and "'action'" in str(e.value)
    with pytest.raises(KeyMapError, match="'observation' is a group"):
        KeyMap(state_keys=("observation",)).apply(episode)


@pytest.mark.parametrize("raw, message", [
    ({"state": ["observation/state"], "camera": {}}, r"unknown fields \['camera'\]"),
    ({"action": []}, "key_map.action must name at least one"),
    ({"images": {"Primary": "observation/image"}}, "camera role 'Primary'"),
    ({"images": ["observation/image"]}, "key_map.images must be a mapping"),
    ({"state": ["steps/observation/state"]}, "drop 'steps/'"),
    ({"state": ["observation/state", "observation/state"]}, "keys repeat"),
    ({"language": 3}, "key_map.language: 3 is not a feature key"),
    ("observation/state", "must be a mapping"),
])
def test_from_dict_errors_name_the_field(raw, message):
    with pytest.raises(KeyMapError, match=message):
        KeyMap.from_dict(raw)


def test_from_dict_round_trip_and_single_keys():
    key_map = KeyMap.from_dict({"state": "observation/state",
                                "images": {"primary": "observation/image"},
                                "action": "action", "language": None})
    assert key_map.state_keys == ("observation/state",) and key_map.action_keys == ("action",)
    assert KeyMap.from_dict(key_map.to_dict()) == key_map
    assert hash(KeyMap.from_dict(key_map.to_dict())) == hash(key_map)
    assert key_map.observation_keys() == ("state", "image_primary")
    assert key_map.digest() != KeyMap.from_dict({"action": "action"}).digest()
    with pytest.raises(KeyMapError, match="data.key_map: unknown fields"):
        KeyMap.from_dict({"bad": 1}, "data.key_map")


def test_key_map_from_a_config_without_one():
    from torch_rlds.config import DataConfig

    key_map = key_map_from_config(DataConfig(action_key="act"))
    assert key_map.state_keys == ("observation/state",) and key_map.action_keys == ("act",)


def test_samples_of_a_mapped_episode(small_dataset):
    """What the dataset hook does: key map, then the usual windows (images decoded there)."""
    source = torch_rlds.RLDSSource(small_dataset)
    episode = SYNTHETIC.apply(source.episode(2))
    sampler = EpisodeSamples(episode, SYNTHETIC.observation_keys(), "action",
                             "language_instruction", 2, source.describe(2))
    sample = sampler.sample(1, obs_window=2, action_horizon=3, epoch=0)
    assert sample["observation"]["image_primary"].shape == (2, 64, 64, 3)
    assert sample["observation"]["image_wrist"].shape == (2, 32, 48, 3)
    assert synthetic.image_ids(sample["observation"]["image_primary"][1]) == (2, 1)
    np.testing.assert_array_equal(sample["observation"]["state"][:, 1], [0, 1])
    assert sample["language_instruction"] == synthetic.instruction(2)
