"""torch_rlds.collate: nested dicts, strings, dtypes, masks, loud mismatches, shared memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils.data

import torch_rlds
from torch_rlds.loader import default_start_method


def _sample(i: int) -> dict:
    return {
        "observation": {
            "image": np.full((2, 4, 4, 3), i, np.uint8),
            "state": np.arange(3, dtype=np.float32) + i,
            "depth": np.full((2, 4, 4, 1), 1000 + i, np.uint16),
        },
        "action_is_pad": np.array([False, i % 2 == 1]),
        "language_instruction": f"task {i}",
        "meta": {"episode_index": np.int64(i), "step_index": np.int64(10 * i)},
        "reward": 0.5 * i,
        "count": i,
        "flag": i == 1,
        "pair": (np.int32(i), f"s{i}"),
    }


def test_nested_dicts_dtypes_strings_and_masks():
    batch = torch_rlds.collate([_sample(0), _sample(1), _sample(2)])
    obs = batch["observation"]
    assert obs["image"].dtype == torch.uint8 and obs["image"].shape == (3, 2, 4, 4, 3)
    assert obs["image"][:, 0, 0, 0, 0].tolist() == [0, 1, 2]
    assert obs["state"].dtype == torch.float32
    assert obs["state"][2].tolist() == [2.0, 3.0, 4.0]
    assert obs["depth"].dtype == torch.uint16 and int(obs["depth"][1, 0, 0, 0, 0]) == 1001
    assert batch["action_is_pad"].dtype == torch.bool
    assert batch["action_is_pad"].tolist() == [[False, False], [False, True], [False, False]]
    assert batch["language_instruction"] == ["task 0", "task 1", "task 2"]
    assert batch["meta"]["episode_index"].dtype == torch.int64
    assert batch["meta"]["step_index"].tolist() == [0, 10, 20]
    assert batch["reward"].dtype == torch.float64 and batch["reward"].tolist() == [0, 0.5, 1]
    assert batch["count"].dtype == torch.int64
    assert batch["flag"].dtype == torch.bool and batch["flag"].tolist() == [False, True, False]
    assert batch["pair"][0].dtype == torch.int32 and batch["pair"][1] == ("s0", "s1", "s2")


def test_torch_tensors_are_stacked():
    batch = torch_rlds.collate([{"x": torch.full((2,), float(i))} for i in range(3)])
    assert batch["x"].tolist() == [[0, 0], [1, 1], [2, 2]]


@pytest.mark.parametrize("second, message", [
    ({"a": np.zeros(4, np.float32)}, r"batch/a: sample 1 is float32\(4,\) / sample 0 is "
                                     r"float32\(3,\)"),
    ({"a": np.zeros(3, np.float64)}, r"batch/a: sample 1 is float64\(3,\) / sample 0 is "
                                     r"float32\(3,\)"),
    ({"b": np.zeros(3, np.float32)}, r"batch: sample 1 has keys \['b'\] / sample 0 has \['a'\]"),
    ({"a": "text"}, r"batch/a: sample 1 is a str / sample 0 is float32"),
])
def test_mismatches_are_named_not_broadcast(second, message):
    with pytest.raises(ValueError, match=message):
        torch_rlds.collate([{"a": np.zeros(3, np.float32)}, second])


def test_unbatchable_values_and_empty_batches():
    with pytest.raises(TypeError, match="batch/x: cannot batch values of type NoneType"):
        torch_rlds.collate([{"x": None}])
    with pytest.raises(ValueError, match="at least one sample"):
        torch_rlds.collate([])


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(4):
            yield {"x": np.full((8, 8), i, np.float32), "s": str(i)}


def test_batches_from_workers_are_in_shared_memory():
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=1,
                                         collate_fn=torch_rlds.collate,
                                         multiprocessing_context=default_start_method())
    batches = list(loader)
    assert [b["s"] for b in batches] == [["0", "1"], ["2", "3"]]
    assert all(b["x"].is_shared() for b in batches)
    assert batches[1]["x"][:, 0, 0].tolist() == [2, 3]
    # In this process the tensors are ordinary ones.
    assert not torch_rlds.collate(list(_Numbers()))["x"].is_shared()
