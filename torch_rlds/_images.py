"""Image decoding: JPEG through simplejpeg, PNG (8 and 16 bit) through Pillow.

The default JPEG mode uses the accurate integer DCT and fancy upsampling, which gives exactly the
pixels of TFDS's numpy decoding (OpenCV or Pillow). ``fast=True`` uses the fast integer DCT with
fancy upsampling, which gives exactly the pixels of ``tf.io.decode_jpeg`` with its defaults
(``dct_method=""``, ``fancy_upscaling=True``) and decodes about 10-20% faster. (libjpeg's fast
upsampling would be faster still but matches neither for 4:2:0 and 4:2:2 images.)

simplejpeg releases the GIL while it decodes, so threads decode frames in parallel.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import simplejpeg

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG"


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image of the declared shape and dtype."""


def decode_image(
    data: bytes,
    shape: tuple[int | None, ...],
    dtype: np.dtype,
    *,
    fast: bool = False,
    out: np.ndarray | None = None,
    name: str = "image",
) -> np.ndarray:
    """Decode one encoded image into an ``[H, W, C]`` array of ``dtype``.

    Args:
      data: the encoded bytes (JPEG or PNG; the format is read from the bytes, not trusted from
        the feature spec, as TFDS does).
      shape: the declared ``(H, W, C)``; ``None`` dimensions are taken from the image.
      dtype: ``uint8`` or ``uint16``.
      fast: JPEG only; fast DCT (the pixels of ``tf.io.decode_jpeg``) instead of the accurate one.
      out: an optional preallocated ``[H, W, C]`` array to decode into (JPEG decodes in place).
      name: what to call the image in an error message (the feature path and frame).
    """
    channels = shape[-1] if shape and shape[-1] is not None else 3
    dtype = np.dtype(dtype)
    if data[:2] == _JPEG_MAGIC and dtype == np.uint8 and channels in (1, 3):
        colorspace = "GRAY" if channels == 1 else "RGB"
        direct = out is not None and out.flags.c_contiguous
        try:
            image = simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=fast,
                                           buffer=out if direct else None)
        except ValueError as e:
            raise ImageDecodeError(f"{name}: JPEG does not decode ({e})") from e
        _check_shape(image, shape, name)
        if direct:
            if image.shape != out.shape:  # a smaller image fills only the front of ``out``
                raise ImageDecodeError(f"{name}: decoded shape {tuple(image.shape)} does not "
                                       f"match the output's {tuple(out.shape)}")
            return out
    else:
        image = _decode_with_pillow(data, channels, dtype, name)
        _check_shape(image, shape, name)
    if out is not None:
        out[...] = image
        return out
    return image


def check_header(data: bytes, shape: tuple[int | None, ...], name: str = "image") -> None:
    """Raise :class:`ImageDecodeError` unless ``data`` starts like a JPEG or PNG whose header
    declares the size in ``shape`` (``None`` dimensions match any); reads no pixels.

    A few microseconds a frame, against hundreds to decode one: a cheap test of a whole episode
    that catches truncated, garbled or mislabelled images, though not damage inside the
    compressed pixel data.
    """
    if data[:2] == _JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise ImageDecodeError(f"{name}: JPEG header does not parse ({e})") from e
    elif data[:4] == _PNG_MAGIC and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
    else:
        raise ImageDecodeError(f"{name}: neither a JPEG nor a PNG (starts with "
                               f"{bytes(data[:8])!r})")
    for want, got, what in zip(shape[:2], (height, width), ("height", "width")):
        if want is not None and want != got:
            raise ImageDecodeError(f"{name}: {what} {got} in the header, {want} declared")


def _decode_with_pillow(data: bytes, channels: int, dtype: np.dtype, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if dtype == np.uint8:
                mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
                if mode is None:
                    raise ImageDecodeError(f"{name}: {channels} channels is not supported")
                if img.mode != mode:
                    img = img.convert(mode)
                array = np.asarray(img, dtype=np.uint8)
            elif dtype == np.uint16:
                if channels != 1:
                    raise ImageDecodeError(
                        f"{name}: uint16 images must have 1 channel (got {channels})"
                    )
                array = np.asarray(img)
                if array.dtype != np.uint16:
                    array = array.astype(np.uint16)
            else:
                raise ImageDecodeError(f"{name}: image dtype {dtype} is not supported")
    except (OSError, SyntaxError) as e:
        raise ImageDecodeError(f"{name}: image does not decode ({e})") from e
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def _check_shape(image: np.ndarray, shape: tuple[int | None, ...], name: str) -> None:
    if len(shape) != image.ndim or any(
        want is not None and want != got for want, got in zip(shape, image.shape)
    ):
        raise ImageDecodeError(
            f"{name}: decoded shape {tuple(image.shape)} does not match the declared {tuple(shape)}"
        )


class EncodedImages:
    """The frames of one image feature of one episode, still encoded.

    Indexing decodes: ``frames[t]`` is the ``[H, W, C]`` array of step ``t``;
    ``frames.decode(indices)`` stacks several. ``frames.encoded[t]`` is the raw bytes.
    Immutable and safe to share between threads.
    """

    __slots__ = ("encoded", "shape", "dtype", "name")

    def __init__(self, encoded: list[bytes], shape: tuple[int | None, ...], dtype: np.dtype,
                 name: str) -> None:
        self.encoded = encoded
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.name = name

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, t: int) -> np.ndarray:
        return decode_image(self.encoded[t], self.shape, self.dtype, name=f"{self.name}[{t}]")

    def decode(self, indices, *, fast: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """Decode the frames at ``indices`` into one ``[len(indices), H, W, C]`` array.

        A frame that repeats in ``indices`` (a padded window) is decoded once and copied.
        """
        indices = [int(t) for t in indices]
        if out is None:
            if any(d is None for d in self.shape):
                first = self[indices[0]]
                out = np.empty((len(indices), *first.shape), self.dtype)
            else:
                out = np.empty((len(indices), *self.shape), self.dtype)
        done: dict[int, int] = {}
        for row, t in enumerate(indices):
            if t in done:
                out[row] = out[done[t]]
                continue
            decode_image(self.encoded[t], self.shape, self.dtype, fast=fast, out=out[row],
                         name=f"{self.name}[{t}]")
            done[t] = row
        return out

    def check_headers(self) -> None:
        """Raise :class:`ImageDecodeError` naming the first frame whose header does not parse
        or declares another size (see :func:`check_header`)."""
        for t, data in enumerate(self.encoded):
            check_header(data, self.shape, f"{self.name}[{t}]")

    def __repr__(self) -> str:
        return f"EncodedImages({self.name}, frames={len(self)}, shape={self.shape}, {self.dtype})"
