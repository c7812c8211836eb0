"""The benchmark dataset: written once into a cache folder, reused by every later run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

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
    path = home / spec.name / spec.version
    if (path / "dataset_info.json").exists():
        return path
    home.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=home))
    try:
        written = pathlib.Path(synthetic.write_dataset(staging, spec, progress=progress))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(written, path)
        except OSError:
            if not (path / "dataset_info.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
