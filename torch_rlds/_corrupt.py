"""What makes an episode corrupt for ``on_corrupt="skip"``.

A record that fails its CRC or ends early (``TFRecordError``), an unreadable array_record
record or a dataset that describes itself inconsistently (``DatasetFormatError``), a record
that does not parse under the features (``EpisodeDecodeError``), a frame whose header does not
(``ImageDecodeError``).
"""

from __future__ import annotations

from torch_rlds._features import EpisodeDecodeError
from torch_rlds._images import ImageDecodeError
from torch_rlds._info import DatasetFormatError
from torch_rlds._tfrecord import TFRecordError

CORRUPT_ERRORS = (TFRecordError, DatasetFormatError, EpisodeDecodeError, ImageDecodeError)
