"""The feature specifications of real RLDS datasets as published, and tiny stand-ins for tests.

:data:`PUBLISHED` holds, for the datasets the shipped configs read (bridge and fractal as Open
X-Embodiment converted them, BridgeData V2 as ``bridge_dataset`` 1.0.0, DROID, LIBERO and the
Open X-Embodiment datasets of Octo's mixtures), the TFDS ``FeaturesDict`` their
``features.json`` declares: key names, shapes, dtypes, and whether strings are ``Text`` or
``Tensor(dtype=string)`` (Google's OXE conversions use the latter), as the TFDS catalogue lists
them. The catalogue does not give image encodings: the OXE conversions store JPEG, and JPEG is
written here. Feature descriptions are left out; they do not change decoding.

:func:`write_published` writes a small dataset with exactly those features, so a config's key map
can be checked against the real key names without downloading anything. Its values follow
:mod:`torch_rlds.synthetic`: images carry the ``(episode, step)`` id bands that
:func:`torch_rlds.synthetic.image_ids` reads; every numeric tensor of step ``t`` of ``episode``
holds ``[episode, t, tag + 2, tag + 3, ...]`` flattened (``tag`` is 10 times the leaf's position in
the feature tree), scalars hold ``t``; text holds :func:`torch_rlds.synthetic.instruction`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from torch_rlds import synthetic
from torch_rlds._features import iter_leaves
from torch_rlds._tfrecord import write_tfrecord


@dataclasses.dataclass(frozen=True)
class PublishedDataset:
    """A published dataset: its TFDS name and version, the shipped configs that read it (the
    first is its plain key-map config), its features."""

    name: str
    version: str
    configs: tuple[str, ...]
    features: Callable[[], Any]  # a tfds.features.FeaturesDict

    @property
    def config(self) -> str:
        """The first of :attr:`configs`."""
        return self.configs[0]


def _bridge():
    F = _features()
    return F.FeaturesDict({
        "steps": F.Dataset({
            "action": F.FeaturesDict({
                "open_gripper": F.Tensor(shape=(), dtype=np.bool_),
                "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
                "terminate_episode": F.Tensor(shape=(), dtype=np.float32),
                "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
            }),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "observation": F.FeaturesDict({
                "image": F.Image(shape=(480, 640, 3), dtype=np.uint8, encoding_format="jpeg"),
                "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
                "natural_language_instruction": F.Tensor(shape=(), dtype=np.object_),
                "state": F.Tensor(shape=(7,), dtype=np.float32),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _fractal():
    F = _features()
    string = dict(shape=(), dtype=np.object_)
    return F.FeaturesDict({
        "aspects": F.FeaturesDict({
            name: F.Tensor(shape=(), dtype=np.bool_)
            for name in ("already_success", "feasible", "has_aspects", "success", "undesirable")
        }),
        "attributes": F.FeaturesDict({
            **{name: F.Tensor(shape=(), dtype=np.int64)
               for name in ("collection_mode", "data_type", "env", "location", "objects_family",
                            "task_family")},
            **{f"{name}_name": F.Tensor(**string)
               for name in ("collection_mode", "data_type", "env", "location", "objects_family",
                            "task_family")},
        }),
        "steps": F.Dataset({
            "action": F.FeaturesDict({
                "base_displacement_vector": F.Tensor(shape=(2,), dtype=np.float32),
                "base_displacement_vertical_rotation": F.Tensor(shape=(1,), dtype=np.float32),
                "gripper_closedness_action": F.Tensor(shape=(1,), dtype=np.float32),
                "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
                "terminate_episode": F.Tensor(shape=(3,), dtype=np.int32),
                "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
            }),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "observation": F.FeaturesDict({
                "base_pose_tool_reached": F.Tensor(shape=(7,), dtype=np.float32),
                "gripper_closed": F.Tensor(shape=(1,), dtype=np.float32),
                "gripper_closedness_commanded": F.Tensor(shape=(1,), dtype=np.float32),
                "height_to_bottom": F.Tensor(shape=(1,), dtype=np.float32),
                "image": F.Image(shape=(256, 320, 3), dtype=np.uint8, encoding_format="jpeg"),
                "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
                "natural_language_instruction": F.Tensor(**string),
                "orientation_box": F.Tensor(shape=(2, 3), dtype=np.float32),
                "orientation_start": F.Tensor(shape=(4,), dtype=np.float32),
                "robot_orientation_positions_box": F.Tensor(shape=(3, 3), dtype=np.float32),
                "rotation_delta_to_go": F.Tensor(shape=(3,), dtype=np.float32),
                "src_rotation": F.Tensor(shape=(4,), dtype=np.float32),
                "vector_to_go": F.Tensor(shape=(3,), dtype=np.float32),
                "workspace_bounds": F.Tensor(shape=(3, 3), dtype=np.float32),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _droid():
    F = _features()
    string = dict(shape=(), dtype=np.object_)

    def f64(n: int):
        return F.Tensor(shape=(n,), dtype=np.float64)

    def camera():
        return F.Image(shape=(180, 320, 3), dtype=np.uint8, encoding_format="jpeg")

    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict({
            "file_path": F.Tensor(**string),
            "recording_folderpath": F.Tensor(**string),
        }),
        "steps": F.Dataset({
            "action": f64(7),
            "action_dict": F.FeaturesDict({
                "cartesian_position": f64(6),
                "cartesian_velocity": f64(6),
                "gripper_position": f64(1),
                "gripper_velocity": f64(1),
                "joint_position": f64(7),
                "joint_velocity": f64(7),
            }),
            "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "language_instruction": F.Tensor(**string),
            "language_instruction_2": F.Tensor(**string),
            "language_instruction_3": F.Tensor(**string),
            "observation": F.FeaturesDict({
                "cartesian_position": f64(6),
                "exterior_image_1_left": camera(),
                "exterior_image_2_left": camera(),
                "gripper_position": f64(1),
                "joint_position": f64(7),
                "wrist_image_left": camera(),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _libero():
    # The LIBERO suites as converted to RLDS for OpenVLA and openpi (libero_10_no_noops,
    # libero_goal_no_noops, libero_object_no_noops, libero_spatial_no_noops share these features).
    F = _features()
    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict({"file_path": F.Text()}),
        "steps": F.Dataset({
            "action": F.Tensor(shape=(7,), dtype=np.float32),
            "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Scalar(dtype=np.bool_),
            "is_last": F.Scalar(dtype=np.bool_),
            "is_terminal": F.Scalar(dtype=np.bool_),
            "language_instruction": F.Text(),
            "observation": F.FeaturesDict({
                "image": F.Image(shape=(256, 256, 3), dtype=np.uint8, encoding_format="jpeg"),
                "joint_state": F.Tensor(shape=(7,), dtype=np.float32),
                "state": F.Tensor(shape=(8,), dtype=np.float32),
                "wrist_image": F.Image(shape=(256, 256, 3), dtype=np.uint8,
                                       encoding_format="jpeg"),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _features():
    import tensorflow_datasets as tfds

    return tfds.features


class _Kit:
    """Short constructors for the feature specifications below."""

    def __init__(self) -> None:
        self.F = _features()

    def t(self, *shape: int, dtype=np.float32):
        return self.F.Tensor(shape=tuple(shape), dtype=dtype)

    def flag(self):
        return self.F.Tensor(shape=(), dtype=np.bool_)

    def scalar(self, dtype=np.float32):
        return self.F.Scalar(dtype=dtype)

    def string(self):
        return self.F.Tensor(shape=(), dtype=np.object_)

    def text(self):
        return self.F.Text()

    def image(self, height: int, width: int, channels: int = 3):
        return self.F.Image(shape=(height, width, channels), dtype=np.uint8,
                            encoding_format="jpeg")

    def rlds(self, observation: dict, action, *, extra: dict | None = None,
             metadata: dict | None = None, top: dict | None = None, converted: bool = False,
             language=None):
        """An RLDS episode: the step flags, ``reward`` and (for datasets converted outside
        Google, ``converted``) ``discount``, ``language_instruction`` (``Text``, or
        ``language``) and ``language_embedding`` as the conversion template writes them."""
        F = self.F
        steps = {"action": action, "is_first": self.flag(), "is_last": self.flag(),
                 "is_terminal": self.flag(), "observation": F.FeaturesDict(observation),
                 "reward": self.scalar()}
        if converted:
            steps.update(discount=self.scalar(), language_embedding=self.t(512),
                         language_instruction=language or self.text())
        steps.update(extra or {})
        tree = {"steps": F.Dataset(steps), **(top or {})}
        if metadata is not None:
            tree["episode_metadata"] = F.FeaturesDict(metadata)
        return F.FeaturesDict(tree)

    def google(self, observation: dict, action: dict, **kwargs):
        """The layout of the datasets Google converted for OXE: a dict action, the instruction
        and its embedding under ``observation``."""
        observation = {**observation, "natural_language_embedding": self.t(512),
                       "natural_language_instruction": self.string()}
        return self.rlds(observation, self.F.FeaturesDict(action), **kwargs)


def _bridge_dataset():
    # BridgeData V2 as its authors publish it for Octo and OpenVLA (bridge_dataset 1.0.0,
    # https://rail.eecs.berkeley.edu/datasets/bridge_release/data/tfds/): four 256x256 cameras
    # (image_1..3 hold dummy frames where episode_metadata/has_image_<i> is false), a flat
    # action [7] (xyz, roll-pitch-yaw deltas, gripper), state [7], the instruction as Text.
    k = _Kit()
    F = k.F
    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict({
            "episode_id": k.scalar(np.int32), "file_path": k.text(),
            "has_image_0": k.scalar(np.bool_), "has_image_1": k.scalar(np.bool_),
            "has_image_2": k.scalar(np.bool_), "has_image_3": k.scalar(np.bool_),
            "has_language": k.scalar(np.bool_),
        }),
        "steps": F.Dataset({
            "action": k.t(7), "discount": k.scalar(), "is_first": k.scalar(np.bool_),
            "is_last": k.scalar(np.bool_), "is_terminal": k.scalar(np.bool_),
            "language_embedding": k.t(512), "language_instruction": k.text(),
            "observation": F.FeaturesDict({
                **{f"image_{i}": k.image(256, 256) for i in range(4)}, "state": k.t(7)}),
            "reward": k.scalar(),
        }),
    })


def _rt1_action(k: _Kit) -> dict:
    return {"base_displacement_vector": k.t(2), "base_displacement_vertical_rotation": k.t(1),
            "gripper_closedness_action": k.t(1), "rotation_delta": k.t(3),
            "terminate_episode": k.t(3, dtype=np.int32), "world_vector": k.t(3)}


def _kuka():
    k = _Kit()
    return k.google({
        "clip_function_input/base_pose_tool_reached": k.t(7),
        "clip_function_input/workspace_bounds": k.t(3, 3), "gripper_closed": k.t(1),
        "height_to_bottom": k.t(1), "image": k.image(512, 640), "task_id": k.t(1),
    }, _rt1_action(k), top={"success": k.flag()})


def _taco_play():
    k = _Kit()
    return k.google({
        "depth_gripper": k.t(84, 84), "depth_static": k.t(150, 200),
        "rgb_gripper": k.image(84, 84), "rgb_static": k.image(150, 200), "robot_obs": k.t(15),
        "structured_language_instruction": k.string(),
    }, {"actions": k.t(7), "rel_actions_gripper": k.t(7), "rel_actions_world": k.t(7),
        "terminate_episode": k.t()})


def _jaco_play():
    k = _Kit()
    return k.google({
        "end_effector_cartesian_pos": k.t(7), "end_effector_cartesian_velocity": k.t(6),
        "image": k.image(224, 224), "image_wrist": k.image(224, 224), "joint_pos": k.t(8),
    }, {"gripper_closedness_action": k.t(1), "terminate_episode": k.t(3, dtype=np.int32),
        "world_vector": k.t(3)})


def _berkeley_cable_routing():
    k = _Kit()
    return k.google({
        "image": k.image(128, 128), "robot_state": k.t(7), "top_image": k.image(128, 128),
        "wrist225_image": k.image(128, 128), "wrist45_image": k.image(128, 128),
    }, {"rotation_delta": k.t(3), "terminate_episode": k.t(), "world_vector": k.t(3)})


def _eef_action(k: _Kit, gripper) -> dict:
    return {"gripper_closedness_action": gripper, "rotation_delta": k.t(3),
            "terminate_episode": k.t(), "world_vector": k.t(3)}


def _roboturk():
    k = _Kit()
    return k.google({"front_rgb": k.image(480, 640)}, _eef_action(k, k.t(1)))


def _nyu_door_opening():
    k = _Kit()
    return k.google({"image": k.image(720, 960)}, _eef_action(k, k.t(1)))


def _viola():
    k = _Kit()
    return k.google({
        "agentview_rgb": k.image(224, 224), "ee_states": k.t(16),
        "eye_in_hand_rgb": k.image(224, 224), "gripper_states": k.t(1), "joint_states": k.t(7),
    }, _eef_action(k, k.t()))


def _berkeley_autolab_ur5():
    # The depth camera (image_with_depth, a float32 Image) is left out: torch_rlds decodes
    # 8- and 16-bit images only, and no recipe here reads it.
    k = _Kit()
    return k.google({
        "hand_image": k.image(480, 640), "image": k.image(480, 640), "robot_state": k.t(15),
    }, _eef_action(k, k.t()))


def _toto():
    k = _Kit()
    return k.google({"image": k.image(480, 640), "state": k.t(7)}, {
        "open_gripper": k.flag(), "rotation_delta": k.t(3), "terminate_episode": k.t(),
        "world_vector": k.t(3)})


def _language_table():
    k = _Kit()
    return k.rlds({
        "effector_target_translation": k.t(2), "effector_translation": k.t(2),
        "instruction": k.t(512, dtype=np.int32), "rgb": k.image(360, 640),
    }, k.t(2), top={"episode_id": k.string()})


def _converted(observation: dict, action_dim: int, *, metadata: dict | None = None,
               extra: dict | None = None, k: _Kit | None = None):
    """A dataset converted with the OXE template (``*_converted_externally_to_rlds`` and the
    later ones): a flat action, the instruction as Text at step level, file_path metadata."""
    k = k or _Kit()
    metadata = {"file_path": k.text()} if metadata is None else metadata
    return k.rlds(observation, k.t(action_dim), metadata=metadata, extra=extra, converted=True)


def _stanford_hydra():
    k = _Kit()
    return _converted({"image": k.image(240, 320), "state": k.t(27),
                       "wrist_image": k.image(240, 320)}, 7,
                      extra={"is_dense": k.scalar(np.bool_)}, k=k)


def _austin_buds():
    # utaustin_mutex publishes the same features.
    k = _Kit()
    return _converted({"image": k.image(128, 128), "state": k.t(24),
                       "wrist_image": k.image(128, 128)}, 7, k=k)


def _nyu_franka_play():
    k = _Kit()
    return _converted({"depth": k.t(128, 128, 1, dtype=np.int32),
                       "depth_additional_view": k.t(128, 128, 1, dtype=np.int32),
                       "image": k.image(128, 128), "image_additional_view": k.image(128, 128),
                       "state": k.t(13)}, 15, k=k)


def _furniture_bench():
    # The TFDS catalogue page of this dataset was not at hand: key names as its features.json
    # has them, sizes as FurnitureBench records them (224x224 cameras, state 35, action 8).
    k = _Kit()
    return _converted({"image": k.image(224, 224), "state": k.t(35),
                       "wrist_image": k.image(224, 224)}, 8,
                      metadata={"file_path": k.text(), "furniture": k.text(),
                                "initial_randomness": k.text()},
                      extra={"skill_completion": k.scalar()}, k=k)


def _ucsd_kitchen():
    k = _Kit()
    return _converted({"image": k.image(480, 640), "state": k.t(21)}, 8, k=k)


def _austin_sailor():
    k = _Kit()
    return _converted({"image": k.image(128, 128), "state": k.t(8), "state_ee": k.t(16),
                       "state_gripper": k.t(1), "state_joint": k.t(7),
                       "wrist_image": k.image(128, 128)}, 7, k=k)


def _austin_sirius():
    k = _Kit()
    return _converted({"image": k.image(84, 84), "state": k.t(8), "state_ee": k.t(16),
                       "state_gripper": k.t(1), "state_joint": k.t(7),
                       "wrist_image": k.image(84, 84)}, 7,
                      extra={"action_mode": k.t(1), "intv_label": k.t(1)}, k=k)


def _bc_z():
    k = _Kit()
    return k.google({
        "episode_success": k.t(), "image": k.image(171, 213),
        "present/autonomous": k.t(dtype=np.int64), "present/axis_angle": k.t(3),
        "present/intervention": k.t(dtype=np.int64), "present/sensed_close": k.t(1),
        "present/xyz": k.t(3), "sequence_length": k.t(dtype=np.int64),
    }, {"future/axis_angle_residual": k.t(30),
        "future/target_close": k.t(10, dtype=np.int64), "future/xyz_residual": k.t(30)})


def _dlr_edan():
    k = _Kit()
    return _converted({"image": k.image(360, 640), "state": k.t(7)}, 7, k=k)


def _iamlab_cmu():
    k = _Kit()
    return _converted({"image": k.image(360, 640), "state": k.t(20),
                       "wrist_image": k.image(240, 320)}, 8, k=k)


def _berkeley_fanuc():
    k = _Kit()
    return _converted({"end_effector_state": k.t(7), "image": k.image(224, 224),
                       "state": k.t(13), "wrist_image": k.image(224, 224)}, 6, k=k)


def _cmu_stretch():
    k = _Kit()
    return _converted({"image": k.image(128, 128), "state": k.t(4)}, 8, k=k)


def _fmb():
    k = _Kit()
    observation = {
        "color_id": k.scalar(np.uint8), "eef_force": k.t(3), "eef_pose": k.t(7),
        "eef_torque": k.t(3), "eef_vel": k.t(6), "joint_pos": k.t(7), "joint_vel": k.t(7),
        "length": k.string(), "object_id": k.scalar(np.uint8), "primitive": k.string(),
        "shape_id": k.scalar(np.uint8), "size": k.string(),
        "state_gripper_pose": k.scalar(),
    }
    for view in ("side_1", "side_2", "wrist_1", "wrist_2"):
        observation[f"image_{view}"] = k.image(256, 256)
        observation[f"image_{view}_depth"] = k.t(256, 256)
    return k.rlds(observation, k.t(7), converted=True, language=k.string(), metadata={
        "episode_language_embedding": k.t(512), "episode_language_instruction": k.string(),
        "episode_task": k.string(), "file_path": k.string()})


def _dobbe():
    k = _Kit()
    return k.rlds({"gripper": k.t(1), "quat": k.t(4), "rot": k.t(3), "state": k.t(7),
                   "wrist_image": k.image(256, 256), "xyz": k.t(3)}, k.t(7), converted=True,
                  language=k.string(), metadata={"file_path": k.string()})


def _entry(name: str, version: str, configs: tuple[str, ...], features) -> PublishedDataset:
    return PublishedDataset(name, version, configs, features)


_OXE = "0.1.0"
PUBLISHED: dict[str, PublishedDataset] = {e.name: e for e in (
    _entry("bridge", "0.1.0", ("bridge",), _bridge),
    _entry("bridge_dataset", "1.0.0", ("bridge_dataset", "bridge_octo"), _bridge_dataset),
    _entry("fractal20220817_data", _OXE, ("fractal", "oxe_fractal"), _fractal),
    _entry("droid", "1.0.0", ("droid", "droid_openpi"), _droid),
    _entry("libero_10_no_noops", "1.0.0", ("libero",), _libero),
    _entry("kuka", _OXE, ("oxe_kuka",), _kuka),
    _entry("taco_play", _OXE, ("oxe_taco_play",), _taco_play),
    _entry("jaco_play", _OXE, ("oxe_jaco_play",), _jaco_play),
    _entry("berkeley_cable_routing", _OXE, ("oxe_berkeley_cable_routing",),
           _berkeley_cable_routing),
    _entry("roboturk", _OXE, ("oxe_roboturk",), _roboturk),
    _entry("nyu_door_opening_surprising_effectiveness", _OXE, ("oxe_nyu_door_opening",),
           _nyu_door_opening),
    _entry("viola", _OXE, ("oxe_viola",), _viola),
    _entry("berkeley_autolab_ur5", _OXE, ("oxe_berkeley_autolab_ur5",), _berkeley_autolab_ur5),
    _entry("toto", _OXE, ("oxe_toto",), _toto),
    _entry("language_table", _OXE, ("oxe_language_table",), _language_table),
    _entry("stanford_hydra_dataset_converted_externally_to_rlds", _OXE,
           ("oxe_stanford_hydra",), _stanford_hydra),
    _entry("austin_buds_dataset_converted_externally_to_rlds", _OXE, ("oxe_austin_buds",),
           _austin_buds),
    _entry("nyu_franka_play_dataset_converted_externally_to_rlds", _OXE,
           ("oxe_nyu_franka_play",), _nyu_franka_play),
    _entry("furniture_bench_dataset_converted_externally_to_rlds", _OXE,
           ("oxe_furniture_bench",), _furniture_bench),
    _entry("ucsd_kitchen_dataset_converted_externally_to_rlds", _OXE, ("oxe_ucsd_kitchen",),
           _ucsd_kitchen),
    _entry("austin_sailor_dataset_converted_externally_to_rlds", _OXE, ("oxe_austin_sailor",),
           _austin_sailor),
    _entry("austin_sirius_dataset_converted_externally_to_rlds", _OXE, ("oxe_austin_sirius",),
           _austin_sirius),
    _entry("bc_z", _OXE, ("oxe_bc_z",), _bc_z),
    _entry("dlr_edan_shared_control_converted_externally_to_rlds", _OXE, ("oxe_dlr_edan",),
           _dlr_edan),
    _entry("iamlab_cmu_pickup_insert_converted_externally_to_rlds", _OXE, ("oxe_iamlab_cmu",),
           _iamlab_cmu),
    _entry("utaustin_mutex", _OXE, ("oxe_utaustin_mutex",), _austin_buds),
    _entry("berkeley_fanuc_manipulation", _OXE, ("oxe_berkeley_fanuc",), _berkeley_fanuc),
    _entry("cmu_stretch", _OXE, ("oxe_cmu_stretch",), _cmu_stretch),
    _entry("fmb", _OXE, ("oxe_fmb",), _fmb),
    _entry("dobbe", _OXE, ("oxe_dobbe",), _dobbe),
)}


def published(name: str) -> PublishedDataset:
    """The published dataset ``name`` (a TFDS name or the name of a config reading it)."""
    for entry in PUBLISHED.values():
        if name == entry.name or name in entry.configs:
            return entry
    raise KeyError(f"no published dataset {name!r} (known: {sorted(PUBLISHED)}, configs "
                   f"{sorted(c for e in PUBLISHED.values() for c in e.configs)})")


def leaf_value(leaf, tag: int, episode: int, t: int, num_steps: int):
    """The value :func:`write_published` stores in ``leaf`` (a
    :class:`~torch_rlds._features.FeatureLeaf`) for step ``t`` of ``episode``."""
    last = t == num_steps - 1
    name = leaf.path[-1]
    if leaf.kind == "text" or (leaf.kind == "tensor" and leaf.dtype == object):
        if leaf.per_step:
            return synthetic.instruction(episode)
        return f"episode_{episode}/{name}"
    if leaf.dtype == np.bool_ and leaf.shape == ():
        if name == "is_first":
            return t == 0
        if name in ("is_last", "is_terminal"):
            return last
        return t % 2 == 1
    if leaf.shape == ():
        if name == "reward":
            return leaf.dtype.type(1.0 if last else 0.0)
        if name == "discount":
            return leaf.dtype.type(1.0)
        return leaf.dtype.type(t if leaf.per_step else episode)
    size = int(np.prod(leaf.shape))
    flat = np.arange(size, dtype=np.float64) + tag
    flat[0] = episode
    if size > 1:
        flat[1] = t
    return flat.reshape(leaf.shape).astype(leaf.dtype)


def _painter(leaf):
    height, width, channels = leaf.shape
    cam = synthetic.Camera(leaf.name, height, width, format=leaf.encoding,
                           dtype=str(leaf.dtype), channels=channels)
    return synthetic._Painter(cam, texture=False, seed=0)


Values = Mapping[str, Callable[[int, int], Any]]


def published_example(features, episode: int, num_steps: int, painters=None,
                      values: Values | None = None) -> dict:
    """The example dict of one episode of a dataset with ``features`` (see the module
    docstring). ``values`` maps feature paths (``episode_metadata/file_path``,
    ``steps/action``) to ``fn(episode, t)`` giving that leaf's value instead (``t`` is 0 for
    episode-level leaves)."""
    values = values or {}
    leaves = list(iter_leaves(features))
    painters = painters if painters is not None else {
        leaf.path: _painter(leaf) for leaf in leaves
        if leaf.kind == "image" and leaf.name not in values}
    example: dict = {}
    steps: list[dict[str, Any]] = [{} for _ in range(num_steps)]
    for position, leaf in enumerate(leaves):
        tag = 10 * position
        override = values.get(leaf.name)
        if not leaf.per_step:
            value = override(episode, 0) if override else leaf_value(leaf, tag, episode, 0,
                                                                     num_steps)
            _set(example, leaf.path, value)
            continue
        for t in range(num_steps):
            if override is not None:
                value = override(episode, t)
            elif leaf.kind == "image":
                value = painters[leaf.path].frame(episode, t)
            else:
                value = leaf_value(leaf, tag, episode, t, num_steps)
            _set(steps[t], leaf.path[1:], value)
    example["steps"] = steps
    return example


def write_published(root: str | os.PathLike, name: str, *, num_episodes: int = 2,
                    episode_lengths: tuple[int, ...] | None = None, num_shards: int = 1,
                    values: Values | None = None) -> epath.Path:
    """Write a small dataset with the published features of ``name`` (a TFDS name or a config
    name) under ``root/<name>/<version>`` and return that directory. Episode ``e`` has
    ``episode_lengths[e]`` steps (default ``3 + e % 3``); ``values`` overrides leaves (see
    :func:`published_example`)."""
    from google.protobuf import json_format
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.core.proto import dataset_info_pb2

    entry = published(name)
    if episode_lengths is None:
        episode_lengths = tuple(3 + e % 3 for e in range(num_episodes))
    if len(episode_lengths) != num_episodes:
        raise ValueError(f"episode_lengths has {len(episode_lengths)} entries, expected "
                         f"num_episodes={num_episodes}")
    if not 1 <= num_shards <= num_episodes:
        raise ValueError(f"num_shards must be in [1, {num_episodes}] (got {num_shards})")
    features = entry.features()
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    painters = {leaf.path: _painter(leaf) for leaf in iter_leaves(features)
                if leaf.kind == "image" and leaf.name not in (values or {})}
    out = epath.Path(root) / entry.name / entry.version
    out.mkdir(parents=True, exist_ok=True)
    shards = np.array_split(np.arange(num_episodes), num_shards)
    num_bytes = 0
    for s, ids in enumerate(shards):
        records = []
        for e in ids:
            example = published_example(features, int(e), episode_lengths[int(e)], painters,
                                        values)
            records.append(serializer.serialize_example(features.encode_example(example)))
        num_bytes += sum(len(r) for r in records)
        write_tfrecord(out / f"{entry.name}-train.tfrecord-{s:05d}-of-{num_shards:05d}", records)
    info = dataset_info_pb2.DatasetInfo(
        name=entry.name, version=entry.version, file_format="tfrecord",
        description=f"Stand-in with the published features of {entry.name}, written by "
                    "torch_rlds._published.",
    )
    info.splits.add(name="train", shard_lengths=[len(ids) for ids in shards],
                    num_bytes=num_bytes,
                    filepath_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    features.save_config(os.fspath(out))
    (out / "dataset_info.json").write_text(json_format.MessageToJson(info, sort_keys=True))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
