"""Decoding serialized RLDS episodes with the dataset's own ``features.json``, numpy only.

TFDS's feature connectors say what each field is (dtype, shape, encoding); TFDS's
``ExampleParserNp`` turns the ``tf.train.Example`` bytes into numpy. What this module adds is the
episode view RLDS users want: step features stacked on a leading time axis, text as ``str``, and
images left encoded (:class:`~torch_rlds._images.EncodedImages`) until a sample asks for them.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from torch_rlds._images import EncodedImages

STEPS = "steps"


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
    """The ``FeaturesDict`` that ``features.json`` in ``features_dir`` describes."""
    import tensorflow_datasets as tfds

    return tfds.features.FeatureConnector.from_config(str(features_dir))


def iter_leaves(features) -> Iterator[FeatureLeaf]:
    """Walk a TFDS feature tree, yielding one :class:`FeatureLeaf` per leaf, in key order."""
    yield from _walk(features, (), False)


def _walk(feature, path: tuple[str, ...], per_step: bool) -> Iterator[FeatureLeaf]:
    from tensorflow_datasets.core import features as F

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
        yield FeatureLeaf(path, "image", tuple(feature.shape), np.dtype(feature.np_dtype),
                          feature.encoding_format or "png", per_step)
    elif isinstance(feature, F.Text):
        yield FeatureLeaf(path, "text", (), np.dtype(object), "none", per_step)
    elif isinstance(feature, F.Tensor):
        encoding = getattr(feature, "_encoding", None)
        encoding = getattr(encoding, "value", encoding) or "none"
        yield FeatureLeaf(path, "tensor", tuple(feature.shape), np.dtype(feature.np_dtype),
                          str(encoding), per_step)
    else:
        raise EpisodeDecodeError(
            f"{'/'.join(path)}: feature type {type(feature).__name__} is not supported"
        )


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

    def decode(self, serialized: bytes, *, name: str = "episode",
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
            except (KeyError, TypeError) as e:
                raise EpisodeDecodeError(f"{name}: feature {leaf.name} is missing") from e
            value = self._decode_leaf(leaf, raw, name)
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
            return EncodedImages(frames, leaf.shape, leaf.dtype, name=leaf.name)
        if leaf.kind == "text":
            if leaf.per_step:
                return np.array([_text(v, where) for v in raw], dtype=object)
            return _text(raw, where)
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


def _text(value: Any, where: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as e:
        raise EpisodeDecodeError(f"{where}: text is not UTF-8 ({e})") from e


def _tensor_from_bytes(value: bytes, leaf: FeatureLeaf, where: str) -> np.ndarray:
    if leaf.encoding == "zlib":
        try:
            value = zlib.decompress(value)
        except zlib.error as e:
            raise EpisodeDecodeError(f"{where}: zlib data does not decompress ({e})") from e
    array = np.frombuffer(value, dtype=leaf.dtype)
    if None in leaf.shape:
        return array
    try:
        return array.reshape(leaf.shape)
    except ValueError as e:
        raise EpisodeDecodeError(
            f"{where}: {array.size} values do not fit the declared shape {leaf.shape}"
        ) from e


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``a/b/c`` paths of the leaves of a nested dict (what error messages list)."""
    keys = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            keys.extend(flat_keys(v, f"{prefix}{k}/"))
        else:
            keys.append(prefix + k)
    return keys
