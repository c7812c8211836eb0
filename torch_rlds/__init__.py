"""torch_rlds: RLDS datasets for PyTorch and JAX, exactly resumable, without TensorFlow."""

from torch_rlds._features import EpisodeDecodeError
from torch_rlds._images import EncodedImages, ImageDecodeError
from torch_rlds._info import DatasetFormatError, DatasetInfo, SplitInfo
from torch_rlds._tfrecord import CorruptRecordError, TFRecordError, TruncatedShardError
from torch_rlds.collate import collate
from torch_rlds.dataset import RLDSDataset
from torch_rlds.loader import DataLoader
from torch_rlds.source import RLDSSource

__version__ = "0.1.0"

__all__ = [
    "CorruptRecordError",
    "DataLoader",
    "DatasetFormatError",
    "DatasetInfo",
    "EncodedImages",
    "EpisodeDecodeError",
    "ImageDecodeError",
    "RLDSDataset",
    "RLDSSource",
    "SplitInfo",
    "TFRecordError",
    "TruncatedShardError",
    "collate",
]
