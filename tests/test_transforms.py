"""Sample transforms against the values the synthetic data encodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import torch_rlds
from torch_rlds import synthetic, transforms
from torch_rlds._samples import EpisodeSamples
from torch_rlds.keymap import KeyMap
from torch_rlds.testing import assert_resumes_exactly
from torch_rlds.transforms import (
    Augment,
    Compose,
    Normalize,
    PadDims,
    Resize,
    SelectCameras,
    TransformConfig,
    TransformedDataset,
)

KEY_MAP = KeyMap(state_keys=("observation/state",),
                 image_keys={"primary": "observation/image", "wrist": "observation/wrist_image"},
                 action_keys=("action",), language_key="language_instruction")


@pytest.fixture(scope="module")
def source(small_dataset):
    return torch_rlds.RLDSSource(small_dataset)


def sample_of(source, episode: int, t: int, obs_window: int = 2, horizon: int = 4,
              key_map: KeyMap = KEY_MAP, epoch: int = 0) -> dict:
    mapped = key_map.apply(source.episode(episode))
    sampler = EpisodeSamples(mapped, key_map.observation_keys(), "action",
                             "language_instruction", episode, source.describe(episode))
    return sampler.sample(t, obs_window, horizon, epoch)


def test_resize_stretch_keeps_the_encoded_ids(source):
    sample = sample_of(source, 3, 2)
    out = Resize((32, 40), "stretch")(sample)
    primary = out["observation"]["image_primary"]
    assert primary.shape == (2, 32, 40, 3) and primary.dtype == np.uint8
    assert [synthetic.image_ids(f) for f in primary] == [(3, 1), (3, 2)]
    assert out["observation"]["image_wrist"].shape == (2, 32, 40, 3)
    assert sample["observation"]["image_primary"].shape == (2, 64, 64, 3)  # input untouched


def test_resize_with_padding_keeps_the_aspect_ratio(source):
    sample = sample_of(source, 1, 0)
    out = Resize((64, 64), "pad")(sample)
    wrist = out["observation"]["image_wrist"]  # 32x48 in the dataset
    top, left, height, width = transforms.letterbox(32, 48, 64, 64)
    assert (top, left, height, width) == (10, 0, 43, 64)
    assert wrist.shape == (2, 64, 64, 3)
    assert not wrist[:, :top].any() and not wrist[:, top + height:].any()
    inside = wrist[1, top:top + height, left:left + width]
    assert synthetic.image_ids(inside) == (1, 0)
    # An image already at the target size is passed through untouched.
    assert out["observation"]["image_primary"] is sample["observation"]["image_primary"]


def test_resize_depth_keeps_its_dtype(write_dataset):
    path = write_dataset(num_episodes=2, min_steps=2, max_steps=3, cameras=(
        synthetic.Camera("depth", 32, 32, format="png", dtype="uint16", channels=1),))
    frames = torch_rlds.RLDSSource(path).episode(1)["steps"]["observation"]["depth"].decode([1])
    out = transforms.resize_images(frames, (48, 48), "stretch")
    assert out.dtype == np.uint16 and out.shape == (1, 48, 48, 1)
    assert int(out[0, 24, 24, 0]) == 1000 + 1 * 7 + 1  # the flat depth value survives


def test_select_cameras_fills_and_masks(source):
    key_map = KeyMap(state_keys=("observation/state",), image_keys={"primary": "observation/image"})
    sample = sample_of(source, 0, 1, key_map=key_map)
    out = SelectCameras(["wrist", "primary"])(sample)
    assert list(out["observation"]) == ["state", "image_wrist", "image_primary"]
    assert not out["observation"]["image_wrist"].any()
    assert out["observation"]["image_wrist"].shape == (2, 64, 64, 3)
    assert out["image_mask"] == {"wrist": False, "primary": True}
    dropped = SelectCameras(["wrist"], fill_shape=(16, 16, 3))(sample_of(source, 0, 1))
    assert set(dropped["observation"]) == {"state", "image_wrist"}
    with pytest.raises(KeyError, match="not in the sample"):
        SelectCameras(["wrist"], fill=False)(sample)


def test_augment_is_a_pure_function_of_the_sample_id(source):
    augment = Augment(seed=7, crop_scale=0.8, brightness=0.3, contrast=0.3)
    a = augment(sample_of(source, 2, 3))
    b = augment(sample_of(source, 2, 3))
    np.testing.assert_array_equal(a["observation"]["image_primary"],
                                  b["observation"]["image_primary"])
    meta = {"epoch": 0, "episode_index": 2, "step_index": 3}
    p = augment.params(meta, "image_primary", 64, 64)
    assert p != augment.params({**meta, "step_index": 4}, "image_primary", 64, 64)
    assert p != augment.params({**meta, "epoch": 1}, "image_primary", 64, 64)
    assert p != augment.params({**meta, "dataset_index": 1}, "image_primary", 64, 64)
    assert p != augment.params(meta, "image_wrist", 64, 64)
    assert p != Augment(seed=8, crop_scale=0.8, brightness=0.3,
                        contrast=0.3).params(meta, "image_primary", 64, 64)
    draws = [augment.params({**meta, "step_index": t}, "k", 64, 64) for t in range(400)]
    brightness = np.array([d.brightness for d in draws])
    assert brightness.min() >= 0.7 and brightness.max() <= 1.3
    assert abs(brightness.mean() - 1.0) < 0.03  # uniform on [0.7, 1.3]: sd of the mean 0.009
    assert {d.crop_height for d in draws} == {51} and max(d.top for d in draws) == 13


def test_augment_crop_keeps_the_ids_and_photometry_is_exact(source):
    sample = sample_of(source, 4, 2)
    cropped = Augment(seed=1, crop_scale=0.9, brightness=0.0, contrast=0.0)(sample)
    frames = cropped["observation"]["image_primary"]
    assert frames.shape == (2, 64, 64, 3)
    assert [synthetic.image_ids(f) for f in frames] == [(4, 1), (4, 2)]
    augment = Augment(seed=1, crop_scale=1.0, brightness=0.25, contrast=0.0)
    out = augment(sample)["observation"]["image_primary"]
    p = augment.params(sample["meta"], "image_primary", 64, 64)
    x = sample["observation"]["image_primary"].astype(np.float32) * np.float32(p.brightness)
    np.testing.assert_array_equal(out, np.clip(np.rint(x), 0, 255).astype(np.uint8))
    # Zero-filled cameras stay zero.
    filled = SelectCameras(["primary", "extra"])(sample)
    assert not Augment(seed=1)(filled)["observation"]["image_extra"].any()


def _stats(spec, lengths):
    state = np.concatenate([[synthetic.state_value(spec, e, t) for t in range(n)]
                            for e, n in enumerate(lengths)]).astype(np.float64)
    action = np.concatenate([[synthetic.action_value(spec, e, t) for t in range(n)]
                             for e, n in enumerate(lengths)]).astype(np.float64)
    return {name: {"mean": v.mean(0), "std": v.std(0), "q01": np.quantile(v, 0.01, axis=0),
                   "q99": np.quantile(v, 0.99, axis=0)}
            for name, v in (("state", state), ("actions", action))}


def test_normalize_zscore_and_exact_inverse(source, small_spec):
    stats = _stats(small_spec, small_spec.lengths()[:small_spec.num_episodes])
    normalize = Normalize(stats, "zscore")
    sample = sample_of(source, 5, 1, horizon=6)
    out = normalize(sample)
    action = sample["action"]
    a = stats["actions"]
    np.testing.assert_allclose(out["action"], (action - a["mean"]) / (a["std"] + 1e-6),
                               rtol=1e-6)
    assert out["action"].dtype == np.float32
    np.testing.assert_array_equal(out["observation"]["state"][:, 2:], 0)  # constant dims
    np.testing.assert_array_equal(out["observation"]["image_primary"],
                                  sample["observation"]["image_primary"])
    back = normalize.unnormalize_actions(out["action"])
    np.testing.assert_allclose(back, action, rtol=2e-7, atol=2e-7 * np.abs(action).max())
    x = np.random.default_rng(0).normal(size=(100, 7)) * 3
    assert np.abs(normalize.unnormalize_actions(
        transforms.normalize(x, a, "zscore")) - x).max() < 1e-12


def test_normalize_quantile_maps_q01_q99_to_minus_one_one(source, small_spec):
    stats = _stats(small_spec, small_spec.lengths()[:small_spec.num_episodes])
    s = stats["state"]
    ends = np.stack([s["q01"], s["q99"]])
    y = transforms.normalize(ends, s, "quantile")
    np.testing.assert_allclose(y[:, :2], [[-1, -1], [1, 1]], atol=1e-5)
    normalize = Normalize(stats, "quantile")
    sample = sample_of(source, 2, 0)
    back = normalize.unnormalize_actions(normalize(sample)["action"])
    np.testing.assert_allclose(back, sample["action"], rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="values have 7 dimensions, the normalization "
                                         "statistics 5"):
        transforms.normalize(np.zeros((2, 7)), {k: np.zeros(5) for k in s}, "zscore")


def test_pad_dims_with_masks(source, small_spec):
    sample = sample_of(source, 1, 2, horizon=3)
    out = PadDims(state_dim=10, action_dim=9)(sample)
    state, action = out["observation"]["state"], out["action"]
    assert state.shape == (2, 10) and action.shape == (3, 9)
    np.testing.assert_array_equal(state[:, :7], sample["observation"]["state"])
    np.testing.assert_array_equal(state[:, 7:], 0)
    np.testing.assert_array_equal(action[0, :7], synthetic.action_value(small_spec, 1, 2))
    np.testing.assert_array_equal(out["state_dim_is_pad"], [False] * 7 + [True] * 3)
    np.testing.assert_array_equal(out["action_dim_is_pad"], [False] * 7 + [True] * 2)
    with pytest.raises(ValueError, match="action has 7 dimensions, more than the padded width 4"):
        PadDims(action_dim=4)(sample)


def test_transform_config_checks_and_builds_in_order():
    config = TransformConfig.from_dict({"image_size": [32, 32], "cameras": ["primary"],
                                        "augment": True, "pad_action_to": 8})
    chain = config.build(seed=3)
    assert [type(t).__name__ for t in chain.transforms] == [
        "SelectCameras", "Resize", "Augment", "PadDims"]
    assert chain.transforms[2].seed == 3
    assert TransformConfig.from_dict(None) is None
    for raw, message in [
        ({"image_size": [224]}, r"data.transform.image_size must be \[height, width\]"),
        ({"resize": "crop"}, r"data.transform.resize must be one of \['pad', 'stretch'\] "
                             r"\(got 'crop'\)"),
        ({"crop_scale": 0}, r"data.transform.crop_scale must be a number in \(0.0, 1.0\]"),
        ({"normalize": "minmax"}, "data.transform.normalize must be one of"),
        ({"pad_state_to": 0}, "data.transform.pad_state_to must be an int >= 1"),
        ({"augment": "yes"}, "data.transform.augment must be true or false"),
        ({"colour": 1}, r"unknown fields \['colour'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            TransformConfig.from_dict(raw)
    with pytest.raises(ValueError, match="normalize needs statistics"):
        TransformConfig(normalize="zscore").build()


def test_augmented_stream_resumes_exactly(small_dataset):
    chain = Compose([Resize((32, 32), "stretch"),
                     Augment(seed=5, crop_scale=0.9, brightness=0.2, contrast=0.2)])

    def make_loader():
        dataset = torch_rlds.RLDSDataset(small_dataset, action_horizon=4, shuffle_window=2,
                                         observation_keys=["image", "state"], seed=1)
        return torch_rlds.DataLoader(TransformedDataset(dataset, chain), batch_size=5)

    reference = assert_resumes_exactly(make_loader, 6)
    assert reference[0]["observation"]["image"].shape == (5, 1, 32, 32, 3)


# -- Lanczos-3 -----------------------------------------------------------------------------------
def _pattern() -> np.ndarray:
    i, j, c = np.meshgrid(np.arange(40), np.arange(56), np.arange(3), indexing="ij")
    return ((i * 7 + j * 13 + c * 50 + (i * j) % 17 * 9) % 256).astype(np.uint8)


def test_lanczos3_gives_the_pixels_of_tf_image_resize():
    # tests/golden/lanczos3_tf.npz: tf.image.resize(_pattern(), size, method="lanczos3",
    # antialias=True), rounded and clipped to uint8 (TensorFlow 2.21), as Octo's loader does.
    golden = np.load(Path(__file__).parent / "golden" / "lanczos3_tf.npz")
    image = _pattern()
    for name, size in (("down", (24, 30)), ("up", (64, 72)), ("mixed", (20, 80))):
        out = transforms.resize_images(image[None], size, "stretch", "lanczos3")[0]
        difference = np.abs(out.astype(int) - golden[name])
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, name
    bilinear = transforms.resize_images(image[None], (24, 30), "stretch")[0]
    assert np.abs(bilinear.astype(int) - golden["down"]).max() > 10  # another filter


def test_lanczos3_keeps_flat_images_and_other_dtypes():
    flat = np.full((2, 30, 50, 3), 77, np.uint8)
    np.testing.assert_array_equal(transforms.lanczos3(flat, 17, 64), 77)
    depth = np.full((1, 32, 32, 1), 1000, np.uint16)
    out = transforms.resize_images(depth, (48, 20), "stretch", "lanczos3")
    assert out.dtype == np.uint16 and (out == 1000).all()
    floats = transforms.lanczos3(np.ones((1, 8, 8, 1), np.float32), 4, 4)
    assert floats.dtype == np.float32
    np.testing.assert_allclose(floats, 1, rtol=1e-6)
    with pytest.raises(ValueError, match=r"resize filter must be one of \['bilinear', "
                                         r"'lanczos3'\] \(got 'cubic'\)"):
        Resize((8, 8), filter="cubic")


def test_resize_and_fill_per_camera(source):
    sample = sample_of(source, 3, 2)
    out = Resize({"image_wrist": (16, 24)}, "stretch")(sample)
    assert out["observation"]["image_wrist"].shape == (2, 16, 24, 3)
    assert out["observation"]["image_primary"] is sample["observation"]["image_primary"]
    config = TransformConfig.from_dict({"image_size": {"primary": [32, 32], "extra": [8, 8]},
                                        "cameras": ["primary", "wrist", "extra"],
                                        "resize": "stretch", "resize_filter": "lanczos3"})
    built = config.build()(sample)
    assert built["observation"]["image_primary"].shape == (2, 32, 32, 3)
    assert built["observation"]["image_wrist"].shape == (2, 32, 48, 3)  # not in image_size
    assert built["observation"]["image_extra"].shape == (2, 8, 8, 3)  # filled at its size
    assert built["image_mask"] == {"primary": True, "wrist": True, "extra": False}
    assert [synthetic.image_ids(f) for f in built["observation"]["image_primary"]] == [(3, 1),
                                                                                     (3, 2)]
    with pytest.raises(ValueError, match=r"data.transform.image_size must be \[height, width\] "
                                         r"with ints >= 1, or a mapping of camera role"):
        TransformConfig.from_dict({"image_size": {"Primary": [8, 8]}})


# -- normalization with masks and bounds ---------------------------------------------------------
STATS = {"mean": np.array([1.0, -2.0, 0.5]), "std": np.array([2.0, 0.5, 0.0]),
         "q01": np.array([-1.0, 0.0, 0.0]), "q99": np.array([3.0, 10.0, 1.0])}


def test_bounds_maps_q01_q99_onto_minus_one_one_and_clips():
    x = np.array([[-1.0, 0.0, 0.0], [3.0, 10.0, 1.0], [1.0, 5.0, 0.25], [-3.0, 20.0, 2.0]])
    y = transforms.normalize(x, STATS, "bounds", eps=0.0)
    np.testing.assert_allclose(y, [[-1, -1, -1], [1, 1, 1], [0, 0, -0.5], [-1, 1, 1]])
    back = transforms.unnormalize(y, STATS, "bounds", eps=0.0)
    np.testing.assert_allclose(back[:3], x[:3], atol=1e-12)  # inside the range: recovered
    np.testing.assert_allclose(back[3], [-1.0, 10.0, 1.0])  # clipped: the ends of the range
    quantile = transforms.normalize(x, STATS, "quantile", eps=0.0)
    np.testing.assert_allclose(quantile[3], [-2, 3, 3])  # the same map, not clipped


def test_normalize_mask_leaves_dimensions_bit_for_bit():
    x = np.array([[0.123456789, 7.5, 0.3], [9.0, -2.0, 1.0]], np.float32)
    mask = [True, False, True]
    y = transforms.normalize(x, STATS, "zscore", mask=mask, eps=1e-8)
    np.testing.assert_array_equal(y[:, 1], x[:, 1])
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - 1.0) / (2.0 + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(y[:, 2], (x[:, 2] - 0.5) / 1e-8, rtol=1e-6)
    normalize = Normalize({"actions": STATS, "state": STATS}, "bounds",
                          mask={"actions": mask}, eps=1e-8)
    back = normalize.unnormalize_actions(normalize({"observation": {}, "action": x})["action"])
    np.testing.assert_array_equal(back[:, 1], x[:, 1])
    np.testing.assert_allclose(back[0, 0], x[0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"normalization mask of actions \(3 dimensions\) must "
                                         r"be 3 bools"):
        Normalize({"actions": STATS}, "zscore", mask={"actions": [True, False]})
    with pytest.raises(ValueError, match="normalization mask for 'state', which has no "
                                         "statistics"):
        Normalize({"actions": STATS}, "zscore", mask={"state": [True] * 3})


def test_transform_config_normalization_fields_reach_the_transform():
    config = TransformConfig.from_dict({"normalize": "bounds", "normalize_eps": 1e-8,
                                        "normalize_action_mask": [True, True, False]})
    chain = config.build(norm_stats={"actions": STATS, "state": STATS})
    normalize = chain.transforms[-1]
    assert (normalize.mode, normalize.eps) == ("bounds", 1e-8)
    np.testing.assert_array_equal(normalize.mask["actions"], [True, True, False])
    assert "state" not in normalize.mask
    for raw, message in [
        ({"normalize_action_mask": [1, 0]}, "normalize_action_mask must be a list of "
                                            "true/false"),
        ({"normalize_eps": -1}, r"normalize_eps must be a number in \[0.0, 1.0\]"),
        ({"normalize": "minmax"}, r"must be one of \['zscore', 'quantile', 'bounds'\]"),
        ({"resize_filter": "lanczos"}, r"resize_filter must be one of \['bilinear', "
                                       r"'lanczos3'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            TransformConfig.from_dict(raw)
