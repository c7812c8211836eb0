"""The embedded demo dataset and the ``torch-rlds demo`` walk-through."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from etils import epath

from torch_rlds import synthetic
from torch_rlds._cache import cache_root

DEMO_SPEC = synthetic.SyntheticSpec(
    name="torch_rlds_demo", version="1.0.0", num_episodes=24, val_episodes=4, min_steps=20,
    max_steps=60, num_shards=4, state_dim=7, action_dim=7,
    cameras=(synthetic.Camera("image", 64, 64), synthetic.Camera("wrist_image", 64, 64)),
)


def demo_dataset() -> epath.Path:
    """The demo dataset's version directory, written into the cache on first use."""
    root = cache_root() / "demo"
    root.mkdir(parents=True, exist_ok=True)
    path = root / DEMO_SPEC.name / DEMO_SPEC.version
    if not (path / "dataset_info.json").exists():
        # Written aside and renamed into place, so concurrent first uses never see half of it.
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            written = synthetic.write_dataset(staging, DEMO_SPEC, progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(written, path)
            except OSError:
                if not (path / "dataset_info.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return epath.Path(path)
