"""Fixtures: tiny genuine RLDS datasets written into temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest

from torch_rlds import synthetic

_CACHE = tempfile.mkdtemp(prefix="torch_rlds_test_cache_")
os.environ["TORCH_RLDS_CACHE"] = _CACHE  # set before any worker process starts


@pytest.fixture(scope="session")
def write_dataset(tmp_path_factory):
    """``write_dataset(**spec_fields)`` -> version directory; identical specs are written once."""
    written = {}

    def write(**fields):
        spec = synthetic.SyntheticSpec(**{"texture": False, **fields})
        if spec not in written:
            root = tmp_path_factory.mktemp("rlds")
            written[spec] = synthetic.write_dataset(root, spec)
        return written[spec]

    return write


@pytest.fixture(scope="session")
def small_dataset(write_dataset):
    """6 train episodes of 3 to 12 steps (some shorter than an action chunk of 4), 3 shards,
    a 64x64 JPEG camera, a 32x48 wrist camera."""
    return write_dataset(
        num_episodes=6, val_episodes=2, min_steps=3, max_steps=12, num_shards=3,
        cameras=(synthetic.Camera("image"), synthetic.Camera("wrist_image", 32, 48)),
    )


@pytest.fixture(scope="session")
def small_spec(small_dataset):
    """The spec ``small_dataset`` was written with."""
    return synthetic.SyntheticSpec(
        num_episodes=6, val_episodes=2, min_steps=3, max_steps=12, num_shards=3, texture=False,
        cameras=(synthetic.Camera("image"), synthetic.Camera("wrist_image", 32, 48)),
    )


_JAX_TESTS = ("test_adapters_", "test_check")


def pytest_collection_modifyitems(config, items):
    """Run the tests that start a jax backend last: after that, a plain StatefulDataLoader
    that forks its workers would fork a multithreaded process."""
    items.sort(key=lambda item: item.path.name.startswith(_JAX_TESTS))
