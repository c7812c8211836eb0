"""torch_rlds.adapters.torch: the loader state in torch.save and torch.distributed.checkpoint
checkpoints, loaded without unpickling anything of ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from torch_rlds.adapters.torch import (
    dcp_key,
    dcp_state,
    dcp_template,
    load_dcp_state,
    load_loader_state,
    loader_state,
)
from torch_rlds.config import load_config
from torch_rlds.testing import assert_batches_equal

WORKER = os.path.join(os.path.dirname(__file__), "dcp_worker.py")
# DCP says so even when told no_dist=True; a single process is the intent here.
SINGLE_PROCESS = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _overrides(path):
    return [f"data.path={path}", "data.action_horizon=4", "data.shuffle_window=2",
            "loader.batch_size=4", "loader.num_workers=0"]


def _consume(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def test_torch_save_checkpoint_loads_with_weights_only(small_dataset, tmp_path):
    config = load_config("demo", _overrides(small_dataset))
    loader = config.make_loader()
    _consume(loader, 3)
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "data_loader": loader_state(loader)},
               tmp_path / "ckpt.pt")
    reference = _consume(loader, 3)

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = config.make_loader()
    load_loader_state(fresh, checkpoint["data_loader"])
    assert fresh.batches_seen == 3
    for i, batch in enumerate(_consume(fresh, 3)):
        assert_batches_equal(reference[i], batch, f"batch {3 + i}")


def test_dcp_state_is_one_json_tensor_under_this_rank_key(small_dataset, tmp_path):
    config = load_config("demo", [*_overrides(small_dataset), "loader.batch_size=6"])
    loader = config.make_loader(1, 3)
    entry = dcp_state(loader)
    assert list(entry) == [dcp_key(1, 3)] == ["rank_1-of-3"]
    assert entry["rank_1-of-3"].dtype == torch.uint8
    assert json.loads(bytes(entry["rank_1-of-3"].numpy())) == loader.state_dict()


def _free_port() -> int:
    from torch_rlds.adapters._multihost import free_port

    return free_port()


@pytest.mark.slow
@SINGLE_PROCESS
def test_dcp_two_gloo_ranks_each_save_and_restore_their_own_state(small_dataset, tmp_path):
    checkpoint = tmp_path / "dcp"
    port = _free_port()
    procs = []
    for rank in range(2):
        cmd = [sys.executable, WORKER, "--rank", str(rank), "--world-size", "2",
               "--port", str(port), "--checkpoint", os.fspath(checkpoint),
               "--out", os.fspath(tmp_path / f"rank{rank}.json"), "--save-at", "3",
               "--after", "4"]
        for override in _overrides(small_dataset):
            cmd += ["--override", override]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["loader_process"] == [rank, 2]  # from torch.distributed
        assert record["model_restored"]
        assert record["batches_seen"] == 3 + 4
        assert record["resumed"] == record["reference"]  # exact resume, per rank
    # The two ranks read disjoint samples, and each saved its own state under its own key.
    ids = [{tuple(row) for batch in r["ids"] for row in batch} for r in records]
    assert not ids[0] & ids[1]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(os.fspath(checkpoint)).read_metadata().state_dict_metadata
    assert {"data_loader.rank_0-of-2", "data_loader.rank_1-of-2"} <= set(keys)

    # Here, a single process: under the window order rank 0 of 1 cannot take a state of world
    # size 2 (under the global order, the ranks' states name no rank and any one serves).
    window = load_config("demo", [*_overrides(small_dataset), "data.order=window"])
    with pytest.raises(ValueError, match=r"world size 2 \(ranks \[0, 1\]\), but this is rank 0 "
                                         r"of 1: resume with the world size"):
        dcp_template(checkpoint, window.make_loader(0, 1))
    config = load_config("demo", _overrides(small_dataset))
    one = config.make_loader(0, 1)
    entry = dcp_template(checkpoint, one)
    import torch.distributed.checkpoint as dcp

    dcp.load({"data_loader": entry}, checkpoint_id=checkpoint, no_dist=True)
    load_dcp_state(one, entry)
    assert one.batches_seen == 3
    # Rank 1 of 2 can, in a single process as well (DCP without a process group).
    loader = config.make_loader(1, 2)
    entry = dcp_template(checkpoint, loader)
    dcp.load({"data_loader": entry}, checkpoint_id=checkpoint, no_dist=True)
    load_dcp_state(loader, entry)
    assert loader.batches_seen == 3


@SINGLE_PROCESS
def test_a_checkpoint_without_loader_state_is_reported(small_dataset, tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": torch.nn.Linear(2, 2).state_dict()}, checkpoint_id=tmp_path / "c",
             no_dist=True)
    loader = load_config("demo", _overrides(small_dataset)).make_loader()
    with pytest.raises(FileNotFoundError, match="holds no data loader state"):
        dcp_template(tmp_path / "c", loader)


def _dcp_checkpoint(loader, folder) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": torch.nn.Linear(2, 2).state_dict(), "data_loader": dcp_state(loader)},
             checkpoint_id=folder, no_dist=True)


@SINGLE_PROCESS
def test_dcp_template_reads_the_metadata_without_unpickling(small_dataset, tmp_path,
                                                            monkeypatch):
    import pickle

    config = load_config("demo", _overrides(small_dataset))
    loader = config.make_loader()
    _consume(loader, 2)
    _dcp_checkpoint(loader, tmp_path / "c")
    saved = json.dumps(loader.state_dict(), sort_keys=True).encode()

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    entry = dcp_template(tmp_path / "c", config.make_loader())
    assert {k: tuple(v.shape) for k, v in entry.items()} == {"rank_0-of-1": (len(saved),)}


class _Payload:
    """Pickles as a call of os.system: what a hostile .metadata would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["payload", "garbage", "another pickle", "empty"])
def test_a_hostile_dcp_metadata_is_refused_and_runs_nothing(small_dataset, tmp_path, content):
    import pickle

    folder = tmp_path / "c"
    folder.mkdir()
    marker = tmp_path / "marker"
    data = {"payload": pickle.dumps({"data_loader.rank_0-of-1": _Payload(marker)}),
            "garbage": os.urandom(4096), "another pickle": pickle.dumps([1, {"a": (2, 3)}]),
            "empty": b""}[content]
    (folder / ".metadata").write_bytes(data)
    loader = load_config("demo", _overrides(small_dataset)).make_loader()
    with pytest.raises(ValueError, match=r"\.metadata: not DCP metadata"):
        dcp_template(folder, loader)
    assert not marker.exists()


@pytest.mark.parametrize("text, message", [
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    (b"\xff\xfe", "byte 0 is not UTF-8"),
])
def test_load_dcp_state_reads_strict_json(small_dataset, text, message):
    loader = load_config("demo", _overrides(small_dataset)).make_loader()
    entry = {"rank_0-of-1": torch.frombuffer(bytearray(text), dtype=torch.uint8)}
    with pytest.raises(ValueError, match=f"loader state rank_0-of-1: not a JSON state .*{message}"):
        load_dcp_state(loader, entry)
    assert loader.batches_seen == 0
