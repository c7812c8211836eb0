"""The real-dataset configs against stand-ins written with each dataset's published features."""

from __future__ import annotations

import dataclasses
import importlib.resources

import numpy as np
import pytest
import yaml

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds._features import iter_leaves
from torch_rlds._samples import EpisodeSamples
from torch_rlds.config import DataConfig, config_names, load_config
from torch_rlds.keymap import KeyMap
from torch_rlds.transforms import TransformConfig

# config -> (state dims, action dims, camera roles) that the config's key map must produce (the
# plain key-map configs; the recipes built on them are checked in test_recipes.py)
EXPECTED = {
    "bridge": (7, 7, {"primary": (480, 640, 3)}),
    "bridge_dataset": (7, 7, {role: (256, 256, 3)
                              for role in ("primary", "secondary", "third", "fourth")}),
    "fractal": (8, 7, {"primary": (256, 320, 3)}),
    "droid": (8, 8, {"primary": (180, 320, 3), "secondary": (180, 320, 3),
                     "wrist": (180, 320, 3)}),
    "libero": (8, 7, {"primary": (256, 256, 3), "wrist": (256, 256, 3)}),
}
CONFIGS = sorted(EXPECTED)


def _data_section(config: str) -> dict:
    text = (importlib.resources.files("torch_rlds.configs") / f"{config}.yaml").read_text()
    return yaml.safe_load(text)["data"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {config: _published.write_published(root, config, num_episodes=2)
            for config in CONFIGS}


def test_every_published_dataset_has_its_configs():
    shipped = set(config_names())
    assert set(CONFIGS) <= {e.config for e in _published.PUBLISHED.values()}
    for entry in _published.PUBLISHED.values():
        for config in entry.configs:
            assert config in shipped, config
            assert _data_section(config)["path"] == entry.name
            assert _published.published(config) is entry


@pytest.mark.parametrize("config", CONFIGS)
def test_written_features_are_the_published_ones(written, config):
    source = torch_rlds.RLDSSource(written[config])
    entry = _published.published(config)
    assert (source.info.name, source.info.version) == (entry.name, entry.version)
    assert source.leaves() == tuple(iter_leaves(entry.features()))


@pytest.mark.parametrize("config", CONFIGS)
def test_config_key_map_validates_and_maps(written, config):
    data = _data_section(config)
    key_map = KeyMap.from_dict(data["key_map"], "data.key_map")
    source = torch_rlds.RLDSSource(written[config])
    state_dim, action_dim, cameras = EXPECTED[config]
    shapes = key_map.validate(source)
    assert shapes["state"] == (state_dim,) and shapes["action"] == (action_dim,)
    assert {k[len("image_"):]: v for k, v in shapes.items() if k.startswith("image_")} == cameras
    assert "language_instruction" in shapes
    for e in range(len(source)):
        raw = source.episode(e)["steps"]
        steps = key_map.apply(source.episode(e))["steps"]
        n = len(raw["is_first"])
        for field, keys, value in (("state", key_map.state_keys, steps["observation"]["state"]),
                                   ("action", key_map.action_keys, steps["action"])):
            parts = []
            for key in keys:
                part = raw
                for name in key.split("/"):
                    part = part[name]
                parts.append(np.asarray(part, np.float32).reshape(n, -1))
            np.testing.assert_array_equal(value, np.concatenate(parts, axis=1), err_msg=field)
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value[:, 0], e)  # every part starts with the episode
        assert list(steps["language_instruction"]) == [synthetic.instruction(e)] * n
        for role in cameras:
            frames = steps["observation"][f"image_{role}"]
            assert synthetic.image_ids(frames[n - 1]) == (e, n - 1)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_sections_and_transform_chain(written, config):
    data = _data_section(config)
    # Besides DataConfig's fields the YAML has two sections, key_map and transform.
    known = {f.name for f in dataclasses.fields(DataConfig)}
    assert set(data) <= known | {"key_map", "transform"}
    assert {"key_map", "transform"} <= set(data)
    transform = TransformConfig.from_dict(data["transform"])
    assert transform.image_size == (224, 224)
    key_map = KeyMap.from_dict(data["key_map"])
    if {"key_map", "transform"} <= known:  # once DataConfig carries them, the config loads
        loaded = load_config(config, [f"data.data_dir={written[config].parent.parent}"])
        assert KeyMap.from_dict(loaded.data.key_map) == key_map
        assert TransformConfig.from_dict(loaded.data.transform) == transform
    source = torch_rlds.RLDSSource(written[config])
    episode = key_map.apply(source.episode(0))
    sampler = EpisodeSamples(episode, key_map.observation_keys(), "action",
                             "language_instruction", 0, source.describe(0))
    sample = transform.build(seed=0)(sampler.sample(2, 1, data["action_horizon"], 0))
    for role in transform.cameras:
        assert sample["observation"][f"image_{role}"].shape == (1, 224, 224, 3)
        assert bool(sample["image_mask"][role])
    assert sample["action"].shape == (data["action_horizon"], EXPECTED[config][1])


def test_unknown_published_name():
    with pytest.raises(KeyError, match="known"):
        _published.published("kuka_v2")
