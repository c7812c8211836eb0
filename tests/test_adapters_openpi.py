"""torch_rlds.adapters.openpi: create_data_loader, (observation, actions) batches and the
persistent iterator's save/load cycles."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from torch_rlds import synthetic
from torch_rlds.adapters._common import latest_data_loader_step
from torch_rlds.adapters.openpi import Observation, create_data_loader
from torch_rlds.config import load_config
from torch_rlds.testing import assert_batches_equal

PERSISTENT_ONLY = "Dataloader must be created with persistent_iterator=True"


def _config(path, *overrides):
    return load_config("demo", [f"data.path={path}", "data.action_horizon=4",
                                "data.shuffle_window=2", "loader.batch_size=4",
                                "loader.num_workers=0", *overrides])


def _plain(observation, actions):
    """A batch as nested dicts of numpy (prompt included), for bit-exact comparison."""
    import dataclasses

    return {"observation": {k: v for k, v in dataclasses.asdict(observation).items()},
            "actions": np.asarray(actions)}


def _take(loader, n):
    return [_plain(*batch) for batch in itertools.islice(loader, n)]


def test_batches_are_observation_and_actions_of_the_documented_shapes(small_dataset,
                                                                      small_spec):
    loader = create_data_loader(_config(small_dataset, "data.obs_window=2"), prefetch=0)
    observation, actions = next(iter(loader))
    assert isinstance(observation, Observation)
    assert observation.state.shape == (4, 2, 7) and observation.state.dtype == np.float32
    assert actions.shape == (4, 4, 7)
    assert sorted(observation.images) == ["image", "wrist_image"]
    assert observation.images["image"].shape == (4, 2, 64, 64, 3)
    assert observation.images["wrist_image"].shape == (4, 2, 32, 48, 3)
    assert sorted(observation.image_masks) == ["image", "wrist_image"]
    assert observation.action_is_pad.shape == (4, 4)
    assert len(observation.prompt) == 4
    meta = observation.meta
    for b, (e, t) in enumerate(zip(meta["episode_index"], meta["step_index"])):
        e, t = int(e), int(t)
        # The window ends at step t; before the episode starts it repeats step 0, masked out.
        first = max(t - 1, 0)
        np.testing.assert_array_equal(observation.state[b, 1],
                                      synthetic.state_value(small_spec, e, t))
        np.testing.assert_array_equal(observation.state[b, 0],
                                      synthetic.state_value(small_spec, e, first))
        assert observation.image_masks["image"][b].tolist() == [t >= 1, True]
        assert synthetic.image_ids(observation.images["image"][b, 1]) == (e, t)
        np.testing.assert_array_equal(actions[b, 0], synthetic.action_value(small_spec, e, t))
        assert observation.prompt[b] == synthetic.instruction(e)


def test_state_key_must_name_a_non_image_observation(small_dataset):
    loader = create_data_loader(_config(small_dataset), state_key="image", prefetch=0)
    with pytest.raises(ValueError, match=r"state_key \['image'\]: not a non-image observation "
                                         r"of synthetic_rlds \(its observations: \['state'\]\)"):
        next(iter(loader))
    both = create_data_loader(_config(small_dataset), state_key=["state", "state"])
    observation, _ = next(iter(both))
    assert observation.state.shape == (4, 1, 14)


def test_the_configs_shuffle_and_seed_stand_unless_passed(small_dataset):
    config = _config(small_dataset, "data.seed=5", "data.shuffle=false")
    kept = create_data_loader(config, prefetch=0)
    assert (kept.data_config().data.seed, kept.data_config().data.shuffle) == (5, False)
    observation, _ = next(iter(kept))
    assert observation.meta["step_index"].tolist() == [0, 1, 2, 3]  # in order, as configured
    shuffled = create_data_loader(config, shuffle=True, seed=3, prefetch=0)
    assert (shuffled.data_config().data.seed, shuffled.data_config().data.shuffle) == (3, True)
    reference = create_data_loader(_config(small_dataset, "data.seed=3"), prefetch=0)
    assert_batches_equal(_take(reference, 2), _take(shuffled, 2))
    assert create_data_loader(config, seed=0).data_config().data.shuffle is False


def test_a_persistent_iterator_continues_over_iter_calls_and_num_batches(small_dataset):
    config = _config(small_dataset)
    reference = _take(create_data_loader(config, persistent_iterator=True), 9)
    loader = create_data_loader(config, persistent_iterator=True, num_batches=3)
    got = _take(loader, 10) + _take(loader, 10) + _take(loader, 2)
    assert len(got) == 8  # num_batches ends each iter() at 3
    for i, batch in enumerate(got):
        assert_batches_equal(reference[i], batch, f"batch {i}")
    assert loader.get_batches_seen() == 8


@pytest.mark.parametrize("prefetch", [0, 2])
def test_any_number_of_save_load_cycles_resume_exactly(small_dataset, tmp_path, prefetch):
    config = _config(small_dataset, "data.obs_window=2")
    reference = _take(create_data_loader(config, persistent_iterator=True), 14)
    position, directory = 0, None
    loader = create_data_loader(config, persistent_iterator=True, prefetch=prefetch)
    for cycle, count in enumerate([2, 0, 3, 1, 4]):
        if directory is not None:
            loader = create_data_loader(config, persistent_iterator=True, prefetch=prefetch)
            assert loader.load_dataloader_state(directory) == position
        for i, batch in enumerate(_take(loader, count)):
            assert_batches_equal(reference[position + i], batch, f"cycle {cycle}")
        position += count
        directory = tmp_path / f"cycle{cycle}"
        path = loader.save_dataloader_state(directory)
        assert path == os.path.join(os.fspath(directory), "process_0-of-1.json")
        with open(path) as f:
            assert json.load(f)["torch_rlds"]["batches_seen"] == position
        assert loader.get_batches_seen() == position
    # The same loader, rewound to its own save twice, replays the same batches.
    for _ in range(2):
        assert loader.load_dataloader_state(directory) == position
        for i, batch in enumerate(_take(loader, 4)):
            assert_batches_equal(reference[position + i], batch, "rewound")
    loader.close()


def test_a_loader_without_persistent_iterator_refuses_to_save_or_load(small_dataset,
                                                                      tmp_path):
    config = _config(small_dataset)
    loader = create_data_loader(config)
    next(iter(loader))
    with pytest.raises(ValueError) as e:
        loader.save_dataloader_state(tmp_path)
    assert str(e.value) == PERSISTENT_ONLY
    with pytest.raises(ValueError) as e:
        loader.load_dataloader_state(tmp_path)
    assert str(e.value) == PERSISTENT_ONLY
    assert loader.get_batches_seen() == 1


def test_loading_from_a_directory_without_state(small_dataset, tmp_path):
    config = _config(small_dataset)
    loader = create_data_loader(config, persistent_iterator=True)
    for directory in (tmp_path / "missing", tmp_path, os.fspath(tmp_path)):
        with pytest.raises(FileNotFoundError) as e:
            loader.load_dataloader_state(directory)
        assert str(e.value) == f"No checkpoint found in {directory}"
    # Under the window order, the states of two processes cannot be loaded by one.
    window = create_data_loader(_config(small_dataset, "data.order=window"),
                                persistent_iterator=True)
    two = create_data_loader(_config(small_dataset, "process_count=2", "process_index=0",
                                     "data.order=window"), persistent_iterator=True)
    next(iter(two))
    two.save_dataloader_state(tmp_path / "two")
    with pytest.raises(ValueError, match=r"2 processes \(files process_0-of-2.json\), but this "
                                         "run has 1 process"):
        window.load_dataloader_state(tmp_path / "two")
    # Under the global order they can: a state names no process.
    two = create_data_loader(_config(small_dataset, "process_count=2", "process_index=1"),
                             persistent_iterator=True)
    next(iter(two))
    two.save_dataloader_state(tmp_path / "two-global")
    assert loader.load_dataloader_state(tmp_path / "two-global") == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_non_persistent_loader_starts_over_on_each_iter(small_dataset, workers):
    config = _config(small_dataset, f"loader.num_workers={workers}")
    loader = create_data_loader(config, num_batches=3)
    first, second = _take(loader, 5), _take(loader, 5)
    assert len(first) == len(second) == 3
    for i, (a, b) in enumerate(zip(first, second)):
        assert_batches_equal(a, b, f"batch {i}")


def test_a_one_pass_dataset_goes_on_over_epochs(small_dataset, small_spec):
    config = _config(small_dataset, "data.repeat=false")
    loader = create_data_loader(config, persistent_iterator=True, prefetch=2)
    epochs = [int(e) for observation, _ in itertools.islice(loader, 40)
              for e in observation.meta["epoch"]]
    steps = sum(small_spec.lengths()[:small_spec.num_episodes])
    assert epochs.count(0) == steps and epochs.count(1) > 0


def test_with_a_sharding_batches_are_global_jax_arrays_and_a_pytree(small_dataset, tmp_path):
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    config = _config(small_dataset)
    reference = [jax.device_get(b) for b in _take(
        create_data_loader(config, sharding=sharding, persistent_iterator=True, prefetch=0), 6)]
    loader = create_data_loader(config, sharding=sharding, persistent_iterator=True)
    observation, actions = next(iter(loader))
    assert isinstance(actions, jax.Array) and isinstance(observation.state, jax.Array)
    assert observation.images["image"].sharding == sharding
    assert len(observation.prompt) == 4  # host-side strings

    @jax.jit
    def loss(observation, actions):
        return (observation.state.sum() + actions.sum()
                + observation.images["image"].astype("float32").mean())

    assert np.isfinite(float(loss(observation, actions)))
    leaves = jax.tree.leaves(observation)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    loader.save_dataloader_state(tmp_path)
    resumed = create_data_loader(config, sharding=sharding, persistent_iterator=True)
    assert resumed.load_dataloader_state(tmp_path) == 1
    for i, (obs, act) in zip(range(1, 6), resumed):
        got = jax.device_get(_plain(obs, act))
        assert_batches_equal(reference[i], got, f"batch {i}")


# -- openpi's own loop, killed and resumed --------------------------------------------------
LOOP = os.path.join(os.path.dirname(__file__), "openpi_loop.py")


def _history(log) -> list[dict]:
    """The steps a run trained, as its restarts left them: each start (from its checkpoint)
    drops the steps logged after that checkpoint by the run that was killed."""
    steps: list[dict] = []
    text = log.read_text() if log.exists() else ""
    for line in text.splitlines()[:text.count("\n")]:
        record = json.loads(line)
        if "start" in record:
            steps = [s for s in steps if s["step"] < record["start"]]
        else:
            assert record["step"] == len(steps), (record, len(steps))
            steps.append(record)
    return steps


def _complete_lines(log) -> int:
    return log.read_text().count("\n") if log.exists() else 0


def test_openpis_loop_resumes_exactly_when_killed(small_dataset, tmp_path):
    """openpi's train.py order (first batch before the restore, next batch before each save),
    killed with SIGKILL at random points and resumed, trains on exactly the batches of the
    uninterrupted run, and ends with the same params."""
    import random
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("orbax.checkpoint")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    steps = 16

    def run(name, *extra):
        return subprocess.Popen([sys.executable, LOOP, "--dataset", str(small_dataset),
                                 "--checkpoints", str(tmp_path / name / "checkpoints"), "--log",
                                 str(tmp_path / name / "log"), "--steps", str(steps), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    (tmp_path / "ref").mkdir()
    reference = run("ref")
    assert reference.wait(timeout=240) == 0, reference.stderr.read().decode()[-3000:]
    expected = _history(tmp_path / "ref" / "log")
    assert len(expected) == steps

    seed = int(os.environ.get("TORCH_RLDS_FAULT_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    kills = int(os.environ.get("TORCH_RLDS_OPENPI_KILLS", 3))
    (tmp_path / "killed").mkdir()
    log = tmp_path / "killed" / "log"
    for attempt in range(kills + 1):
        process = run("killed", *(["--resume"] if attempt else []))
        if attempt < kills:
            # Let it save a checkpoint more and train 0 to 2 steps past it, then kill it
            # without warning (a save falls every third step).
            checkpoints = tmp_path / "killed" / "checkpoints"
            saved = latest_data_loader_step(checkpoints)
            saved = -1 if saved is None else saved
            deadline = time.monotonic() + 120
            while process.poll() is None and (latest_data_loader_step(checkpoints) or -1) <= saved:
                assert time.monotonic() < deadline, f"no save (seed {seed})"
                time.sleep(0.01)
            target = _complete_lines(log) + rng.randint(0, 2)
            while process.poll() is None and _complete_lines(log) < target:
                assert time.monotonic() < deadline, f"no progress (seed {seed})"
                time.sleep(0.01)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        else:
            assert process.wait(timeout=240) == 0, process.stderr.read().decode()[-3000:]
    got = _history(log)
    starts = [json.loads(line)["start"] for line in log.read_text().splitlines()
              if line.startswith('{"start"')]
    assert len(starts) == kills + 1 and max(starts) > 0, (starts, seed)  # it did resume
    assert [s["ids"] for s in got] == [s["ids"] for s in expected], f"seed {seed}"
    assert got[-1]["params"] == expected[-1]["params"], f"seed {seed}"
