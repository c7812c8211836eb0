"""Image decoding: JPEG through simplejpeg, PNG (8 and 16 bit) through Pillow's PNG decoder, each
only where the feature declares that format, each header checked before any pixel is decoded.

The default JPEG mode uses the accurate integer DCT and fancy upsampling, which gives exactly the
pixels of TFDS's numpy decoding (OpenCV or Pillow). ``fast=True`` uses the fast integer DCT with
fancy upsampling, which gives exactly the pixels of ``tf.io.decode_jpeg`` with its defaults
(``dct_method=""``, ``fancy_upscaling=True``) and decodes about 10-20% faster. (libjpeg's fast
upsampling would be faster still but matches neither for 4:2:0 and 4:2:2 images.)

simplejpeg releases the GIL while it decodes, so threads decode frames in parallel.

A camera that is resized to at most half its stored size can be decoded at 1/2, 1/4 or 1/8 of
it directly: libjpeg's DCT scaling computes the smaller image from the DCT coefficients,
skipping most of the inverse transform and the colour conversion of the pixels a resize would
throw away (``decode_image(..., scale_to=(h, w))``, :func:`reduced_scale`). Its pixels are not
those of a full decode followed by the resize; see :func:`reduced_scale` for how far they are.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import cast

import numpy as np
import simplejpeg

from torch_rlds._limits import value_over_limit

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FORMATS = ("jpeg", "png")
# What other image bytes start with, to say what a frame is without echoing its bytes.
_OTHER_MAGIC = (
    (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
    (b"%!PS", "PostScript (EPS)"), (b"\xc5\xd0\xd3\xc6", "PostScript (EPS)"),
    (b"\0\0\0\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\0\0\1\0", "ICO"), (b"8BPS", "Photoshop (PSD)"), (b"P1", "PNM"), (b"P2", "PNM"),
    (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"), (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"), (b"qoif", "QOI"), (b"\x0a", "PCX"), (b"SIMPLE", "FITS"),
)
# PNG colour types: channels of the stored samples.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image of the declared format, shape and dtype."""


DCT_SCALES = (8, 4, 2)


def reduced_scale(size: Sequence[int], target: Sequence[int]) -> int:
    """The factor, 1, 2, 4 or 8, by which a JPEG of ``size`` ``(H, W)`` may be decoded smaller
    and still be at least ``target`` ``(h, w)`` in both dimensions: the largest ``f`` with
    ``ceil(H / f) >= h`` and ``ceil(W / f) >= w`` (1: decode at full size).

    Decoding at ``1/f`` and then resizing to the target gives other pixels than decoding at
    full size and resizing: libjpeg's scaled inverse DCT is a box-like reduction, not the
    resize's filter. Measured on 4 stand-ins of camera frames each (smooth fields with an edge
    and noise, JPEG 4:2:0 at quality 90, fast DCT), against a full decode and the same resize
    (``resize_images(..., "stretch", filter)``), the final uint8 values:

    ============================  ========  ===============  =======  =========
    stored -> target (factor)     filter    mean difference  largest  differing
    ============================  ========  ===============  =======  =========
    480x640 -> 224x224 (2)        bilinear  1.4              24       78%
    480x640 -> 224x224 (2)        lanczos3  1.7              17       82%
    256x256 -> 128x128 (2)        bilinear  3.1              51       90%
    256x256 -> 128x128 (2)        lanczos3  2.4              27       87%
    720x960 -> 128x128 (4)        bilinear  1.2              7        76%
    720x960 -> 128x128 (4)        lanczos3  1.2              10       76%
    180x320 -> 64x64 (2)          bilinear  1.0              8        69%
    ============================  ========  ===============  =======  =========

    The decode itself is 1.1-1.5x faster (entropy decoding, which scaling cannot skip, takes
    more of the time the noisier the frame), decode and bilinear resize together 1.4-3x
    (3x where the reduced size is the target, and no resize is left).

    For a pipeline that must match the pixels a model was trained on, leave it off.
    """
    height, width = size
    out_h, out_w = target
    for factor in DCT_SCALES:
        if -(-height // factor) >= out_h and -(-width // factor) >= out_w:
            return factor
    return 1


def reduced_size(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """The ``(height, width)`` a JPEG of ``size`` decodes to with ``scale_to=target``."""
    factor = reduced_scale(size, target)
    return -(-size[0] // factor), -(-size[1] // factor)


def decode_image(
    data: bytes,
    shape: tuple[int | None, ...],
    dtype: np.dtype,
    *,
    format: str | None = None,  # noqa: A002 - the word TFDS's Image feature uses
    fast: bool = False,
    out: np.ndarray | None = None,
    name: str = "image",
    scale_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode one encoded image into an ``[H, W, C]`` array of ``dtype``.

    Only the declared format is ever opened: a ``jpeg`` feature's frames through simplejpeg,
    a ``png`` feature's through Pillow's PNG decoder alone; bytes of another format (GIF, BMP,
    TIFF, WEBP, EPS...) raise :class:`ImageDecodeError` without reaching any decoder. The
    header is checked against the declared shape and dtype (a PNG's bit depth against
    ``uint8``/``uint16``) before any pixel is decoded or any buffer allocated, so a frame whose
    header promises 13000x13000 pixels costs microseconds.

    Args:
      data: the encoded bytes.
      shape: the declared ``(H, W, C)``; ``None`` dimensions are taken from the image (within
        the value cap of :mod:`torch_rlds._limits`).
      dtype: ``uint8`` or ``uint16`` (PNG only).
      format: the feature's declared ``encoding_format``, ``jpeg`` or ``png``; ``None`` takes
        whichever of the two the bytes are.
      fast: JPEG only; fast DCT (the pixels of ``tf.io.decode_jpeg``) instead of the accurate one.
      out: an optional preallocated ``[H, W, C]`` array to decode into (JPEG decodes in place;
        with ``scale_to``, of the reduced size).
      name: what to call the image in an error message (the feature path and frame).
      scale_to: JPEG only: the ``(height, width)`` the frame will be resized to. When that is
        at most half the stored size, the frame decodes at 1/2, 1/4 or 1/8 of it (the
        smallest that stays at least this large; see :func:`reduced_scale`), and the result
        has that size. PNG frames decode at full size.
    """
    dtype = np.dtype(dtype)
    kind = _kind(data, format, name)
    channels = shape[-1] if shape and shape[-1] is not None else 3
    if kind == "jpeg":
        direct = out is not None and out.flags.c_contiguous
        reduced = {}
        if scale_to is not None:
            # The header gives the stored size the factor is chosen from (a microsecond).
            check_header(data, shape, name, format=kind, dtype=dtype)
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            small = reduced_size((height, width), tuple(scale_to))
            if small != (height, width):
                reduced = {"min_height": small[0], "min_width": small[1]}
                shape = (*small, *shape[2:])
        elif not direct or None in shape:
            # Without a buffer of the declared size, simplejpeg would allocate what the header
            # says: check it first (a microsecond).
            check_header(data, shape, name, format=kind, dtype=dtype)
        elif dtype != np.uint8 or channels not in (1, 3):
            _check_jpeg_layout(dtype, channels, name)
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB",
                                           fastdct=fast, buffer=out if direct else None,
                                           **reduced)
        except ValueError as e:  # simplejpeg refuses a buffer too small before decoding
            raise ImageDecodeError(f"{name}: JPEG does not decode ({e})") from e
        _check_shape(image, shape, name)
        if direct and out is not None:
            if image.shape != out.shape:  # a smaller image fills only the front of ``out``
                raise ImageDecodeError(f"{name}: decoded shape {tuple(image.shape)} does not "
                                       f"match the output's {tuple(out.shape)}")
            return out
    else:
        check_header(data, shape, name, format=kind, dtype=dtype)
        image = _decode_png(data, channels, dtype, name)
        _check_shape(image, shape, name)
    if out is not None:
        out[...] = image
        return out
    return image


def check_header(data: bytes, shape: tuple[int | None, ...], name: str = "image", *,
                 format: str | None = None,  # noqa: A002
                 dtype: np.dtype | None = None) -> None:
    """Raise :class:`ImageDecodeError` unless ``data`` starts like an image of the declared
    ``format`` (JPEG or PNG; ``None``: either) whose header declares the size in ``shape``
    (``None`` dimensions match any size within the value cap) and, given ``dtype``, samples of
    its bit depth; reads no pixels.

    A few microseconds a frame, against hundreds to decode one: a cheap test of a whole episode
    that catches truncated, garbled or mislabelled images, though not damage inside the
    compressed pixel data.
    """
    kind = _kind(data, format, name)
    channels = shape[-1] if shape and shape[-1] is not None else None
    if kind == "jpeg":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise ImageDecodeError(f"{name}: JPEG header does not parse ({e})") from e
        if dtype is not None:
            _check_jpeg_layout(np.dtype(dtype), channels or 3, name)
        depth = 8
    else:
        if len(data) < 29 or data[12:16] != b"IHDR":
            raise ImageDecodeError(f"{name}: PNG without its IHDR header ({len(data)} bytes)")
        width, height, depth, color = struct.unpack(">IIBB", data[16:26])
        if color not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
            raise ImageDecodeError(f"{name}: PNG header declares colour type {color} at bit "
                                   f"depth {depth}, which PNG does not define")
        if dtype is not None:
            dtype = np.dtype(dtype)
            wanted = 16 if dtype == np.uint16 else 8
            if (depth == 16) != (wanted == 16):
                raise ImageDecodeError(
                    f"{name}: a {depth}-bit PNG where the feature declares {dtype} "
                    f"({wanted}-bit samples); torch_rlds does not rescale samples")
    for want, got, what in zip(shape[:2], (height, width), ("height", "width")):
        if want is not None and want != got:
            raise ImageDecodeError(f"{name}: {what} {got} in the header, {want} declared")
    if None in shape[:3]:
        itemsize = 2 if depth == 16 else 1
        over = value_over_limit(height * width * (channels or 4) * itemsize)
        if over is not None:
            raise ImageDecodeError(f"{name}: header declares {height}x{width} pixels: {over}")


def _kind(data: bytes, declared: str | None, name: str) -> str:
    """``jpeg`` or ``png``: what ``data`` is, which must be what the feature declares."""
    if declared is not None and declared not in FORMATS:
        raise ImageDecodeError(f"{name}: image format {declared!r} is not one torch_rlds "
                               f"decodes ({', '.join(FORMATS)})")
    head = bytes(data[:16])
    if head.startswith(_JPEG_MAGIC):
        found = "jpeg"
    elif head.startswith(_PNG_MAGIC):
        found = "png"
    else:
        what = next((label for magic, label in _OTHER_MAGIC if head.startswith(magic)), None)
        if what is None and head[:4] == b"RIFF" and data[8:12] == b"WEBP":
            what = "WEBP"
        found = f"a {what} image" if what else f"not an image torch_rlds recognizes " \
                                                 f"({len(data)} bytes)"
        expected = declared.upper() if declared else "a JPEG or a PNG"
        raise ImageDecodeError(f"{name}: expected {expected}, the bytes are {found}")
    if declared is not None and found != declared:
        raise ImageDecodeError(f"{name}: the feature declares {declared.upper()} images, the "
                               f"bytes are a {found.upper()}")
    return found


def _check_jpeg_layout(dtype: np.dtype, channels: int, name: str) -> None:
    if dtype != np.uint8:
        raise ImageDecodeError(f"{name}: JPEG holds 8-bit samples, the feature declares {dtype}")
    if channels not in (1, 3):
        raise ImageDecodeError(f"{name}: JPEG decodes to 1 or 3 channels, the feature declares "
                               f"{channels}")


def _decode_png(data: bytes, channels: int, dtype: np.dtype, name: str) -> np.ndarray:
    from PIL import Image

    try:
        # Only Pillow's PNG decoder: no other plugin (or external program) sees these bytes.
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
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
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        raise ImageDecodeError(f"{name}: PNG does not decode ({type(e).__name__}: "
                               f"{str(e)[:200]})") from e
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

    __slots__ = ("encoded", "shape", "dtype", "name", "format")

    def __init__(self, encoded: list[bytes], shape: tuple[int | None, ...], dtype: np.dtype,
                 name: str, format: str | None = None) -> None:  # noqa: A002
        self.encoded = encoded
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self.format = format  # the feature's declared encoding: jpeg or png

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, t: int) -> np.ndarray:
        return decode_image(self.encoded[t], self.shape, self.dtype, format=self.format,
                            name=f"{self.name}[{t}]")

    def decode(self, indices, *, fast: bool = False, out: np.ndarray | None = None,
               scale_to: tuple[int, int] | None = None) -> np.ndarray:
        """Decode the frames at ``indices`` into one ``[len(indices), H, W, C]`` array.

        A frame that repeats in ``indices`` (a padded window) is decoded once and copied.
        ``scale_to`` decodes JPEG frames at a reduced size (see :func:`decode_image`).
        """
        indices = [int(t) for t in indices]
        if out is None:
            if any(d is None for d in self.shape):
                first = decode_image(self.encoded[indices[0]], self.shape, self.dtype,
                                     format=self.format, fast=fast, scale_to=scale_to,
                                     name=f"{self.name}[{indices[0]}]")
                out = np.empty((len(indices), *first.shape), self.dtype)
            else:
                shape = cast("tuple[int, ...]", self.shape)  # every dimension known: see above
                if scale_to is not None and self.format == "jpeg":
                    shape = (*reduced_size(shape[:2], scale_to), *shape[2:])
                out = np.empty((len(indices), *shape), self.dtype)
        done: dict[int, int] = {}
        for row, t in enumerate(indices):
            if t in done:
                out[row] = out[done[t]]
                continue
            decode_image(self.encoded[t], self.shape, self.dtype, format=self.format, fast=fast,
                         out=out[row], name=f"{self.name}[{t}]", scale_to=scale_to)
            done[t] = row
        return out

    def check_headers(self) -> None:
        """Raise :class:`ImageDecodeError` naming the first frame whose header does not parse,
        is of another format, or declares another size or bit depth (see :func:`check_header`).
        Frames that were not read (``None``: a step read by byte range holds only the frames
        its sample uses) are passed over."""
        for t, data in enumerate(self.encoded):
            if data is not None:
                check_header(data, self.shape, f"{self.name}[{t}]", format=self.format,
                             dtype=self.dtype)

    def __repr__(self) -> str:
        return f"EncodedImages({self.name}, frames={len(self)}, shape={self.shape}, {self.dtype})"
