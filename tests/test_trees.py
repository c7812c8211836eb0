"""torch_rlds._trees: leaves by path, and the digests runs compare batches by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_rlds import _trees


def _batch():
    return {"observation": {"image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                            "state": np.ones((2, 7), np.float32)},
            "action": torch.zeros((2, 4, 7)),
            "language": ["pick up the cup", "open the drawer"],
            "pair": (np.int64(3), b"raw")}


def test_flat_items_gives_every_leaf_by_its_path():
    batch = _batch()
    items = _trees.flat_items(batch)
    assert list(items) == ["observation/image", "observation/state", "action", "language",
                           "pair"]
    assert items["observation/state"] is batch["observation"]["state"]
    assert _trees.flat_keys({"steps": {"a": 1, "b": {"c": 2}}}, "x/") == ["x/steps/a",
                                                                          "x/steps/b/c"]


def test_equal_batches_have_one_digest_whatever_holds_their_arrays():
    batch = _batch()
    other = _batch()
    other["action"] = other["action"].numpy()  # a tensor and its numpy view: the same bytes
    other["observation"] = dict(reversed(other["observation"].items()))  # key order aside
    assert _trees.batch_digest(batch) == _trees.batch_digest(other)


@pytest.mark.parametrize("change", ["dtype", "shape", "byte", "string", "key", "length"])
def test_any_difference_changes_the_digest(change):
    batch, other = _batch(), _batch()
    if change == "dtype":
        other["observation"]["image"] = other["observation"]["image"].view(np.int8)
    elif change == "shape":
        other["observation"]["image"] = other["observation"]["image"].reshape(2, 4, 3)
    elif change == "byte":
        other["observation"]["image"][1, 2, 3] += 1
    elif change == "string":
        other["language"][0] = "pick up the cup "
    elif change == "key":
        other["actions"] = other.pop("action")
    else:
        other["language"].append("")
    assert _trees.batch_digest(batch) != _trees.batch_digest(other)


def test_tf_data_strings_digest_as_the_torch_batch_strings():
    # tf.data hands strings out as an object array of bytes, torch_rlds as a list of str: the
    # benchmark compares their digests, so the two must digest alike.
    tf_batch = {"text": np.array([b"a", b"bc"], dtype=object)}
    assert _trees.batch_digest(tf_batch) == _trees.batch_digest({"text": ["a", "bc"]})
    assert _trees.batch_digest(tf_batch) != _trees.batch_digest({"text": ["a", "b"]})


def test_array_digest_tells_dtype_and_shape_apart_from_bytes():
    a = np.arange(8, dtype=np.int32)
    assert _trees.array_digest(a) == _trees.array_digest(a.copy())
    assert len({_trees.array_digest(a), _trees.array_digest(a.view(np.uint32)),
                _trees.array_digest(a.reshape(2, 4)), _trees.array_digest(a[::-1])}) == 4
