"""Stacking samples into batches of torch tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data


def collate(samples: Sequence[Any]) -> Any:
    """Stack a list of samples into one batch.

    Dicts are collated key by key; numpy arrays, numpy scalars, Python numbers and bools become
    torch tensors with a leading batch axis (dtypes kept); strings become a list. Inside a
    DataLoader worker the tensors are allocated in shared memory, so the batch crosses to the
    main process without a copy through a pipe.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    first = samples[0]
    if isinstance(first, Mapping):
        return {key: collate([s[key] for s in samples]) for key in first}
    if isinstance(first, str):
        return [str(s) for s in samples]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(samples))
    if isinstance(first, (np.ndarray, np.generic, int, float, bool)):
        return _stack(samples)
    if isinstance(first, (list, tuple)):
        return [collate(list(group)) for group in zip(*samples)]
    raise TypeError(f"collate: cannot batch values of type {type(first).__name__}")


def _stack(values: Sequence[Any]) -> torch.Tensor:
    first = np.asarray(values[0])
    if first.dtype == object or first.dtype.kind in "US":
        raise TypeError(f"collate: cannot batch arrays of dtype {first.dtype}")
    shape = (len(values), *first.shape)
    dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty(0, dtype=dtype).new_empty(shape).share_memory_()
    else:
        out = torch.empty(shape, dtype=dtype)
    target = out.numpy()
    for i, value in enumerate(values):
        target[i] = value
    return out
