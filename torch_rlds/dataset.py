"""``RLDSDataset``: step samples of an RLDS dataset as a resumable torch ``IterableDataset``."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data

from torch_rlds._batch import BatchBuilder, Item
from torch_rlds._global_stream import GlobalStream
from torch_rlds._info import DatasetFormatError
from torch_rlds._state import MAX_INT
from torch_rlds._step_index import NotStepAddressable
from torch_rlds._step_reader import IndexBuilder, StepFiles
from torch_rlds._window_stream import WindowStream, shutdown
from torch_rlds._windows import EpisodeSampler
from torch_rlds.source import RLDSSource

if TYPE_CHECKING:
    from torch_rlds.keymap import KeyMap

logger = logging.getLogger(__name__)

ON_CORRUPT = ("raise", "skip")
ORDERS = ("auto", "global", "window")
# One step of the stream: (sampler, step, epoch, cursor after it). A sampler of None is a
# marker: the cursor moves (past an empty window, at the end) without a sample.
_Plan = tuple[EpisodeSampler | None, int, int, Any]
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

    **Order** (``order``). Two, each a pure function of the seed and the data:

    * ``"global"``: every step of the split in one keyed permutation per epoch
      (:mod:`torch_rlds._global_order`: i.i.d.-like shuffling at any dataset size, in O(1)
      memory), cut into global batches of ``batch_size * process_count`` samples; host ``p``
      takes its slice of each, and DataLoader worker ``w`` of ``W`` makes its host's batches
      ``w, w + W, ...``, the order in which the DataLoader hands them out. The sequence of
      global batches therefore does not depend on the hosts or workers, and a state saved
      under one topology resumes under any other (bit-identical global batches with the same
      global batch size; with another, every step of the epoch exactly once). A sample reads
      only the steps it needs, by byte range, through the step index
      (:mod:`torch_rlds._step_index`, built in the background the first time a dataset is
      read; until then whole records are read, with the same result). Needs tfrecord shards.
    * ``"window"``: each epoch permutes the episodes and reader ``process_index * W + worker``
      of ``process_count * W`` takes every such episode in turn, cuts its share into windows
      of ``shuffle_window`` episodes and emits every step of a window in a seeded permutation.
      Episodes are read whole, once per window: the order for media where random reads are
      slow (array_record shards, object stores). A state resumes under the same hosts and
      workers only.
    * ``"auto"`` (the default): ``"global"`` for local tfrecord datasets, else ``"window"``.

    Either way every step of every episode appears exactly once per epoch across all hosts
    and workers, and images are decoded only for the samples emitted, and only the frames
    their observation windows use.

    **State.** ``state_dict()`` holds ints and strings, JSON-serialisable, a few hundred bytes
    whatever the dataset, the shuffle or the step count, versioned (a state of another version
    is refused, never misread). Under the global order it is ``{"version": 2, "order":
    "global", "fingerprint", "start", "batch_size", "done", "skipped"}``: the stream this reader
    reads starts at sample ``start``, in global batches of ``batch_size``, and ``done`` is the
    host batch after the last one it handed out; its fingerprint (dataset, version, split,
    episode and step counts, seed, shuffle, obs_window, action_horizon, recipe) names no host
    or worker. Under the window order it is ``{"version": 1, "fingerprint", "epoch",
    "window", "position", "skipped"}``: step ``position`` of the permutation of window
    ``window`` of ``epoch``, with a fingerprint that also names the process index and count
    and the worker count and index. ``skipped`` counts the corrupt episodes (window order) or
    samples (global order) this reader skipped (see "Corrupt episodes"). Every fingerprint
    field must match on ``load_state_dict``; every difference is named in the ``ValueError``
    with both values. Restoring reads one batch's samples (global order) or one window of
    episodes (window order), never a replay.

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
    episode is read) is logged with ``logging.warning`` naming file and offset, and counted in
    the state's ``skipped``: under the window order it is left out of its window; under the
    global order each of its samples is replaced by the sample at the same position of the next
    epoch (of the epoch after, if that one is corrupt too). Which episodes are skipped is a
    function of the data, so the stream, and resume, stay exact. A frame whose header is sound
    but whose compressed pixels are damaged is found only when a sample decodes it, and raises
    under either policy.

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
      order: ``"global"``, ``"window"`` or ``"auto"`` (see "Order"). ``shuffle_window`` applies
        to the window order only.
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
                 decode_threads: int | None = None, on_corrupt: str = "raise",
                 order: str = "auto") -> None:
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
        # Samples per host batch when this dataset emits samples (see sampling_view).
        self._host_batch = 1
        # What the configuration adds to the data in deciding the samples (a key map, for now):
        # part of the global order's fingerprint.
        self._recipe = key_map.digest() if key_map is not None else ""
        self._stream = self._make_stream(order)
        # Where the next pass starts; a batching view shares it (see batching_view).
        self._progress = _Progress(self._stream.initial(self))

    def _make_stream(self, order: str) -> WindowStream | GlobalStream:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)} (got {order!r})")
        info = self.source.info
        local = "://" not in os.fspath(info.path)
        if order == "auto":
            order = "global" if info.file_format == "tfrecord" and local else "window"
        if order == "window":
            return WindowStream()
        if info.file_format != "tfrecord":
            raise ValueError(f"order='global' reads steps by byte range, which "
                             f"{info.file_format} shards do not allow ({info.path}); use "
                             "order='window'")
        try:
            files = StepFiles(self.source)
        except NotStepAddressable as e:
            raise ValueError(f"order='global' cannot address the steps of {info.path} ({e}); "
                             "use order='window'") from e
        lengths = files.lengths()
        unreadable = np.flatnonzero(lengths < 0)
        if unreadable.size:
            where = ", ".join(self.source.describe(int(e)) for e in unreadable[:5])
            if self.on_corrupt == "raise":
                raise DatasetFormatError(
                    f"{unreadable.size} episodes of {info.path} do not say how many steps they "
                    f"have (their records' headers do not parse): {where}; "
                    "on_corrupt='skip' leaves them out")
            logger.warning("torch_rlds: leaving out %d episodes whose steps cannot be counted: "
                           "%s", unreadable.size, where)
            lengths = np.maximum(lengths, 0)
        stream = GlobalStream(files, lengths, seed=self.seed, shuffle=self.shuffle)
        _start_index_build(files)
        # The feature keys a sample reads, by the part of the sample they feed.
        if self.key_map is not None:
            km = self.key_map
            self._global_observations = tuple(
                [f"steps/{k}" for k in km.state_keys]
                + [f"steps/{km.image_keys[role]}" for role in km.cameras()])
            self._global_actions = tuple(f"steps/{k}" for k in km.action_keys)
            self._global_language = None if km.language_key is None else f"steps/{km.language_key}"
        else:
            self._global_observations = tuple(f"steps/observation/{k}"
                                              for k in self.observation_keys)
            self._global_actions = (f"steps/{self.action_key}",)
            self._global_language = (None if self.language_key is None
                                     else f"steps/{self.language_key}")
        return stream

    @property
    def order(self) -> str:
        """The order this dataset reads in: ``"global"`` or ``"window"``."""
        return self._stream.kind

    @property
    def num_steps(self) -> int:
        """The steps of the split (global order: counted when the dataset is built)."""
        if self._stream.kind != "global":
            raise ValueError("num_steps is counted under the global order only (the window "
                             "order reads episodes as it goes)")
        return self._stream.num_steps

    def epoch_after(self, states: list[dict[str, Any]]) -> int:
        """The epoch after the one the reader states ``states`` (of one pass, checked) stood
        in: where the next pass of a one-pass dataset starts once that one is finished."""
        if not states:
            return 0
        if self._stream.kind == "global":
            return max(s["start"] for s in states) // self._stream.num_steps + 1
        return max(s["epoch"] for s in states) + 1

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
        return self._stream.fingerprint(self, workers, worker)

    # -- Stateful protocol -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reader's position (see the class docstring); JSON-serialisable."""
        _, _, workers, worker = self._reader()
        return self._stream.make_state(self, self._progress.cursor, workers, worker)

    def _state_mark(self) -> Callable[[], dict[str, Any]]:
        """What :meth:`state_dict` returns now, made when called: a loader takes one before
        each batch, at no cost, and uses it only when the batch fails half way."""
        cursor = self._progress.cursor
        _, _, workers, worker = self._reader()
        return lambda: self._stream.make_state(self, cursor, workers, worker)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``; raises ``ValueError`` on mismatch.

        The next ``iter()`` continues the pass the state was saved in: with ``repeat=False`` it
        emits the rest of the state's epoch, nothing if this reader had finished it.
        """
        self._progress.cursor = self._check_state(state_dict, *self._reader()[2:])
        self._progress.resume = True

    def _check_state(self, state_dict: Any, num_workers: int, worker_index: int,
                     ended: bool = False) -> Any:
        """The cursor of ``state_dict`` if it belongs to worker ``worker_index`` of
        ``num_workers`` (any reader, under the global order) and names a position of the
        stream; raises ``ValueError`` naming every field that differs, or the field out of
        range. ``ended``: the state's iterator had ended (torchdata's ``fetcher_ended``), which
        only a one-pass dataset at the end of its epoch can be."""
        return self._stream.check_state(self, state_dict, num_workers, worker_index, ended)

    def seek(self, position: int, skipped: int = 0) -> None:
        """Go on from stream position ``position`` (a sample count since the start of epoch 0)
        on the next ``iter()``: what a loader does with a state saved under another topology.
        Global order only."""
        if self._stream.kind != "global":
            raise ValueError("seek() needs the global order (the window order's position is "
                             "one per reader)")
        self._progress.cursor = self._stream.at_position(self, position, skipped)
        self._progress.resume = True

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

    def sampling_view(self, batch_size: int) -> RLDSDataset:
        """This dataset emitting samples whose loader collates them ``batch_size`` at a time
        (one cursor for both, as :meth:`batching_view`). Under the global order a reader then
        takes the samples of whole host batches, so the loader's batches are those a
        batching view makes, under any worker count. What :class:`torch_rlds.DataLoader`
        iterates when given this dataset, a ``batch_size`` and a ``collate_fn``."""
        _check_positive("batch_size", batch_size)
        if self.batch_size is not None:
            raise ValueError(f"the dataset emits batches (batch_size={self.batch_size}); a "
                             "sampling view is of a dataset that emits samples")
        out = copy.copy(self)
        out._host_batch = batch_size
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start from the beginning of ``epoch`` on the next ``iter()`` (drops any cursor but
        the count of skipped episodes)."""
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0 (got {epoch!r})")
        self._progress.cursor = self._stream.at_epoch(self, epoch, self._progress.cursor)
        self._progress.resume = False

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A pass: see "Passes" in the class docstring. Where it starts is decided here."""
        _, _, workers, worker = self._reader()
        cursor, resume = self._progress.cursor, self._progress.resume
        self._progress.resume = False
        cursor = self._progress.cursor = self._stream.begin(self, cursor, resume, workers,
                                                            worker)
        return self._steps(cursor, workers, worker)

    def _steps(self, cursor: Any, workers: int, worker: int) -> Iterator[Any]:
        threads = self._threads()
        pool = None
        reads = self._stream.reads(self)
        stop = shutdown  # the module's globals may be gone when a generator left open closes
        try:
            if threads > 1:
                pool = concurrent.futures.ThreadPoolExecutor(
                    threads, thread_name_prefix="torch_rlds-decode")
            plans = self._stream.plan(self, cursor, workers, worker, reads)
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

    def _samples(self, plans: Iterator[_Plan], pool: concurrent.futures.Executor | None,
                 threads: int, reads: Any) -> Iterator[dict[str, Any]]:
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
                 reads: Any) -> Iterator[dict[str, Any]]:
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

    def __repr__(self) -> str:
        return (f"RLDSDataset({self.source!r}, obs_window={self.obs_window}, "
                f"action_horizon={self.action_horizon}, shuffle={self.shuffle}, "
                f"seed={self.seed}, shuffle_window={self.shuffle_window}, repeat={self.repeat}, "
                f"process {self.process_index}/{self.process_count})")


class _Progress:
    """Where a dataset's next pass starts: the cursor, whether it was loaded (resumed) rather
    than reached, and the windows that checking loaded states read (by reader, reader count,
    epoch and window), for the pass that starts there."""

    def __init__(self, cursor: Any, resume: bool = False) -> None:
        self.cursor = cursor
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


# The step index builds running in this process, one per dataset folder and split (a build is
# started once, by the first dataset of that data to need it).
_builds: dict[tuple[str, str], IndexBuilder] = {}


def _start_index_build(files: StepFiles) -> None:
    """Build the missing step indexes of ``files`` in the background (once per process and
    data), unless ``TORCH_RLDS_STEP_INDEX=off``."""
    if os.environ.get(STEP_INDEX_ENV, "") == "off":
        return
    key = (os.fspath(files.source.info.path), files.source.split)
    build = _builds.get(key)
    if build is None or build.join(0) and files.missing():
        _builds[key] = IndexBuilder(files).start()


STEP_INDEX_ENV = "TORCH_RLDS_STEP_INDEX"


def _check_positive(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
