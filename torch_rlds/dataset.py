"""``RLDSDataset``: step samples of an RLDS dataset as a resumable torch ``IterableDataset``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch.utils.data

from torch_rlds import _order
from torch_rlds._state import MAX_INT, Cursor, load_cursor, make_state
from torch_rlds._windows import EpisodeSampler
from torch_rlds.source import RLDSSource

if TYPE_CHECKING:
    from torch_rlds.keymap import KeyMap


class RLDSDataset(torch.utils.data.IterableDataset):
    """Step samples of an RLDS split, in a seeded order, with a state of a few hundred bytes.

    **A sample** is a dict::

        {"observation": {key: [obs_window, ...]},      # images decoded to [obs_window, H, W, C]
         "observation_is_pad": bool [obs_window],
         "action": float32 [action_horizon, A],
         "action_is_pad": bool [action_horizon],
         "language_instruction": str,
         "meta": {"episode_index", "step_index", "epoch"}}   # int64 scalars

    Before an episode's first step the observation window repeats step 0; past its last step
    the action chunk repeats the last action; the masks are ``True`` exactly on those repeated
    entries (repeating real values keeps padded inputs in range; losses should use the masks).

    **Order.** A pure function of (seed, epoch, host, worker): each epoch permutes the episodes
    (``shuffle=True``) and reader ``process_index * W + worker`` of ``process_count * W`` takes
    every such episode in turn (``W`` is the DataLoader's worker count, 1 without workers). A
    reader cuts its share into windows of ``shuffle_window`` episodes and emits every step of a
    window in a seeded permutation. Every step of every episode appears exactly once per epoch
    across all hosts and workers. Images are decoded when a sample is emitted, and only the
    frames its observation window uses.

    **State.** ``state_dict()`` is ``{"version", "fingerprint", "epoch", "window",
    "position"}``: ints and strings, JSON-serialisable, a few hundred bytes whatever the window,
    the dataset or the step count. The cursor names the next step to emit: step ``position`` of
    the permutation of window ``window`` of ``epoch``. Because the order does not depend on
    progress, the cursors of all readers name exactly which steps of an epoch were consumed,
    also for a later resume under another worker or host count. The fingerprint (dataset name,
    version, split and episode count, seed, shuffle, obs_window, action_horizon,
    shuffle_window, process index and count, worker count and index) must match on
    ``load_state_dict``; every difference is named in the ``ValueError`` with both values.
    Restoring reads one window of episodes, never a replay. The format is versioned; a state of
    another version is refused, never misread.

    **Passes.** Every ``iter()`` is a pass. With ``repeat=True`` a pass is endless and continues
    from the cursor. With ``repeat=False`` a pass is (the rest of) one epoch: the first
    ``iter()`` after ``load_state_dict`` emits the rest of the saved epoch (nothing if this
    reader had finished it, as happens to a worker whose share ran out before the others'); any
    other ``iter()`` continues an unfinished epoch, or starts the next epoch once the previous
    pass finished it. So repeated passes give epochs 0, 1, 2... (:meth:`set_epoch` picks
    another start), and a pass that was saved and restored ends where the uninterrupted one
    would have.

    Under ``torch.utils.data.DataLoader`` workers each hold a copy; one object is not meant to
    be iterated from two threads, nor by two live iterators, at once.

    Args:
      source: an :class:`RLDSSource`, or a dataset path (with ``split`` and ``data_dir``).
      split: the TFDS split expression when ``source`` is a path.
      obs_window: observation steps per sample (>= 1).
      action_horizon: actions per sample (>= 1).
      observation_keys: keys under ``steps/observation`` to emit (default: all but text).
      action_key: the action tensor under ``steps``.
      language_key: the instruction under ``steps`` (``None`` gives ``""``).
      shuffle: permute episodes and steps; otherwise episodes and steps come in order.
      seed: the order's seed (>= 0).
      shuffle_window: episodes whose steps are mixed together (>= 1).
      repeat: an endless stream over epochs (training) or one pass.
      process_index, process_count: this host's part of every epoch.
      fast_jpeg: decode JPEG with the fast DCT (the pixels of ``tf.io.decode_jpeg``) instead of
        the accurate one (the pixels of TFDS's numpy decoding).
      data_dir: the TFDS data directory when ``source`` is a dataset name.
      key_map: a :class:`torch_rlds.KeyMap` that turns each decoded episode into the standard
        layout (``observation/state``, ``observation/image_<role>``, ``action``,
        ``language_instruction``) before sampling; it is checked against the features on
        construction, and ``observation_keys``, ``action_key`` and ``language_key`` then follow
        from it.
      sample_transform: a function applied to every sample before it is emitted (resize,
        augmentation, normalisation...). It must be a pure function of the sample (the sample's
        ``meta`` carries epoch, episode and step for seeded randomness) so resume stays exact.
    """

    def __init__(self, source: RLDSSource | str | os.PathLike, split: str = "train", *,
                 obs_window: int = 1, action_horizon: int = 16,
                 observation_keys: Sequence[str] | None = None, action_key: str = "action",
                 language_key: str | None = "language_instruction", shuffle: bool = True,
                 seed: int = 0, shuffle_window: int = 16, repeat: bool = True,
                 process_index: int = 0, process_count: int = 1, fast_jpeg: bool = False,
                 data_dir: str | os.PathLike | None = None, key_map: KeyMap | None = None,
                 sample_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> None:
        super().__init__()
        _check_positive("obs_window", obs_window)
        _check_positive("action_horizon", action_horizon)
        _check_positive("shuffle_window", shuffle_window)
        _check_positive("process_count", process_count)
        if type(seed) is not int or not 0 <= seed <= MAX_INT:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1] (got {seed!r})")
        if type(process_index) is not int or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}) (got "
                             f"{process_index!r})")
        if not isinstance(source, RLDSSource):
            source = RLDSSource(source, split, data_dir=data_dir)
        self.source = source
        self.obs_window = obs_window
        self.action_horizon = action_horizon
        self.action_key = action_key
        self.language_key = language_key
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.repeat = bool(repeat)
        self.process_index = process_index
        self.process_count = process_count
        self.fast_jpeg = bool(fast_jpeg)
        self.key_map = key_map
        self.sample_transform = sample_transform
        if key_map is not None:
            if observation_keys is not None:
                raise ValueError("observation_keys must be None with a key_map (the key map "
                                 "names the observations)")
            key_map.validate(source)
            self.observation_keys = key_map.observation_keys()
            self.action_key = "action"
            self.language_key = "language_instruction" if key_map.language_key else None
        else:
            self.observation_keys = tuple(observation_keys) if observation_keys is not None else (
                self._default_observation_keys())
            self._check_keys(language_explicit=language_key != "language_instruction")
        self._cursor = Cursor()
        self._resume = False

    def _default_observation_keys(self) -> tuple[str, ...]:
        prefix = ("steps", "observation")
        return tuple("/".join(leaf.path[2:]) for leaf in self.source.leaves()
                     if leaf.path[:2] == prefix and leaf.kind != "text")

    def _check_keys(self, language_explicit: bool) -> None:
        available = {"/".join(leaf.path[1:]): leaf for leaf in self.source.leaves()
                     if leaf.per_step}
        observation = sorted(k[len("observation/"):] for k in available
                             if k.startswith("observation/"))
        for key in self.observation_keys:
            if f"observation/{key}" not in available:
                raise ValueError(f"observation key {key!r} is not a feature of "
                                 f"{self.source.info.name} (observation keys: {observation})")
        if self.action_key not in available:
            raise ValueError(f"action_key {self.action_key!r} is not a step feature of "
                             f"{self.source.info.name} (step features: {sorted(available)})")
        if self.language_key is not None and self.language_key not in available:
            if language_explicit:
                raise ValueError(f"language_key {self.language_key!r} is not a step feature of "
                                 f"{self.source.info.name} (step features: {sorted(available)})")
            self.language_key = None  # the RLDS default name is optional

    # -- reader identity -------------------------------------------------------------------
    def _reader(self) -> tuple[int, int, int, int]:
        """(reader, num_readers, num_workers, worker_index) in the current process."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (0, 0)
        return (*self._reader_of(workers, worker), workers, worker)

    def _reader_of(self, num_workers: int, worker_index: int) -> tuple[int, int]:
        per_host = max(num_workers, 1)
        return self.process_index * per_host + worker_index, self.process_count * per_host

    def fingerprint(self) -> dict[str, Any]:
        """What a state must match to be loaded into this dataset in this process."""
        _, _, workers, worker = self._reader()
        return self._fingerprint(workers, worker)

    def _fingerprint(self, num_workers: int, worker_index: int) -> dict[str, Any]:
        info = self.source.info
        return {
            "dataset": info.name,
            "dataset_version": info.version,
            "split": self.source.split,
            "num_episodes": len(self.source),
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "obs_window": self.obs_window,
            "action_horizon": self.action_horizon,
            "shuffle_window": self.shuffle_window,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_workers": num_workers,
            "worker_index": worker_index,
        }

    # -- Stateful protocol -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reader's position (see the class docstring); JSON-serialisable."""
        return make_state(self.fingerprint(), self._cursor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``; raises ``ValueError`` on mismatch.

        The next ``iter()`` continues the pass the state was saved in: with ``repeat=False`` it
        emits the rest of the state's epoch, nothing if this reader had finished it.
        """
        self._cursor = self._check_state(state_dict, *self._reader()[2:])
        self._resume = True

    def _check_state(self, state_dict: Any, num_workers: int, worker_index: int) -> Cursor:
        """The cursor of ``state_dict`` if it belongs to worker ``worker_index`` of
        ``num_workers``; raises ``ValueError`` naming every field that differs."""
        cursor = load_cursor(state_dict, self._fingerprint(num_workers, worker_index))
        reader, num_readers = self._reader_of(num_workers, worker_index)
        windows = _order.num_windows(
            _order.share_size(len(self.source), reader, num_readers), self.shuffle_window)
        if cursor.window > windows or (cursor.window == windows and cursor.position != 0):
            raise ValueError(f"state field 'window': {cursor.window} (position "
                             f"{cursor.position}) is past the end of reader {reader}'s "
                             f"{windows} windows")
        return cursor

    def set_epoch(self, epoch: int) -> None:
        """Start from the beginning of ``epoch`` on the next ``iter()`` (drops any cursor)."""
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0 (got {epoch!r})")
        self._cursor = Cursor(epoch=epoch)
        self._resume = False

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A pass: see "Passes" in the class docstring. Where it starts is decided here."""
        reader, num_readers, _, _ = self._reader()
        num_episodes = len(self.source)
        if self.repeat and num_episodes < num_readers:
            raise ValueError(
                f"{num_readers} readers (process_count {self.process_count} x workers) but the "
                f"split has {num_episodes} episodes: reader {reader} would have none; use fewer "
                "workers or processes"
            )
        windows = _order.num_windows(_order.share_size(num_episodes, reader, num_readers),
                                     self.shuffle_window)
        cursor, resume = self._cursor, self._resume
        self._resume = False
        if not self.repeat and not resume and 0 < windows <= cursor.window:
            # The previous pass finished this epoch: a new pass is the next epoch.
            cursor = self._cursor = Cursor(cursor.epoch + 1)
        return self._steps(reader, num_readers, windows, cursor)

    def _steps(self, reader: int, num_readers: int, windows: int,
               cursor: Cursor) -> Iterator[dict[str, Any]]:
        num_episodes = len(self.source)
        epoch, first_window, first_position = cursor.epoch, cursor.window, cursor.position
        empty_epochs = 0
        while True:
            episodes = _order.reader_episodes(
                num_episodes, seed=self.seed, epoch=epoch, shuffle=self.shuffle, reader=reader,
                num_readers=num_readers)
            emitted = 0
            for window in range(first_window, windows):
                samplers = [self._sampler(int(e)) for e in
                            _order.window_episodes(episodes, window, self.shuffle_window)]
                which, steps = _order.window_steps(
                    [s.num_steps for s in samplers], seed=self.seed, epoch=epoch,
                    shuffle=self.shuffle, reader=reader, window=window)
                start = first_position if window == first_window else 0
                if start > len(which):
                    raise ValueError(f"state field 'position': {start} is past the end of "
                                     f"window {window} of epoch {epoch} ({len(which)} steps)")
                for position in range(start, len(which)):
                    sample = samplers[which[position]].sample(
                        int(steps[position]), self.obs_window, self.action_horizon, epoch,
                        fast_jpeg=self.fast_jpeg)
                    if self.sample_transform is not None:
                        sample = self.sample_transform(sample)
                    # The cursor names the next step; past a window's last step it names the
                    # next window, so a state never makes a resume read a consumed window.
                    if position + 1 < len(which):
                        self._cursor = Cursor(epoch, window, position + 1)
                    else:
                        self._cursor = self._after_window(epoch, window, windows)
                    emitted += 1
                    yield sample
                self._cursor = self._after_window(epoch, window, windows)
            if not self.repeat:
                return
            epoch, first_window, first_position = epoch + 1, 0, 0
            self._cursor = Cursor(epoch)
            empty_epochs = empty_epochs + 1 if emitted == 0 else 0
            if empty_epochs > 1:
                raise ValueError(f"reader {reader} of {num_readers} emitted no step in two "
                                 "epochs: its episodes are all empty")

    def _after_window(self, epoch: int, window: int, windows: int) -> Cursor:
        if window + 1 < windows:
            return Cursor(epoch, window + 1)
        # After the epoch's last window: an endless stream goes on with the next epoch; a
        # one-pass dataset stays at the end of this one (see "Passes").
        return Cursor(epoch + 1) if self.repeat else Cursor(epoch, windows)

    def _sampler(self, episode_index: int) -> EpisodeSampler:
        episode = self.source.episode(episode_index)
        name = self.source.describe(episode_index)
        if self.key_map is not None:
            episode = self.key_map.apply(episode, name=name)
        return EpisodeSampler(episode, self.observation_keys, self.action_key, self.language_key,
                              episode_index, name)

    def __repr__(self) -> str:
        return (f"RLDSDataset({self.source!r}, obs_window={self.obs_window}, "
                f"action_horizon={self.action_horizon}, shuffle={self.shuffle}, "
                f"seed={self.seed}, shuffle_window={self.shuffle_window}, repeat={self.repeat}, "
                f"process {self.process_index}/{self.process_count})")


def _check_positive(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
