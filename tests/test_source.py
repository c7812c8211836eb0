"""Reading RLDS episodes: round trips, TFDS equivalence, split slicing, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import simplejpeg

import torch_rlds
from torch_rlds import _images, synthetic

ALL_FEATURES = dict(
    num_episodes=5, num_shards=3, min_steps=2, max_steps=9, zlib_tensor=True,
    cameras=(
        synthetic.Camera("image", 64, 64),
        synthetic.Camera("gray", 32, 32, channels=1),
        synthetic.Camera("png_rgb", 32, 48, format="png"),
        synthetic.Camera("depth", 32, 32, format="png", dtype="uint16", channels=1),
    ),
)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_round_trip_every_feature(write_dataset, file_format):
    spec = synthetic.SyntheticSpec(**ALL_FEATURES, file_format=file_format, texture=False)
    path = write_dataset(**ALL_FEATURES, file_format=file_format)
    source = torch_rlds.RLDSSource(path, "train")
    lengths = spec.lengths()
    assert len(source) == spec.num_episodes
    for e in range(len(source)):
        episode = source.episode(e, decode_images=True)
        steps = episode["steps"]
        n = lengths[e]
        expected_state = np.stack([synthetic.state_value(spec, e, t) for t in range(n)])
        expected_action = np.stack([synthetic.action_value(spec, e, t) for t in range(n)])
        np.testing.assert_array_equal(steps["observation"]["state"], expected_state)
        assert steps["observation"]["state"].dtype == np.float32
        np.testing.assert_array_equal(steps["action"], expected_action)
        np.testing.assert_array_equal(steps["observation"]["joint_zlib"],
                                      [[e, t, 0.5] for t in range(n)])
        assert steps["observation"]["joint_zlib"].dtype == np.float64
        assert list(steps["language_instruction"]) == [synthetic.instruction(e)] * n
        np.testing.assert_array_equal(steps["is_first"], [t == 0 for t in range(n)])
        np.testing.assert_array_equal(steps["is_last"], [t == n - 1 for t in range(n)])
        assert steps["is_last"].dtype == np.bool_
        assert int(episode["episode_metadata"]["episode_id"]) == e
        assert episode["episode_metadata"]["file_path"] == f"episode_{e}.npz"
        obs = steps["observation"]
        assert obs["image"].shape == (n, 64, 64, 3) and obs["image"].dtype == np.uint8
        assert obs["gray"].shape == (n, 32, 32, 1)
        assert obs["png_rgb"].shape == (n, 32, 48, 3)
        assert obs["depth"].shape == (n, 32, 32, 1) and obs["depth"].dtype == np.uint16
        for t in range(n):
            assert synthetic.image_ids(obs["image"][t]) == (e, t)
            assert synthetic.image_ids(obs["gray"][t]) == (e, t)
            assert synthetic.image_ids(obs["png_rgb"][t]) == (e, t)
            assert synthetic.depth_ids(obs["depth"][t]) == (e, t)


def test_images_stay_encoded_until_asked(write_dataset):
    path = write_dataset(**ALL_FEATURES)
    episode = torch_rlds.RLDSSource(path).episode(1)
    frames = episode["steps"]["observation"]["image"]
    assert isinstance(frames, torch_rlds.EncodedImages)
    assert frames.encoded[0][:2] == b"\xff\xd8"
    window = frames.decode([0, 0, 1])
    assert window.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(window[0], window[1])
    assert synthetic.image_ids(window[2]) == (1, 1)


def test_fast_jpeg_gives_the_pixels_of_tf_decode_jpeg(write_dataset):
    # tf.io.decode_jpeg's defaults are the fast integer DCT with fancy upsampling: exactly
    # simplejpeg's fastdct=True, fastupsample=False (checked against TensorFlow 2.21). The
    # synthetic frames are 4:2:0, where libjpeg's fast upsampling gives other pixels.
    path = write_dataset(**{**ALL_FEATURES, "texture": True})
    frames = torch_rlds.RLDSSource(path).episode(1)["steps"]["observation"]["image"]
    data = frames.encoded[1]
    assert simplejpeg.decode_jpeg_header(data)[3] == "420"
    tf_pixels = simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=False)
    fast = frames.decode([1], fast=True)[0]
    np.testing.assert_array_equal(fast, tf_pixels)
    assert not np.array_equal(fast, simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True))
    assert not np.array_equal(fast, frames[1])  # the accurate DCT's pixels differ
    dataset = torch_rlds.RLDSDataset(path, observation_keys=["image"], fast_jpeg=True,
                                     shuffle=False, obs_window=1)
    sample = next(s for s in dataset
                  if (int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])) == (1, 1))
    np.testing.assert_array_equal(sample["observation"]["image"][0], fast)


def test_decoding_into_a_buffer_checks_the_size():
    data = simplejpeg.encode_jpeg(np.zeros((32, 48, 3), np.uint8))
    out = np.empty((40, 48, 3), np.uint8)
    with pytest.raises(torch_rlds.ImageDecodeError, match=r"decoded shape \(32, 48, 3\) does "
                                                          r"not match the output's"):
        _images.decode_image(data, (None, None, 3), np.uint8, out=out)
    with pytest.raises(torch_rlds.ImageDecodeError, match="does not match the declared"):
        _images.decode_image(data, (40, 48, 3), np.uint8, out=out)
    out = np.empty((32, 48, 3), np.uint8)
    assert _images.decode_image(data, (32, 48, 3), np.uint8, out=out) is out


@pytest.mark.parametrize("data, shape, message", [
    (b"\xff\xd8\xff\xe0garbage", (32, 48, 3), "JPEG header does not parse"),
    (b"GIF89a....", (32, 48, 3), "expected a JPEG or a PNG, the bytes are a GIF image"),
    ("jpeg", (48, 48, 3), "height 32 in the header, 48 declared"),
    ("png", (32, 40, 1), "width 48 in the header, 40 declared"),
])
def test_header_checks(data, shape, message):
    import io

    from PIL import Image

    if data == "jpeg":
        data = simplejpeg.encode_jpeg(np.zeros((32, 48, 3), np.uint8))
    elif data == "png":
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
    with pytest.raises(torch_rlds.ImageDecodeError, match=message):
        _images.check_header(data, shape, "frame")
    if message.startswith(("height", "width")):
        _images.check_header(data, (None, None, None), "frame")  # open sizes match any


def test_equivalent_to_tfds_numpy_decoding(write_dataset):
    pytest.importorskip("cv2")  # TFDS decodes uint16 PNG with OpenCV
    from tensorflow_datasets.core import example_parser

    path = write_dataset(**{**ALL_FEATURES, "texture": True})
    source = torch_rlds.RLDSSource(path)
    features = source.features
    parser = example_parser.ExampleParserNp(features.get_serialized_info())
    for e in range(len(source)):
        record = source.read(e)
        theirs = features.decode_example_np(parser.parse_example(record))
        ours = source.episode(e, decode_images=True)
        assert len(theirs["steps"]) == len(ours["steps"]["action"])
        for t in range(len(theirs["steps"])):
            step = theirs["steps"][t]
            for leaf in source.leaves():
                if not leaf.per_step:
                    continue
                mine, other = ours["steps"], step
                for key in leaf.path[1:]:
                    mine, other = mine[key], other[key]
                mine = mine[t]
                if leaf.kind == "text":
                    assert mine == other.decode("utf-8"), leaf.name
                else:
                    other = np.asarray(other)
                    assert mine.dtype == other.dtype, leaf.name
                    np.testing.assert_array_equal(mine, other, err_msg=f"{leaf.name} step {t}")
        meta = theirs["episode_metadata"]
        assert ours["episode_metadata"]["file_path"] == meta["file_path"].decode()
        assert int(ours["episode_metadata"]["episode_id"]) == int(meta["episode_id"])


def test_tfds_opens_what_synthetic_writes(write_dataset):
    import tensorflow_datasets as tfds

    path = write_dataset(num_episodes=4, num_shards=2, file_format="array_record")
    builder = tfds.builder_from_directory(str(path))
    assert builder.info.splits["train"].num_examples == 4
    data = builder.as_data_source(split="train")
    ours = torch_rlds.RLDSSource(path)
    for e in range(4):
        np.testing.assert_array_equal(
            np.stack([s["observation"]["state"] for s in data[e]["steps"]]),
            ours.episode(e)["steps"]["observation"]["state"])


def test_open_by_name_and_data_dir(small_dataset):
    data_dir = small_dataset.parent.parent
    by_name = torch_rlds.RLDSSource("synthetic_rlds", data_dir=data_dir)
    by_version = torch_rlds.RLDSSource("synthetic_rlds:1.0.0", data_dir=data_dir)
    by_dataset_dir = torch_rlds.RLDSSource(small_dataset.parent)
    assert by_name.info.path == by_version.info.path == by_dataset_dir.info.path == small_dataset


def test_splits_and_slicing(small_dataset, small_spec):
    info = torch_rlds.DatasetInfo.load(small_dataset)
    assert {n: s.num_episodes for n, s in info.splits.items()} == {"train": 6, "val": 2}
    ids = lambda src: [int(src.episode(i)["episode_metadata"]["episode_id"])  # noqa: E731
                       for i in range(len(src))]
    assert ids(torch_rlds.RLDSSource(small_dataset, "train[:50%]")) == [0, 1, 2]
    assert ids(torch_rlds.RLDSSource(small_dataset, "train[2:5]")) == [2, 3, 4]
    assert ids(torch_rlds.RLDSSource(small_dataset, "train[-2:]")) == [4, 5]
    assert ids(torch_rlds.RLDSSource(small_dataset, "val")) == [6, 7]
    assert ids(torch_rlds.RLDSSource(small_dataset, "train[4:]+val[:1]")) == [4, 5, 6]


def test_unknown_split_and_out_of_range(small_dataset):
    with pytest.raises(ValueError, match=r"'test'.*train \(6 episodes\)"):
        torch_rlds.RLDSSource(small_dataset, "test")
    source = torch_rlds.RLDSSource(small_dataset, "train[1:3]")
    with pytest.raises(IndexError, match=r"episode index 2 out of range.*has 2 episodes"):
        source.episode(2)
    with pytest.raises(IndexError, match="-1"):
        source.episode(-1)


def _copy(path, tmp_path):
    target = tmp_path / "copy" / path.name
    shutil.copytree(path, target)
    return target


def test_missing_metadata_files(small_dataset, tmp_path):
    copy = _copy(small_dataset, tmp_path)
    (copy / "features.json").unlink()
    with pytest.raises(FileNotFoundError, match="features.json"):
        torch_rlds.RLDSSource(copy)
    (copy / "dataset_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        torch_rlds.RLDSSource(copy)


def test_missing_shard(small_dataset, tmp_path):
    copy = _copy(small_dataset, tmp_path)
    shard = sorted(copy.glob("*train.tfrecord-*"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name + ".*missing"):
        torch_rlds.RLDSSource(copy)


def test_shard_size_differs_from_dataset_info(small_dataset, tmp_path):
    copy = _copy(small_dataset, tmp_path)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["splits"][0]["numBytes"] = str(int(info["splits"][0]["numBytes"]) + 1)
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(torch_rlds.DatasetFormatError, match=r"numBytes=\d+"):
        torch_rlds.RLDSSource(copy)
    info["splits"][0]["numBytes"] = "0"
    info["splits"][0]["shardLengths"][0] = "7"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(torch_rlds.DatasetFormatError, match=r"tfrecord-00000.*records 7"):
        torch_rlds.RLDSSource(copy)


@pytest.mark.parametrize("cut", [5, 40, -3])
def test_truncated_shard(small_dataset, tmp_path, cut):
    copy = _copy(small_dataset, tmp_path)
    shard = sorted(copy.glob("*train.tfrecord-*"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(torch_rlds.TruncatedShardError, match=shard.name):
        torch_rlds.RLDSSource(copy)


def test_flipped_byte_names_file_and_offset(small_dataset, tmp_path):
    copy = _copy(small_dataset, tmp_path)
    source = torch_rlds.RLDSSource(copy)
    shard = sorted(copy.glob("*train.tfrecord-*"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x40
    shard.write_bytes(bytes(data))
    source = torch_rlds.RLDSSource(copy)  # the index only reads headers; the payload is checked
    with pytest.raises(torch_rlds.CorruptRecordError, match=shard.name + r".*(offset|@) ?\D*0\b"):
        source.episode(0)


def test_inspect_command(small_dataset, capsys):
    from torch_rlds import cli

    assert cli.main(["inspect", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "6 episodes" in out and "val" in out
    assert "steps/observation/image" in out and "jpeg" in out
    assert "float32" in out and "(7,)" in out


@pytest.mark.parametrize("cut", [100, 0.5, -10])
def test_truncated_array_record_shard(write_dataset, tmp_path, cut):
    path = write_dataset(num_episodes=4, num_shards=2, file_format="array_record")
    copy = _copy(path, tmp_path)
    shard = sorted(copy.glob("*train.array_record-*"))[0]
    data = shard.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    shard.write_bytes(data[:end])
    with pytest.raises(torch_rlds.DatasetFormatError, match=shard.name):
        source = torch_rlds.RLDSSource(copy)
        for i in range(len(source)):
            source.episode(i)


def test_inspect_counts_steps(small_dataset, small_spec, capsys):
    from torch_rlds import cli

    assert cli.main(["inspect", str(small_dataset), "--steps"]) == 0
    out = capsys.readouterr().out
    lengths = small_spec.lengths()
    assert f"split train: {sum(lengths[:6])} steps" in out
    assert f"split val: {sum(lengths[6:])} steps" in out
    assert f"min {min(lengths[:6])}," in out


def test_a_path_without_a_dataset_lists_the_datasets_near_it(small_dataset, tmp_path):
    data_dir = small_dataset.parent.parent  # data_dir/synthetic_rlds/1.0.0
    with pytest.raises(FileNotFoundError, match=r"bridge: no dataset_info.json.*Datasets found "
                                                r"under .*: synthetic_rlds/1\.0\.0\."):
        torch_rlds.RLDSSource(data_dir / "bridge")
    with pytest.raises(FileNotFoundError, match=r"Datasets found under .*: synthetic_rlds/1\.0\.0"):
        torch_rlds.RLDSSource("bridge_dataset", data_dir=data_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no TFDS dataset"):
        torch_rlds.RLDSSource(empty)
    with pytest.raises(FileNotFoundError, match=r"No folder of that path exists"):
        torch_rlds.RLDSSource("/nonexistent-root-folder/x/1.0.0")


def test_a_remote_path_without_its_filesystem_names_the_extra(monkeypatch):
    import importlib.util

    from torch_rlds import _paths

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "s3fs") else real(name, *a))
    with pytest.raises(ImportError, match=r"gs:// paths need gcsfs.*pip install "
                                          r"'torch-rlds\[gcs\]'"):
        torch_rlds.RLDSSource("gs://bucket/bridge/0.1.0")
    with pytest.raises(ImportError, match=r"pip install 'torch-rlds\[s3\]'"):
        _paths.to_path("s3://bucket/state.json")
    assert _paths.scheme("/local/path") is None and _paths.scheme("gs://b/x") == "gs"
