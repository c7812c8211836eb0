"""openpi's training loop (``scripts/train.py``, ``main``), step for step in its order, with the
two imports of openpi's data loader and checkpoints replaced by torch_rlds's adapters.

What openpi's loop does, and this script does in the same order:

* ``initialize_checkpoint_dir`` (overwrite, resume), then ``create_data_loader(config,
  sharding=data_sharding, shuffle=True)``;
* ``data_iter = iter(data_loader)`` and ``batch = next(data_iter)`` *before* the train state is
  made or restored;
* ``restore_state(checkpoint_manager, train_state, data_loader)`` when resuming, and
  ``start_step = int(train_state.step)``;
* for each step: a jitted step on ``batch``, then ``batch = next(data_iter)``, *then*
  ``save_state(checkpoint_manager, train_state, data_loader, step)`` when ``step %
  save_interval == 0 and step > start_step`` or at the last step.

The train state is a pytree with ``step`` and ``params``, as openpi's ``TrainState``; the config
a dataclass with the ``TrainConfig`` fields the loop and the adapters read, its ``data`` a
torch_rlds config. Each run appends ``{"start": start_step}`` to ``--log``, then every trained
step ``{"step", "ids", "params"}`` (flushed and fsynced): the sample ids of the batch it trained
on and a digest of the params after it. Run: ``python tests/openpi_loop.py --dataset D --checkpoints C --log L [--resume]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

# The imports openpi's train.py has, with its two torch_rlds replacements.
import torch_rlds.adapters.openpi as _data_loader  # was: openpi.training.data_loader
import torch_rlds.adapters.orbax as _checkpoints  # was: openpi.training.checkpoints


@dataclasses.dataclass
class TrainConfig:
    """The fields of openpi's ``TrainConfig`` that its loop and the adapters read."""

    data: Any
    checkpoint_dir: str
    batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    num_train_steps: int = 14
    save_interval: int = 3
    keep_period: int | None = None
    overwrite: bool = False
    resume: bool = False


class TrainState:
    """``step`` and ``params``, a jax pytree (as openpi's ``TrainState``)."""

    def __init__(self, step: Any, params: Any) -> None:
        self.step, self.params = step, params

    def tree_flatten(self):
        return (self.step, self.params), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def main(config: TrainConfig, log_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.tree_util.register_pytree_node_class(TrainState)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())

    checkpoint_manager, resuming = _checkpoints.initialize_checkpoint_dir(
        config.checkpoint_dir, keep_period=config.keep_period, overwrite=config.overwrite,
        resume=config.resume)
    data_loader = _data_loader.create_data_loader(config, sharding=data_sharding, shuffle=True)
    data_iter = iter(data_loader)
    batch = next(data_iter)

    train_state = jax.device_put(TrainState(jnp.asarray(0, jnp.int32),
                                            jnp.zeros((3,), jnp.float32)), replicated)
    if resuming:
        train_state = _checkpoints.restore_state(checkpoint_manager, train_state, data_loader)

    @jax.jit
    def train_step(state: TrainState, batch: Any) -> TrainState:
        observation, actions = batch
        update = jnp.stack([actions.mean(), observation.state.mean(),
                            observation.meta["step_index"].astype(jnp.float32).mean()])
        return TrainState(state.step + 1, state.params * 0.5 + update)

    start_step = int(train_state.step)
    with open(log_path, "a") as log:
        log.write(json.dumps({"start": start_step}) + "\n")
        for step in range(start_step, config.num_train_steps):
            trained = batch
            train_state = train_step(train_state, batch)
            meta = jax.device_get(trained[0].meta)
            ids = [list(map(int, r)) for r in zip(meta["epoch"], meta["episode_index"],
                                                    meta["step_index"])]
            params = np.asarray(jax.device_get(train_state.params))
            log.write(json.dumps({"step": step, "ids": ids,
                                  "params": hashlib.blake2b(params.tobytes(),
                                                            digest_size=8).hexdigest()}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            batch = next(data_iter)
            if (step % config.save_interval == 0 and step > start_step) or (
                    step == config.num_train_steps - 1):
                _checkpoints.save_state(checkpoint_manager, train_state, data_loader, step)
    checkpoint_manager.wait_until_finished()
    data_loader.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=14)
    return parser


if __name__ == "__main__":
    args = _parser().parse_args(sys.argv[1:])
    from torch_rlds.config import load_config

    data = load_config("demo", [f"data.path={args.dataset}", "data.action_horizon=4",
                                "data.shuffle_window=2", "loader.num_workers=0"])
    main(TrainConfig(data=data, checkpoint_dir=args.checkpoints, resume=args.resume,
                     overwrite=not args.resume, num_train_steps=args.steps), args.log)
