"""Configs: shipped names, overrides, validation errors, and loaders built from them."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds.config import (
    Config,
    ConfigError,
    DataConfig,
    LoaderConfig,
    config_names,
    format_config,
    load_config,
)
from torch_rlds.testing import assert_resumes_exactly
from torch_rlds.trajectory import FilterConfig, TrajectoryConfig


def test_shipped_configs_load():
    assert {"demo", "bridge", "fractal", "droid", "libero"} <= set(config_names())
    for name in config_names():
        config = load_config(name)
        assert config.name == name
        assert config.loader.batch_size >= 1


def test_overrides_are_typed_and_applied():
    config = load_config("demo", ["loader.batch_size=8", "data.seed=3", "data.shuffle=false",
                                  "data.observation_keys=[state]"])
    assert config.loader.batch_size == 8 and config.data.seed == 3
    assert config.data.shuffle is False and config.data.observation_keys == ("state",)


@pytest.mark.parametrize("override, message", [
    ("data.shuffle_window=0", r"data.shuffle_window must be an int >= 1 \(got 0\)"),
    ("loader.batch_size=-1", r"loader.batch_size must be an int >= 1 \(got -1\)"),
    ("data.shuffle=maybe", r"data.shuffle must be true or false \(got 'maybe'\)"),
    ("data.colour=red", r"unknown fields \['colour'\]"),
    ("loader", r"must look like section.field=value"),
    ("data.transform.normalize=sideways", r"normalize"),
])
def test_bad_fields_name_field_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"no config named 'nope'.*demo"):
        load_config("nope")


def test_config_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  path: demo\n  obs_window: 2\nloader:\n  num_workers: 0\n")
    config = load_config(str(path))
    assert config.name == "mine" and config.data.obs_window == 2


def test_global_batch_must_divide_among_processes():
    config = Config(loader=LoaderConfig(batch_size=30))
    assert config.local_batch_size(3) == 10
    with pytest.raises(ConfigError, match=r"batch_size 30 does not divide among 4 .*multiple of 4"):
        config.local_batch_size(4)


def test_dataset_name_without_data_dir_is_explained():
    config = Config(data=DataConfig(path="bridge"))
    with pytest.raises(ConfigError, match="data.data_dir"):
        config.dataset_path()


def test_key_map_with_observation_keys_is_refused():
    with pytest.raises(ConfigError, match="observation_keys must be null"):
        DataConfig(path="x/y", observation_keys=("state",),
                   key_map={"state": ["observation/state"], "action": ["action"]})


def test_process_overrides():
    config = Config(process_index=1, process_count=2)
    assert config.processes() == (1, 2)
    with pytest.raises(ConfigError, match=r"process_index must be < process_count"):
        Config(process_index=2, process_count=2)


def test_make_loader_splits_the_global_batch(small_dataset):
    config = load_config("demo", [f"data.path={small_dataset}", "loader.batch_size=8",
                                  "loader.num_workers=0", "data.action_horizon=4"])
    loader = config.make_loader(process_index=1, process_count=2)
    assert loader.batch_size == 4 and loader.dataset.process_index == 1
    batch = next(iter(loader))
    assert batch["action"].shape == (4, 4, 7)


@pytest.fixture(scope="module")
def bridge_like(tmp_path_factory):
    return _published.write_published(tmp_path_factory.mktemp("bridge"), "bridge")


def test_real_dataset_config_with_key_map_and_augmentation_resumes_exactly(bridge_like):
    overrides = [f"data.path={bridge_like}", "loader.batch_size=4", "loader.num_workers=0",
                 "data.transform.augment=true", "data.transform.image_size=[32, 32]",
                 "data.shuffle_window=2"]
    config = load_config("bridge", overrides)
    batch = next(iter(config.make_loader()))
    assert batch["observation"]["image_primary"].shape == (4, 1, 32, 32, 3)
    assert batch["observation"]["state"].shape == (4, 1, 7)
    assert batch["action"].shape == (4, config.data.action_horizon, 7)
    assert all(isinstance(s, str) and not s.startswith("b'") for s in
               batch["language_instruction"])
    assert_resumes_exactly(lambda: load_config("bridge", overrides).make_loader(), 6)


def test_dataset_key_map_must_match_features(small_dataset):
    key_map = torch_rlds.KeyMap(state_keys=("observation/proprio",), action_keys=("action",))
    with pytest.raises(torch_rlds.KeyMapError, match=r"observation/proprio.*observation/state"):
        torch_rlds.RLDSDataset(small_dataset, key_map=key_map)


def test_explicit_language_key_must_exist(small_dataset):
    with pytest.raises(ValueError, match=r"language_key 'instruction' is not a step feature"):
        torch_rlds.RLDSDataset(small_dataset, language_key="instruction")


def test_mixture_config_builds_a_weighted_resumable_loader(small_dataset, tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(
        "mixture:\n  seed: 1\n  datasets:\n"
        f"    - {{config: demo, weight: 3, overrides: [data.path={small_dataset}, "
        "data.split=train, data.action_horizon=4]}\n"
        f"    - {{config: demo, weight: 1, overrides: [data.path={small_dataset}, "
        "data.split=val, data.action_horizon=4]}\n"
        "loader:\n  batch_size: 8\n  num_workers: 0\n")
    config = load_config(str(path))
    loader = config.make_loader()
    assert isinstance(loader.dataset, torch_rlds.MixtureDataset)
    counts = [0, 0]
    iterator = iter(loader)
    for _ in range(25):
        for d in next(iterator)["meta"]["dataset_index"].tolist():
            counts[d] += 1
    # 200 independent draws with p = 3/4: the binomial sd is ~6, so 150 +- 30 is a 5-sigma band.
    assert abs(counts[0] - 150) <= 30
    assert_resumes_exactly(lambda: load_config(str(path)).make_loader(), 5)


def test_shipped_mixture_config(tmp_path):
    config = load_config("demo_mixture")
    assert [e.weight for e in config.mixture.datasets] == [3.0, 1.0]
    with pytest.raises(ConfigError, match=r"mixture weight of demo must be a number > 0"):
        load_config("demo_mixture", ["mixture.datasets=[{config: demo, weight: 0}]"])


def test_num_workers_defaults_to_the_cpus_available_capped(monkeypatch):
    from torch_rlds import config as config_module

    for cpus, expected in ((1, 1), (2, 2), (6, 6), (64, config_module.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(config_module, "available_cpus", lambda cpus=cpus: cpus)
        assert LoaderConfig().num_workers == expected
        for name in config_names():  # no shipped config asks for workers of its own
            assert load_config(name).loader.num_workers == expected, name
    assert load_config("demo", ["loader.num_workers=3"]).loader.num_workers == 3


def test_a_camera_role_the_key_map_lacks_is_refused_with_its_roles(bridge_like):
    with pytest.raises(ConfigError, match=r"cameras: \['wrst'\] not among the camera roles of "
                                          r"data.key_map.images \(\['primary'\]\)"):
        load_config("bridge", [f"data.path={bridge_like}",
                               "data.transform.cameras=[primary, wrst]"])


def test_a_camera_mapped_to_null_is_zero_filled_and_masked(bridge_like):
    config = load_config("bridge", [
        f"data.path={bridge_like}", "loader.batch_size=2", "loader.num_workers=0",
        "data.key_map.images={primary: observation/image, wrist: null}",
        "data.transform.cameras=[primary, wrist]", "data.transform.image_size=[32, 32]"])
    assert config.data.key_map.cameras() == ("primary",)
    batch = next(iter(config.make_loader()))
    assert batch["image_mask"]["primary"].all() and not batch["image_mask"]["wrist"].any()
    assert batch["observation"]["image_wrist"].shape == (2, 1, 32, 32, 3)
    assert int(batch["observation"]["image_wrist"].abs().sum()) == 0
    assert int(batch["observation"]["image_primary"].sum()) > 0


def test_trajectory_and_filter_sections_load_check_and_print_back(bridge_like, tmp_path):
    overrides = [f"data.path={bridge_like}",
                 "data.trajectory=[{op: invert_gripper, dims: [6]}, "
                 "{op: relabel_actions, dims: '0:3', last: repeat}]",
                 "data.filters={episode: [{op: min_length, steps: 2}], "
                 "sample: [{op: idle_chunk, horizon: 4}]}"]
    config = load_config("bridge", overrides)
    assert isinstance(config.data.trajectory, TrajectoryConfig)
    assert [e.op for e in config.data.trajectory.transforms] == ["invert_gripper",
                                                                 "relabel_actions"]
    assert isinstance(config.data.filters, FilterConfig)
    assert config.data.filters.sample[0].horizon == 4
    printed = tmp_path / "printed.yaml"
    printed.write_text(format_config(config))
    again = load_config(str(printed))
    assert again.data.trajectory == config.data.trajectory
    assert again.data.filters == config.data.filters
    assert load_config("bridge").data.trajectory is None


@pytest.mark.parametrize("override, message", [
    ("data.trajectory=[{op: spin}]", r"data.trajectory\[0\]: unknown op 'spin'"),
    ("data.trajectory=[{op: clip, high: x}]",
     r"data.trajectory\[0\]: clip.high must be a number \(got 'x'\)"),
    ("data.filters={episode: [{op: min_length, steps: 0}]}",
     r"data.filters.episode\[0\]: min_length.steps must be an int >= 1 \(got 0\)"),
    ("data.filters={samples: []}", r"data.filters: unknown fields \['samples'\]"),
])
def test_bad_trajectory_and_filter_entries_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_configs_decode_jpeg_with_tf_decode_jpegs_pixels_unless_told(write_dataset):
    path = write_dataset(num_episodes=2, min_steps=3, max_steps=3, texture=True,
                         cameras=(synthetic.Camera("image", 64, 64),))
    data = torch_rlds.RLDSSource(path).episode(0)["steps"]["observation"]["image"].encoded[0]
    base = [f"data.path={path}", "data.shuffle=false", "data.observation_keys=[image]"]
    pixels = {}
    for setting in (None, "false"):
        overrides = base + ([] if setting is None else [f"data.fast_jpeg={setting}"])
        config = load_config("demo", overrides)
        sample = next(iter(config.make_dataset()))
        assert (int(sample["meta"]["episode_index"]), int(sample["meta"]["step_index"])) == (0, 0)
        pixels[setting] = sample["observation"]["image"][0]
    assert load_config("demo").data.fast_jpeg is True
    np.testing.assert_array_equal(pixels[None], simplejpeg.decode_jpeg(data, fastdct=True))
    np.testing.assert_array_equal(pixels["false"], simplejpeg.decode_jpeg(data, fastdct=False))
    assert not np.array_equal(pixels[None], pixels["false"])


def test_mixture_balance_and_data_dir_are_checked_and_applied():
    with pytest.raises(ConfigError, match=r"mixture.balance must be .*episodes or steps .got 'sometimes'"):
        load_config("oxe_rtx", ["mixture.balance=sometimes"])
    config = load_config("oxe_rtx", ["mixture.data_dir=/elsewhere"])
    entry = config.mixture.datasets[0]
    assert load_config(entry.config, config.mixture.entry_overrides(entry)).data.data_dir == (
        "/elsewhere")
    assert "  data_dir: /elsewhere" in format_config(config)


def test_data_fields_and_dataset_arguments_are_one_set_of_defaults():
    import dataclasses
    import inspect

    from torch_rlds.config import DATASET_FIELDS

    parameters = inspect.signature(torch_rlds.RLDSDataset.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    # What a config does not set on the dataset: the source, the process (from the runtime),
    # the batch (from the loader section) and what the transform section builds.
    not_config = {"self", "source", "process_index", "process_count", "sample_transform",
                  "batch_size", "drop_last", "decode_sizes"}
    assert set(parameters) - not_config == set(DATASET_FIELDS) | {"split", "data_dir"}
    for name in [*DATASET_FIELDS, "split", "data_dir"]:
        assert parameters[name].default == fields[name], name


def test_on_corrupt_and_decode_threads_reach_the_dataset():
    dataset = load_config("demo", ["data.on_corrupt=skip", "data.decode_threads=3"]).make_dataset()
    assert (dataset.on_corrupt, dataset.decode_threads) == ("skip", 3)
    with pytest.raises(ConfigError, match="data.on_corrupt"):
        load_config("demo", ["data.on_corrupt=ignore"])
