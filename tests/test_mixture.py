"""Mixtures: proportions, exact resume, exactly-once, weights changed on restore."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import torch_rlds
from torch_rlds import synthetic
from torch_rlds.mixture import MixtureDataset
from torch_rlds.testing import assert_resumes_exactly
from torch_rlds.transforms import Augment, Compose, Resize, TransformedDataset

CAMERA = (synthetic.Camera("image", 32, 32),)
SPECS = [dict(name="mix_a", num_episodes=3, min_steps=2, max_steps=5, seed=1),
         dict(name="mix_b", num_episodes=4, min_steps=2, max_steps=4, seed=2),
         dict(name="mix_c", num_episodes=2, min_steps=3, max_steps=6, seed=3)]


@pytest.fixture(scope="module")
def paths(write_dataset):
    return [write_dataset(cameras=CAMERA, **spec) for spec in SPECS]


def children(paths, *, repeat: bool = True, seed: int = 0, **options):
    return [torch_rlds.RLDSDataset(p, action_horizon=2, shuffle_window=2, repeat=repeat,
                                   seed=seed + i, **options) for i, p in enumerate(paths)]


def window_children(paths, **options):
    """Datasets in the window order: their mixture draws per reader (the legacy mixture)."""
    return children(paths, order="window", **options)


def ids(batch) -> list[tuple[int, int, int]]:
    meta = batch["meta"]
    return list(zip(meta["dataset_index"].tolist(), meta["episode_index"].tolist(),
                    meta["step_index"].tolist()))


def all_steps(paths) -> set[tuple[int, int, int]]:
    steps = set()
    for d, spec in enumerate(SPECS[:len(paths)]):
        lengths = synthetic.SyntheticSpec(**spec, texture=False).lengths()
        steps |= {(d, e, t) for e in range(spec["num_episodes"]) for t in range(lengths[e])}
    return steps


def within_bound(counts: np.ndarray, weights: np.ndarray) -> None:
    """Each count within 5 binomial standard deviations of its expectation."""
    n = counts.sum()
    p = weights / weights.sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= 5 * sigma).all(), (counts, n * p, sigma)


def test_choice_proportions_follow_the_weights(paths):
    weights = np.array([0.5, 0.3, 0.2])
    mixture = MixtureDataset(children(paths), weights, seed=4)
    choices = np.array([mixture.choose(k) for k in range(20_000)])
    within_bound(np.bincount(choices, minlength=3), weights)
    # Other readers (workers) draw differently, with the same proportions.
    other = np.array([mixture.choose(k, reader=1) for k in range(20_000)])
    assert (other != choices).mean() > 0.3
    within_bound(np.bincount(other, minlength=3), weights)


def test_stream_proportions_and_determinism(paths):
    weights = np.array([1.0, 2.0, 5.0])
    mixture = MixtureDataset(children(paths), weights.tolist(), seed=9)
    samples = list(itertools.islice(iter(mixture), 1200))
    got = [int(s["meta"]["dataset_index"]) for s in samples]
    within_bound(np.bincount(got, minlength=3), weights)
    again = MixtureDataset(children(paths), weights.tolist(), seed=9)
    assert [int(s["meta"]["dataset_index"]) for s in itertools.islice(iter(again), 200)] == \
        got[:200]
    other_seed = MixtureDataset(children(paths), weights.tolist(), seed=10)
    assert [int(s["meta"]["dataset_index"]) for s in itertools.islice(iter(other_seed), 200)] \
        != got[:200]
    for s in samples[:50]:  # the sample comes from the dataset it says
        d = int(s["meta"]["dataset_index"])
        assert s["action"][0, 0] == s["meta"]["episode_index"]
        assert synthetic.image_ids(s["observation"]["image"][0])[1] == s["meta"]["step_index"]
        assert s["language_instruction"] == synthetic.instruction(int(s["meta"]["episode_index"]))
        assert d in (0, 1, 2)


def test_balance_by_size(paths):
    mixture = MixtureDataset(children(paths), [1, 1, 2], balance=True)
    np.testing.assert_allclose(mixture.weights, np.array([3, 4, 4]) / 11)  # episodes x weight
    steps = MixtureDataset(children(paths), balance=True, sizes=[10, 30, 60])
    np.testing.assert_allclose(steps.weights, [0.1, 0.3, 0.6])
    with pytest.raises(ValueError, match="sizes is used only with balance=True"):
        MixtureDataset(children(paths), sizes=[1, 2, 3])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number > 0 \(got 0\)"):
        MixtureDataset(children(paths), [1, 0, 1])
    with pytest.raises(ValueError, match="2 weights for 3 datasets"):
        MixtureDataset(children(paths), [1, 1])


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_with_augmentation_resumes_exactly(paths, workers):
    chain = Compose([Resize((24, 24), "stretch"),
                     Augment(seed=3, crop_scale=0.8, brightness=0.3, contrast=0.3)])

    def make_loader():
        mixture = MixtureDataset(children(paths), [0.5, 0.25, 0.25], seed=2)
        return torch_rlds.DataLoader(TransformedDataset(mixture, chain), batch_size=3,
                                     num_workers=workers)

    points = None if workers == 0 else [0, 3, 7]
    reference = assert_resumes_exactly(make_loader, 9, restore_points=points)
    assert reference[0]["observation"]["image"].shape == (3, 1, 24, 24, 3)
    seen = {d for batch in reference for d in batch["meta"]["dataset_index"].tolist()}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("workers, stop", [(0, None), (0, 4), (2, None), (2, 3)])
def test_exactly_once_when_datasets_end(paths, workers, stop):
    """repeat=False: a dataset that ends drops out; the mixture ends when all have, having
    emitted every step of every dataset once, also across a save and restore."""

    def make_loader():
        mixture = MixtureDataset(children(paths, repeat=False), [0.6, 0.2, 0.2], seed=5)
        return torch_rlds.DataLoader(mixture, batch_size=4, num_workers=workers)

    seen: list[tuple[int, int, int]] = []
    loader = make_loader()
    if stop is not None:
        iterator = iter(loader)
        for _ in range(stop):
            seen += ids(next(iterator))
        state = json.loads(json.dumps(loader.state_dict()))
        del iterator
        loader = make_loader()
        loader.load_state_dict(state)
    for batch in loader:
        seen += ids(batch)
    assert len(seen) == len(set(seen))
    assert set(seen) == all_steps(paths)


def test_a_new_pass_after_the_end(paths):
    mixture = MixtureDataset(children(paths, repeat=False), seed=1)
    first = [(int(s["meta"]["dataset_index"]), int(s["meta"]["epoch"])) for s in mixture]
    second = [(int(s["meta"]["dataset_index"]), int(s["meta"]["epoch"])) for s in mixture]
    assert len(first) == len(second) == len(all_steps(paths))
    assert {e for _, e in first} == {0} and {e for _, e in second} == {1}


def test_weights_may_change_on_restore(paths):
    """Documented choice: the datasets continue exactly where they stopped, new weights apply
    from the next sample on."""
    def stream(weights, state=None, n=0):
        mixture = MixtureDataset(window_children(paths), weights, seed=6)
        if state is not None:
            mixture.load_state_dict(json.loads(json.dumps(state)))
        it = iter(mixture)
        return mixture, [next(it) for _ in range(n)]

    mixture, before = stream([1, 1, 1], n=60)
    state = mixture.state_dict()
    assert state["weights"] == [repr(1 / 3)] * 3
    resumed, after = stream([8, 1, 1], state, n=600)
    assert resumed.state_dict()["weights"] == ["0.8", "0.1", "0.1"]
    assert resumed.state_dict()["samples"] == 660
    within_bound(np.bincount([int(s["meta"]["dataset_index"]) for s in after], minlength=3),
                 np.array([8.0, 1.0, 1.0]))
    # Within each dataset, the samples before and after the restore are that dataset's own
    # uninterrupted stream: nothing repeated, nothing skipped.
    for d, child in enumerate(window_children(paths)):
        mine = [(int(s["meta"]["epoch"]), int(s["meta"]["episode_index"]),
                 int(s["meta"]["step_index"])) for s in before + after
                if int(s["meta"]["dataset_index"]) == d]
        alone = [(int(s["meta"]["epoch"]), int(s["meta"]["episode_index"]),
                  int(s["meta"]["step_index"])) for s in itertools.islice(iter(child), len(mine))]
        assert mine == alone
    # With the same weights the restored stream is the uninterrupted one.
    def key(s):
        return tuple(int(s["meta"][k]) for k in ("dataset_index", "episode_index", "step_index"))

    _, same = stream([1, 1, 1], state, n=20)
    _, whole = stream([1, 1, 1], n=80)
    assert [key(s) for s in whole[:60]] == [key(s) for s in before]
    assert [key(s) for s in same] == [key(s) for s in whole[60:]]


def test_state_is_small_json_and_checked(paths):
    mixture = MixtureDataset(window_children(paths), seed=3)
    it = iter(mixture)
    for _ in range(10):
        next(it)
    state = mixture.state_dict()
    assert len(json.dumps(state)) < 3 * 1024
    assert state["samples"] == 10 and state["fingerprint"] == {"num_datasets": 3, "seed": 3}
    with pytest.raises(ValueError, match="seed in checkpoint: 3 / in this mixture: 4"):
        MixtureDataset(window_children(paths), seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_datasets in checkpoint: 3 / in this mixture: 2"):
        MixtureDataset(window_children(paths)[:2], seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="field 'samples' must be an int >= 0"):
        MixtureDataset(window_children(paths), seed=3).load_state_dict({**state, "samples": -1})
    with pytest.raises(ValueError, match="field 'exhausted'"):
        MixtureDataset(window_children(paths), seed=3).load_state_dict({**state, "exhausted": [0, 1]})
    with pytest.raises(ValueError, match="mixture dataset 0: state belongs to another dataset"):
        MixtureDataset(window_children(paths, seed=1), seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="'version'"):
        MixtureDataset(window_children(paths), seed=3).load_state_dict({**state, "version": 2})
    with pytest.raises(TypeError, match="no state_dict"):
        MixtureDataset([[1, 2, 3]])


# -- mixtures in the global order ------------------------------------------------------------
def global_children(paths, **options):
    return children(paths, order="global", **options)


def test_endless_global_datasets_make_a_global_mixture(paths):
    from torch_rlds.mixture import GlobalMixture

    assert type(MixtureDataset(global_children(paths))) is GlobalMixture
    assert type(MixtureDataset(window_children(paths))) is MixtureDataset
    assert type(MixtureDataset(global_children(paths, repeat=False))) is MixtureDataset


@pytest.mark.parametrize("saved, restored", [((0, 1), (2, 1)), ((2, 1), (3, 1)),
                                             ((2, 2), (1, 3)), ((1, 1), (3, 2))])
def test_a_global_mixture_resumes_under_another_topology(paths, saved, restored):
    """``(workers, hosts)``: the global batches of a mixture depend on neither, and a state
    saved under one resumes under the other with the same global batches."""
    weights = [0.5, 0.3, 0.2]

    def hosts(workers, count):
        return [torch_rlds.DataLoader(
            MixtureDataset(global_children(paths, process_index=p, process_count=count),
                           weights, seed=8), batch_size=6 // count, num_workers=workers)
            for p in range(count)]

    def run(loaders, n):
        iterators = [iter(loader) for loader in loaders]
        return [[i for it in iterators for i in ids(next(it))] for _ in range(n)]

    reference = run(hosts(0, 1), 10)
    job = hosts(*saved)
    assert run(job, 4) == reference[:4]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in job]
    resumed = hosts(*restored)
    for p, loader in enumerate(resumed):
        loader.load_state_dict(states[p % len(states)])
    assert run(resumed, 6) == reference[4:]
    assert {d for batch in reference for d, _, _ in batch} == {0, 1, 2}


def test_a_global_mixture_draws_by_the_weights_and_each_dataset_goes_its_own_way(paths):
    weights = np.array([1.0, 2.0, 5.0])
    loader = torch_rlds.DataLoader(MixtureDataset(global_children(paths), weights, seed=9),
                                   batch_size=40)
    samples = [i for batch in itertools.islice(loader, 30) for i in ids(batch)]
    within_bound(np.bincount([d for d, _, _ in samples], minlength=3), weights)
    # Each dataset's samples are its own global order's, in order: nothing skipped.
    for d, child in enumerate(global_children(paths)):
        mine = [(e, t) for dd, e, t in samples if dd == d]
        alone = [(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"]))
                 for s in itertools.islice(iter(child), len(mine))]
        assert mine == alone


def test_a_global_mixture_takes_new_weights_on_restore(paths):
    def loader(weights):
        return torch_rlds.DataLoader(MixtureDataset(global_children(paths), weights, seed=6),
                                     batch_size=20)

    before = loader([1, 1, 1])
    first = [i for batch in itertools.islice(before, 3) for i in ids(batch)]
    state = json.loads(json.dumps(before.state_dict()))
    assert state["dataset_state"]["weights"] == [repr(1 / 3)] * 3
    after = loader([8, 1, 1])
    after.load_state_dict(state)
    rest = [i for batch in itertools.islice(after, 30) for i in ids(batch)]
    within_bound(np.bincount([d for d, _, _ in rest], minlength=3), np.array([8.0, 1.0, 1.0]))
    for d, child in enumerate(global_children(paths)):  # every dataset goes on from its count
        mine = [(e, t) for dd, e, t in first + rest if dd == d]
        alone = [(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"]))
                 for s in itertools.islice(iter(child), len(mine))]
        assert mine == alone


def test_a_global_mixture_locates_the_samples_it_reads(paths):
    mixture = MixtureDataset(global_children(paths), [0.5, 0.3, 0.2], seed=8)
    read = [i for batch in itertools.islice(torch_rlds.DataLoader(mixture, batch_size=10), 6)
            for i in ids(batch)]
    stream = mixture._stream
    drawn, _, episodes, steps = stream.locate(np.arange(60))
    assert list(zip(drawn.tolist(), episodes.tolist(), steps.tolist())) == read
    # Positions with gaps, or counted on from a position whose counts are known, locate
    # the same samples.
    some = np.array([3, 4, 5, 17, 40, 41, 59])
    located = stream.locate(some)
    assert [a.tolist() for a in located] == [a[some].tolist() for a in stream.locate(
        np.arange(60))]
    counts = stream.draws.counts(0, 17)
    assert [a.tolist() for a in stream.locate(some[3:], counts, 17)] == [
        a[3:].tolist() for a in located]
    with pytest.raises(ValueError, match="positions must ascend from at=17"):
        stream.locate(some, counts, 17)
    with pytest.raises(ValueError, match=r"counts one per dataset \(3\)"):
        stream.locate(some, counts[:2])


def test_a_global_mixture_state_is_checked(paths):
    mixture = MixtureDataset(global_children(paths), seed=3)
    next(iter(torch_rlds.DataLoader(mixture, batch_size=4)))
    state = json.loads(json.dumps(mixture.state_dict()))
    assert state["order"] == "global-mixture" and sum(state["counts"]) == 4
    assert len(json.dumps(state)) < 3 * 1024
    with pytest.raises(ValueError, match="seed in checkpoint: 3 / in this mixture: 4"):
        MixtureDataset(global_children(paths), seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="mixture dataset 0: .*seed in checkpoint: 0 / in this "
                                         "dataset: 5"):
        MixtureDataset(global_children(paths, seed=5), seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="do not agree"):
        MixtureDataset(global_children(paths), seed=3).load_state_dict(
            {**state, "counts": [0, 0, 1]})
    with pytest.raises(ValueError, match="not one of a mixture in the global order"):
        MixtureDataset(global_children(paths), seed=3).load_state_dict(
            MixtureDataset(window_children(paths), seed=3).state_dict())


# Run in a fresh interpreter per measurement: the worker's private memory (what fork has not
# shared with the parent) after a few dozen batches of a mixture of ``n`` datasets.
_WORKER_MEMORY = r"""
import sys
import torch_rlds
from torch_rlds import synthetic

root, n = sys.argv[1], int(sys.argv[2])
paths = [synthetic.write_dataset_once(root, synthetic.SyntheticSpec(
    name=f"d{i}", num_episodes=4, num_shards=2, min_steps=20, max_steps=30,
    cameras=(synthetic.Camera("image", 64, 64),))) for i in range(50)][:n]
kids = [torch_rlds.RLDSDataset(p, action_horizon=4, order="global") for p in paths]
dataset = kids[0] if n == 1 else torch_rlds.MixtureDataset(kids)
loader = torch_rlds.DataLoader(dataset, batch_size=32, num_workers=1,
                               multiprocessing_context="fork")
it = iter(loader)
for _ in range(40):
    next(it)
kib = 0
with open(f"/proc/{it._workers[0].pid}/smaps_rollup") as f:
    for line in f:
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
print(kib)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_a_mixture_of_50_datasets_costs_a_worker_at_most_half_again_a_single_dataset(tmp_path):
    def private_kib(n: int) -> int:
        done = subprocess.run([sys.executable, "-c", _WORKER_MEMORY, str(tmp_path), str(n)],
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return int(done.stdout.split()[-1])

    single, fifty = private_kib(1), private_kib(50)
    assert fifty <= 1.5 * single, (single, fifty)
