"""torch_rlds.adapters.orbax: the loader state in a real orbax CheckpointManager step."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from torch_rlds.config import load_config
from torch_rlds.testing import assert_batches_equal


@pytest.fixture(scope="module")
def ocp():
    pytest.importorskip("jax")
    return pytest.importorskip("orbax.checkpoint")


def _config(path, *overrides):
    return load_config("demo", [f"data.path={path}", "data.action_horizon=4",
                                "data.shuffle_window=2", "loader.batch_size=4",
                                "loader.num_workers=0", *overrides])


def _train_state():
    import jax.numpy as jnp

    return {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
            "step": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _consume(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def test_a_manager_step_holds_one_json_per_process_and_restores_it(ocp, small_dataset,
                                                                   tmp_path):
    import jax

    from torch_rlds.adapters.orbax import DataLoaderRestore, DataLoaderSave

    config = _config(small_dataset)
    loader = config.make_loader(as_numpy=True)
    _consume(loader, 3)
    expected_state = loader.state_dict()
    reference = _consume(loader, 3)
    loader.load_state_dict(expected_state)  # back to "after batch 3" for the save

    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    train_state = _train_state()
    manager.save(3, args=ocp.args.Composite(train_state=ocp.args.StandardSave(train_state),
                                            data_loader=DataLoaderSave(loader)))
    manager.wait_until_finished()
    state_file = tmp_path / "ckpt" / "3" / "data_loader" / "process_0-of-1.json"
    assert json.loads(state_file.read_text()) == expected_state
    assert state_file.stat().st_size < 2048

    fresh = config.make_loader(as_numpy=True)
    restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(3, args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(_abstract(train_state)),
        data_loader=DataLoaderRestore(fresh)))
    assert restored["data_loader"] is fresh
    jax.tree.map(np.testing.assert_array_equal, restored["train_state"], train_state)
    assert fresh.batches_seen == 3
    for i, batch in enumerate(_consume(fresh, 3)):
        assert_batches_equal(reference[i], batch, f"batch {3 + i}")


def test_openpi_style_save_state_and_restore_state(ocp, small_dataset, tmp_path):
    import jax

    from torch_rlds.adapters.orbax import restore_state, save_state

    config = _config(small_dataset, "data.obs_window=2")
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="No checkpoint found in"):
        restore_state(manager, _train_state(), config.make_loader())
    loader = config.make_loader(as_numpy=True)
    train_state = _train_state()
    for step in (2, 5):
        _consume(loader, step - loader.batches_seen)
        save_state(manager, train_state, loader, step)
    manager.wait_until_finished()
    reference = _consume(loader, 2)
    assert manager.all_steps() == [2, 5]

    fresh = config.make_loader(as_numpy=True)
    restored = restore_state(manager, _abstract(train_state), fresh)  # the latest step
    jax.tree.map(np.testing.assert_array_equal, restored, train_state)
    assert fresh.batches_seen == 5
    for i, batch in enumerate(_consume(fresh, 2)):
        assert_batches_equal(reference[i], batch, f"batch {5 + i}")
    older = config.make_loader(as_numpy=True)
    restore_state(manager, _abstract(train_state), older, step=2)
    assert older.batches_seen == 2
    # data_loader=None restores the train state only, as openpi's restore_state does.
    jax.tree.map(np.testing.assert_array_equal,
                 restore_state(manager, _abstract(train_state), None), train_state)


def test_a_restore_under_another_process_count_is_refused(ocp, small_dataset, tmp_path):
    from torch_rlds.adapters.orbax import DataLoaderRestore, restore_state, save_state

    # The window order: each process's state holds its own part of the data. (The global
    # order's restores under another count: test_a_global_order_state_restores_...)
    config = _config(small_dataset, "data.order=window")
    two = config.make_loader(0, 2)  # process 0 of 2 (the other process writes its own file)
    _consume(two, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    save_state(manager, _train_state(), two, 2)
    manager.wait_until_finished()
    names = sorted(p.name for p in (tmp_path / "ckpt" / "2" / "data_loader").iterdir())
    assert "process_0-of-2.json" in names
    with pytest.raises(ValueError, match=r"holds the data loader states of 2 processes \(files "
                                         r"process_0-of-2.json\), but this run has 1 process "
                                         r"\(process 0\): resume with the process count"):
        restore_state(manager, _abstract(_train_state()), config.make_loader(0, 1))
    with pytest.raises(FileNotFoundError, match=r"none for process 1 \(process_1-of-2.json is "
                                                r"missing\)"):
        manager.restore(2, args=ocp.args.Composite(
            data_loader=DataLoaderRestore(config.make_loader(1, 2))))


def test_prefetched_batches_do_not_leak_into_the_saved_state(ocp, small_dataset, tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from torch_rlds.adapters.jax import JaxLoader
    from torch_rlds.adapters.orbax import restore_state, save_state

    config = _config(small_dataset)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    loader = JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch=4)
    iterator = iter(loader)
    next(iterator), next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    save_state(manager, _train_state(), loader, 2)
    manager.wait_until_finished()
    reference = [jax.device_get(next(iterator)) for _ in range(3)]
    saved = json.loads((tmp_path / "ckpt" / "2" / "data_loader" /
                        "process_0-of-1.json").read_text())
    assert saved["torch_rlds"]["batches_seen"] == 2
    fresh = JaxLoader(config.make_loader(as_numpy=True), sharding, prefetch=4)
    restore_state(manager, _abstract(_train_state()), fresh)
    for i, batch in zip(range(3), fresh):
        assert_batches_equal(reference[i], jax.device_get(batch), f"batch {2 + i}")


def test_save_state_refuses_a_loader_without_a_persistent_iterator(ocp, small_dataset,
                                                                   tmp_path):
    from torch_rlds.adapters.openpi import create_data_loader
    from torch_rlds.adapters.orbax import save_state

    loader = create_data_loader(_config(small_dataset), prefetch=0)
    next(iter(loader))
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(ValueError) as error:
        save_state(manager, _train_state(), loader, 1)
    assert str(error.value) == "Dataloader must be created with persistent_iterator=True"
    assert manager.all_steps() == []


def test_restoring_a_checkpoint_without_a_loader_state_says_how(ocp, small_dataset, tmp_path):
    from torch_rlds.adapters.orbax import restore_state

    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(4, args=ocp.args.Composite(train_state=ocp.args.StandardSave(_train_state())))
    manager.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 4 in .* holds no 'data_loader' item .*"
                                                r"restore_state\(checkpoint_manager, "
                                                r"train_state, None\)"):
        restore_state(manager, _abstract(_train_state()), _config(small_dataset).make_loader())
    import jax

    jax.tree.map(np.testing.assert_array_equal,
                 restore_state(manager, _abstract(_train_state()), None), _train_state())


def test_a_restore_after_the_loop_took_a_batch_is_exact_or_refused(ocp, small_dataset,
                                                                   tmp_path):
    """openpi's order: the first batch before the restore, each next batch before the save."""
    import jax.numpy as jnp

    from torch_rlds.adapters.openpi import create_data_loader
    from torch_rlds.adapters.orbax import restore_state, save_state

    config = _config(small_dataset)
    reference = [b[1] for b in itertools.islice(
        create_data_loader(config, persistent_iterator=True, prefetch=0), 8)]
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    loader = create_data_loader(config, persistent_iterator=True)
    iterator = iter(loader)
    batch = next(iterator)
    for step in range(4):  # trains on batch `step`, then fetches the next, then saves
        np.testing.assert_array_equal(batch[1], reference[step])
        state = {"params": jnp.ones(2), "step": jnp.asarray(step + 1)}
        batch = next(iterator)
    save_state(manager, state, loader, 3)  # the loop holds batch 4, not trained on
    manager.wait_until_finished()
    saved = json.loads((tmp_path / "ckpt" / "3" / "data_loader" / "process_0-of-1.json")
                       .read_text())
    assert saved["torch_rlds"]["batches_seen"] == 4

    # A loader that resumes from the checkpoint directory first hands out batch 4 again...
    resumed = create_data_loader(config, persistent_iterator=True,
                                 resume_from=tmp_path / "ckpt")
    assert resumed.resumed_step == 3
    again = iter(resumed)
    np.testing.assert_array_equal(next(again)[1], reference[4])
    restore_state(manager, _abstract(state), resumed)  # ...and is there already
    for step in (5, 6):
        np.testing.assert_array_equal(next(again)[1], reference[step])
    # One that took a batch of a fresh stream is refused, naming the fix.
    fresh = create_data_loader(config, persistent_iterator=True)
    next(iter(fresh))
    with pytest.raises(ValueError, match=r"handed out 1 batch\(es\) of a fresh stream .* "
                                         "resume_from=checkpoint_dir"):
        restore_state(manager, _abstract(state), fresh)
    with pytest.raises(ValueError, match="resumed from checkpoint step 3 .* step 2 is being"):
        restore_state(manager, _abstract(state), resumed, step=2)


def test_a_global_order_state_restores_under_another_process_count(small_dataset, tmp_path):
    # The global order's state names no host: the states a run of 2 processes saved restore
    # a run of 3, which goes on with the same global batches.
    import torch_rlds
    from torch_rlds.adapters.orbax import (
        DataLoaderCheckpointHandler,
        DataLoaderRestore,
        DataLoaderSave,
    )

    def loader(index, count):
        dataset = torch_rlds.RLDSDataset(small_dataset, order="global", action_horizon=4,
                                         process_index=index, process_count=count)
        return torch_rlds.DataLoader(dataset, batch_size=12 // count)

    def ids(batch):
        return list(zip(batch["meta"]["episode_index"].tolist(),
                        batch["meta"]["step_index"].tolist()))

    reference = [ids(b) for b in itertools.islice(loader(0, 1), 5)]
    handler = DataLoaderCheckpointHandler()
    for run in (loader(i, 2) for i in range(2)):
        iterator = iter(run)
        for _ in range(3):
            next(iterator)
        handler.save(tmp_path, DataLoaderSave(run))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0-of-2.json",
                                                         "process_1-of-2.json"]
    restored = [loader(i, 3) for i in range(3)]
    for run in restored:
        handler.restore(tmp_path, DataLoaderRestore(run))
    iterators = [iter(run) for run in restored]
    for expected in reference[3:]:
        assert [i for it in iterators for i in ids(next(it))] == expected
