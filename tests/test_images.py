"""JPEG frames decoded at a reduced scale: the sizes chosen, and how close the pixels stay to a
full decode followed by the same resize."""

from __future__ import annotations

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _images, synthetic
from torch_rlds._images import ImageDecodeError, decode_image, reduced_scale, reduced_size
from torch_rlds.transforms import resize_images


@pytest.mark.parametrize("size, target, factor", [
    ((480, 640), (224, 224), 2),   # 240x320 still covers 224x224; 120x160 would not
    ((720, 960), (128, 128), 4),   # 180x240; 1/8 would be 90x120
    ((256, 256), (128, 128), 2),   # exactly half
    ((256, 256), (129, 128), 1),   # a row more than half: no reduction
    ((180, 320), (20, 40), 8),     # 23x40
    ((181, 321), (90, 160), 2),    # sizes round up: 91x161
])
def test_reduced_scale_is_the_largest_that_covers_the_target(size, target, factor):
    assert reduced_scale(size, target) == factor
    height, width = reduced_size(size, target)
    assert height >= target[0] and width >= target[1]
    assert (height, width) == (-(-size[0] // factor), -(-size[1] // factor))


def _frame(height: int, width: int, episode: int = 3, step: int = 5) -> bytes:
    """A synthetic camera frame (id bands and a texture), JPEG 4:2:0 at quality 90."""
    painter = synthetic._Painter(synthetic.Camera("image", height, width), texture=True, seed=1)
    return painter.frame(episode, step)


def test_a_reduced_decode_is_the_frame_at_a_smaller_scale():
    data = _frame(192, 256)
    full = decode_image(data, (192, 256, 3), np.uint8, fast=True)
    half = decode_image(data, (192, 256, 3), np.uint8, fast=True, scale_to=(96, 100))
    assert half.shape == (96, 128, 3)
    # libjpeg's 1/2 scale is close to the 2x2 average of the full decode (3 levels on this
    # noisy texture; the average of a frame shifted by one block is 40 away).
    box = full.reshape(96, 2, 128, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(half - box).mean() < 4.0
    assert np.abs(half - np.roll(box, 8, axis=1)).mean() > 20
    assert synthetic.image_ids(half) == (3, 5)
    eighth = decode_image(data, (192, 256, 3), np.uint8, scale_to=(24, 32))
    assert eighth.shape == (24, 32, 3)
    same = decode_image(data, (192, 256, 3), np.uint8, fast=True, scale_to=(100, 128))
    np.testing.assert_array_equal(same, full)  # more than half: the full decode


@pytest.mark.parametrize("filter", ["bilinear", "lanczos3"])
def test_reduced_decode_then_resize_stays_near_full_decode_then_resize(filter):
    # The bounds of _images.reduced_scale's table (its worst case: a mean of 3.1, at most 51).
    data = _frame(240, 320, episode=7, step=2)
    target = (112, 112)
    full = resize_images(decode_image(data, (240, 320, 3), np.uint8, fast=True)[None], target,
                         "stretch", filter)[0]
    reduced = decode_image(data, (240, 320, 3), np.uint8, fast=True, scale_to=target)
    assert reduced.shape == (120, 160, 3)
    small = resize_images(reduced[None], target, "stretch", filter)[0]
    difference = np.abs(small.astype(int) - full.astype(int))
    assert difference.mean() < 3.5 and difference.max() <= 64
    assert synthetic.image_ids(small) == synthetic.image_ids(full) == (7, 2)


def test_reduced_decode_into_a_buffer_and_from_encoded_frames(write_dataset):
    data = _frame(64, 96)
    out = np.empty((32, 48, 3), np.uint8)
    assert decode_image(data, (64, 96, 3), np.uint8, out=out, scale_to=(32, 40)) is out
    with pytest.raises(ImageDecodeError, match="does not match the output's"):
        decode_image(data, (64, 96, 3), np.uint8, out=np.empty((64, 96, 3), np.uint8),
                     scale_to=(32, 40))
    path = write_dataset(num_episodes=2, min_steps=3, max_steps=3, cameras=(
        synthetic.Camera("image", 64, 64), synthetic.Camera("png", 32, 32, format="png")))
    observation = torch_rlds.RLDSSource(path).episode(1)["steps"]["observation"]
    frames = observation["image"].decode([0, 2, 2], scale_to=(30, 20))
    assert frames.shape == (3, 32, 32, 3)
    assert [synthetic.image_ids(f) for f in frames] == [(1, 0), (1, 2), (1, 2)]
    png = observation["png"].decode([1], scale_to=(8, 8))
    assert png.shape == (1, 32, 32, 3)  # PNG has no scaled decode: full size
    assert _images.DCT_SCALES == (8, 4, 2)
