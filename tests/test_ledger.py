"""The exposure ledger: the samples it lists for global batches are the ones the loader
produces, under any workers and hosts, from the config alone and without reading a sample."""

from __future__ import annotations

import json
import os

import pytest
import yaml

import torch_rlds
from torch_rlds import cli, synthetic
from torch_rlds.ledger import LedgerError, check_hosts, ledger

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

LENGTHS = (1, 5, 3, 12, 7, 2, 9, 4, 6)  # 49 steps
VARIED = dict(num_episodes=9, episode_lengths=LENGTHS, num_shards=3,
              cameras=(synthetic.Camera("image", 32, 32),))


OTHER = dict(num_episodes=4, episode_lengths=(6, 3, 8, 5), num_shards=2,
             cameras=(synthetic.Camera("image", 32, 32),))  # 22 steps


@pytest.fixture(scope="module")
def varied(write_dataset):
    return write_dataset(**VARIED)


@pytest.fixture
def make_mixture(make_config, write_dataset, tmp_path):
    """``make_mixture(data_overrides, loader_overrides)`` -> the path of a YAML config of a
    mixture (weights 2:1) of the varied dataset and another, both in the global order."""
    other = write_dataset(**OTHER)

    def make(data=None, loader=None, name="mixture"):
        children = [make_config(data, name=f"{name}_a"),
                    make_config({"path": str(other), "seed": 3, **(data or {})},
                                name=f"{name}_b")]
        raw = {"mixture": {"seed": 11, "datasets": [{"config": children[0], "weight": 2.0},
                                                    {"config": children[1], "weight": 1.0}]},
               "loader": {"batch_size": 6, "num_workers": 0, **(loader or {})}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return make


@pytest.fixture
def make_config(varied, tmp_path):
    """``make_config(data_overrides, loader_overrides)`` -> the path of a YAML config of the
    varied dataset in the global order."""
    def make(data=None, loader=None, name="varied"):
        raw = {"data": {"path": str(varied), "obs_window": 2, "action_horizon": 3, "seed": 7,
                        "order": "global", **(data or {})},
               "loader": {"batch_size": 6, "num_workers": 0, **(loader or {})}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return make


def _ids(batch) -> list[tuple[int, ...]]:
    meta = batch["meta"]
    ids = [meta["epoch"].tolist(), meta["episode_index"].tolist(), meta["step_index"].tolist()]
    if "dataset_index" in meta:
        ids.insert(0, meta["dataset_index"].tolist())
    return list(zip(*ids))


def _rows(rows, mixture=False) -> list[tuple[int, ...]]:
    return [((r.dataset_index,) if mixture else ()) + (r.epoch, r.episode, r.step)
            for r in rows]


def _loader_batches(config, count, **where):
    loader = config.make_loader(**where)
    out = []
    for batch in loader:
        out.append(_ids(batch))
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_the_ledger_lists_the_samples_the_loader_produced(make_config, workers):
    config = torch_rlds.load_config(make_config(loader={"num_workers": workers}))
    produced = _loader_batches(config, 12)  # 72 samples: epochs 0 and 1, into 2
    rows = torch_rlds.ledger(config, batches=range(12))
    assert [r.batch for r in rows] == [b for b in range(12) for _ in range(6)]
    assert [r.row for r in rows[:7]] == [0, 1, 2, 3, 4, 5, 0]
    assert [r.position for r in rows] == list(range(72))
    assert _rows(rows) == [i for batch in produced for i in batch]
    assert {r.epoch for r in rows} == {0, 1}
    # A window of batches in the middle says the same as those batches of the whole list.
    assert ledger(config, range(7, 9)) == rows[42:54]


def test_each_row_names_the_episode_s_file_and_record(make_config, varied):
    rows = ledger(make_config(), range(4))
    source = torch_rlds.RLDSSource(varied)
    for r in rows:
        # RLDSSource.describe: "<shard path> record <r> @ byte <offset>"
        assert source.describe(r.episode) == f"{r.file} record {r.record} @ byte {r.offset}"
        assert r.dataset == source.info.name
    assert len({r.file for r in rows}) > 1  # 24 samples of 9 episodes in 3 shards


def test_under_two_hosts_each_host_s_rows_are_what_it_produced(make_config):
    config = torch_rlds.load_config(make_config(loader={"num_workers": 1}))
    rows = ledger(config, range(10), hosts=2)
    for host in (0, 1):
        produced = _loader_batches(config, 10, process_index=host, process_count=2)
        mine = [r for r in rows if r.host == host]
        assert [r.row for r in mine[:3]] == ([0, 1, 2] if host == 0 else [3, 4, 5])
        assert _rows(mine) == [i for batch in produced for i in batch], f"host {host}"
    # The check builds each host's dataset and finds the same rows.
    assert check_hosts(config, range(10), 2) == rows
    assert check_hosts(config, range(10), 3) == ledger(config, range(10), hosts=3)


def test_a_one_pass_config_starts_each_epoch_on_a_new_batch(make_config):
    # 49 steps in batches of 5: 9 full batches and one of 4 per epoch.
    config = torch_rlds.load_config(make_config(data={"repeat": False},
                                                loader={"batch_size": 5, "num_workers": 2}))
    loader = config.make_loader()
    produced = [_ids(b) for _ in range(2) for b in loader]  # two passes: epochs 0 and 1
    assert [len(b) for b in produced] == [5] * 9 + [4] + [5] * 9 + [4]
    rows = ledger(config, range(20))
    assert _rows(rows) == [i for batch in produced for i in batch]
    assert [r.position for r in rows if r.batch == 10][:2] == [49, 50]


@pytest.mark.parametrize("kind", ["make_config", "make_mixture"])
def test_start_names_the_batches_after_a_resume_with_another_batch_size(request, kind,
                                                                        tmp_path):
    make = request.getfixturevalue(kind)
    before = torch_rlds.load_config(make(loader={"batch_size": 8}, name="before"))
    after = torch_rlds.load_config(make(loader={"batch_size": 5}, name="after"))
    loader = before.make_loader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    loader.save_state(tmp_path / "state.json")
    resumed = after.make_loader()
    resumed.load_state(tmp_path / "state.json")
    produced = []
    for batch in resumed:
        produced.append(_ids(batch))
        if len(produced) == 4:
            break
    rows = ledger(after, range(4), start=3 * 8)
    assert _rows(rows, mixture=kind == "make_mixture") == [i for b in produced for i in b]
    assert rows[0].position == 24


def test_the_ledger_reads_no_sample_and_builds_no_index(make_config, tmp_path, monkeypatch):
    from torch_rlds import dataset as dataset_module
    from torch_rlds._step_reader import StepReader

    cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("TORCH_RLDS_CACHE", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError("the ledger read a sample")

    monkeypatch.setattr(StepReader, "read", refuse)
    monkeypatch.setattr(torch_rlds.RLDSSource, "read", refuse)
    builds = dict(dataset_module._builds)
    rows = check_hosts(make_config(), range(3), 2)
    assert len(rows) == 18
    assert dataset_module._builds == builds  # no background step-index build started
    steps = cache / "steps"
    assert any(p.suffix == ".lengths" for p in steps.iterdir())  # counted, and cached
    assert not any(p.suffix == ".trsi" for p in steps.iterdir())
    assert "TORCH_RLDS_STEP_INDEX" not in os.environ


def test_the_check_finds_hosts_that_would_read_the_same_samples(make_config, monkeypatch):
    from torch_rlds import _global_order

    def every_host_reads_host_0s_part(start, batch, batch_size, process_index, process_count):
        return original(start, batch, batch_size, 0, process_count)

    original = _global_order.host_samples
    monkeypatch.setattr(_global_order, "host_samples", every_host_reads_host_0s_part)
    with pytest.raises(LedgerError, match=r"batch 0: hosts 0 and 1 would both read stream "
                                          r"position 0"):
        check_hosts(make_config(), range(2), 2)


def test_the_check_finds_a_host_that_builds_another_dataset(make_config, monkeypatch):
    import dataclasses

    from torch_rlds.config import Config

    make = Config.make_dataset

    def host_1_has_another_seed(self, process_index=None, process_count=None):
        if process_index == 1:
            self = dataclasses.replace(self, data=dataclasses.replace(self.data, seed=8))
        return make(self, process_index, process_count)

    monkeypatch.setattr(Config, "make_dataset", host_1_has_another_seed)
    with pytest.raises(LedgerError, match="host 1 builds another dataset than host 0: seed 7 / 8"):
        check_hosts(make_config(), range(2), 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixture_s_ledger_lists_the_samples_the_loader_produced(make_mixture, varied,
                                                                 workers):
    config = torch_rlds.load_config(make_mixture(loader={"num_workers": workers}))
    produced = _loader_batches(config, 16)  # 96 samples: about 64 of 49 steps, 32 of 22
    rows = ledger(config, range(16))
    assert _rows(rows, mixture=True) == [i for batch in produced for i in batch]
    assert [r.position for r in rows] == list(range(96))
    names = {0: torch_rlds.RLDSSource(varied).info.name}
    for r in rows:
        assert r.dataset == names.setdefault(r.dataset_index, r.dataset)
    # Both datasets, each into its second epoch: their own orders, counted apart.
    for d in (0, 1):
        assert {r.epoch for r in rows if r.dataset_index == d} == {0, 1}, d
    assert ledger(config, range(9, 12)) == rows[54:72]


def test_a_mixture_s_hosts_read_their_rows_and_the_check_confirms_them(make_mixture):
    config = torch_rlds.load_config(make_mixture(loader={"num_workers": 1}))
    rows = ledger(config, range(8), hosts=3)
    for host in range(3):
        produced = _loader_batches(config, 8, process_index=host, process_count=3)
        mine = [r for r in rows if r.host == host]
        assert _rows(mine, mixture=True) == [i for b in produced for i in b], f"host {host}"
    assert check_hosts(config, range(8), 3) == rows
    # Batches asked for out of order are counted from the stream's start again.
    assert ledger(config, [7, 2, 5]) == [r._replace(host=0) for b in (7, 2, 5)
                                         for r in rows if r.batch == b]


def test_what_the_ledger_cannot_answer_is_named(make_config, make_mixture):
    with pytest.raises(LedgerError, match=r"config window_mixture is a mixture \(.*\) whose "
                                          "datasets do not all read endlessly in the global"):
        ledger(make_mixture(data={"order": "window"}, name="window_mixture"), range(2))
    with pytest.raises(LedgerError, match="reads in the window order"):
        ledger(make_config(data={"order": "window"}), range(2))
    with pytest.raises(ValueError, match=r"batch numbers must be ints >= 0 \(got -1\)"):
        ledger(make_config(), [-1])
    with pytest.raises(ValueError, match=r"start must be a stream position"):
        ledger(make_config(), range(2), start=-5)
    with pytest.raises(torch_rlds.ConfigError, match="does not divide among 4 processes"):
        check_hosts(make_config(), range(2), 4)


def test_the_command_prints_the_table_or_json(make_config, capsys):
    path = make_config()
    assert cli.main(["ledger", "--config-name", path, "--batches", "2:4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [r._asdict() for r in ledger(path, range(2, 4))]
    assert cli.main(["ledger", "--config-name", path, "loader.batch_size=3", "--batches", "5",
                     "--check-hosts", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["batch", "row", "host", "position", "epoch", "dataset_index",
                              "dataset", "episode", "step", "file", "record", "offset"]
    assert [line.split()[:4] for line in out[1:4]] == [["5", "0", "0", "15"],
                                                      ["5", "1", "1", "16"],
                                                      ["5", "2", "2", "17"]]
    assert out[4] == ("check: 3 hosts read disjoint samples that together are global batches "
                      "5..5 (3 samples)")
    with pytest.raises(SystemExit):
        cli.main(["ledger", "--config-name", path, "--batches", "4:2"])
    assert "need 0 <= A < B" in capsys.readouterr().err
