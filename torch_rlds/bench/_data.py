"""The benchmark dataset: written once into a cache folder, reused by every later run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

from torch_rlds import synthetic
from torch_rlds._cache import cache_root


def default_cache_dir() -> pathlib.Path:
    """Where benchmark datasets are kept: ``bench/`` under the torch_rlds cache."""
    return cache_root() / "bench"


def bench_dataset(spec: synthetic.SyntheticSpec, cache_dir: str | os.PathLike | None = None,
                  *, progress: bool = True) -> pathlib.Path:
    """The version directory of ``spec`` under ``cache_dir``, written on first use.

    The folder is named by a digest of the spec, so a changed spec never reuses stale data. The
    dataset is written aside and renamed into place, so a run that is killed while writing
    leaves nothing that a later run would take for complete.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    home = root / key.hexdigest()[:16]
    return pathlib.Path(synthetic.write_dataset_once(home, spec, progress=progress))
