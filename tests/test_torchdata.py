"""torch_rlds._torchdata: every private name of torchdata and torch that torch_rlds relies on
exists on the installed releases, and the saved layout is the one torchdata writes."""

from __future__ import annotations

import configparser
import re
import warnings
from pathlib import Path

import pytest
import torchdata.stateful_dataloader.incremental_state as incremental
import torchdata.stateful_dataloader.stateful_dataloader as stateful
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_rlds
from torch_rlds import _torchdata as td
from torch_rlds.loader import default_start_method


@pytest.mark.parametrize("where, name, owner", td.CLASS_NAMES,
                         ids=[f"{w}.{n}" for w, n, _ in td.CLASS_NAMES])
def test_every_private_name_torch_rlds_needs_exists(where, name, owner):
    assert hasattr(owner, name), f"{where} has no {name}: torch_rlds._torchdata needs a change"


def test_the_import_time_check_finds_nothing_missing():
    assert td.missing_class_names() == []
    assert td.SingleProcessIterBase is stateful._StatefulSingleProcessDataLoaderIter
    assert td.MultiProcessIterBase is stateful._StatefulMultiProcessingDataLoaderIter


@pytest.mark.parametrize("workers", [0, 1])
def test_every_private_attribute_of_the_loader_and_its_iterator_exists(workers):
    loader = StatefulDataLoader(list(range(8)), batch_size=2, num_workers=workers,
                                multiprocessing_context=default_start_method() if workers
                                else None)
    missing = [name for name in td.LOADER_ATTRIBUTES if not hasattr(loader, name)]
    iterator = iter(loader)
    assert next(iterator).tolist() == [0, 1]
    expected = td.ITERATOR_ATTRIBUTES + (td.WORKER_ITERATOR_ATTRIBUTES if workers else ())
    missing += [name for name in expected if not hasattr(iterator, name)]
    assert missing == []
    # What the accessors read is what torchdata keeps.
    assert td.live_iterator(loader) is iterator
    assert td.yielded_in_pass(loader) == 1
    assert not td.pass_finished(iterator)
    assert len(td.worker_processes(iterator)) == workers
    assert td.watched_by_sigchld(iterator) == bool(workers)
    if workers:
        td.unwatch_workers(iterator)
        assert not td.watched_by_sigchld(iterator)
        assert len(td.index_queues(iterator)) == 1
    assert [b.tolist() for b in iterator] == [[2, 3], [4, 5], [6, 7]]
    assert td.pass_finished(iterator)
    td.forget_iterator(loader)
    assert td.live_iterator(loader) is None


def test_the_layout_constants_are_torchdata_s_own_names():
    multi = stateful._StatefulMultiProcessingDataLoaderIter
    assert (td.SNAPSHOT, td.MAIN_SNAPSHOT, td.WORKER_SNAPSHOTS, td.SNAPSHOT_STEP,
            td.STEPS_SINCE_SNAPSHOT, td.NUM_WORKERS, td.BASE_SEED,
            td.LAST_YIELDED_WORKER_ID) == (
        multi._SNAPSHOT, multi._MAIN_SNAPSHOT, multi._WORKER_SNAPSHOTS, multi._SNAPSHOT_STEP,
        multi._STEPS_SINCE_SNAPSHOT, multi._NUM_WORKERS, multi._BASE_SEED,
        multi._LAST_YIELDED_WORKER_ID)
    assert (td.ITERATOR_FINISHED, td.INDEX_SAMPLER_STATE, td.SAMPLER_ITER_STATE,
            td.SAMPLER_ITER_YIELDED, td.ITERABLE_LEN_CALLED, td.SHARED_SEED) == (
        stateful._ITERATOR_FINISHED, stateful._INDEX_SAMPLER_STATE, stateful._SAMPLER_ITER_STATE,
        stateful._SAMPLER_ITER_YIELDED, stateful._ITERABLEDATASET_LEN_CALLED,
        stateful._SHARED_SEED)
    assert td.NUM_YIELDED == stateful._StatefulSingleProcessDataLoaderIter._NUM_YIELDED
    assert (td.WORKER_ID, td.FETCHER_STATE, td.FETCHER_ENDED, td.DATASET_STATE,
            td.DATASET_ITER_STATE) == (
        incremental._WORKER_ID, incremental._FETCHER_STATE, incremental._FETCHER_ENDED,
        incremental._DATASET_STATE, incremental._DATASET_ITER_STATE)


def _keys(tree, prefix=""):
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_saved_state_has_the_layout_torch_rlds_reads(small_dataset, workers):
    dataset = torch_rlds.RLDSDataset(small_dataset, action_horizon=4, shuffle_window=2)
    loader = torch_rlds.DataLoader(dataset, batch_size=2, num_workers=workers,
                                   multiprocessing_context=default_start_method() if workers
                                   else None)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    keys = _keys(loader.state_dict())
    del iterator
    if workers == 0:
        expected = {td.NUM_YIELDED, td.DATASET_STATE, td.ITERATOR_FINISHED,
                    td.SAMPLER_ITER_YIELDED, td.ITERABLE_LEN_CALLED, td.SHARED_SEED,
                    td.INDEX_SAMPLER_STATE, td.SAMPLER_ITER_STATE,
                    f"{td.FETCHER_STATE}.{td.FETCHER_ENDED}",
                    f"{td.FETCHER_STATE}.{td.DATASET_ITER_STATE}"}
    else:
        snapshot, main = td.SNAPSHOT, f"{td.SNAPSHOT}.{td.MAIN_SNAPSHOT}"
        worker = f"{td.SNAPSHOT}.{td.WORKER_SNAPSHOTS}.{td.worker_key(1)}"
        expected = {td.STEPS_SINCE_SNAPSHOT, td.ITERATOR_FINISHED,
                    f"{snapshot}.{td.SNAPSHOT_STEP}", f"{snapshot}.{td.LAST_YIELDED_WORKER_ID}",
                    f"{main}.{td.NUM_WORKERS}", f"{main}.{td.BASE_SEED}",
                    f"{main}.{td.SAMPLER_ITER_YIELDED}", f"{worker}.{td.WORKER_ID}",
                    f"{worker}.{td.DATASET_STATE}",
                    f"{worker}.{td.FETCHER_STATE}.{td.FETCHER_ENDED}",
                    f"{worker}.{td.FETCHER_STATE}.{td.DATASET_ITER_STATE}"}
    assert expected - keys == set()


def test_a_torchdata_without_a_needed_name_is_refused_naming_it():
    with pytest.raises(ImportError, match=r"found torchdata 0\.12\.0, which lacks "
                                          r"StatefulDataLoader\._get_iterator"):
        td.check_version("0.12.0", ["StatefulDataLoader._get_iterator"])


@pytest.mark.parametrize("version", ["0.12.0", "1.11.0", "0.10.1", "nightly"])
def test_an_untested_torchdata_warns_naming_both_versions(version):
    with pytest.warns(RuntimeWarning, match=rf"tested with torchdata 0\.11 \(found "
                                            rf"torchdata {version}\)"):
        td.check_version(version, [])


@pytest.mark.parametrize("version", ["0.11.0", "0.11.2", "0.11.0+cpu"])
def test_a_supported_torchdata_passes_quietly(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td.check_version(version, [])


def test_the_dependency_and_the_ci_pin_are_the_supported_releases():
    root = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    required = [r for r in setup["options"]["install_requires"].split()
                if r.startswith("torchdata")]
    assert required == [td.REQUIREMENT]
    pins = re.findall(r"^torchdata==(\d+\.\d+)\.", (root / ".ci" / "constraints.txt").read_text(),
                      re.MULTILINE)
    assert len(pins) == 1 and pins[0] in td.SUPPORTED_VERSIONS
