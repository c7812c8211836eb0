"""The most memory a dataset's declared shapes may make torch_rlds allocate.

A dataset from elsewhere declares its shapes in ``features.json``, and its records carry image
headers and compressed tensors; none of them may make a process allocate without bound. Two
caps, each overridable by an environment variable read when it is checked:

* ``TORCH_RLDS_MAX_VALUE_BYTES`` (default 256 MiB): one value of one feature, as decoded: a
  frame, one step's tensor, an inflated ``zlib`` tensor. A ``features.json`` declaring more is
  refused when it is loaded; an image header or a compressed tensor of a record promising more
  (where the declared shape leaves sizes open) is an error of that record, raised before
  anything of that size is allocated.
* ``TORCH_RLDS_MAX_BATCH_BYTES`` (default 16 GiB): the buffer one batch is laid out in; a
  batch needing more is refused before its buffer is asked for.
"""

from __future__ import annotations

import os

MAX_VALUE_BYTES_ENV = "TORCH_RLDS_MAX_VALUE_BYTES"
MAX_BATCH_BYTES_ENV = "TORCH_RLDS_MAX_BATCH_BYTES"
DEFAULT_MAX_VALUE_BYTES = 256 << 20
DEFAULT_MAX_BATCH_BYTES = 16 << 30


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{env} must be a positive number of bytes (got {raw!r})")
    return value


def max_value_bytes() -> int:
    """The cap on one decoded value of one feature (``$TORCH_RLDS_MAX_VALUE_BYTES``)."""
    return _limit(MAX_VALUE_BYTES_ENV, DEFAULT_MAX_VALUE_BYTES)


def max_batch_bytes() -> int:
    """The cap on one batch's buffer (``$TORCH_RLDS_MAX_BATCH_BYTES``)."""
    return _limit(MAX_BATCH_BYTES_ENV, DEFAULT_MAX_BATCH_BYTES)


def value_over_limit(nbytes: int) -> str | None:
    """``None`` when a value of ``nbytes`` fits the value cap, else the end of an error
    message saying by how much it does not."""
    cap = max_value_bytes()
    if nbytes <= cap:
        return None
    return (f"{nbytes} bytes, more than the {cap} bytes torch_rlds allocates for one value "
            f"(set {MAX_VALUE_BYTES_ENV} to allow more)")


def check_batch_bytes(nbytes: int, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when a batch buffer of ``nbytes`` exceeds the cap."""
    cap = max_batch_bytes()
    if nbytes > cap:
        raise ValueError(f"{what}: a batch of {nbytes} bytes, more than the {cap} bytes "
                         f"torch_rlds allocates for one (lower batch_size or obs_window, or set "
                         f"{MAX_BATCH_BYTES_ENV} to allow more)")
