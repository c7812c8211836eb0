"""Decoding serialized RLDS episodes with the dataset's own ``features.json``, numpy only.

TFDS's feature connectors say what each field is (dtype, shape, encoding); TFDS's
``ExampleParserNp`` turns the ``tf.train.Example`` bytes into numpy. What this module adds is the
episode view RLDS users want: step features stacked on a leading time axis, text as ``str``, and
images left encoded (:class:`~torch_rlds._images.EncodedImages`) until a sample asks for them.

``features.json`` comes with the dataset and is untrusted. TFDS would import whatever module a
feature's ``pythonClassName`` names; here every class name is checked against TFDS's own
feature classes (:data:`FEATURE_CLASSES`) and every dtype against the plain numeric ones before
TFDS sees the file, so nothing is imported (tensorflow neither), and a declared shape larger
than the value cap of :mod:`torch_rlds._limits` is refused. Every defect of a record's content
is an :class:`EpisodeDecodeError` (or an ``ImageDecodeError`` for a frame), never another
exception type.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from etils import epath

from torch_rlds._images import FORMATS, EncodedImages, ImageDecodeError
from torch_rlds._info import DatasetFormatError, read_metadata_json
from torch_rlds._limits import max_value_bytes, value_over_limit
from torch_rlds._state_file import loads_strict
from torch_rlds._trees import flat_keys as flat_keys  # where error messages import it from

STEPS = "steps"
_FEATURES_FILE = "features.json"

# The TFDS feature classes a features.json may name: the ones torch_rlds decodes (Sequence to
# say so), under the module paths TFDS writes. Any other name is refused before TFDS could
# import the module it names.
_TFDS_FEATURES = "tensorflow_datasets.core.features."
FEATURE_CLASSES = frozenset(_TFDS_FEATURES + name for name in (
    "features_dict.FeaturesDict", "dataset_feature.Dataset", "sequence_feature.Sequence",
    "image_feature.Image", "text_feature.Text", "tensor_feature.Tensor", "feature.Tensor",
    "scalar.Scalar", "class_label_feature.ClassLabel",
))
# The dtypes a feature may declare (TFDS names them as numpy does; text is "string"). Any other
# name would make TFDS fall back to tensorflow to parse it.
DTYPES = frozenset(("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                    "uint64", "float16", "float32", "float64", "complex64", "complex128",
                    "string", "object"))
# Where features.json names a class: protobuf's JSON names, the field's own name, TFDS's legacy
# {"type": ..., "content": ...} layout.
_CLASS_KEYS = ("pythonClassName", "python_class_name", "type")
# JSON nesting a features.json may have: each feature level takes two or three; real RLDS
# datasets stay below 20.
MAX_FEATURES_DEPTH = 64
_MAX_DIMS = 32


class EpisodeDecodeError(ValueError):
    """A record that does not parse or decode under the dataset's feature specification."""


@dataclasses.dataclass(frozen=True)
class FeatureLeaf:
    """One leaf of the feature tree.

    Attributes:
      path: keys from the root, e.g. ``("steps", "observation", "image")``.
      kind: ``image``, ``text`` or ``tensor``.
      shape: the declared shape of one value (per step for step features).
      dtype: numpy dtype of the decoded value (``object`` for text).
      encoding: ``none``, ``bytes`` or ``zlib`` for tensors; the image format for images.
      per_step: whether the leaf lives under ``steps`` (stacked on a time axis).
    """

    path: tuple[str, ...]
    kind: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    encoding: str
    per_step: bool

    @property
    def name(self) -> str:
        """The path joined with ``/`` as TFDS writes feature keys."""
        return "/".join(self.path)


def load_features(features_dir: Any):
    """The ``FeaturesDict`` that ``features.json`` in ``features_dir`` describes.

    Raises :class:`DatasetFormatError` naming the file for anything but a strict JSON object
    whose classes are all in :data:`FEATURE_CLASSES` and dtypes in :data:`DTYPES`, checked
    before TFDS reads it (so no module is imported), and for anything TFDS then refuses.
    TFDS's side files (class label names) are not read: decoding needs none.
    """
    from tensorflow_datasets.core.features import feature as tfds_feature

    path = epath.Path(features_dir) / _FEATURES_FILE
    content = read_metadata_json(path)
    if not isinstance(content, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object")
    check_feature_json(content, path)
    try:
        return tfds_feature.FeatureConnector.from_json(content)
    except Exception as e:  # protobuf's ParseError, TFDS's ValueError, KeyError, TypeError...
        raise DatasetFormatError(f"{path}: not a TFDS feature specification "
                                 f"({type(e).__name__}: {str(e)[:300]})") from None


def check_feature_json(node: Any, path: Any, where: str = "", depth: int = 0, *,
                       names: bool = False) -> None:
    """Raise :class:`DatasetFormatError` unless every class named in the features.json tree
    ``node`` is one of :data:`FEATURE_CLASSES`, every dtype one of :data:`DTYPES` (and every
    tensor or image declares one), and it nests at most :data:`MAX_FEATURES_DEPTH` deep.
    JSON held in strings (TFDS's ``json`` features, legacy string content) is checked the same
    way. ``names``: the keys of ``node`` are feature names (a ``features`` table)."""
    if depth > MAX_FEATURES_DEPTH:
        raise DatasetFormatError(f"{path}: nested deeper than {MAX_FEATURES_DEPTH} levels "
                                 f"(at {where or 'the top'})")
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_feature_json(item, path, f"{where}[{i}]", depth + 1)
        return
    if not isinstance(node, dict):
        return
    if names:
        for key, value in node.items():
            check_feature_json(value, path, f"{where}/{key}", depth + 1)
        return
    if any(key in node for key in _CLASS_KEYS[:2]):  # a feature: its content declares a dtype
        for content in ("tensor", "image"):
            if content in node and not (isinstance(node[content], dict)
                                        and "dtype" in node[content]):
                raise DatasetFormatError(f"{path}: {where}/{content} declares no dtype")
    for key, value in node.items():
        at = f"{where}/{key}"
        if key in _CLASS_KEYS and isinstance(value, str) and (key != "type" or "." in value):
            if value not in FEATURE_CLASSES:
                raise DatasetFormatError(
                    f"{path}: {at} names the class {value[:200]!r}, which is not one of TFDS's "
                    "own feature classes that torch_rlds decodes; nothing else is imported "
                    "(allowed: " + ", ".join(sorted(c.rsplit(".", 1)[1] for c in FEATURE_CLASSES))
                    + ")")
        elif key == "dtype" and not (isinstance(value, str) and value in DTYPES):
            shown = repr(value[:80]) if isinstance(value, str) else type(value).__name__
            raise DatasetFormatError(f"{path}: {at} is {shown}, not a dtype torch_rlds "
                                     f"reads ({', '.join(sorted(DTYPES))})")
        nested = isinstance(value, str) and key in ("json", "content")
        if nested and value.lstrip()[:1] in ("{", "["):
            try:
                inner = loads_strict(value.encode())
            except ValueError as e:
                raise DatasetFormatError(f"{path}: {at} holds malformed JSON ({e})") from None
            check_feature_json(inner, path, at, depth + 1)
        else:
            check_feature_json(value, path, at, depth + 1, names=key == "features")


def iter_leaves(features) -> Iterator[FeatureLeaf]:
    """Walk a TFDS feature tree, yielding one :class:`FeatureLeaf` per leaf, in key order."""
    yield from _walk(features, (), False)


def _walk(feature, path: tuple[str, ...], per_step: bool) -> Iterator[FeatureLeaf]:
    from tensorflow_datasets.core import features as F

    if len(path) > MAX_FEATURES_DEPTH:
        raise DatasetFormatError(f"{'/'.join(path)[:200]}: features nested too deep")
    if isinstance(feature, F.FeaturesDict):
        for key in sorted(feature.keys()):
            yield from _walk(feature[key], (*path, key), per_step)
    elif isinstance(feature, F.Dataset):
        if per_step:
            raise EpisodeDecodeError(f"{'/'.join(path)}: nested Dataset features are not supported")
        yield from _walk(feature.feature, path, True)
    elif isinstance(feature, F.Sequence):
        raise EpisodeDecodeError(
            f"{'/'.join(path)}: Sequence features are not supported (RLDS steps use Dataset)"
        )
    elif isinstance(feature, F.Image):
        leaf = FeatureLeaf(path, "image", tuple(feature.shape), np.dtype(feature.np_dtype),
                           feature.encoding_format or "png", per_step)
        if leaf.encoding not in FORMATS:
            raise DatasetFormatError(f"{leaf.name}: image encoding {leaf.encoding!r} is not one "
                                     f"torch_rlds decodes ({', '.join(FORMATS)})")
        yield _checked(leaf)
    elif isinstance(feature, F.Text):
        yield FeatureLeaf(path, "text", (), np.dtype(object), "none", per_step)
    elif isinstance(feature, F.Tensor):
        encoding = getattr(feature, "_encoding", None)
        encoding = getattr(encoding, "value", encoding) or "none"
        yield _checked(FeatureLeaf(path, "tensor", tuple(feature.shape),
                                   np.dtype(feature.np_dtype), str(encoding), per_step))
    else:
        raise EpisodeDecodeError(
            f"{'/'.join(path)}: feature type {type(feature).__name__} is not supported"
        )


def _checked(leaf: FeatureLeaf) -> FeatureLeaf:
    """``leaf`` if its declared shape is one numpy can hold and one value of it fits the value
    cap; else :class:`DatasetFormatError`."""
    shape = leaf.shape
    if len(shape) > _MAX_DIMS or any(d is not None and (not isinstance(d, int) or d < 0)
                                     for d in shape):
        raise DatasetFormatError(f"{leaf.name}: declared shape {shape[:_MAX_DIMS]} is not a "
                                 f"shape (at most {_MAX_DIMS} sizes, each >= 0 or open)")
    if leaf.dtype == object and leaf.kind == "tensor" and leaf.encoding != "none":
        raise DatasetFormatError(f"{leaf.name}: a {leaf.encoding}-encoded tensor of strings")
    known = [d for d in shape if d is not None]
    over = value_over_limit(math.prod(known) * leaf.dtype.itemsize) if known else None
    if over is not None:
        raise DatasetFormatError(f"{leaf.name}: declared shape {shape} of {leaf.dtype} is "
                                 f"{over}")
    return leaf


class EpisodeDecoder:
    """Turns one serialized episode into a nested dict of numpy arrays.

    Step features come back stacked: ``episode["steps"]["observation"]["state"]`` is ``[T, 7]``.
    Text is ``str`` (a ``[T]`` object array under ``steps``); images are
    :class:`EncodedImages` unless ``decode_images`` is set. Stateless after construction, so
    one decoder may be shared by threads.
    """

    def __init__(self, features) -> None:
        from tensorflow_datasets.core import example_parser

        self.features = features
        self.leaves = tuple(iter_leaves(features))
        self._parser = example_parser.ExampleParserNp(features.get_serialized_info())

    def decode(self, serialized: bytes | memoryview, *, name: str = "episode",
               decode_images: bool = False) -> dict[str, Any]:
        """Decode ``serialized`` (a ``tf.train.Example``); ``name`` labels errors."""
        try:
            parsed = self._parser.parse_example(serialized)
        except Exception as e:  # the parser raises whatever protobuf or numpy raised
            raise EpisodeDecodeError(f"{name}: record does not parse as a tf.train.Example "
                                     f"of this dataset's features ({type(e).__name__}: {e})") from e
        episode: dict[str, Any] = {}
        num_steps = None
        for leaf in self.leaves:
            raw = parsed
            try:
                for key in leaf.path:
                    raw = raw[key]
            except (KeyError, TypeError, IndexError) as e:
                raise EpisodeDecodeError(f"{name}: feature {leaf.name} is missing") from e
            if raw is None:
                raise EpisodeDecodeError(f"{name}: feature {leaf.name} is missing")
            try:
                value = self._decode_leaf(leaf, raw, name)
            except (EpisodeDecodeError, ImageDecodeError):
                raise
            except Exception as e:  # numpy's ValueError, TypeError...: the record's defect
                raise EpisodeDecodeError(f"{name}: feature {leaf.name} does not decode as its "
                                         f"declared {leaf.dtype} {leaf.shape} "
                                         f"({type(e).__name__}: {str(e)[:200]})") from e
            if leaf.per_step:
                if num_steps is None:
                    num_steps = len(value)
                elif len(value) != num_steps:
                    raise EpisodeDecodeError(
                        f"{name}: feature {leaf.name} has {len(value)} steps, expected "
                        f"{num_steps} like the other step features"
                    )
                if decode_images and leaf.kind == "image":
                    value = value.decode(range(len(value))) if len(value) else np.empty(
                        (0, *value.shape), value.dtype)
            elif decode_images and leaf.kind == "image":
                value = value[0]
            _set(episode, leaf.path, value)
        return episode

    def _decode_leaf(self, leaf: FeatureLeaf, raw: Any, name: str) -> Any:
        where = f"{name}: feature {leaf.name}"
        if leaf.kind == "image":
            frames = list(raw) if leaf.per_step else [raw]
            if not all(isinstance(f, bytes) for f in frames):
                raise EpisodeDecodeError(f"{where}: image frames are not byte strings")
            return EncodedImages(frames, leaf.shape, leaf.dtype, name=leaf.name,
                                 format=leaf.encoding)
        if leaf.kind == "text":
            if leaf.per_step:
                return np.array([text_value(v, where) for v in raw], dtype=object)
            return text_value(raw, where)
        if leaf.encoding in ("bytes", "zlib"):
            items = list(raw) if leaf.per_step else [raw]
            arrays = [_tensor_from_bytes(v, leaf, where) for v in items]
            if not leaf.per_step:
                return arrays[0]
            if not arrays:
                return np.empty((0, *leaf.shape), leaf.dtype)
            return np.stack(arrays)
        array = np.asarray(raw)
        if array.dtype != leaf.dtype:
            array = array.astype(leaf.dtype)
        shape = ((len(array),) if leaf.per_step else ()) + leaf.shape
        if None in shape:
            return array
        try:
            return array.reshape(shape)
        except ValueError as e:
            raise EpisodeDecodeError(
                f"{where}: {array.size} values do not fit the declared shape {shape}"
            ) from e


def text_value(value: Any, where: str) -> str:
    """``value`` as ``str``: bytes decoded as UTF-8 (the one way torch_rlds turns stored text
    into ``str``: text features, instructions stored as string tensors, metadata), anything
    else written out; bytes that are not UTF-8 raise :class:`EpisodeDecodeError` naming
    ``where``."""
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as e:
        raise EpisodeDecodeError(f"{where}: text is not UTF-8 ({e})") from e


def _tensor_from_bytes(value: bytes, leaf: FeatureLeaf, where: str) -> np.ndarray:
    if not isinstance(value, bytes):
        raise EpisodeDecodeError(f"{where}: expected the tensor's bytes, found "
                                 f"{type(value).__name__}")
    known = (None if None in leaf.shape
             else math.prod(cast(tuple[int, ...], leaf.shape)) * leaf.dtype.itemsize)
    if leaf.encoding == "zlib":
        value = _inflate(value, max_value_bytes() if known is None else known, where)
    if len(value) % leaf.dtype.itemsize:
        raise EpisodeDecodeError(f"{where}: {len(value)} bytes are not a whole number of "
                                 f"{leaf.dtype} values ({leaf.dtype.itemsize} bytes each)")
    if known is None:
        over = value_over_limit(len(value))
        if over is not None:
            raise EpisodeDecodeError(f"{where}: {over}")
    array = np.frombuffer(value, dtype=leaf.dtype)
    if None in leaf.shape:
        return array
    try:
        return array.reshape(leaf.shape)
    except ValueError as e:
        raise EpisodeDecodeError(
            f"{where}: {array.size} values do not fit the declared shape {leaf.shape}"
        ) from e


def _inflate(data: bytes, limit: int, where: str) -> bytes:
    """``data`` inflated, refusing (before producing more) anything beyond ``limit`` bytes: the
    declared shape's size, or the value cap where the shape leaves sizes open."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
        more = inflater.decompress(inflater.unconsumed_tail, 1) if not inflater.eof else b""
    except zlib.error as e:
        raise EpisodeDecodeError(f"{where}: zlib data does not decompress ({e})") from e
    if more or inflater.unconsumed_tail:
        raise EpisodeDecodeError(f"{where}: zlib data ({len(data)} bytes) inflates to more than "
                                 f"the {limit} bytes its declared shape holds")
    if not inflater.eof:
        raise EpisodeDecodeError(f"{where}: zlib data ({len(data)} bytes) ends before its stream "
                                 "does (truncated)")
    return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


