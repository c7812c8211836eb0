"""Sample transforms: camera selection, image resize, augmentation, normalization, padding.

Each transform is a picklable callable ``sample -> sample`` on one step sample as
:class:`torch_rlds.RLDSDataset` emits it (``{"observation": {key: [obs_window, ...]},
"action": [H, A], "meta": {...}, ...}``), returning a new dict and leaving its input untouched.
Every transform is deterministic: its output is a pure function of the sample, its own arguments
and, for :class:`Augment`, ``(seed, epoch, dataset_index, episode_index, step_index)`` read from
``sample["meta"]``. A transformed stream therefore resumes exactly wherever the untransformed one
does, and no transform adds anything to the state.

Image observations are the 4-d arrays ``[obs_window, H, W, C]`` of ``sample["observation"]``;
after a :class:`~torch_rlds.keymap.KeyMap` they are called ``image_<role>``.

:class:`Compose` chains transforms; :class:`TransformedDataset` applies one to every sample of
a resumable dataset and forwards its state; :class:`TransformConfig` is the ``data.transform``
section of a config and :meth:`TransformConfig.build` the chain it describes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch.utils.data

from torch_rlds import _order
from torch_rlds._rules import (
    BOOL,
    Rule,
    check_fields,
    check_value,
    choice_rule,
    field,
    int_rule,
    nullable,
    number_rule,
)
from torch_rlds.keymap import IMAGE_PREFIX, STATE, image_key

EPS = 1e-6
NORMALIZE_MODES = ("zscore", "quantile", "bounds")
RESIZE_MODES = ("pad", "stretch")

# The rules every place that takes a mode checks it by (ValueError naming the place).
RESIZE_MODE = Rule(f"one of {list(RESIZE_MODES)}", lambda v: v in RESIZE_MODES)
NORMALIZE_MODE = Rule(f"one of {list(NORMALIZE_MODES)}", lambda v: v in NORMALIZE_MODES)
RESIZE_FILTERS = ("bilinear", "lanczos3")
_AUGMENT_TAG = 0x41554731
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")


def _is_size(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(type(d) is int and d >= 1 for d in value))


def _is_sizes(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value) and all(isinstance(k, str) and _ROLE.match(k) and _is_size(v)
                                   for k, v in value.items())
    return _is_size(value)


def _sizes(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: tuple(v) for k, v in value.items()}
    return tuple(value)


def _is_bools(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(type(v) is bool for v in value))


def _is_roles(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(c, str) for c in value))


def _images(observation: Mapping[str, Any]) -> list[str]:
    return [k for k, v in observation.items() if isinstance(v, np.ndarray) and v.ndim == 4]


def _with_observation(sample: Mapping[str, Any], observation: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    out["observation"] = observation
    return out


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        self.transforms = tuple(transforms)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({list(self.transforms)!r})"


class TransformedDataset(torch.utils.data.IterableDataset):
    """``fn`` applied to every sample of ``dataset``; the state is ``dataset``'s, unchanged.

    Because ``fn`` must be a pure function of the sample (every transform here is), the
    transformed stream resumes exactly wherever ``dataset`` does. Other attributes
    (``source``, ``process_index``, ``set_epoch``...) are those of ``dataset``.
    """

    def __init__(self, dataset: Any, fn: Callable[[dict], dict]) -> None:
        super().__init__()
        self.dataset = dataset
        self.fn = fn

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.dataset:
            yield self.fn(sample)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped dataset's state."""
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped dataset's state."""
        self.dataset.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "fn") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"TransformedDataset({self.dataset!r}, {self.fn!r})"


# -- cameras -------------------------------------------------------------------------------------
class SelectCameras:
    """Keep the cameras ``roles`` (in that order) and drop other image observations.

    A role the sample lacks (a dataset without a wrist camera in a mixture) is filled with
    zeros, of ``fill_shape`` ``(H, W, C)`` when given (a mapping of role to shape for cameras
    of different sizes), else of the first present camera's shape, and marked ``False`` in
    ``sample["image_mask"][role]`` (``True`` for present ones), so batches of several datasets
    line up and a model can tell the filler apart. ``fill=False`` raises instead.
    """

    def __init__(self, roles: Sequence[str], *, fill: bool = True,
                 fill_shape: tuple[int, int, int] | Mapping[str, tuple[int, int, int]]
                 | None = None) -> None:
        if isinstance(roles, str) or not roles:
            raise ValueError(f"roles must be a non-empty list of camera roles (got {roles!r})")
        self.roles = tuple(roles)
        self.fill = fill
        if isinstance(fill_shape, Mapping):
            self.fill_shapes = {r: tuple(int(d) for d in v) for r, v in fill_shape.items()}
        else:
            shape = None if fill_shape is None else tuple(int(d) for d in fill_shape)
            self.fill_shapes = {r: shape for r in self.roles if shape is not None}
        self.fill_shape = fill_shape

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        observation = sample["observation"]
        images = _images(observation)
        present = [image_key(r) for r in self.roles if image_key(r) in observation]
        missing = [r for r in self.roles if image_key(r) not in observation]
        if missing and not self.fill:
            raise KeyError(f"cameras {missing} are not in the sample (its images: {images})")
        if missing and not present and not all(r in self.fill_shapes for r in missing):
            raise KeyError(f"none of the cameras {list(self.roles)} is in the sample (its "
                           f"images: {images}); give fill_shape to fill them all with zeros")
        out = {k: v for k, v in observation.items() if k not in images}
        window = len(sample["observation_is_pad"])
        mask = {}
        for role in self.roles:
            key = image_key(role)
            if key in observation:
                out[key] = observation[key]
                mask[role] = np.bool_(True)
            else:
                if role in self.fill_shapes:
                    shape, dtype = (window, *self.fill_shapes[role]), np.uint8
                else:
                    first = observation[present[0]]
                    shape, dtype = first.shape, first.dtype
                out[key] = np.zeros(shape, dtype)
                mask[role] = np.bool_(False)
        result = _with_observation(sample, out)
        result["image_mask"] = mask
        return result

    def __repr__(self) -> str:
        return f"SelectCameras({list(self.roles)}, fill={self.fill}, fill_shape={self.fill_shape})"


# -- resize --------------------------------------------------------------------------------------
def letterbox(height: int, width: int, out_height: int, out_width: int
              ) -> tuple[int, int, int, int]:
    """Where an ``height x width`` image lands when resized into ``out_height x out_width``
    keeping its aspect ratio: ``(top, left, new_height, new_width)``, centred."""
    scale = min(out_height / height, out_width / width)
    new_h = min(out_height, max(1, round(height * scale)))
    new_w = min(out_width, max(1, round(width * scale)))
    return (out_height - new_h) // 2, (out_width - new_w) // 2, new_h, new_w


def _resize_frame(frame: np.ndarray, height: int, width: int,
                  filter: str = "bilinear") -> np.ndarray:  # noqa: A002 - Pillow's word
    if frame.shape[:2] == (height, width):
        return frame
    if filter == "lanczos3":
        return lanczos3(frame[None], height, width)[0]
    from PIL import Image

    if frame.dtype == np.uint8 and frame.shape[2] in (1, 3, 4):
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[frame.shape[2]]
        image = Image.fromarray(frame[:, :, 0] if mode == "L" else frame, mode)
        resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        return resized.reshape(height, width, frame.shape[2])
    # Other dtypes (uint16 depth, float): each channel through Pillow's 32-bit float mode.
    channels = []
    for c in range(frame.shape[2]):
        image = Image.fromarray(np.ascontiguousarray(frame[:, :, c], dtype=np.float32), "F")
        channels.append(np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)))
    return _rounded(np.stack(channels, axis=-1), frame.dtype)


def _rounded(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float ``values`` in ``dtype``: integers rounded half to even and clipped to its range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


# -- Lanczos-3 ------------------------------------------------------------------------------------
# tf.image.resize(method="lanczos3", antialias=True) computes in float32: for output pixel x the
# sample point is (x + 0.5) / scale in input pixels, the kernel 3 sin(pi d) sin(pi d / 3) /
# (pi d)^2 (1 for |d| <= 1e-3, 0 beyond 3) is widened by 1 / scale when shrinking, the weights
# of the input pixels in reach are normalised to sum 1, and the image is resampled along its
# height, then along its width. The float32 steps below follow that arithmetic.
_PI32 = np.float32(3.14159265359)


def _lanczos3_kernel(d: np.ndarray) -> np.ndarray:
    f32 = np.float32
    d = np.abs(d).astype(f32)
    a = (_PI32 * d).astype(f32)
    # sin in float64 rounded to float32: the correctly rounded float32 sine.
    sin_a = np.sin(a.astype(np.float64)).astype(f32)
    sin_b = np.sin((a / f32(3)).astype(f32).astype(np.float64)).astype(f32)
    denominator = (((_PI32 * _PI32) * d).astype(f32) * d).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (((f32(3) * sin_a).astype(f32) * sin_b).astype(f32) / denominator).astype(f32)
    value = np.where(d > f32(3), f32(0), value)
    return np.where(d <= f32(1e-3), f32(1), value).astype(f32)


@functools.lru_cache(maxsize=64)
def _lanczos3_weights(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts [out], weights [out, span])``: output pixel ``x`` is the sum over ``k`` of
    ``weights[x, k] * input[starts[x] + k]`` (zero weights past the input's end)."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0 / float(scale))
    reach = f32(f32(3) * max(inv_scale, f32(1)))
    kernel_scale = max(inv_scale, f32(1))
    span = min(2 * int(np.ceil(float(reach))) + 1, in_size)
    sample = ((np.arange(out_size).astype(f32) + f32(0.5)) * inv_scale).astype(f32)
    first = np.ceil(((sample - reach).astype(f32) - f32(0.5)).astype(f32)).astype(np.int64)
    starts = np.clip(first, 0, in_size - 1)
    source = starts[:, None] + np.arange(span)
    ends = np.clip(np.floor(((sample + reach).astype(f32) - f32(0.5)).astype(f32)),
                   0, in_size - 1).astype(np.int64) + 1
    position = ((source.astype(f32) + f32(0.5)).astype(f32) - sample[:, None]).astype(f32)
    weights = _lanczos3_kernel((position / kernel_scale).astype(f32))
    weights = np.where(source < ends[:, None], weights, f32(0)).astype(f32)
    total = np.zeros(out_size, f32)
    for k in range(span):  # summed in order, as float32
        total = (total + weights[:, k]).astype(f32)
    usable = np.abs(total) >= f32(1000) * np.finfo(f32).tiny
    inverse = np.where(usable, f32(1) / np.where(usable, total, f32(1)), f32(0)).astype(f32)
    weights = (weights * inverse[:, None]).astype(f32)
    outside = (sample < 0) | (sample > in_size)
    weights[outside] = 0
    starts[outside] = 0
    for array in (starts, weights):
        array.setflags(write=False)
    return starts, weights


def _lanczos3_axis(values: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    starts, weights = _lanczos3_weights(out_size, values.shape[axis])
    shape = [1] * values.ndim
    shape[axis] = out_size
    out_shape = list(values.shape)
    out_shape[axis] = out_size
    out = np.zeros(out_shape, np.float32)
    term = np.empty(out_shape, np.float32)
    last = values.shape[axis] - 1
    for k in range(weights.shape[1]):  # accumulated in span order, as float32
        np.take(values, np.minimum(starts + k, last), axis=axis, out=term)
        term *= weights[:, k].reshape(shape)
        out += term
    return out


def lanczos3(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``frames`` ``[N, H, W, C]`` resized to ``height x width`` as
    ``tf.image.resize(method="lanczos3", antialias=True)`` and a round-and-clip to the dtype
    (what Octo's and OpenVLA's loaders do) compute it.

    Measured against TensorFlow 2.21 (4 frames each: 3 natural-image stand-ins and noise) at
    256x256 -> 224x224, 480x640 -> 256x256, 180x320 -> 224x224, 256x256 -> 128x128, 128x128
    -> 224x224, 150x200 -> 256x256 and 84x84 -> 128x128: every uint8 value identical but at
    most 0.001% of them, which differ by 1 (float32 sums added in another order). Pillow's
    ``LANCZOS`` differs from it by up to 43 levels on 15-24% of the values. Integer frames are rounded half to even and clipped; float frames stay float32.
    About 6 ms a 256x256 frame to 224x224 on one core (Pillow's bilinear: 0.5 ms).
    """
    x = frames.astype(np.float32)
    if x.shape[1] != height:
        x = _lanczos3_axis(x, height, 1)
    if x.shape[2] != width:
        x = _lanczos3_axis(x, width, 2)
    return _rounded(x, frames.dtype) if frames.dtype != np.float32 else x


def resize_images(frames: np.ndarray, size: tuple[int, int], mode: str = "pad",
                  filter: str = "bilinear") -> np.ndarray:  # noqa: A002
    """Resize ``frames`` ``[N, H, W, C]`` to ``size`` ``(height, width)``: ``stretch`` to
    exactly that size, or ``pad`` keeping the aspect ratio, centred on zeros (see
    :func:`letterbox`). Frames already of that size come back unchanged.

    ``filter``: ``bilinear`` (Pillow's), or ``lanczos3``, the antialiased Lanczos-3 of
    ``tf.image.resize`` that Octo and OpenVLA resize with (see :func:`lanczos3`)."""
    check_value("resize mode", mode, RESIZE_MODE, ValueError)
    _check_filter(filter)
    out_h, out_w = size
    n, h, w, c = frames.shape
    if (h, w) == (out_h, out_w):
        return frames
    out = np.zeros((n, out_h, out_w, c), frames.dtype)
    if mode == "stretch":
        top, left, new_h, new_w = 0, 0, out_h, out_w
    else:
        top, left, new_h, new_w = letterbox(h, w, out_h, out_w)
    for i in range(n):
        out[i, top:top + new_h, left:left + new_w] = _resize_frame(frames[i], new_h, new_w,
                                                                   filter)
    return out


def _check_filter(name: str) -> None:
    if name not in RESIZE_FILTERS:
        raise ValueError(f"resize filter must be one of {list(RESIZE_FILTERS)} (got {name!r})")


def _check_size(size: Any, where: str) -> tuple[int, int]:
    size = tuple(size) if isinstance(size, Sequence) and not isinstance(size, str) else size
    if not _is_size(size):
        raise ValueError(f"{where} must be (height, width), both ints >= 1 (got {size!r})")
    return size


class Resize:
    """Resize image observations to ``size``: ``(height, width)`` for every camera (or those
    in ``keys``), or a mapping of observation key (``image_wrist``) to ``(height, width)``
    for cameras of their own sizes (Octo: primary 256x256, wrist 128x128; a camera the
    mapping leaves out keeps its size). ``mode`` ``pad`` keeps the aspect ratio and pads with
    zeros, ``stretch`` does not; ``filter`` is ``bilinear`` or ``lanczos3`` (see
    :func:`resize_images`)."""

    def __init__(self, size: tuple[int, int] | Mapping[str, tuple[int, int]],
                 mode: str = "pad", keys: Sequence[str] | None = None,
                 filter: str = "bilinear") -> None:  # noqa: A002
        if isinstance(size, Mapping):
            self.sizes: dict[str, tuple[int, int]] | None = {
                str(k): _check_size(v, f"size[{k!r}]") for k, v in size.items()}
            self.size: tuple[int, int] | None = None
        else:
            self.size = _check_size(size, "size")
            self.sizes = None
        check_value("resize mode", mode, RESIZE_MODE, ValueError)
        _check_filter(filter)
        self.mode = mode
        self.filter = filter
        self.keys = None if keys is None else tuple(keys)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        observation = dict(sample["observation"])
        if self.sizes is not None:
            targets = {k: v for k, v in self.sizes.items() if k in observation}
        else:
            size = cast(tuple[int, int], self.size)  # one size for all when sizes is None
            targets = {k: size for k in self.keys or _images(observation)}
        for key, size in targets.items():
            observation[key] = resize_images(observation[key], size, self.mode, self.filter)
        return _with_observation(sample, observation)

    def __repr__(self) -> str:
        return f"Resize({self.sizes or self.size}, mode={self.mode!r}, filter={self.filter!r})"


# -- augmentation --------------------------------------------------------------------------------
def uniform(*key: int) -> float:
    """A number in ``[0, 1)`` determined by the integers ``key`` (the platform-stable hash of
    :mod:`torch_rlds._order`; numpy generators promise no stream stability)."""
    return (_order._key(*key) >> 11) * 2.0 ** -53


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """What :class:`Augment` does to one camera of one sample: crop ``crop_height x
    crop_width`` at ``(top, left)`` and resize back, multiply by ``brightness``, scale the
    deviation from the frame mean by ``contrast``."""

    top: int
    left: int
    crop_height: int
    crop_width: int
    brightness: float
    contrast: float


class Augment:
    """Random crop, brightness and contrast, drawn from ``(seed, epoch, dataset_index,
    episode_index, step_index, camera)``.

    The same draw applies to every frame of a sample's observation window (the frames stay
    consistent with each other); cameras draw separately. ``dataset_index`` is read from
    ``meta`` when present (samples of a :class:`~torch_rlds.mixture.MixtureDataset`), so apply
    this transform after the mixture, or give each dataset of a mixture its own ``seed``.

    * crop: a ``crop_scale`` fraction of the height and width at a random place, resized back
      to the frame size (bilinear); ``crop_scale=1`` turns it off.
    * brightness: pixels times a factor uniform in ``[1 - brightness, 1 + brightness]``.
    * contrast: deviations from the frame's mean times a factor uniform in
      ``[1 - contrast, 1 + contrast]``. Brightness and contrast apply to uint8 images only
      (a depth image keeps its values).
    """

    def __init__(self, seed: int = 0, *, crop_scale: float = 0.95, brightness: float = 0.2,
                 contrast: float = 0.2, keys: Sequence[str] | None = None) -> None:
        if type(seed) is not int or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (got {seed!r})")
        check_value("crop_scale", crop_scale, number_rule(0.0, 1.0, low_open=True), ValueError)
        check_value("brightness", brightness, number_rule(0.0, 1.0), ValueError)
        check_value("contrast", contrast, number_rule(0.0, 1.0), ValueError)
        self.seed = seed
        self.crop_scale = float(crop_scale)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.keys = None if keys is None else tuple(keys)

    def params(self, meta: Mapping[str, Any], key: str, height: int, width: int) -> AugmentParams:
        """The draw for camera ``key`` (``height x width``) of the sample with ``meta``."""
        base = (self.seed, int(meta["epoch"]), int(meta.get("dataset_index", 0)),
                int(meta["episode_index"]), int(meta["step_index"]),
                zlib.crc32(key.encode()), _AUGMENT_TAG)
        u = [uniform(*base, i) for i in range(4)]
        crop_h = min(height, max(1, round(height * self.crop_scale)))
        crop_w = min(width, max(1, round(width * self.crop_scale)))
        top = min(int(u[0] * (height - crop_h + 1)), height - crop_h)
        left = min(int(u[1] * (width - crop_w + 1)), width - crop_w)
        return AugmentParams(top, left, crop_h, crop_w,
                             1.0 + (2.0 * u[2] - 1.0) * self.brightness,
                             1.0 + (2.0 * u[3] - 1.0) * self.contrast)

    def apply(self, frames: np.ndarray, p: AugmentParams) -> np.ndarray:
        """Apply the draw ``p`` to ``frames`` ``[N, H, W, C]``."""
        n, h, w, c = frames.shape
        out = frames
        if (p.crop_height, p.crop_width) != (h, w):
            crop = frames[:, p.top:p.top + p.crop_height, p.left:p.left + p.crop_width]
            out = np.stack([_resize_frame(np.ascontiguousarray(f), h, w) for f in crop])
        if frames.dtype == np.uint8 and (self.brightness or self.contrast):
            x = out.astype(np.float32) * np.float32(p.brightness)
            mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
            x = (x - mean) * np.float32(p.contrast) + mean
            out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        observation = dict(sample["observation"])
        mask = sample.get("image_mask", {})
        for key in self.keys or _images(observation):
            if key.startswith(IMAGE_PREFIX) and not mask.get(key[len(IMAGE_PREFIX):], True):
                continue  # a zero-filled camera stays zero
            frames = observation[key]
            observation[key] = self.apply(
                frames, self.params(sample["meta"], key, frames.shape[1], frames.shape[2]))
        return _with_observation(sample, observation)

    def __repr__(self) -> str:
        return (f"Augment(seed={self.seed}, crop_scale={self.crop_scale}, "
                f"brightness={self.brightness}, contrast={self.contrast})")


# -- normalization -------------------------------------------------------------------------------
def _stat(stats: Any, name: str) -> np.ndarray:
    value = stats[name] if isinstance(stats, Mapping) else getattr(stats, name)
    return np.asarray(value, dtype=np.float64)


def normalize(x: np.ndarray, stats: Any, mode: str, *, mask: Sequence[bool] | np.ndarray | None = None,
              eps: float = EPS) -> np.ndarray:
    """``x`` ``[..., D]`` normalized with per-dimension ``stats`` (an object or mapping with
    ``mean``, ``std``, ``q01``, ``q99``):

    * ``zscore``: ``(x - mean) / (std + eps)`` (Octo's NORMAL, with its eps 1e-8);
    * ``quantile``: ``[q01, q99]`` onto ``[-1, 1]``, ``2 (x - q01) / (q99 - q01 + eps) - 1``,
      not clipped (openpi's quantile normalization);
    * ``bounds``: the same map clipped to ``[-1, 1]`` (Octo's BOUNDS, which maps its p01 and
      p99: the q01 and q99 here).

    ``mask`` (bool ``[D]``) leaves the dimensions where it is false as they are (Octo's
    ``action_normalization_mask``: the gripper). Computed in float64; the result has ``x``'s
    float dtype (float32 for integer input)."""
    x = np.asarray(x)
    shift, scale = _affine(stats, mode, x.shape[-1], eps)
    out_dtype = x.dtype if x.dtype.kind == "f" else np.float32
    x64 = x.astype(np.float64)
    y = (x64 - shift) / scale
    if mode == "bounds":
        y = np.clip(y, -1.0, 1.0)
    return _masked(y, x64, mask, x.shape[-1]).astype(out_dtype)


def unnormalize(y: np.ndarray, stats: Any, mode: str, *, mask: Sequence[bool] | np.ndarray | None = None,
                eps: float = EPS) -> np.ndarray:
    """The inverse of :func:`normalize`: ``unnormalize(normalize(x)) == x`` up to the rounding
    of ``x``'s dtype (a few ulp in float32, exact to ~1e-15 relative in float64), with the
    same ``mask`` and ``eps``. In ``bounds`` mode a value that was clipped cannot be recovered:
    it comes back as ``q01`` or ``q99`` (the ends of the range); values inside come back."""
    y = np.asarray(y)
    shift, scale = _affine(stats, mode, y.shape[-1], eps)
    out_dtype = y.dtype if y.dtype.kind == "f" else np.float32
    y64 = y.astype(np.float64)
    return _masked(y64 * scale + shift, y64, mask, y.shape[-1]).astype(out_dtype)


def _masked(mapped: np.ndarray, original: np.ndarray, mask: Sequence[bool] | np.ndarray | None,
            dims: int) -> np.ndarray:
    if mask is None:
        return mapped
    return np.where(_check_mask(mask, dims, "mask"), mapped, original)


def _check_mask(mask: Sequence[bool] | np.ndarray, dims: int, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.shape != (dims,):
        raise ValueError(f"{name} must be {dims} bools, one per dimension (got "
                         f"{list(np.ravel(mask))[:16]!r})")
    return array


def _affine(stats: Any, mode: str, dims: int, eps: float = EPS
            ) -> tuple[np.ndarray, np.ndarray]:
    # x_normalized = (x - shift) / scale, for every mode.
    if mode == "zscore":
        shift, scale = _stat(stats, "mean"), _stat(stats, "std") + eps
    elif mode in ("quantile", "bounds"):
        q01, q99 = _stat(stats, "q01"), _stat(stats, "q99")
        scale = (q99 - q01 + eps) / 2.0
        shift = q01 + scale
    else:
        check_value("normalize mode", mode, NORMALIZE_MODE, ValueError)
    if shift.shape != (dims,):
        raise ValueError(f"values have {dims} dimensions, the normalization statistics "
                         f"{shift.shape[0] if shift.ndim == 1 else shift.shape}")
    return shift, scale


class Normalize:
    """Normalize ``observation/state`` and ``action`` with dataset statistics.

    ``stats`` maps ``"state"`` and ``"actions"`` (openpi's names, as in ``norm_stats.json``)
    to per-dimension statistics (:class:`torch_rlds.stats.Stats` or a mapping with ``mean``,
    ``std``, ``q01``, ``q99``); a missing entry leaves that part alone. ``mode`` is ``zscore``,
    ``quantile`` or ``bounds`` (see :func:`normalize`); ``mask`` maps ``"state"`` and
    ``"actions"`` to bools per dimension, false where a dimension stays as it is; ``eps`` is
    added to the denominators (1e-6, openpi's; Octo's is 1e-8). :meth:`unnormalize_actions`
    inverts it for a model's predicted actions (exactly, except values ``bounds`` clipped).
    Apply it before :class:`PadDims`: the statistics have the dataset's width.
    """

    def __init__(self, stats: Mapping[str, Any], mode: str, *,
                 mask: Mapping[str, Sequence[bool] | None] | None = None,
                 eps: float = EPS) -> None:
        check_value("normalize mode", mode, NORMALIZE_MODE, ValueError)
        if "state" not in stats and "actions" not in stats:
            raise ValueError(f"normalization statistics need 'state' or 'actions' (got "
                             f"{sorted(stats)})")
        check_value("eps", eps, number_rule(0.0, 1.0), ValueError)
        self.mode = mode
        self.eps = float(eps)
        self.stats = {k: {n: _stat(v, n) for n in ("mean", "std", "q01", "q99")}
                      for k, v in stats.items() if k in ("state", "actions")}
        given = {k: v for k, v in (mask or {}).items() if v is not None}
        unknown = sorted(set(given) - {"state", "actions"})
        if unknown:
            raise ValueError(f"normalization mask: unknown parts {unknown} (allowed: "
                             "['actions', 'state'])")
        self.mask: dict[str, np.ndarray] = {}
        for part, value in given.items():
            if part not in self.stats:
                raise ValueError(f"normalization mask for {part!r}, which has no statistics")
            dims = len(self.stats[part]["mean"])
            self.mask[part] = _check_mask(value, dims, f"normalization mask of {part} "
                                                       f"({dims} dimensions)")

    def _apply(self, x: np.ndarray, part: str) -> np.ndarray:
        return normalize(x, self.stats[part], self.mode, mask=self.mask.get(part),
                         eps=self.eps)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        if "state" in self.stats and STATE in sample["observation"]:
            observation = dict(sample["observation"])
            observation[STATE] = self._apply(observation[STATE], "state")
            out["observation"] = observation
        if "actions" in self.stats:
            out["action"] = self._apply(sample["action"], "actions")
        return out

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Actions ``[..., A]`` (at the dataset's width: drop padded dimensions first) in the
        dataset's units."""
        return unnormalize(actions, self.stats["actions"], self.mode,
                           mask=self.mask.get("actions"), eps=self.eps)

    def __repr__(self) -> str:
        return f"Normalize({sorted(self.stats)}, mode={self.mode!r}, eps={self.eps})"


# -- padding -------------------------------------------------------------------------------------
class PadDims:
    """Pad ``observation/state`` to ``state_dim`` and ``action`` to ``action_dim`` values with
    zeros, adding ``state_dim_is_pad`` / ``action_dim_is_pad`` (bool ``[dim]``, ``True`` on
    the added dimensions), so datasets of different widths batch together; a sample without
    state gets a zero state, all of it marked as padding. A wider value than the target raises
    (nothing is cut off silently); ``None`` leaves that part alone."""

    def __init__(self, state_dim: int | None = None, action_dim: int | None = None) -> None:
        for name, value in (("state_dim", state_dim), ("action_dim", action_dim)):
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (got {value!r})")
        self.state_dim = state_dim
        self.action_dim = action_dim

    @staticmethod
    def _pad(x: np.ndarray, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        width = x.shape[-1]
        if width > dim:
            raise ValueError(f"{name} has {width} dimensions, more than the padded width {dim}")
        out = np.zeros((*x.shape[:-1], dim), x.dtype)
        out[..., :width] = x
        return out, np.arange(dim) >= width

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        if self.state_dim is not None:
            observation = dict(sample["observation"])
            if STATE in observation:
                observation[STATE], out["state_dim_is_pad"] = self._pad(
                    observation[STATE], self.state_dim, "observation/state")
            else:  # a dataset without state: all padding, so it batches with the others
                rows = len(sample["observation_is_pad"])
                observation[STATE] = np.zeros((rows, self.state_dim), np.float32)
                out["state_dim_is_pad"] = np.ones(self.state_dim, bool)
            out["observation"] = observation
        if self.action_dim is not None:
            out["action"], out["action_dim_is_pad"] = self._pad(
                sample["action"], self.action_dim, "action")
        return out

    def __repr__(self) -> str:
        return f"PadDims(state_dim={self.state_dim}, action_dim={self.action_dim})"


# -- the config section --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """The ``data.transform`` section of a config: which sample transforms run, in the order
    camera selection, resize, augmentation, normalization, padding.

    Attributes:
      image_size: ``[height, width]`` every camera is resized to, or ``{role: [height,
        width]}`` per camera (a role left out keeps its size); ``None``: as stored.
      resize: ``pad`` (keep the aspect ratio, pad with zeros) or ``stretch``.
      resize_filter: ``bilinear``, or ``lanczos3`` (``tf.image.resize``'s antialiased
        Lanczos-3, what Octo and OpenVLA resize with; see :func:`lanczos3`).
      cameras: the camera roles to emit, in order; missing ones are zero-filled and masked
        (see :class:`SelectCameras`). ``None``: every camera of the key map.
      augment: random crop, brightness and contrast (see :class:`Augment`), seeded by
        ``data.seed``.
      crop_scale, brightness, contrast: the augmentation's strengths.
      pad_state_to, pad_action_to: pad state / action to this many dimensions (``None``: no).
      normalize: ``zscore``, ``quantile``, ``bounds`` (quantile, clipped to [-1, 1]) or
        ``None`` (see :func:`normalize`).
      normalize_state_mask, normalize_action_mask: a bool per dimension, false where it is left
        as it is (Octo leaves the gripper action unnormalized); ``None``: every dimension.
      normalize_eps: added to the denominators (openpi's 1e-6; Octo's 1e-8).
      norm_stats: a ``norm_stats.json`` to normalize with; ``None``: the cached statistics of
        the dataset and key map (computed on first use, see :mod:`torch_rlds.stats`).
      reduced_decode: decode each JPEG camera that ``image_size`` shrinks to at most half its
        stored size at libjpeg's 1/2, 1/4 or 1/8 scale instead of full size, then resize (see
        :meth:`decode_sizes`): faster, with pixels a few levels from the full decode's.
    """

    image_size: Any = field(
        None, nullable(Rule("[height, width] with ints >= 1, or a mapping of camera role to "
                            "[height, width]", _is_sizes, _sizes)),
        "the size cameras are resized to (null: as stored)")
    resize: str = field("pad", RESIZE_MODE,
                        "pad keeps the aspect ratio, stretch does not")
    resize_filter: str = field("bilinear", choice_rule(RESIZE_FILTERS),
                               "lanczos3: tf.image.resize's antialiased Lanczos-3 (Octo's, "
                               "OpenVLA's)")
    cameras: tuple[str, ...] | None = field(
        None, nullable(Rule("a non-empty list of camera roles", _is_roles, tuple)),
        "camera roles to emit, in order (null: every camera of the key map)")
    augment: bool = field(False, BOOL, "random crop, brightness and contrast")
    crop_scale: float = field(0.95, number_rule(0.0, 1.0, low_open=True),
                              "fraction of height and width an augmentation crop keeps")
    brightness: float = field(0.2, number_rule(0.0, 1.0), "brightness factor range")
    contrast: float = field(0.2, number_rule(0.0, 1.0), "contrast factor range")
    pad_state_to: int | None = field(None, nullable(int_rule(1)), "pad state to this width")
    pad_action_to: int | None = field(None, nullable(int_rule(1)), "pad action to this width")
    normalize: str | None = field(None, nullable(NORMALIZE_MODE),
                                  "normalize state and action")
    normalize_state_mask: tuple[bool, ...] | None = field(
        None, nullable(Rule("a list of true/false, one per state dimension", _is_bools,
                            tuple)), "false: a state dimension left unnormalized (null: all)")
    normalize_action_mask: tuple[bool, ...] | None = field(
        None, nullable(Rule("a list of true/false, one per action dimension", _is_bools,
                            tuple)),
        "false: an action dimension left unnormalized, e.g. the gripper (null: all)")
    normalize_eps: float = field(EPS, number_rule(0.0, 1.0),
                                 "added to std or q99 - q01 (Octo: 1e-8)")
    reduced_decode: bool = field(False, BOOL, "decode JPEG cameras resized to at most half "
                                              "their size at libjpeg's reduced scale (faster; "
                                              "pixels differ slightly)")
    norm_stats: str | None = field(None, nullable(Rule("a path to a norm_stats.json",
                                                       lambda v: isinstance(v, str) and v != "")),
                                   "statistics to normalize with (null: computed and cached)")

    def __post_init__(self) -> None:
        check_fields(self, "data.transform", ValueError)

    def decode_sizes(self, key_map: Any, source: Any) -> dict[str, tuple[int, int]]:
        """``{observation key: (height, width)}``: the size each camera's frames take after
        the resize (before padding), for ``RLDSDataset(decode_sizes=...)`` when
        ``reduced_decode`` is on (empty otherwise)."""
        if not self.reduced_decode or self.image_size is None or key_map is None:
            return {}
        shapes = key_map.validate(source)
        out = {}
        for role in key_map.cameras():
            key = image_key(role)
            size = (self.image_size.get(role) if isinstance(self.image_size, Mapping)
                    else self.image_size)
            stored = shapes.get(key)
            if size is None or stored is None or None in stored[:2]:
                continue
            height, width = stored[:2]
            if self.resize == "pad":
                _, _, new_h, new_w = letterbox(height, width, *size)
                out[key] = (new_h, new_w)
            else:
                out[key] = tuple(size)
        return out

    def check_cameras(self, key_map: Any) -> None:
        """Raise ``ValueError`` unless every role of ``cameras`` (and of a per-camera
        ``image_size``) is one the key map defines (a role mapped to ``null`` there is a
        camera the dataset lacks on purpose: it is zero-filled and masked)."""
        roles = list(key_map.image_keys)
        if isinstance(self.image_size, Mapping):
            unknown = [r for r in self.image_size
                       if r not in key_map.image_keys and r not in (self.cameras or ())]
            if unknown:
                raise ValueError(f"data.transform.image_size: {unknown} not among the camera "
                                 f"roles of data.key_map.images ({roles})")
        if self.cameras is None:
            return
        unknown = [role for role in self.cameras if role not in key_map.image_keys]
        if unknown:
            raise ValueError(
                f"data.transform.cameras: {unknown} not among the camera roles of "
                f"data.key_map.images ({roles}); to zero-fill a camera this dataset lacks, map "
                "its role to null there")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | TransformConfig | None,
                  where: str = "data.transform") -> TransformConfig | None:
        """The section from its config mapping (``None`` stays ``None``). Errors name
        ``where.field``, the value and what is allowed."""
        if raw is None or isinstance(raw, TransformConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be a mapping (got {raw!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(raw) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (allowed: {sorted(fields)})")
        try:
            return cls(**dict(raw))
        except ValueError as e:
            raise ValueError(str(e).replace("data.transform", where, 1)) from None

    def build(self, *, seed: int = 0, norm_stats: Mapping[str, Any] | None = None,
              source: Any = None, key_map: Any = None, plan: Any = None) -> Compose:
        """The transform chain. With ``normalize`` set, the statistics are ``norm_stats`` if
        given, else read from ``self.norm_stats``, else the cached statistics of ``source``
        under ``key_map`` (computed, streaming the dataset once, when not cached)."""
        if key_map is not None:
            self.check_cameras(key_map)
        chain: list[Callable[[dict], dict]] = []
        sizes = self.image_size
        if self.cameras is not None:
            if isinstance(sizes, Mapping):
                fill: Any = {role: (*size, 3) for role, size in sizes.items()}
            else:
                fill = None if sizes is None else (*sizes, 3)
            chain.append(SelectCameras(self.cameras, fill_shape=fill))
        if sizes is not None:
            if isinstance(sizes, Mapping):
                sizes = {image_key(role): size for role, size in sizes.items()}
            chain.append(Resize(sizes, self.resize, filter=self.resize_filter))
        if self.augment:
            chain.append(Augment(seed, crop_scale=self.crop_scale, brightness=self.brightness,
                                 contrast=self.contrast))
        if self.normalize is not None:
            if norm_stats is None:
                from torch_rlds import stats as _stats

                if self.norm_stats is not None:
                    norm_stats = _stats.read_norm_stats(self.norm_stats)
                elif source is not None and key_map is not None:
                    norm_stats, _ = _stats.load_or_compute_stats(source, key_map, plan=plan)
                else:
                    raise ValueError("data.transform.normalize needs statistics: set "
                                     "data.transform.norm_stats, or pass source and key_map")
            mask = {"state": self.normalize_state_mask, "actions": self.normalize_action_mask}
            chain.append(Normalize(norm_stats, self.normalize, eps=self.normalize_eps,
                                   mask={k: v for k, v in mask.items()
                                         if v is not None and k in norm_stats}))
        if self.pad_state_to is not None or self.pad_action_to is not None:
            chain.append(PadDims(self.pad_state_to, self.pad_action_to))
        return Compose(chain)


__all__ = [
    "Augment",
    "AugmentParams",
    "Compose",
    "Normalize",
    "PadDims",
    "Resize",
    "SelectCameras",
    "TransformConfig",
    "TransformedDataset",
    "letterbox",
    "normalize",
    "resize_images",
    "uniform",
    "unnormalize",
]
