"""``RLDSDataset``: step samples of an RLDS dataset as a resumable torch ``IterableDataset``."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data

from torch_rlds import _order
from torch_rlds._batch import BatchBuilder, Item
from torch_rlds._features import EpisodeDecodeError
from torch_rlds._images import ImageDecodeError
from torch_rlds._info import DatasetFormatError
from torch_rlds._state import MAX_INT, Cursor, load_cursor, make_state
from torch_rlds._tfrecord import TFRecordError
from torch_rlds._windows import EpisodeSampler
from torch_rlds.source import RLDSSource

if TYPE_CHECKING:
    from torch_rlds.keymap import KeyMap

logger = logging.getLogger(__name__)

ON_CORRUPT = ("raise", "skip")
# What makes an episode corrupt for on_corrupt="skip": a record that fails its CRC or ends early
# (TFRecordError), an unreadable array_record record (DatasetFormatError), one that does not parse
# under the features (EpisodeDecodeError), a frame whose header does not (ImageDecodeError).
CORRUPT_ERRORS = (TFRecordError, DatasetFormatError, EpisodeDecodeError, ImageDecodeError)
# One step of the stream: (sampler, step, epoch, cursor after it). A sampler of None is a
# marker: the cursor moves (past an empty window, at the end) without a sample.
_Plan = tuple[EpisodeSampler | None, int, int, Cursor]
# Samples made ahead per decode thread: enough to keep the threads busy while the consumer
# collates a batch of a few dozen.
_LOOKAHEAD = 16
# Threads chosen when decode_threads is None, at most: beyond that a process on a large machine
# would hold hundreds of samples ahead for little gain.
_MAX_THREADS = 8


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
    across all hosts and workers. Images are decoded only for the samples emitted, and only the
    frames their observation windows use.

    **State.** ``state_dict()`` is ``{"version", "fingerprint", "epoch", "window",
    "position", "skipped"}``: ints and strings, JSON-serialisable, a few hundred bytes whatever
    the window, the dataset or the step count. The cursor names the next step to emit: step
    ``position`` of the permutation of window ``window`` of ``epoch``; ``skipped`` counts the
    corrupt episodes this reader skipped so far (see "Corrupt episodes"; it only counts, the
    order does not depend on it). Because the order does not depend on
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

    **Batches.** With ``batch_size`` every item is a whole batch: ``batch_size`` consecutive
    samples of the same stream (the last one of a one-pass epoch shorter, or dropped with
    ``drop_last``), equal bit for bit to :func:`torch_rlds.collate` of those samples, and the
    state after a batch is the state after its last sample. It is built straight into one
    buffer (shared memory inside a DataLoader worker) with each frame decoded into its row and
    a frame that several of its samples show decoded once: no copy, little Python per sample.
    :class:`torch_rlds.DataLoader` with a ``batch_size`` batches this way by itself; give
    torch's own loaders the dataset (or :meth:`batched`) with ``batch_size=None``. A state
    saved by either form loads into the other: the cursor counts samples, not batches.

    **Threads.** Frames are decoded by ``decode_threads`` threads (simplejpeg releases the GIL)
    ahead of what the caller asked for: a few samples, or the next batch. While a window is
    emitted, the next one is read in a background thread, so two windows of encoded episodes
    are held at once. Neither changes what is emitted nor the state: work done ahead is
    dropped on a restore, errors surface at the sample (or batch) they belong to, and the
    state is always the cursor after the last item handed out.

    **Corrupt episodes.** With ``on_corrupt="raise"`` (the default) an episode that does not
    read raises: its file and byte offset are in the message. With ``on_corrupt="skip"`` an
    episode whose record fails its CRC, is truncated, does not parse, or holds a frame whose
    header does not parse or declares another size (every frame's header is checked when the
    episode is read) is left out of the window it belongs to, logged with ``logging.warning``
    naming file and offset, and counted in the state's ``skipped`` (once per epoch it is
    skipped in). Which episodes are skipped is a function of the data, so the stream, and
    resume, stay exact. A frame whose header is sound but whose compressed pixels are damaged
    is found only when a sample decodes it, and raises under either policy.

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
        It runs in the iterating thread.
      batch_size: emit batches of this many samples instead of samples (see "Batches").
      drop_last: with ``batch_size``, drop the short last batch of a one-pass epoch.
      decode_threads: threads that decode frames (>= 1; 1 decodes in the iterating thread).
        ``None``: the CPUs this process may run on, divided by the DataLoader's worker count,
        at most 8.
      on_corrupt: ``"raise"`` or ``"skip"`` (see "Corrupt episodes").
    """

    def __init__(self, source: RLDSSource | str | os.PathLike, split: str = "train", *,
                 obs_window: int = 1, action_horizon: int = 16,
                 observation_keys: Sequence[str] | None = None, action_key: str = "action",
                 language_key: str | None = "language_instruction", shuffle: bool = True,
                 seed: int = 0, shuffle_window: int = 16, repeat: bool = True,
                 process_index: int = 0, process_count: int = 1, fast_jpeg: bool = False,
                 data_dir: str | os.PathLike | None = None, key_map: KeyMap | None = None,
                 sample_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 batch_size: int | None = None, drop_last: bool = False,
                 decode_threads: int | None = None, on_corrupt: str = "raise") -> None:
        super().__init__()
        _check_positive("obs_window", obs_window)
        if batch_size is not None:
            _check_positive("batch_size", batch_size)
        if decode_threads is not None:
            _check_positive("decode_threads", decode_threads)
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {list(ON_CORRUPT)} (got {on_corrupt!r})")
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
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.decode_threads = decode_threads
        self.on_corrupt = on_corrupt
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
        # Where the next pass starts; a batching view shares it (see batching_view).
        self._progress = _Progress()

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
        return make_state(self.fingerprint(), self._progress.cursor)

    def _state_mark(self) -> Callable[[], dict[str, Any]]:
        """What :meth:`state_dict` returns now, made when called: a loader takes one before
        each batch, at no cost, and uses it only when the batch fails half way."""
        cursor = self._progress.cursor
        return lambda: make_state(self.fingerprint(), cursor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``; raises ``ValueError`` on mismatch.

        The next ``iter()`` continues the pass the state was saved in: with ``repeat=False`` it
        emits the rest of the state's epoch, nothing if this reader had finished it.
        """
        self._progress.cursor = self._check_state(state_dict, *self._reader()[2:])
        self._progress.resume = True

    def _check_state(self, state_dict: Any, num_workers: int, worker_index: int,
                     ended: bool = False) -> Cursor:
        """The cursor of ``state_dict`` if it belongs to worker ``worker_index`` of
        ``num_workers`` and names a step of the stream; raises ``ValueError`` naming every
        field that differs, or the field out of range.

        ``ended``: the state's iterator had ended (torchdata's ``fetcher_ended``), which only a
        one-pass dataset's reader at the end of its epoch can be. A cursor inside a window is
        checked against the window's steps, which takes reading the window: it is kept for
        the pass that resumes from the state in this process (or in a worker forked from it),
        so a restore still reads it once.
        """
        cursor = load_cursor(state_dict, self._fingerprint(num_workers, worker_index))
        reader, num_readers = self._reader_of(num_workers, worker_index)
        windows = _order.num_windows(
            _order.share_size(len(self.source), reader, num_readers), self.shuffle_window)
        if cursor.window > windows or (cursor.window == windows and cursor.position != 0):
            raise ValueError(f"state field 'window': {cursor.window} (position "
                             f"{cursor.position}) is past the end of reader {reader}'s "
                             f"{windows} windows")
        if ended and (self.repeat or cursor.window < windows):
            what = ("the stream of a repeat=True dataset never ends" if self.repeat else
                    f"reader {reader} is in window {cursor.window} of {windows}")
            raise ValueError(f"state field 'fetcher_ended' is true, but {what}")
        if cursor.position > 0:
            key = (reader, num_readers, cursor.epoch, cursor.window)
            episodes = _order.window_episodes(
                self._episodes(cursor.epoch, reader, num_readers), cursor.window,
                self.shuffle_window)
            window = self._read_window(episodes)
            steps = sum(s.num_steps for s in window[0])
            if cursor.position > steps:
                raise ValueError(f"state field 'position': {cursor.position} is past the end "
                                 f"of window {cursor.window} of epoch {cursor.epoch} ({steps} "
                                 "steps)")
            self._progress.windows[key] = window
        return cursor

    def batched(self, batch_size: int, *, drop_last: bool = False) -> RLDSDataset:
        """A copy of this dataset that emits batches of ``batch_size`` samples (see "Batches"),
        for ``DataLoader(..., batch_size=None)``.

        The copy shares the source and starts where this dataset would (a loaded state
        included); from then on each keeps its own state.
        """
        out = self.batching_view(batch_size, drop_last=drop_last)
        out._progress = _Progress(self._progress.cursor, self._progress.resume)
        return out

    def batching_view(self, batch_size: int, *, drop_last: bool = False) -> RLDSDataset:
        """This dataset emitting batches of ``batch_size`` samples (see "Batches"), with one
        cursor for both: iterating, :meth:`set_epoch` and :meth:`load_state_dict` on either
        move the other. What :class:`torch_rlds.DataLoader` iterates when given this dataset
        and a ``batch_size``."""
        _check_positive("batch_size", batch_size)
        out = copy.copy(self)
        out.batch_size = batch_size
        out.drop_last = bool(drop_last)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start from the beginning of ``epoch`` on the next ``iter()`` (drops any cursor but
        the count of skipped episodes)."""
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0 (got {epoch!r})")
        self._progress.cursor = Cursor(epoch=epoch, skipped=self._progress.cursor.skipped)
        self._progress.resume = False

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
        cursor, resume = self._progress.cursor, self._progress.resume
        self._progress.resume = False
        if not self.repeat and not resume and 0 < windows <= cursor.window:
            # The previous pass finished this epoch: a new pass is the next epoch.
            cursor = self._progress.cursor = Cursor(cursor.epoch + 1, skipped=cursor.skipped)
        return self._steps(reader, num_readers, windows, cursor)

    def _steps(self, reader: int, num_readers: int, windows: int,
               cursor: Cursor) -> Iterator[Any]:
        threads = self._threads()
        pool = None
        reads = _WindowReads(self._read_window)
        stop = _shutdown  # the module's globals may be gone when a generator left open closes
        try:
            if threads > 1:
                pool = concurrent.futures.ThreadPoolExecutor(
                    threads, thread_name_prefix="torch_rlds-decode")
            plans = self._plan(reader, num_readers, windows, cursor, reads)
            if self.batch_size is None:
                yield from self._samples(plans, pool, threads, reads)
            else:
                yield from self._batches(plans, BatchBuilder(
                    self.obs_window, self.action_horizon, fast_jpeg=self.fast_jpeg, pool=pool,
                    threads=threads, sample_transform=self.sample_transform), reads)
        finally:
            reads.close()
            if pool is not None:
                stop(pool)

    def _threads(self) -> int:
        if self.decode_threads is not None:
            return self.decode_threads
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        return max(1, min(_MAX_THREADS, cpus // workers))

    def _plan(self, reader: int, num_readers: int, windows: int, cursor: Cursor,
              reads: _WindowReads) -> Iterator[_Plan]:
        """The stream from ``cursor`` on: every step to emit, with the cursor after it.

        It runs ahead of what was emitted (the caller decodes ahead), so it never touches
        ``self._progress.cursor``; the caller sets that as it hands items out.
        """
        epoch, first_window, first_position = cursor.epoch, cursor.window, cursor.position
        skipped = cursor.skipped
        empty_epochs = 0
        while True:
            episodes = self._episodes(epoch, reader, num_readers)
            emitted = 0
            for window in range(first_window, windows):
                checked = self._progress.take_window((reader, num_readers, epoch, window))
                samplers, corrupt = checked or reads.get((epoch, window), _order.window_episodes(
                    episodes, window, self.shuffle_window))
                if window + 1 < windows:
                    following = (epoch, window + 1), _order.window_episodes(
                        episodes, window + 1, self.shuffle_window)
                elif self.repeat:
                    following = (epoch + 1, 0), _order.window_episodes(
                        self._episodes(epoch + 1, reader, num_readers), 0, self.shuffle_window)
                else:
                    following = None
                start = first_position if window == first_window else 0
                # A window's skipped episodes count once it is opened: a cursor inside it (a
                # position past 0) already holds them.
                if start == 0:
                    skipped += corrupt
                which, steps = _order.window_steps(
                    [s.num_steps for s in samplers], seed=self.seed, epoch=epoch,
                    shuffle=self.shuffle, reader=reader, window=window)
                if start > len(which):
                    raise ValueError(f"state field 'position': {start} is past the end of "
                                     f"window {window} of epoch {epoch} ({len(which)} steps)")
                # The cursor names the next step; past a window's last step it names the next
                # window, so a state never makes a resume read a consumed window.
                after = self._after_window(epoch, window, windows, skipped)
                last = len(which) - 1
                # The next window is read once half of this one is out: early enough to be
                # ready, late enough that a short-lived iterator (a restore that is checked
                # and dropped) does not read it for nothing.
                halfway = start + (len(which) - start) // 2
                for position, (k, t) in enumerate(zip(which[start:].tolist(),
                                                      steps[start:].tolist()), start):
                    if position == halfway and following is not None:
                        reads.prefetch(*following)
                    yield (samplers[k], t, epoch,
                           Cursor(epoch, window, position + 1, skipped=skipped)
                           if position < last else after)
                emitted += len(which) - start
                yield None, 0, 0, after
            if not self.repeat:
                return
            epoch, first_window, first_position = epoch + 1, 0, 0
            empty_epochs = empty_epochs + 1 if emitted == 0 else 0
            if empty_epochs > 1:
                raise ValueError(f"reader {reader} of {num_readers} emitted no step in two "
                                 "epochs: its episodes are all empty")

    def _episodes(self, epoch: int, reader: int, num_readers: int) -> np.ndarray:
        return _order.reader_episodes(len(self.source), seed=self.seed, epoch=epoch,
                                      shuffle=self.shuffle, reader=reader,
                                      num_readers=num_readers)

    def _samples(self, plans: Iterator[_Plan], pool: concurrent.futures.Executor | None,
                 threads: int, reads: _WindowReads) -> Iterator[dict[str, Any]]:
        """Samples of ``plans``, made up to a few ahead on ``pool``, cursor set as emitted.

        The first sample is made alone, and the next window is read only once it is out, so
        a restore waits for one window and one sample, no more.
        """
        args = (self.obs_window, self.action_horizon)
        ahead: collections.deque = collections.deque()
        depth = 1
        while True:
            while len(ahead) < depth:
                try:
                    plan = next(plans)
                except StopIteration:
                    break
                except Exception as error:  # the plan's own error, raised in its turn
                    ahead.append((None, error))
                    break
                sampler, t, epoch, cursor = plan
                if sampler is None:
                    ahead.append((cursor, None))
                elif pool is not None:
                    ahead.append((cursor, pool.submit(sampler.sample, t, *args, epoch,
                                                      fast_jpeg=self.fast_jpeg)))
                else:
                    ahead.append((cursor, (sampler, t, epoch)))
            if not ahead:
                return
            cursor, job = ahead.popleft()
            if cursor is None:
                raise job
            if job is None:
                self._progress.cursor = cursor
                continue
            if isinstance(job, concurrent.futures.Future):
                sample = job.result()
            else:
                sampler, t, epoch = job
                sample = sampler.sample(t, *args, epoch, fast_jpeg=self.fast_jpeg)
            if self.sample_transform is not None:
                sample = self.sample_transform(sample)
            self._progress.cursor = cursor
            yield sample
            reads.start()
            # Lookahead grows with what was consumed, so that an iterator dropped early did
            # at most as much work ahead as it handed out.
            depth = min(depth + 1, _LOOKAHEAD * threads) if pool is not None else 1

    def _batches(self, plans: Iterator[_Plan], builder: BatchBuilder,
                 reads: _WindowReads) -> Iterator[dict[str, Any]]:
        """Batches of ``plans``; with a pool the next batch is decoding while one is handed
        out (from the second batch on, so that a restore waits for one batch only)."""
        pending: collections.deque = collections.deque()
        depth = 1
        done = False
        while True:
            while not done and len(pending) < depth:
                items: list[Item] = []
                cursor = None
                try:
                    while len(items) < self.batch_size:
                        sampler, t, epoch, cursor = next(plans)
                        if sampler is not None:
                            items.append((sampler, t, epoch))
                except StopIteration:
                    done = True
                except Exception as error:  # the plan's own error, raised in its turn
                    pending.append((None, error))
                    done = True
                    break
                if items and not (done and self.drop_last and len(items) < self.batch_size):
                    try:
                        pending.append((cursor, builder.start(items)))
                    except Exception as error:
                        pending.append((None, error))
                        done = True
                elif cursor is not None:
                    pending.append((cursor, None))
            if not pending:
                return
            cursor, job = pending.popleft()
            if cursor is None:
                raise job
            batch = job.result() if job is not None else None
            self._progress.cursor = cursor
            if batch is not None:
                yield batch
                reads.start()
                depth = 2 if builder.pool is not None else 1

    def _after_window(self, epoch: int, window: int, windows: int, skipped: int) -> Cursor:
        if window + 1 < windows:
            return Cursor(epoch, window + 1, skipped=skipped)
        # After the epoch's last window: an endless stream goes on with the next epoch; a
        # one-pass dataset stays at the end of this one (see "Passes").
        return (Cursor(epoch + 1, skipped=skipped) if self.repeat
                else Cursor(epoch, windows, skipped=skipped))

    def _read_window(self, episodes: np.ndarray) -> tuple[list[EpisodeSampler], int]:
        """The samplers of ``episodes`` and how many were skipped as corrupt."""
        samplers = []
        for e in episodes.tolist():
            try:
                samplers.append(self._sampler(e))
            except CORRUPT_ERRORS as error:
                if self.on_corrupt == "raise":
                    raise
                logger.warning("torch_rlds: skipping corrupt episode %d of %s (%s): %s", e,
                               self.source.info.name, self.source.describe(e), error)
        return samplers, len(episodes) - len(samplers)

    def _sampler(self, episode_index: int) -> EpisodeSampler:
        episode = self.source.episode(episode_index)
        name = self.source.describe(episode_index)
        if self.key_map is not None:
            episode = self.key_map.apply(episode, name=name)
        return EpisodeSampler(episode, self.observation_keys, self.action_key, self.language_key,
                              episode_index, name, check_images=self.on_corrupt == "skip",
                              keep_recent=not self.shuffle and self.obs_window > 1)

    def __repr__(self) -> str:
        return (f"RLDSDataset({self.source!r}, obs_window={self.obs_window}, "
                f"action_horizon={self.action_horizon}, shuffle={self.shuffle}, "
                f"seed={self.seed}, shuffle_window={self.shuffle_window}, repeat={self.repeat}, "
                f"process {self.process_index}/{self.process_count})")


class _Progress:
    """Where a dataset's next pass starts: the cursor, whether it was loaded (resumed) rather
    than reached, and the windows that checking loaded states read (by reader, reader count,
    epoch and window), for the pass that starts there."""

    def __init__(self, cursor: Cursor | None = None, resume: bool = False) -> None:
        self.cursor = cursor if cursor is not None else Cursor()
        self.resume = resume
        self.windows: dict[tuple[int, int, int, int], tuple[list[EpisodeSampler], int]] = {}

    def take_window(self, key: tuple[int, int, int, int]
                    ) -> tuple[list[EpisodeSampler], int] | None:
        """The window ``key`` if a check read it; the others are dropped (a worker forked
        after the checks holds every worker's)."""
        window = self.windows.pop(key, None)
        self.windows.clear()
        return window

    def __getstate__(self) -> dict[str, Any]:
        # Read windows stay in this process: a worker started by pickling reads its own.
        return {**self.__dict__, "windows": {}}


class _WindowReads:
    """Reads windows of episodes with ``read``, the next one in a background thread.

    :meth:`prefetch` names the window to read ahead; :meth:`start` (called as an item is
    handed out) starts reading it; :meth:`get` returns a window, from that read when it is the
    same key, else read here. What is read never depends on timing, and an error of the read
    is raised by ``get``.
    """

    def __init__(self, read: Callable[[np.ndarray], Any]) -> None:
        self._read = read
        self._stop = _shutdown
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: tuple[Any, np.ndarray] | None = None
        self._pending: tuple[Any, concurrent.futures.Future] | None = None

    def get(self, key: Any, episodes: np.ndarray) -> Any:
        pending, self._pending = self._pending, None
        if self._next is not None and self._next[0] == key:
            self._next = None
        if pending is not None and pending[0] == key:
            return pending[1].result()
        if pending is not None:
            pending[1].cancel()
        return self._read(episodes)

    def prefetch(self, key: Any, episodes: np.ndarray) -> None:
        self._next = (key, episodes)

    def start(self) -> None:
        if self._next is None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="torch_rlds-read")
        key, episodes = self._next
        self._next = None
        self._pending = (key, self._executor.submit(self._read, episodes))

    def close(self) -> None:
        self._next = self._pending = None
        if self._executor is not None:
            self._stop(self._executor)


def _shutdown(executor: concurrent.futures.Executor,
              _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
    """Stop ``executor`` without waiting; at interpreter exit, when the modules it needs may
    be gone already, its threads are left to the interpreter."""
    if not _finalizing():
        executor.shutdown(wait=False, cancel_futures=True)


def _check_positive(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
