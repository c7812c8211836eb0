"""Trajectory transforms and filters against values the synthetic data encodes and values worked
out by hand."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds.trajectory import (
    FilterConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryError,
    read_keys,
    register,
    trajectory_from_episode,
    validate_sections,
)

DROID_KEY_MAP = {
    "state": ["observation/joint_position", "observation/gripper_position"],
    "images": {"primary": "observation/exterior_image_1_left",
               "wrist": "observation/wrist_image_left"},
    "action": ["action_dict/joint_position", "action_dict/gripper_position"],
    "language": "language_instruction",
}
EXTERIOR = ["observation/exterior_image_1_left", "observation/exterior_image_2_left"]
INSTRUCTIONS = ["language_instruction", "language_instruction_2", "language_instruction_3"]


def _instruction(episode: int, t: int, which: int) -> str:
    return f"instruction {which} of episode {episode}"


@pytest.fixture(scope="module")
def droid(tmp_path_factory):
    """A DROID stand-in: 4 episodes, distinct second and third instructions, file paths of
    successes (even episodes) and failures (odd ones)."""
    root = tmp_path_factory.mktemp("droid")
    values = {
        "steps/language_instruction_2": lambda e, t: _instruction(e, t, 2),
        "steps/language_instruction_3": lambda e, t: _instruction(e, t, 3),
        "episode_metadata/file_path": lambda e, t: (
            f"gs://droid/{'success' if e % 2 == 0 else 'failure'}/{e}/trajectory.h5"),
    }
    path = _published.write_published(root, "droid", num_episodes=4,
                                      episode_lengths=(3, 4, 5, 6), values=values)
    return torch_rlds.RLDSSource(path)


def traj(numeric: dict | None = None, text: dict | None = None, *, steps: int | None = None,
         **kwargs) -> Trajectory:
    numeric = {k: np.asarray(v) for k, v in (numeric or {}).items()}
    text = {k: np.asarray(v, dtype=object) for k, v in (text or {}).items()}
    n = steps if steps is not None else len(next(iter({**numeric, **text}.values())))
    return Trajectory(numeric=numeric, text=text, cameras=kwargs.pop("cameras", {}),
                      frame_steps=np.arange(n), **kwargs)


def run(entries: list, t: Trajectory) -> Trajectory:
    return TrajectoryConfig.from_value(entries).build()(t)


# -- the trajectory ------------------------------------------------------------------------------
def test_trajectory_from_a_decoded_episode(droid):
    keys = ("observation/cartesian_position", "language_instruction_2", "action")
    t = trajectory_from_episode(droid.episode(2), DROID_KEY_MAP, keys=keys, episode_index=2,
                                seed=5, epoch=1)
    raw = droid.episode(2)["steps"]
    np.testing.assert_array_equal(t.numeric["state"], np.concatenate(
        [raw["observation"]["joint_position"], raw["observation"]["gripper_position"]],
        axis=1).astype(np.float32))
    assert t.numeric["action"].dtype == np.float32 and t.numeric["action"].shape == (5, 8)
    cartesian = t.numeric["observation/cartesian_position"]
    assert cartesian.dtype == np.float64 and cartesian.shape == (5, 6)  # as decoded
    np.testing.assert_array_equal(cartesian[:, :2], [[2, s] for s in range(5)])
    assert list(t.text["language_instruction"]) == [synthetic.instruction(2)] * 5
    assert list(t.text["language_instruction_2"]) == [_instruction(2, 0, 2)] * 5
    assert t.cameras == {"primary": EXTERIOR[0], "wrist": "observation/wrist_image_left"}
    np.testing.assert_array_equal(t.frame_steps, np.arange(5))
    assert t.metadata == {"file_path": "gs://droid/success/2/trajectory.h5",
                          "recording_folderpath": "episode_2/recording_folderpath"}
    assert (t.episode_index, t.seed, t.epoch) == (2, 5, 1)
    with pytest.raises(TrajectoryError, match=r"'observation/nope' is not a step feature.*"
                                              r"observation/joint_position"):
        trajectory_from_episode(droid.episode(0), DROID_KEY_MAP, keys=["observation/nope"])


def test_trajectory_checks_lengths_and_take_keeps_frames_in_step():
    with pytest.raises(TrajectoryError, match=r"numeric\['action'\] has 2 steps, frame_steps 3"):
        Trajectory(numeric={"action": np.zeros((2, 1))}, text={}, cameras={},
                   frame_steps=np.arange(3))
    with pytest.raises(TrajectoryError, match="seed must be an int >= 0"):
        traj({"action": np.zeros((2, 1))}, seed=-1)
    t = traj({"action": np.arange(10.0).reshape(5, 2)}, {"language_instruction": list("abcde")})
    taken = t.take([4, 1])
    np.testing.assert_array_equal(taken.numeric["action"], [[8, 9], [2, 3]])
    assert list(taken.text["language_instruction"]) == ["e", "b"]
    np.testing.assert_array_equal(taken.frame_steps, [4, 1])
    np.testing.assert_array_equal(t.numeric["action"][0], [0, 1])  # the input is unchanged


def test_uniform_is_a_pure_function_of_seed_epoch_episode_and_tags():
    base = traj({"action": np.zeros((1, 1))}, seed=3, epoch=1, episode_index=7)
    assert base.uniform(1) == traj({"action": np.zeros((1, 1))}, seed=3, epoch=1,
                                   episode_index=7).uniform(1)
    others = {base.replace(seed=4).uniform(1), base.replace(epoch=2).uniform(1),
              base.replace(episode_index=8).uniform(1), base.uniform(2)}
    assert base.uniform(1) not in others and len(others) == 4
    draws = np.array([base.replace(episode_index=i).uniform(9) for i in range(2000)])
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.02  # sd of the mean of 2000 uniforms: 0.0065


# -- the transforms ------------------------------------------------------------------------------
def _octo_bridge_reference(state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Octo's bridge standardisation written out step by step: binarise the gripper (scan
    from the end), then relabel the first 6 dimensions with state deltas, dropping the last."""
    gripper = action[:, -1]
    binary = np.empty_like(gripper)
    carry = gripper[-1]
    for i in reversed(range(len(gripper))):
        if gripper[i] > 0.95:
            carry = 1.0
        elif gripper[i] < 0.05:
            carry = 0.0
        binary[i] = carry
    out = []
    for t in range(len(state) - 1):
        out.append(list(state[t + 1, :6] - state[t, :6]) + [binary[t]])
    return np.asarray(out, np.float32)


def test_octo_bridge_relabelling_and_gripper_binarisation():
    rng = np.random.default_rng(0)
    state = rng.normal(size=(9, 7)).astype(np.float32)
    gripper = np.array([1.0, 0.5, 0.0, 0.3, 0.99, 0.97, 0.02, 0.5, 0.6], np.float32)
    action = np.concatenate([rng.normal(size=(9, 6)), gripper[:, None]], 1).astype(np.float32)
    t = traj({"state": state, "action": action})
    out = run([{"op": "binarize_gripper", "dim": 6},
               {"op": "relabel_actions", "dims": "0:6", "last": "drop"}], t)
    np.testing.assert_array_equal(out.numeric["action"], _octo_bridge_reference(state, action))
    np.testing.assert_array_equal(out.frame_steps, np.arange(8))  # the last frame is gone
    np.testing.assert_array_equal(out.numeric["state"], state[:8])
    # By hand: 0.5 between a 1 and a 0 takes the 0 that follows; the trailing 0.5, 0.6 keep the
    # last raw value 0.6.
    binary = run([{"op": "binarize_gripper", "dim": -1}], t).numeric["action"][:, 6]
    np.testing.assert_allclose(binary, [1, 0, 0, 1, 1, 1, 0, 0.6, 0.6])


def test_relabel_actions_repeat_and_other_dims():
    state = np.array([[0, 0], [1, 10], [3, 30], [6, 60]], np.float32)
    action = np.full((4, 3), 7.0, np.float32)
    out = run([{"op": "relabel_actions", "dims": [1], "action_dims": [2], "last": "repeat"}],
              traj({"state": state, "action": action}))
    np.testing.assert_array_equal(out.numeric["action"], [[7, 7, 10], [7, 7, 20], [7, 7, 30],
                                                          [7, 7, 30]])
    np.testing.assert_array_equal(out.frame_steps, np.arange(4))
    one = run([{"op": "relabel_actions", "dims": [0], "last": "drop"}],
              traj({"state": state[:1], "action": action[:1]}))
    assert one.num_steps == 0
    with pytest.raises(TrajectoryError, match="dims select 2 state dimensions, action_dims 1"):
        run([{"op": "relabel_actions", "dims": "0:2", "action_dims": [0]}],
            traj({"state": state, "action": action}))


def test_absolute_gripper_from_relative_commands():
    def absolute(values):
        t = traj({"action": np.asarray(values, np.float32)[:, None]})
        return run([{"op": "absolute_gripper", "dim": 0}], t).numeric["action"][:, 0]

    # close (> 0.1) then open (< -0.1): before the first command the gripper was open.
    np.testing.assert_array_equal(absolute([0, 0.05, 0.5, 0, -0.5, 0]), [1, 1, 0, 0, 1, 1])
    # opening first means it was closed before.
    np.testing.assert_array_equal(absolute([0, -1, 0]), [0, 1, 1])
    np.testing.assert_array_equal(absolute([0, 0, 0.05]), [1, 1, 1])  # no command: open


def test_invert_clip_rescale_and_concat():
    action = np.array([[0.2, -3, 2.0], [0.9, 4, -1.0]], np.float32)
    t = traj({"action": action, "observation/robot_obs": np.arange(30.0).reshape(2, 15)})
    out = run([{"op": "clip", "dims": [1], "low": -1, "high": 1},
               {"op": "invert_gripper", "dims": "2:"},
               {"op": "rescale", "dims": [0], "source": [0, 1], "target": [-1, 1]}], t)
    np.testing.assert_allclose(out.numeric["action"], [[-0.6, -1, -1], [0.8, 1, 2]], rtol=1e-6)
    assert out.numeric["action"].dtype == np.float32
    out = run([{"op": "concat", "out": "state", "parts": [
        "observation/robot_obs[0:6]", "observation/robot_obs[7]", {"const": 0.0, "size": 2},
        "action[-1]"]}], t)
    np.testing.assert_array_equal(out.numeric["state"], [
        [0, 1, 2, 3, 4, 5, 7, 0, 0, 2], [15, 16, 17, 18, 19, 20, 22, 0, 0, -1]])
    assert out.numeric["state"].dtype == np.float32
    with pytest.raises(TrajectoryError, match=r"concat.parts\[0\]: dimensions \[20\] are outside "
                                              r"the value's 15 dimensions"):
        run([{"op": "concat", "out": "state", "parts": ["observation/robot_obs[20]"]}], t)
    with pytest.raises(TrajectoryError, match=r"no numeric step feature 'observation/nope'"):
        run([{"op": "concat", "parts": ["observation/nope"]}], t)


def _quaternion(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """(x, y, z, w) of R = Rz(yaw) Ry(pitch) Rx(roll), through the rotation matrix."""
    cx, sx, cy, sy, cz, sz = (np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch),
                              np.cos(yaw), np.sin(yaw))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = rz @ ry @ rx
    w = np.sqrt(1 + m[0, 0] + m[1, 1] + m[2, 2]) / 2
    return np.array([(m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w),
                     (m[1, 0] - m[0, 1]) / (4 * w), w])


def test_quaternion_to_euler_recovers_the_angles():
    angles = np.array([[0.3, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, -0.5], [0.4, -0.3, 1.2]])
    rows = [np.concatenate([[1, 2, 3], 2.0 * _quaternion(*a), [9]]) for a in angles]
    t = traj({"action": np.asarray(rows, np.float32)})
    out = run([{"op": "quaternion_to_euler", "dims": "3:7"}], t).numeric["action"]
    assert out.shape == (4, 7)
    np.testing.assert_allclose(out[:, 3:6], angles, atol=2e-6)
    np.testing.assert_array_equal(out[:, [0, 1, 2, 6]], [[1, 2, 3, 9]] * 4)
    with pytest.raises(TrajectoryError, match="4 consecutive dimensions"):
        run([{"op": "quaternion_to_euler", "dims": [0, 1, 2, 4]}], t)


def test_drop_steps_and_subsample_update_the_frames():
    t = traj({"action": np.arange(7.0)[:, None]})
    out = run([{"op": "drop_steps", "first": 1, "last": 2}], t)
    np.testing.assert_array_equal(out.frame_steps, [1, 2, 3, 4])
    np.testing.assert_array_equal(out.numeric["action"][:, 0], [1, 2, 3, 4])
    out = run([{"op": "subsample", "every": 3}, {"op": "drop_steps", "first": 1}], t)
    np.testing.assert_array_equal(out.frame_steps, [3, 6])
    assert run([{"op": "drop_steps", "first": 4, "last": 4}], t).num_steps == 0


def test_choose_camera_is_seeded_per_episode_and_epoch(droid):
    config = TrajectoryConfig.from_value([{"op": "choose_camera", "role": "primary",
                                           "keys": EXTERIOR}])
    validate_sections(droid, DROID_KEY_MAP, config)
    transform = config.build()
    base = trajectory_from_episode(droid.episode(0), DROID_KEY_MAP)
    chosen = [transform(base.replace(episode_index=i)).cameras["primary"] for i in range(400)]
    assert chosen == [transform(base.replace(episode_index=i)).cameras["primary"]
                      for i in range(400)]
    assert 160 < chosen.count(EXTERIOR[0]) < 240  # binomial(400, 1/2): sd 10
    epochs = [transform(base.replace(epoch=e)).cameras["primary"] for e in range(40)]
    assert set(epochs) == set(EXTERIOR)
    assert transform(base).cameras["wrist"] == "observation/wrist_image_left"
    with pytest.raises(TrajectoryError, match=r"'observation/joint_position' is a tensor "
                                              r"feature of droid, not an image"):
        validate_sections(droid, DROID_KEY_MAP, TrajectoryConfig.from_value([
            {"op": "choose_camera", "keys": ["observation/joint_position"]}]))


def test_choose_instruction_draws_one_of_three_per_episode(droid):
    config = TrajectoryConfig.from_value([{"op": "choose_instruction", "keys": INSTRUCTIONS}])
    keys = read_keys(config)
    assert keys == ("language_instruction_2", "language_instruction_3")
    transform = config.build()
    counts = {}
    for i in range(600):
        t = trajectory_from_episode(droid.episode(i % 4), DROID_KEY_MAP, keys=keys,
                                    episode_index=i)
        text = transform(t).text["language_instruction"]
        assert len(set(text)) == 1 and len(text) == t.num_steps  # one choice per episode
        which = {synthetic.instruction(i % 4): 1, _instruction(i % 4, 0, 2): 2,
                 _instruction(i % 4, 0, 3): 3}[text[0]]
        counts[which] = counts.get(which, 0) + 1
    assert all(160 < counts[k] < 240 for k in (1, 2, 3))  # binomial(600, 1/3): sd 11.5
    empty = traj(text={"a": ["", ""], "b": ["x", "y"]})
    picks = {run([{"op": "choose_instruction", "keys": ["a", "b"], "skip_empty": True}],
                 empty.replace(episode_index=i)).text["language_instruction"][1]
             for i in range(30)}
    assert picks == {"y"}


def test_set_text_and_text_from_codepoints():
    codes = np.zeros((2, 8), np.int32)
    codes[0, :4] = [ord(c) for c in "pick"]
    codes[1, :3] = [ord("a"), 0xD800, ord("b")]  # a lone surrogate is no character
    t = traj({"observation/instruction": codes, "action": np.zeros((2, 1))})
    out = run([{"op": "text_from_codepoints", "key": "observation/instruction"}], t)
    assert list(out.text["language_instruction"]) == ["pick", "a\ufffdb"]
    out = run([{"op": "set_text", "value": ""}], out)
    assert list(out.text["language_instruction"]) == ["", ""]


# -- registered functions ------------------------------------------------------------------------
@register("tests.double_action")
def double_action(t: Trajectory, factor: float = 2.0) -> Trajectory:
    return t.replace(numeric={**t.numeric, "action": t.numeric["action"] * factor})


@register("tests.even_steps")
def even_steps(t: Trajectory) -> np.ndarray:
    return t.frame_steps % 2 == 0


def test_registered_functions_are_called_and_pickle_by_reference():
    t = traj({"action": np.ones((3, 1), np.float32)})
    config = TrajectoryConfig.from_value([{"op": "call", "name": "tests.double_action",
                                           "kwargs": {"factor": 3.0}}])
    transform = pickle.loads(pickle.dumps(config.build()))
    np.testing.assert_array_equal(transform(t).numeric["action"], [[3], [3], [3]])
    filters = FilterConfig.from_dict({"sample": [{"op": "call", "name": "tests.even_steps"}]})
    np.testing.assert_array_equal(filters.build().sample_mask(t), [True, False, True])
    register("tests.double_action", double_action)  # the same function again is fine
    with pytest.raises(TrajectoryError, match="already registered"):
        register("tests.double_action", even_steps)
    with pytest.raises(TrajectoryError, match=r"no function is registered as 'tests.nope'.*"
                                              r"tests.double_action"):
        TrajectoryConfig.from_value([{"op": "call", "name": "tests.nope"}]).build()
    register("tests.not_a_trajectory", lambda t: 3)
    with pytest.raises(TrajectoryError, match=r"data.trajectory\[0\] \(call "
                                              r"tests.not_a_trajectory\) returned a int"):
        TrajectoryConfig.from_value([{"op": "call", "name": "tests.not_a_trajectory"}]).build()(t)
    with pytest.raises(TrajectoryError, match="is not a function name"):
        register("Bad Name", double_action)


# -- filters --------------------------------------------------------------------------------------
def test_episode_filters(droid):
    filters = FilterConfig.from_dict({"episode": [
        {"op": "metadata_match", "key": "file_path", "pattern": "success"},
        {"op": "min_length", "steps": 4}, {"op": "has_language"},
        {"op": "max_abs", "key": "state", "limit": 1000}]})
    validate_sections(droid, DROID_KEY_MAP, None, filters)
    built = filters.build()
    verdicts = [built.rejected_by(trajectory_from_episode(droid.episode(e), DROID_KEY_MAP))
                for e in range(4)]
    # episodes 1 and 3 are failures; episode 0 (3 steps) is too short; 2 passes everything.
    assert verdicts == ["episode[1] (min_length)", "episode[0] (metadata_match)", None,
                        "episode[0] (metadata_match)"]
    negated = FilterConfig.from_dict({"episode": [
        {"op": "metadata_match", "key": "file_path", "pattern": "^gs://droid/success/",
         "negate": True}]}).build()
    assert [negated.keep_episode(trajectory_from_episode(droid.episode(e), DROID_KEY_MAP))
            for e in range(4)] == [False, True, False, True]
    state = trajectory_from_episode(droid.episode(3), DROID_KEY_MAP)
    largest = float(np.abs(state.numeric["state"]).max())
    assert FilterConfig.from_dict({"episode": [{"op": "max_abs", "key": "state",
                                                "limit": largest}]}).build().keep_episode(state)
    assert not FilterConfig.from_dict({"episode": [
        {"op": "max_abs", "key": "state", "limit": largest - 0.5}]}).build().keep_episode(state)
    unlabelled = traj({"action": np.zeros((2, 1))}, {"language_instruction": ["", ""]})
    assert not FilterConfig.from_dict({"episode": [{"op": "has_language"}]}).build(
        ).keep_episode(unlabelled)
    with pytest.raises(TrajectoryError, match="episode_metadata/nope, which droid does not "
                                              "have"):
        validate_sections(droid, DROID_KEY_MAP, None, FilterConfig.from_dict(
            {"episode": [{"op": "metadata_match", "key": "nope", "pattern": "x"}]}))


def _idle_reference(actions: np.ndarray, horizon: int, position: bool) -> list[bool]:
    """openpi's rule written out per step: pad the chunk with the last action, compare its
    first half with its first row (positions) or with zero (velocities)."""
    keep = []
    for t in range(len(actions)):
        chunk = [actions[min(t + i, len(actions) - 1)] for i in range(horizon)]
        half = np.asarray(chunk[:horizon // 2])
        moved = np.abs(half - half[0]) if position else np.abs(half)
        keep.append(bool((moved > 1e-3).any()))
    return keep


def test_idle_chunk_matches_openpi_rule():
    positions = np.zeros((12, 2), np.float32)
    positions[5:, 0] = 0.01   # one move at step 5
    positions[9:, 1] = 0.0005  # below the threshold
    t = traj({"action": positions})
    mask = FilterConfig.from_dict({"sample": [{"op": "idle_chunk", "horizon": 8}]}).build(
        ).sample_mask(t)
    # A chunk from t sees steps t..t+3: it moves when step 5 lies in t+1..t+3.
    np.testing.assert_array_equal(mask, [False, False, True, True, True] + [False] * 7)
    assert mask.tolist() == _idle_reference(positions, 8, True)
    velocities = np.zeros((6, 1), np.float32)
    velocities[3] = -0.002
    mask = FilterConfig.from_dict({"sample": [{"op": "idle_chunk", "mode": "velocity"}]}).build(
        action_horizon=4).sample_mask(traj({"action": velocities}))
    assert mask.tolist() == [False, False, True, True, False, False]
    assert mask.tolist() == _idle_reference(velocities, 4, False)
    with pytest.raises(TrajectoryError, match="horizon is null and no action_horizon"):
        FilterConfig.from_dict({"sample": [{"op": "idle_chunk"}]}).build()


def test_step_ranges_from_a_file(droid, tmp_path):
    ranges = {"episode_2/recording_folderpath--gs://droid/success/2/trajectory.h5": [[0, 2],
                                                                                       [4, 9]]}
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(ranges))
    filters = FilterConfig.from_dict({"sample": [{"op": "step_ranges", "path": str(path)}]})
    validate_sections(droid, DROID_KEY_MAP, None, filters)
    built = filters.build()
    t = trajectory_from_episode(droid.episode(2), DROID_KEY_MAP)
    assert built.sample_mask(t).tolist() == [True, True, False, False, True]
    # The ranges are of dataset steps: after dropping the first step, the rows move.
    dropped = run([{"op": "drop_steps", "first": 1}], t)
    assert built.sample_mask(dropped).tolist() == [True, False, False, True]
    unlisted = trajectory_from_episode(droid.episode(0), DROID_KEY_MAP)
    assert not built.sample_mask(unlisted).any()
    digest = filters.digest()
    path.write_text(json.dumps({**ranges, "other": [[0, 1]]}))
    assert filters.digest() != digest  # the file's bytes are part of the digest
    path.write_text(json.dumps({"x": [[3, 1]]}))
    with pytest.raises(TrajectoryError, match=r"episode 'x' must map to a list of \[start, "
                                              r"end\]"):
        filters.build()
    with pytest.raises(TrajectoryError, match="cannot read"):
        FilterConfig.from_dict({"sample": [{"op": "step_ranges",
                                            "path": str(tmp_path / "nope.json")}]}).build()


# -- the config sections --------------------------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    ({"op": "spin"}, r"data.trajectory\[0\]: unknown op 'spin' \(allowed: \['absolute_gripper'"),
    ({"op": "clip", "lo": 1}, r"data.trajectory\[0\]: clip: unknown arguments \['lo'\] "
                              r"\(allowed: \['dims', 'high', 'key', 'low'\]\)"),
    ({"op": "clip", "low": "x"}, r"data.trajectory\[0\]: clip.low must be a number "
                                 r"\(got 'x'\)"),
    ({"op": "clip", "low": 2, "high": 1}, r"clip: low 2.0 is above high 1.0"),
    ({"op": "relabel_actions", "dims": "0-6"}, r"relabel_actions.dims must be a list of "
                                               r"distinct dimension indices, or a slice"),
    ({"op": "relabel_actions", "last": "keep"}, r"relabel_actions.last must be one of "
                                                r"\['drop', 'repeat'\] \(got 'keep'\)"),
    ({"op": "drop_steps", "first": -1}, r"drop_steps.first must be an int >= 0 \(got -1\)"),
    ({"op": "concat", "parts": ["x[a:b]"]}, r"concat.parts must be a non-empty list of parts"),
    ({"op": "choose_camera", "keys": []}, r"choose_camera.keys must be a non-empty list"),
    ("clip", r"data.trajectory\[0\] must be a mapping with an 'op'"),
])
def test_trajectory_config_errors_name_the_entry_field_and_value(raw, message):
    with pytest.raises(TrajectoryError, match=message):
        TrajectoryConfig.from_value([raw])


def test_filter_config_errors_and_round_trip():
    with pytest.raises(TrajectoryError, match=r"data.filters: unknown fields \['episodes'\]"):
        FilterConfig.from_dict({"episodes": []})
    with pytest.raises(TrajectoryError, match=r"data.filters.sample\[0\]: unknown op "
                                              r"'min_length' \(allowed: \['call', "
                                              r"'idle_chunk', 'step_ranges'\]\)"):
        FilterConfig.from_dict({"sample": [{"op": "min_length"}]})
    with pytest.raises(TrajectoryError, match="metadata_match.key must be a path under "
                                              "episode_metadata"):
        FilterConfig.from_dict({"episode": [{"op": "metadata_match",
                                             "key": "episode_metadata/file_path",
                                             "pattern": "success"}]})
    with pytest.raises(TrajectoryError, match="metadata_match.pattern must be a non-empty "
                                              "regular expression"):
        FilterConfig.from_dict({"episode": [{"op": "metadata_match", "pattern": "("}]})
    config = FilterConfig.from_dict({"episode": [{"op": "min_length", "steps": 2}],
                                     "sample": [{"op": "idle_chunk", "horizon": 4}]})
    assert FilterConfig.from_dict(config.to_dict()) == config
    trajectory = TrajectoryConfig.from_value([{"op": "drop_steps", "last": 1}])
    assert TrajectoryConfig.from_value(trajectory.to_list()) == trajectory
    assert trajectory.digest() != TrajectoryConfig.from_value(
        [{"op": "drop_steps", "last": 2}]).digest()


def test_validate_names_what_the_key_map_lacks(droid):
    no_state = {**DROID_KEY_MAP, "state": []}
    with pytest.raises(TrajectoryError, match=r"droid: data.trajectory\[0\] "
                                              r"\(relabel_actions\): reads 'state', which the "
                                              r"key map does not provide"):
        validate_sections(droid, no_state, TrajectoryConfig.from_value(
            [{"op": "relabel_actions"}]))
    # A name written by an earlier entry may be read by a later one.
    validate_sections(droid, no_state, TrajectoryConfig.from_value([
        {"op": "concat", "out": "state", "parts": ["observation/joint_position"]},
        {"op": "relabel_actions", "dims": "0:7", "action_dims": "0:7"}]))
    with pytest.raises(TrajectoryError, match=r"'language_instruction_2' is a text feature of "
                                              r"droid, not numbers"):
        validate_sections(droid, DROID_KEY_MAP, TrajectoryConfig.from_value(
            [{"op": "concat", "parts": ["language_instruction_2"]}]))


def test_resolve_dims_refuses_a_string_that_is_no_slice():
    from torch_rlds._trajectory_base import TrajectoryError, resolve_dims

    assert resolve_dims("1:3", 5, "clip.dims").tolist() == [1, 2]
    with pytest.raises(TrajectoryError, match=r"clip.dims: '1-3' is not a slice 'start:stop'"):
        resolve_dims("1-3", 5, "clip.dims")


def test_an_entry_without_call_or_bind_is_refused_when_bound():
    import dataclasses

    from torch_rlds._trajectory_base import Entry

    @dataclasses.dataclass(frozen=True)
    class Inert(Entry):
        op = "inert"

    with pytest.raises(TypeError, match="Inert defines neither __call__ nor bind"):
        Inert().bind()
