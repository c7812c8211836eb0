"""torch_rlds: RLDS datasets for PyTorch and JAX, exactly resumable, without TensorFlow.

The design (the flow of data, the numbered contracts, the state formats) is the file
``DESIGN.md`` beside this module, shipped with the package.
"""

# First: in a source checkout, mounts adapters/ and configs/ as subpackages (see _checkout).
import torch_rlds._checkout  # noqa: F401, I001
from torch_rlds._features import EpisodeDecodeError
from torch_rlds._images import EncodedImages, ImageDecodeError
from torch_rlds._info import DatasetFormatError, DatasetInfo, SplitInfo
from torch_rlds._tfrecord import CorruptRecordError, TFRecordError, TruncatedShardError
from torch_rlds.collate import collate
from torch_rlds.config import Config, ConfigError, load_config
from torch_rlds.dataset import RLDSDataset
from torch_rlds.keymap import KeyMap, KeyMapError
from torch_rlds.ledger import check_hosts, ledger
from torch_rlds.loader import DataLoader, WorkerError
from torch_rlds.mixture import MixtureDataset
from torch_rlds.source import RLDSSource
from torch_rlds.transforms import TransformedDataset

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "CorruptRecordError",
    "DataLoader",
    "DatasetFormatError",
    "DatasetInfo",
    "EncodedImages",
    "EpisodeDecodeError",
    "ImageDecodeError",
    "KeyMap",
    "KeyMapError",
    "MixtureDataset",
    "RLDSDataset",
    "RLDSSource",
    "SplitInfo",
    "TFRecordError",
    "TransformedDataset",
    "TruncatedShardError",
    "WorkerError",
    "check_hosts",
    "collate",
    "ledger",
    "load_config",
]
