"""The recipe configs (Octo's standardisation of each Open X-Embodiment dataset, its mixtures,
openpi's DROID recipe) against stand-ins written with each dataset's published features."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds.config import load_config
from torch_rlds.keymap import KeyMap, lookup
from torch_rlds.trajectory import (
    TrajectoryConfig,
    read_keys,
    trajectory_from_episode,
    validate_sections,
)

# Octo's standardisation: the width of the state it calls proprio, and whether it clears the
# instruction as uninformative (octo/data/oxe/oxe_standardization_transforms.py). Actions are
# 7-d everywhere: xyz, roll-pitch-yaw, gripper.
OCTO = {
    "bridge_octo": (7, False), "oxe_fractal": (8, False), "oxe_kuka": (8, True),
    "oxe_taco_play": (7, False), "oxe_jaco_play": (7, False),
    "oxe_berkeley_cable_routing": (7, True), "oxe_roboturk": (1, True),
    "oxe_nyu_door_opening": (1, True), "oxe_viola": (8, True),
    "oxe_berkeley_autolab_ur5": (8, False), "oxe_toto": (7, True),
    "oxe_language_table": (2, False), "oxe_stanford_hydra": (7, True),
    "oxe_austin_buds": (8, True), "oxe_nyu_franka_play": (6, True),
    "oxe_furniture_bench": (8, False), "oxe_ucsd_kitchen": (7, False),
    "oxe_austin_sailor": (8, True), "oxe_austin_sirius": (8, True), "oxe_bc_z": (7, False),
    "oxe_dlr_edan": (7, False), "oxe_iamlab_cmu": (8, False), "oxe_utaustin_mutex": (8, True),
    "oxe_berkeley_fanuc": (7, False), "oxe_cmu_stretch": (7, False), "oxe_fmb": (8, False),
    "oxe_dobbe": (7, False),
}
# Octo's mixtures (octo/data/oxe/oxe_dataset_mixes.py): TFDS name -> weight.
MAGIC_SOUP = {
    "fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0,
    "taco_play": 2.0, "jaco_play": 1.0, "berkeley_cable_routing": 1.0, "roboturk": 2.0,
    "nyu_door_opening_surprising_effectiveness": 1.0, "viola": 2.0, "berkeley_autolab_ur5": 2.0,
    "toto": 1.0, "language_table": 0.1,
    "stanford_hydra_dataset_converted_externally_to_rlds": 2.0,
    "austin_buds_dataset_converted_externally_to_rlds": 1.0,
    "nyu_franka_play_dataset_converted_externally_to_rlds": 3.0,
    "furniture_bench_dataset_converted_externally_to_rlds": 0.1,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": 2.0,
    "austin_sailor_dataset_converted_externally_to_rlds": 1.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 1.0, "bc_z": 0.2,
    "dlr_edan_shared_control_converted_externally_to_rlds": 1.0,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": 1.0, "utaustin_mutex": 1.0,
    "berkeley_fanuc_manipulation": 2.0, "cmu_stretch": 1.0,
}
RTX = {"fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0,
       "taco_play": 2.0, "jaco_play": 2.0, "berkeley_cable_routing": 3.0, "roboturk": 1.0,
       "nyu_door_opening_surprising_effectiveness": 5.0, "viola": 2.0,
       "berkeley_autolab_ur5": 1.0, "toto": 1.0}
REQUIRED = ("fractal20220817_data", "kuka", "taco_play", "jaco_play", "berkeley_cable_routing",
            "roboturk", "viola", "toto", "language_table",
            "stanford_hydra_dataset_converted_externally_to_rlds",
            "austin_buds_dataset_converted_externally_to_rlds",
            "furniture_bench_dataset_converted_externally_to_rlds",
            "ucsd_kitchen_dataset_converted_externally_to_rlds",
            "austin_sailor_dataset_converted_externally_to_rlds",
            "austin_sirius_dataset_converted_externally_to_rlds", "bc_z",
            "dlr_edan_shared_control_converted_externally_to_rlds",
            "iamlab_cmu_pickup_insert_converted_externally_to_rlds", "utaustin_mutex",
            "berkeley_fanuc_manipulation", "cmu_stretch", "fmb", "dobbe", "droid")


def _codes(text: str) -> np.ndarray:
    codes = np.zeros(512, np.int32)
    codes[:len(text)] = [ord(c) for c in text]
    return codes


def _quaternion_x(angle: float) -> np.ndarray:
    return np.array([math.sin(angle / 2), 0, 0, math.cos(angle / 2)])


# Leaves given values of their own where the generic stand-in values say too little.
VALUES = {
    "language_table": {"steps/observation/instruction": lambda e, t: _codes(f"push block {e}")},
    "furniture_bench_dataset_converted_externally_to_rlds": {
        # xyz, a rotation of 0.1 (t + 1) about x, gripper -0.5 + t
        "steps/action": lambda e, t: np.concatenate(
            [[e, t, 0], _quaternion_x(0.1 * (t + 1)), [-0.5 + t]]).astype(np.float32)},
    "bridge_dataset": {
        "steps/action": lambda e, t: np.array([9] * 6 + [[1.0, 0.5, 0.02, 0.5, 0.99][t % 5]],
                                              np.float32),
        "steps/observation/state": lambda e, t: np.arange(7, dtype=np.float32) * t ** 2 + e},
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """TFDS name -> the source of its stand-in (2 episodes of 5 and 4 steps)."""
    root = tmp_path_factory.mktemp("published")
    return {name: torch_rlds.RLDSSource(_published.write_published(
        root, name, num_episodes=2, episode_lengths=(5, 4), values=VALUES.get(name)))
        for name in _published.PUBLISHED}


def _config(name: str, source):
    """Config ``name`` reading ``source``'s dataset (its data_dir: two folders up)."""
    return load_config(name, [f"data.data_dir={source.info.path.parent.parent}"])


def test_the_registry_has_the_datasets_asked_for():
    assert set(REQUIRED) <= set(_published.PUBLISHED)
    assert {_published.published(c).name for c in OCTO} >= set(MAGIC_SOUP)


@pytest.mark.parametrize("name", sorted(OCTO))
def test_octo_recipe_validates_and_gives_octos_shapes(stand_ins, name):
    entry = _published.published(name)
    source = stand_ins[entry.name]
    data = _config(name, source).data
    assert (source.info.name, source.info.version) == (entry.name, entry.version)
    data.key_map.validate(source)
    validate_sections(source, data.key_map, data.trajectory, data.filters)
    transform = (data.trajectory or TrajectoryConfig()).build()
    keys = read_keys(data.trajectory, data.filters)
    state_dim, cleared = OCTO[name]
    for e in range(len(source)):
        raw = trajectory_from_episode(source.episode(e), data.key_map, keys=keys,
                                      episode_index=e)
        out = transform(raw)
        assert out.numeric["action"].shape[1:] == (7,), name
        assert out.numeric["state"].shape[1:] == (state_dim,), name
        assert out.numeric["action"].dtype == np.float32
        language = out.text["language_instruction"]
        assert len(language) == out.num_steps
        assert all(s == "" for s in language) == cleared, name
        assert set(out.cameras) <= {"primary", "secondary", "wrist"}
    # With normalization on, Octo's gripper mask fits statistics of the standardised actions.
    stats = {"actions": {k: np.zeros(7) for k in ("mean", "std", "q01", "q99")}}
    chain = dataclasses.replace(data.transform, normalize="zscore").build(
        norm_stats=stats, key_map=data.key_map)
    assert chain.transforms[-1].mask["actions"].tolist() == [True] * 6 + [False]


def _steps(source, e: int, key: str) -> np.ndarray:
    """Raw step feature ``key`` of episode ``e``, as float64 ``[T, D]``."""
    return np.asarray(lookup(source.episode(e)["steps"], key), np.float64).reshape(
        len(source.episode(e)["steps"]["is_first"]), -1)


def _standardise(stand_ins, name: str, e: int = 1):
    source = stand_ins[_published.published(name).name]
    data = _config(name, source).data
    traj = trajectory_from_episode(source.episode(e), data.key_map,
                                   keys=read_keys(data.trajectory), episode_index=e)
    return source, data.trajectory.build()(traj)


def test_octo_slices_clip_and_invert_against_the_raw_values(stand_ins):
    source, out = _standardise(stand_ins, "oxe_taco_play")
    robot_obs = _steps(source, 1, "observation/robot_obs")
    np.testing.assert_array_equal(out.numeric["state"], robot_obs[:, [0, 1, 2, 3, 4, 5, 7]])
    world = _steps(source, 1, "action/rel_actions_world")
    np.testing.assert_array_equal(out.numeric["action"][:, :6], world[:, :6])
    np.testing.assert_array_equal(out.numeric["action"][:, 6], np.clip(world[:, 6], 0, 1))
    source, out = _standardise(stand_ins, "oxe_bc_z")  # keys whose names hold '/'
    xyz = _steps(source, 1, "action/future/xyz_residual")
    angle = _steps(source, 1, "action/future/axis_angle_residual")
    close = _steps(source, 1, "action/future/target_close")
    np.testing.assert_array_equal(out.numeric["action"], np.concatenate(
        [xyz[:, :3], angle[:, :3], 1 - close[:, :1]], axis=1))
    source, out = _standardise(stand_ins, "oxe_berkeley_fanuc")
    state = _steps(source, 1, "observation/state")
    np.testing.assert_array_equal(out.numeric["action"][:, 6], 1 - state[:, 6])
    np.testing.assert_array_equal(out.numeric["state"], state[:, :7])


def test_octo_language_table_and_furniture_bench(stand_ins):
    _, out = _standardise(stand_ins, "oxe_language_table")
    assert list(out.text["language_instruction"]) == ["push block 1"] * 4
    np.testing.assert_array_equal(out.numeric["action"][:, 2:], [[0, 0, 0, 0, 1]] * 4)
    _, out = _standardise(stand_ins, "oxe_furniture_bench")
    action = out.numeric["action"]
    np.testing.assert_allclose(action[:, 3:6], [[0.1 * (t + 1), 0, 0] for t in range(4)],
                               atol=1e-6)
    # the gripper -0.5 + t, clipped to [0, 1] and inverted
    np.testing.assert_array_equal(action[:, 6], [1, 0.5, 0, 0])


def test_bridge_octo_relabels_from_the_state_reached(stand_ins):
    source, out = _standardise(stand_ins, "bridge_octo", e=0)  # 5 steps
    state = _steps(source, 0, "observation/state")
    assert out.num_steps == 4
    np.testing.assert_array_equal(out.frame_steps, np.arange(4))
    np.testing.assert_allclose(out.numeric["action"][:, :6], state[1:, :6] - state[:-1, :6])
    # gripper 1.0, 0.5, 0.02, 0.5, 0.99: in-between values take the next decided one.
    np.testing.assert_array_equal(out.numeric["action"][:, 6], [1, 0, 0, 1])
    bridge_dataset = _config("bridge_dataset", source).data
    assert bridge_dataset.trajectory is None
    assert bridge_dataset.key_map.validate(source)["image_primary"] == (256, 256, 3)


# -- openpi's DROID recipe -----------------------------------------------------------------------
LENGTHS = (20, 18, 25, 9, 30, 12)
SUCCESS = {0, 2, 3, 5}
MOVES = {0: [10], 1: [3], 2: [], 3: [0, 4], 4: [15], 5: [11]}  # steps where joint 0 jumps


def _joint_position(e: int, t: int) -> np.ndarray:
    position = np.zeros(7)
    position[0] = 0.01 * sum(t >= m for m in MOVES[e])
    position[3] = 0.0001 * t  # drifts by less than 1e-3 over 8 steps
    return position


@pytest.fixture(scope="module")
def droid(tmp_path_factory):
    values = {
        "episode_metadata/file_path": lambda e, t: (
            f"/droid/{'success' if e in SUCCESS else 'failure'}/2023-07-0{e}/trajectory.h5"),
        "steps/action_dict/joint_position": _joint_position,
        "steps/action_dict/gripper_position": lambda e, t: np.zeros(1),
        "steps/language_instruction_2": lambda e, t: f"second {e}",
        "steps/language_instruction_3": lambda e, t: f"third {e}",
    }
    path = _published.write_published(tmp_path_factory.mktemp("droid"), "droid",
                                      num_episodes=len(LENGTHS), episode_lengths=LENGTHS,
                                      values=values)
    return torch_rlds.RLDSSource(path)


def _kept_by_hand(e: int) -> list[int]:
    """Steps t whose chunk t..t+15 (the last action repeated) moves in its first 8 actions: a
    jump at step m is seen from t = m - 7 to t = m - 1."""
    return sorted({t for m in MOVES[e] for t in range(m - 7, m) if 0 <= t < LENGTHS[e]})


def test_droid_openpi_keeps_the_steps_the_rules_select(droid):
    data = _config("droid_openpi", droid).data
    validate_sections(droid, data.key_map, data.trajectory, data.filters)
    transform = data.trajectory.build()
    filters = data.filters.build(action_horizon=data.action_horizon)
    assert data.action_horizon == 16
    keys = read_keys(data.trajectory, data.filters)
    kept_episodes, kept_steps = [], {}
    for e in range(len(droid)):
        t = transform(trajectory_from_episode(droid.episode(e), data.key_map, keys=keys,
                                              episode_index=e, seed=data.seed))
        assert t.cameras["primary"] in ("observation/exterior_image_1_left",
                                        "observation/exterior_image_2_left")
        assert t.text["language_instruction"][0] in (synthetic.instruction(e), f"second {e}",
                                                     f"third {e}")
        if filters.keep_episode(t):
            kept_episodes.append(e)
            kept_steps[e] = np.flatnonzero(filters.sample_mask(t)).tolist()
    assert kept_episodes == sorted(SUCCESS)
    assert kept_steps == {e: _kept_by_hand(e) for e in SUCCESS}
    assert kept_steps[0] == [3, 4, 5, 6, 7, 8, 9]
    assert kept_steps[3] == [0, 1, 2, 3]  # jumps at 0 (not seen: row 0 is the reference) and 4
    assert sum(map(len, kept_steps.values())) == 7 + 0 + 4 + 7
    camera_of = {e: transform(trajectory_from_episode(
        droid.episode(e % 6), data.key_map, keys=keys, episode_index=e)).cameras["primary"]
        for e in range(60)}
    assert len(set(camera_of.values())) == 2


def test_droid_openpi_velocity_variant_and_its_key_map(droid):
    overrides = [f"data.data_dir={droid.info.path.parent.parent}",
                 "data.key_map.action=[action_dict/joint_velocity, action_dict/gripper_position]",
                 "data.filters.sample=[{op: idle_chunk, mode: velocity, threshold: 0.001}]"]
    data = load_config("droid_openpi", overrides).data
    assert KeyMap.from_dict(data.key_map).validate(droid)["action"] == (8,)
    assert data.filters.sample[0].mode == "velocity"


# -- mixtures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixture, weights", [("oxe_magic_soup", MAGIC_SOUP), ("oxe_rtx", RTX)])
def test_octo_mixtures_have_octos_datasets_and_weights(mixture, weights):
    config = load_config(mixture)
    got = {}
    for entry in config.mixture.datasets:
        assert entry.config in OCTO
        got[_published.published(entry.config).name] = entry.weight
        loaded = load_config(entry.config, config.mixture.entry_overrides(entry))
        assert loaded.data.data_dir == "/data" and loaded.data.transform.pad_state_to == 8
    assert got == weights
    assert config.mixture.balance == "steps"


def test_octos_magic_soup_builds_and_batches_from_its_stand_ins(stand_ins):
    root = next(iter(stand_ins.values())).info.path.parent.parent
    config = load_config("oxe_magic_soup", [f"mixture.data_dir={root}", "loader.batch_size=8",
                                            "loader.num_workers=0"])
    mixture = config.make_dataset()
    assert len(mixture.datasets) == len(MAGIC_SOUP)
    # balance: steps: each weight times the steps its dataset samples (Octo's weighting).
    raw = np.asarray([e.weight for e in config.mixture.datasets])
    steps = np.asarray([d.num_steps for d in mixture.datasets], dtype=np.float64)
    np.testing.assert_allclose(mixture.weights, raw * steps / (raw * steps).sum())
    loader = config.make_loader()
    batch = next(iter(loader))
    assert batch["observation"]["state"].shape == (8, 2, 8)  # two observation steps
    assert batch["action"].shape[0] == 8 and batch["action"].shape[-1] == 7
    assert batch["observation"]["image_primary"].shape[-3:] == (256, 256, 3)
    assert batch["meta"]["dataset_index"].shape == (8,)
