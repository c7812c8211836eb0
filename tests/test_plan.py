"""Trajectory transforms and filters in the sample path: the orders cover exactly the kept steps,
samples come from the transformed episodes, resume stays exact, counts are cached and reported."""

from __future__ import annotations

import io
import itertools
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _published, cli
from torch_rlds._step_reader import StepReader
from torch_rlds.config import load_config
from torch_rlds.stats import compute_stats
from torch_rlds.testing import assert_resumes_exactly

# DROID stand-in: six episodes, four of them successes; joint 0 jumps at the MOVES steps, so the
# idle-chunk rule (a chunk of 16 whose first 8 actions move by more than 1e-3) keeps the 7
# steps before each jump.
LENGTHS = (20, 18, 25, 9, 30, 12)
SUCCESS = (0, 2, 3, 5)
MOVES = {0: [10], 1: [3], 2: [], 3: [0, 4], 4: [15], 5: [11]}
INSTRUCTIONS = ("first", "second", "third")


def _joint_position(e: int, t: int) -> np.ndarray:
    position = np.zeros(7)
    position[0] = 0.01 * sum(t >= m for m in MOVES[e])
    return position


def _kept(e: int) -> list[int]:
    return sorted({t for m in MOVES[e] for t in range(m - 7, m) if 0 <= t < LENGTHS[e]})


KEPT = {(e, t) for e in SUCCESS for t in _kept(e)}


@pytest.fixture(scope="module")
def droid_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("droid")
    _published.write_published(root, "droid", num_episodes=len(LENGTHS), episode_lengths=LENGTHS,
                               values={
        "episode_metadata/file_path": lambda e, t: (
            f"/r/{'success' if e in SUCCESS else 'failure'}/{e}/trajectory.h5"),
        "steps/action_dict/joint_position": _joint_position,
        "steps/action_dict/gripper_position": lambda e, t: np.full(1, 0.5),
        "steps/language_instruction": lambda e, t: f"first {e}",
        "steps/language_instruction_2": lambda e, t: f"second {e}",
        "steps/language_instruction_3": lambda e, t: f"third {e}",
    })
    return root


def droid_config(droid_dir, *overrides: str):
    return load_config("droid_openpi", [f"data.data_dir={droid_dir}", "data.transform=null",
                                        *overrides])


def ids(samples) -> list[tuple[int, int]]:
    return [(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])) for s in samples]


@pytest.mark.parametrize("order", ["global", "window"])
def test_the_droid_recipe_samples_exactly_the_steps_its_rules_keep(droid_dir, order):
    dataset = droid_config(droid_dir, "data.repeat=false", f"data.order={order}").make_dataset()
    samples = list(dataset)
    got = ids(samples)
    assert len(got) == len(KEPT) == 18 and set(got) == KEPT
    for sample, (e, _) in zip(samples, got):
        assert sample["observation"]["state"].shape == (1, 8)
        assert sample["action"].shape == (16, 8)
        assert sample["language_instruction"] in {f"{w} {e}" for w in INSTRUCTIONS}
        assert (sample["action"][:, 7] == 0.5).all()
    # A second pass is the next epoch, over the same steps.
    assert set(ids(dataset)) == KEPT


def test_the_global_order_counts_only_the_kept_steps(droid_dir):
    dataset = droid_config(droid_dir, "data.order=global").make_dataset()
    assert dataset.num_steps == len(KEPT)


def test_chunks_come_from_the_transformed_actions(droid_dir):
    dataset = droid_config(droid_dir, "data.repeat=false", "data.shuffle=false").make_dataset()
    for sample in dataset:
        e, t = int(sample["meta"]["episode_index"]), int(sample["meta"]["step_index"])
        rows = np.minimum(np.arange(t, t + 16), LENGTHS[e] - 1)
        want = np.stack([_joint_position(e, r) for r in rows])
        np.testing.assert_allclose(sample["action"][:, :7], want.astype(np.float32))
        np.testing.assert_array_equal(sample["action_is_pad"], np.arange(t, t + 16)
                                      >= LENGTHS[e])


def test_choices_are_drawn_per_episode_and_epoch_and_repeat_on_rebuild(droid_dir):
    def choices(dataset, epochs):
        out = {}
        for epoch in range(epochs):
            for s in dataset:
                e = int(s["meta"]["episode_index"])
                out.setdefault((epoch, e), set()).add(s["language_instruction"].split()[0])
        return out

    first = choices(droid_config(droid_dir, "data.repeat=false").make_dataset(), 4)
    again = choices(droid_config(droid_dir, "data.repeat=false").make_dataset(), 4)
    assert first == again
    assert all(len(v) == 1 for v in first.values())  # one instruction per episode and epoch
    per_episode = {e: {first[epoch, e].pop() for epoch in range(4)} for e in (0, 3, 5)}
    assert any(len(v) > 1 for v in per_episode.values())  # epochs draw anew


@pytest.mark.parametrize("order, workers, restored", [("global", 2, 1), ("window", 2, 2)])
def test_resume_is_exact_with_filters_and_random_choices(droid_dir, order, workers, restored):
    def loader(num_workers):
        dataset = droid_config(droid_dir, f"data.order={order}").make_dataset()
        return lambda: torch_rlds.DataLoader(dataset, batch_size=4, num_workers=num_workers)

    batches = assert_resumes_exactly(loader(workers), 10, restore_points=[0, 3, 7],
                                     make_restored=loader(restored))
    seen = [(int(e), int(t)) for b in batches[:5] for e, t in zip(b["meta"]["episode_index"],
                                                                  b["meta"]["step_index"])]
    assert set(seen) <= KEPT
    if order == "global":  # the first epoch: every kept step once
        assert sorted(seen[:18]) == sorted(KEPT)


def test_kept_steps_are_cached_per_shard_and_counted_again_when_the_filters_change(
        droid_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_RLDS_CACHE", os.fspath(tmp_path))
    reads = []
    original = StepReader.read
    monkeypatch.setattr(StepReader, "read", lambda self, e, wants: reads.append(e)
                        or original(self, e, wants))
    droid_config(droid_dir, "data.order=global").make_dataset()
    assert sorted(reads) == list(range(len(LENGTHS)))  # counted: every episode read once
    kept_files = list((tmp_path / "steps").glob("*.kept"))
    assert len(kept_files) == 1
    reads.clear()
    dataset = droid_config(droid_dir, "data.order=global").make_dataset()
    assert reads == [] and dataset.num_steps == 18  # from the cache
    kept_files[0].write_bytes(b"\x00" * 40)  # a damaged cache file is counted again
    assert droid_config(droid_dir, "data.order=global").make_dataset().num_steps == 18
    assert len(reads) == len(LENGTHS)
    reads.clear()
    looser = droid_config(droid_dir, "data.order=global",
                          "data.filters.episode=[]").make_dataset()
    assert len(reads) == len(LENGTHS)
    # Every episode now, the idle rule still on: the failures' steps before their jumps too.
    assert looser.num_steps == sum(len(_kept(e)) for e in range(len(LENGTHS)))


def test_statistics_are_those_of_the_kept_steps(droid_dir):
    config = droid_config(droid_dir)
    source = config.make_dataset().source
    stats = compute_stats(source, torch_rlds.KeyMap.from_dict(config.data.key_map),
                          progress=False, plan=config.plan())
    assert stats["actions"].count == len(KEPT)
    actions = np.stack([_joint_position(e, t) for e, t in sorted(KEPT)])
    np.testing.assert_allclose(stats["actions"].mean[:7], actions.mean(0), atol=1e-6)
    everything = compute_stats(source, torch_rlds.KeyMap.from_dict(config.data.key_map),
                               progress=False)
    assert everything["actions"].count == sum(LENGTHS)


def test_inspect_reports_what_the_filters_keep(droid_dir):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["inspect", "--config-name", "droid_openpi",
                         f"data.data_dir={droid_dir}"]) == 0
    text = out.getvalue()
    assert "filters: 4 of 6 episodes kept, 18 steps to sample" in text
    assert "rejected by data.filters.episode[0] (metadata_match): 2 episodes" in text


def test_trajectory_and_filters_need_a_key_map(droid_dir):
    source = droid_config(droid_dir).make_dataset().source
    with pytest.raises(ValueError, match="need a key_map"):
        torch_rlds.RLDSDataset(source, observation_keys=[],
                               filters={"episode": [{"op": "min_length", "length": 3}]})


def test_a_filter_reading_a_missing_feature_is_named_on_construction(droid_dir):
    with pytest.raises(ValueError, match=r"episode_metadata/no_such, which droid does not"):
        droid_config(droid_dir, "data.filters.episode=[{op: metadata_match, key: no_such, "
                                "pattern: x}]").make_dataset()


def test_bridge_octo_drops_the_last_step_and_relabels_from_the_state_reached(tmp_path):
    lengths = (6, 4, 5)

    def state(e, t):
        return np.array([e + 0.1 * t, 2.0 * t, -t, 0.5 * t, 0.0, 1.0, 0.25 * t], np.float32)

    _published.write_published(tmp_path, "bridge_dataset", num_episodes=3,
                               episode_lengths=lengths,
                               values={"steps/observation/state": state})
    config = load_config("bridge_octo", [f"data.data_dir={tmp_path}", "data.transform=null",
                                         "data.repeat=false"])
    samples = list(config.make_dataset())
    assert sorted(ids(samples)) == [(e, t) for e, n in enumerate(lengths) for t in range(n - 1)]
    for s in samples:
        e, t = int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])
        np.testing.assert_allclose(s["action"][0, :6], (state(e, t + 1) - state(e, t))[:6],
                                   atol=1e-6)
        assert s["observation"]["image_primary"].shape == (2, 256, 256, 3)
    assert len(list(itertools.islice(config.make_dataset(), 3))) == 3


# -- an action chunk for every observation row (Octo's layout) -------------------------------------
@pytest.mark.parametrize("order", ["global", "window"])
def test_window_actions_give_every_observation_row_its_chunk(write_dataset, order):
    from torch_rlds.collate import collate
    from torch_rlds.testing import assert_batches_equal

    path = write_dataset(num_episodes=3, min_steps=3, max_steps=6)
    source = torch_rlds.RLDSSource(path)
    raw = {e: np.asarray(source.episode(e)["steps"]["action"], np.float32)
           for e in range(len(source))}

    def make(**options):
        return torch_rlds.RLDSDataset(path, obs_window=3, action_horizon=4, window_actions=True,
                                      repeat=False, shuffle=False, order=order, **options)

    samples = list(make())
    assert len(samples) == sum(len(a) for a in raw.values())
    for s in samples:
        e, t = int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])
        n = len(raw[e])
        assert s["action"].shape == (3, 4, raw[e].shape[1])
        for i in range(3):
            for j in range(4):
                step = t - 2 + i + j
                np.testing.assert_array_equal(s["action"][i, j], raw[e][min(max(step, 0), n - 1)])
                assert s["action_is_pad"][i, j] == (step >= n or t - 2 + i < 0)
    # Built straight into a batch buffer, the same as the samples collated.
    for k, got in enumerate(make(batch_size=5)):
        want = samples[5 * k:5 * k + 5]
        assert_batches_equal(collate(list(want)), got, "window_actions batch")


# -- goal-image relabelling --------------------------------------------------------------------
@pytest.mark.parametrize("order", ["global", "window"])
def test_goal_frames_come_from_a_future_step_drawn_per_sample(write_dataset, order):
    from torch_rlds import synthetic
    from torch_rlds.collate import collate
    from torch_rlds.testing import assert_batches_equal

    path = write_dataset(num_episodes=4, min_steps=5, max_steps=12)
    lengths = {e: len(torch_rlds.RLDSSource(path).episode(e)["steps"]["action"])
               for e in range(4)}

    def make(seed=0, **options):
        return torch_rlds.RLDSDataset(path, obs_window=2, action_horizon=2, goal_relabel=True,
                                      repeat=False, order=order, seed=seed, **options)

    samples = list(make())
    offsets = []
    for s in samples:
        e, t = int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])
        goal = int(s["task"]["goal_step"])
        assert t <= goal < lengths[e]
        assert synthetic.image_ids(s["task"]["image"]) == (e, goal)  # the goal step's frame
        offsets.append((goal - t) / max(1, lengths[e] - 1 - t))
    assert 0.3 < np.mean(offsets) < 0.7  # uniform over the future steps, not always near t
    # A pure function of the sample: the same again, another seed draws others.
    again = {(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])):
             int(s["task"]["goal_step"]) for s in make()}
    assert again == {(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])):
                     int(s["task"]["goal_step"]) for s in samples}
    other = {(int(s["meta"]["episode_index"]), int(s["meta"]["step_index"])):
             int(s["task"]["goal_step"]) for s in make(seed=1)}
    assert other != again
    for k, got in enumerate(make(batch_size=6)):
        assert_batches_equal(collate(samples[6 * k:6 * k + 6]), got, "goal batch")


def test_goal_relabelling_under_a_recipe_resumes_exactly(droid_dir):
    def loader(workers):
        dataset = droid_config(droid_dir, "data.goal_relabel=true").make_dataset()
        return lambda: torch_rlds.DataLoader(dataset, batch_size=4, num_workers=workers)

    batches = assert_resumes_exactly(loader(2), 6, restore_points=[0, 2, 5],
                                     make_restored=loader(1))
    for b in batches:
        assert b["task"]["image_primary"].shape == (4, 180, 320, 3)
        assert (b["task"]["goal_step"] >= b["meta"]["step_index"]).all()


# -- reduced-scale decode ------------------------------------------------------------------------
def test_reduced_decode_gives_the_resized_size_close_to_a_full_decode(write_dataset, tmp_path):
    from torch_rlds import synthetic

    path = write_dataset(num_episodes=2, min_steps=4, max_steps=5, texture=True,
                         cameras=(synthetic.Camera("image", 256, 256),))

    def samples(reduced, size=(128, 128)):
        config = load_config("demo", [f"data.path={path}", "data.repeat=false",
                                      "data.shuffle=false", "data.order=window",
                                      "data.key_map={state: [observation/state], images: "
                                      "{primary: observation/image}, action: [action]}",
                                      f"data.transform.image_size=[{size[0]}, {size[1]}]",
                                      "data.transform.resize=stretch",
                                      f"data.transform.reduced_decode={str(reduced).lower()}"])
        dataset = config.make_dataset()
        return dataset, list(dataset)

    full_ds, full = samples(False)
    reduced_ds, reduced = samples(True)
    assert full_ds.decode_sizes == () and reduced_ds.decode_sizes == (("image_primary",
                                                                       (128, 128)),)
    assert len(full) == len(reduced) > 0
    for a, b in zip(full, reduced):
        x = a["observation"]["image_primary"].astype(int)
        y = b["observation"]["image_primary"].astype(int)
        assert x.shape == y.shape == (1, 128, 128, 3)
        # Close, not equal: another decode (the synthetic texture is all high frequencies,
        # the worst case of the table in torch_rlds._images).
        assert np.abs(x - y).mean() < 8.0
        assert synthetic.image_ids(b["observation"]["image_primary"][0]) == (
            int(b["meta"]["episode_index"]), int(b["meta"]["step_index"]))
    assert any((a["observation"]["image_primary"] != b["observation"]["image_primary"]).any()
               for a, b in zip(full, reduced))
    # Less than half the stored size on neither side: nothing to reduce, the full decode.
    same_ds, same = samples(True, size=(200, 200))
    assert same_ds.decode_sizes == (("image_primary", (200, 200)),)
    assert all((a["observation"]["image_primary"] == b["observation"]["image_primary"]).all()
               for a, b in zip(samples(False, size=(200, 200))[1], same))


def test_the_ledger_of_a_filtered_recipe_lists_what_its_loader_produced(droid_dir):
    from torch_rlds.ledger import ledger

    config = droid_config(droid_dir, "data.order=global", "loader.batch_size=4",
                          "loader.num_workers=2")
    produced = [(int(e), int(t), int(p)) for b in itertools.islice(iter(config.make_loader()), 9)
                for e, t, p in zip(b["meta"]["episode_index"], b["meta"]["step_index"],
                                   b["meta"]["epoch"])]
    rows = ledger(config, range(9))
    assert [(r.episode, r.step, r.epoch) for r in rows] == produced
    assert {(e, t) for e, t, _ in produced} == KEPT  # 36 samples: two epochs of 18 kept steps
