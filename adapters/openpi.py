"""The openpi-style data loader API: ``create_data_loader`` yielding ``(observation, actions)``.

An openpi-style training script keeps its loop::

    loader = create_data_loader(config, sharding=sharding, persistent_iterator=True)
    if resuming:
        loader.load_dataloader_state(checkpoint_dir)
    for observation, actions in loader:
        ...
        loader.save_dataloader_state(checkpoint_dir)

**openpi's own loop** (``scripts/train.py``) runs as it is, with its two imports of
``openpi.training.data_loader`` and ``openpi.training.checkpoints`` replaced by this module and
:mod:`torch_rlds.adapters.orbax`, given a ``TrainConfig`` whose ``data`` is a torch_rlds
config (``data=torch_rlds.load_config("bridge")``, or a config name). That loop takes its
first batch before it restores a checkpoint and fetches each next batch before it saves, and
it resumes exactly all the same: :func:`create_data_loader` resumes the stream from the
latest checkpoint of ``config.checkpoint_dir`` when ``config.resume`` is set (so the first
batch is the one the checkpoint held), :func:`torch_rlds.adapters.orbax.save_state` saves the
position before the batch the loop holds (its train state's ``step`` says how many batches it
trained on), and :func:`torch_rlds.adapters.orbax.restore_state` finds the loader there
already. A restore into a loader that handed out batches from anywhere else is refused, naming
the fix, rather than training on a batch the checkpoint does not hold.

``observation.state`` is ``(B, obs_window, S)``, ``observation.images[camera]`` is
``(B, obs_window, H, W, C)``, ``actions`` is ``(B, action_horizon, A)``. ``B`` is the global batch
with a ``sharding`` (global ``jax.Array`` s), this process's part of it without one (numpy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds.adapters._common import (
    DATA_LOADER_ITEM,
    latest_data_loader_step,
    loader_processes,
    state_filename,
    state_path,
    topology_free,
)
from torch_rlds.adapters._prefetch import StatefulPrefetcher
from torch_rlds.loader import to_numpy

__all__ = ["Observation", "OpenpiDataLoader", "create_data_loader"]

_PERSISTENT_ONLY = "Dataloader must be created with persistent_iterator=True"


@dataclasses.dataclass(frozen=True)
class Observation:
    """One batch of observations, openpi's ``Observation`` reshaped for observation windows.

    Attributes:
      images: camera -> ``(B, obs_window, H, W, C)`` (uint8 for JPEG/PNG cameras).
      image_masks: camera -> bool ``(B, obs_window)``, ``True`` on real frames, ``False`` on the
        frames repeated before an episode's first step.
      state: ``(B, obs_window, S)`` float32.
      action_is_pad: bool ``(B, action_horizon)``, ``True`` where the action chunk runs past the
        episode's end (the loss should skip those actions). It rides here because an
        openpi-style loop unpacks exactly ``(observation, actions)``.
      meta: ``episode_index``, ``step_index``, ``epoch`` of every sample ``(B,)``.
      prompt: the language instruction of every sample (host-side strings).

    With jax imported it is a pytree whose leaves are the arrays; ``prompt`` is not a leaf (jax
    cannot trace strings) and comes back ``None`` from a jax transformation: tokenize it first.
    """

    images: dict[str, Any]
    image_masks: dict[str, Any]
    state: Any
    action_is_pad: Any = None
    meta: dict[str, Any] | None = None
    prompt: list[str] | None = None


_ARRAY_FIELDS = ("images", "image_masks", "state", "action_is_pad", "meta")
_registered = False


def _register_pytree() -> None:
    global _registered
    if _registered:
        return
    import jax

    def flatten(obs: Observation):
        return [getattr(obs, f) for f in _ARRAY_FIELDS], None

    def unflatten(_: Any, children: Sequence[Any]) -> Observation:
        return Observation(**dict(zip(_ARRAY_FIELDS, children)))

    jax.tree_util.register_pytree_node(Observation, flatten, unflatten)
    _registered = True


class _Restructure:
    """A torch_rlds batch -> ``{"observation": {...}, "actions": ...}`` of numpy arrays.

    Cameras are the observation arrays of rank 5, ``(B, obs_window, H, W, C)``, whatever the
    dataset's key map names them; ``state_keys`` must name other observation arrays.
    """

    def __init__(self, state_keys: Sequence[str], dataset_name: str) -> None:
        self.state_keys = tuple(state_keys)
        self.dataset_name = dataset_name

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = to_numpy(batch)
        observation = batch["observation"]
        cameras = [k for k, v in observation.items() if getattr(v, "ndim", 0) == 5]
        missing = [k for k in self.state_keys if k not in observation or k in cameras]
        if missing or not self.state_keys:
            usable = sorted(k for k in observation if k not in cameras)
            raise ValueError(f"state_key {missing or list(self.state_keys)}: not a non-image "
                             f"observation of {self.dataset_name} (its observations: {usable}); "
                             "pass state_key= one of them, or a list of them to concatenate")
        real = ~np.asarray(batch["observation_is_pad"])
        states = [np.asarray(observation[k], dtype=np.float32) for k in self.state_keys]
        states = [s.reshape(*s.shape[:2], -1) for s in states]
        return {
            "observation": {
                "images": {c: observation[c] for c in cameras},
                "image_masks": {c: real for c in cameras},
                "state": states[0] if len(states) == 1 else np.concatenate(states, axis=-1),
                "action_is_pad": batch["action_is_pad"],
                "meta": batch["meta"],
                "prompt": batch.get("language_instruction"),
            },
            "actions": batch["action"],
        }


class OpenpiDataLoader:
    """What :func:`create_data_loader` returns: iterate it for ``(observation, actions)``.

    **Persistent iterator.** With ``persistent_iterator=True`` every ``iter()`` continues one
    stream, and the stream's position is saved and loaded any number of times
    (:meth:`save_dataloader_state`, :meth:`load_dataloader_state`); a loaded state continues
    after the last batch handed out before the save, whatever was prefetched. Otherwise each
    ``iter()`` starts the stream over from its beginning (the same batches again; another
    ``seed`` gives another order) and saving or loading raises ``ValueError``. Either way the
    stream goes on over epochs (a new pass of the loader when one ends), up to ``num_batches``
    per ``iter()`` when given.

    **State.** One JSON file per process, ``process_{i}-of-{n}.json``, the torch_rlds loader state
    (cursors and counters, about a kilobyte); it is also what :meth:`state_dict` returns, so the
    loader fits the orbax adapter (``DataLoaderSave(loader)``). :attr:`resumed_step` is the
    checkpoint step it resumed from when it was made (see the module docstring), else
    ``None``. Not thread-safe.
    """

    def __init__(self, config: Any, loader: Any, *, sharding: Any = None,
                 persistent_iterator: bool = False, num_batches: int | None = None,
                 prefetch: int = 2, state_key: str | Sequence[str] = "state") -> None:
        if num_batches is not None and (type(num_batches) is not int or num_batches < 0):
            raise ValueError(f"num_batches must be None or an int >= 0 (got {num_batches!r})")
        self._config = config
        self.loader = loader
        self.sharding = sharding
        self.persistent_iterator = bool(persistent_iterator)
        self.num_batches = num_batches
        self.resumed_step: int | None = None
        self._initial_state: dict[str, Any] | None = None
        self.process_index, self.process_count = loader_processes(loader)
        info = getattr(getattr(loader.dataset, "source", None), "info", None)
        keys = (state_key,) if isinstance(state_key, str) else tuple(state_key)
        restructure = _Restructure(keys, getattr(info, "name", "the dataset"))
        if sharding is None:
            self._stream = StatefulPrefetcher(loader, restructure, prefetch, name="openpi")
        else:
            from torch_rlds.adapters.jax import JaxLoader

            _register_pytree()
            self._stream = JaxLoader(loader, sharding, prefetch, preprocess=restructure)

    def data_config(self) -> Any:
        """The torch_rlds :class:`~torch_rlds.config.Config` this loader was made from."""
        return self._config

    def __iter__(self) -> Iterator[tuple[Observation, Any]]:
        if not self.persistent_iterator:
            if self._initial_state is None:
                self._initial_state = self._stream.state_dict()
            else:
                self._stream.load_state_dict(self._initial_state)
        yielded = 0
        while self.num_batches is None or yielded < self.num_batches:
            got_one = False
            for batch in self._stream:
                got_one = True
                yield Observation(**batch["observation"]), batch["actions"]
                yielded += 1
                if self.num_batches is not None and yielded >= self.num_batches:
                    return
            if not got_one:  # an empty pass: nothing more will come
                return

    # -- state -----------------------------------------------------------------------------
    def get_batches_seen(self) -> int:
        """Batches handed out since the start of the stream, restored with the state."""
        ours = self._stream.state_dict().get("torch_rlds", {})
        return int(ours.get("batches_seen", self._stream.batches_received))

    @property
    def batches_received(self) -> int:
        """Batches this object handed out since it was made (not restored with the state)."""
        return self._stream.batches_received

    def state_dict(self, *, held: int = 0) -> dict[str, Any]:
        """The loader state after the last batch handed out (JSON-safe); with ``held=1``, the
        state before it (the caller holds that batch, not yet used: a resume hands it out
        again first)."""
        return self._stream.state_dict(held=held)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue after the batch ``state_dict`` was taken after."""
        self._stream.load_state_dict(state_dict)

    def save_dataloader_state(self, directory: str | os.PathLike) -> str:
        """Write this process's state to ``directory/process_{i}-of-{n}.json`` (atomically)
        and return that path."""
        if not self.persistent_iterator:
            raise ValueError(_PERSISTENT_ONLY)
        path = os.path.join(os.fspath(directory),
                            state_filename(self.process_index, self.process_count))
        write_json_atomic(epath.Path(path), self.state_dict())
        return path

    def load_dataloader_state(self, directory: str | os.PathLike) -> int:
        """Load this process's state from ``directory``; returns the batches seen before it.

        Raises ``FileNotFoundError("No checkpoint found in <directory>")`` when there is no
        state, and ``ValueError`` when the states there belong to another process count.
        """
        if not self.persistent_iterator:
            raise ValueError(_PERSISTENT_ONLY)
        path = state_path(directory, self.process_index, self.process_count,
                          any_process=topology_free(self))
        self.load_state_dict(read_json(path))
        return self.get_batches_seen()

    def resume_from(self, checkpoint_dir: str | os.PathLike) -> int | None:
        """Load this process's loader state from the latest step of ``checkpoint_dir`` (an
        orbax ``CheckpointManager`` directory) that holds one, and return that step (``None``
        when there is none: the stream starts at its beginning)."""
        step = latest_data_loader_step(checkpoint_dir)
        if step is None:
            return None
        self.load_dataloader_state(epath.Path(checkpoint_dir) / str(step) / DATA_LOADER_ITEM)
        self.resumed_step = step
        return step

    def close(self) -> None:
        """Stop the prefetch thread (the state stays that of the last batch handed out)."""
        self._stream.close()


def create_data_loader(config: Any, *, sharding: Any = None, shuffle: bool | None = None,
                       seed: int | None = None, persistent_iterator: bool | None = None,
                       num_batches: int | None = None, batch_size: int | None = None,
                       num_workers: int | None = None, prefetch: int = 2,
                       state_key: str | Sequence[str] = "state",
                       resume_from: str | os.PathLike | None = None) -> OpenpiDataLoader:
    """An openpi-style loader of ``(observation, actions)`` batches (see
    :class:`OpenpiDataLoader` and :class:`Observation`).

    Args:
      config: a :class:`torch_rlds.config.Config`, a config name or YAML path, or an
        openpi-style ``TrainConfig``: one whose ``data`` is any of those, with
        ``batch_size``, ``num_workers``, ``seed``, ``checkpoint_dir`` and ``resume`` (see the
        module docstring); its ``batch_size``, ``num_workers`` and ``seed`` replace the torch_rlds
        config's.
      sharding: a ``jax.sharding.Sharding`` to get global ``jax.Array`` batches (the global batch
        is ``loader.batch_size``); ``None`` gives this process's numpy batch (no jax import).
      shuffle, seed: replace the config's ``data.shuffle`` and ``data.seed`` when given;
        otherwise the config's stand.
      persistent_iterator: one continuing, saveable stream over every ``iter()``. ``None``: on
        for a ``TrainConfig`` (openpi's loop saves and restores it), off otherwise.
      num_batches: stop each ``iter()`` after this many batches (``None``: endless over epochs).
      batch_size, num_workers: replace the config's ``loader.batch_size`` (global) and
        ``loader.num_workers`` when given.
      prefetch: batches prepared ahead in a background thread (0: none).
      state_key: the observation key of ``observation.state``, or keys to concatenate.
      resume_from: an orbax checkpoint directory to resume the stream from before the first
        batch (:meth:`OpenpiDataLoader.resume_from`); a ``TrainConfig`` with ``resume`` set
        gives its ``checkpoint_dir``.

    The process index and count come from jax, else torch.distributed, else 0 of 1, unless the
    config sets them; the global batch must divide by the process count.
    """
    from torch_rlds.config import Config, load_config

    train = None if isinstance(config, (Config, str, os.PathLike)) else config
    if train is not None:
        if not hasattr(train, "data"):
            raise TypeError(f"config must be a torch_rlds Config, a config name or YAML path, or "
                            f"a TrainConfig with a torch_rlds config as its data (got "
                            f"{type(train).__name__})")
        config = train.data
        batch_size = getattr(train, "batch_size", None) if batch_size is None else batch_size
        num_workers = (getattr(train, "num_workers", None) if num_workers is None
                       else num_workers)
        seed = getattr(train, "seed", None) if seed is None else seed
        if persistent_iterator is None:
            persistent_iterator = True
        if (resume_from is None and getattr(train, "resume", False)
                and not getattr(train, "overwrite", False)):
            resume_from = getattr(train, "checkpoint_dir", None)
    if not isinstance(config, Config):
        config = load_config(os.fspath(config))
    data = config.data
    if shuffle is not None:
        data = dataclasses.replace(data, shuffle=bool(shuffle))
    if seed is not None:
        data = dataclasses.replace(data, seed=seed)
    loader_config = config.loader
    if batch_size is not None:
        loader_config = dataclasses.replace(loader_config, batch_size=batch_size)
    if num_workers is not None:
        loader_config = dataclasses.replace(loader_config, num_workers=num_workers)
    config = dataclasses.replace(config, data=data, loader=loader_config)
    index, count = config.processes()
    loader = config.make_loader(index, count, as_numpy=True)
    out = OpenpiDataLoader(config, loader, sharding=sharding,
                           persistent_iterator=bool(persistent_iterator),
                           num_batches=num_batches, prefetch=prefetch, state_key=state_key)
    if resume_from is not None:
        if not out.persistent_iterator:
            raise ValueError(f"resume_from needs persistent_iterator=True ({_PERSISTENT_ONLY})")
        out.resume_from(resume_from)
    return out
