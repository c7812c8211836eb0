"""``RLDSDataset``: step samples of an RLDS dataset as a resumable torch ``IterableDataset``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from torch_rlds._global_stream import GlobalStream
from torch_rlds._info import DatasetFormatError
from torch_rlds._plan import EpisodePlan
from torch_rlds._rules import check_int
from torch_rlds._samples import EpisodeSamples
from torch_rlds._state import MAX_INT
from torch_rlds._step_index import NotStepAddressable
from torch_rlds._step_reader import IndexBuilder, StepFiles, StepReader
from torch_rlds._streamed import Progress, StreamedDataset
from torch_rlds._window_stream import WindowStream
from torch_rlds.keymap import check_plain_keys
from torch_rlds.source import RLDSSource

if TYPE_CHECKING:
    from torch_rlds.keymap import KeyMap

logger = logging.getLogger(__name__)

ON_CORRUPT = ("raise", "skip")
ORDERS = ("auto", "global", "window")


class RLDSDataset(StreamedDataset):
    """Step samples of an RLDS split, in a seeded order, with a state of a few hundred bytes.

    **A sample** is a dict::

        {"observation": {key: [obs_window, ...]},      # images decoded to [obs_window, H, W, C]
         "observation_is_pad": bool [obs_window],
         "action": float32 [action_horizon, A],
         "action_is_pad": bool [action_horizon],
         "language_instruction": str,
         "meta": {"episode_index", "step_index", "epoch"}}   # int64 scalars

    Before an episode's first step the observation window repeats step 0; past its last step
    the action chunk repeats the last action; the masks are ``True`` exactly there.

    **Order** (``order``): ``"global"`` permutes every step of the split per epoch and cuts
    the permutation into global batches (``batch_size * process_count``), of which host ``p``
    takes its slice and worker ``w`` of ``W`` the host batches ``w, w + W, ...``; a sample reads
    only the steps it needs, by byte range. ``"window"`` reads episodes whole and permutes the
    steps of windows of ``shuffle_window`` episodes, per reader (for array_record shards and
    object stores). ``"auto"``: global for local tfrecord datasets, else window. Either way
    every kept step appears once per epoch across all hosts and workers.

    **State.** ``state_dict()`` is a small versioned JSON object of ints and strings (the
    formats: ``torch_rlds/DESIGN.md``). A global-order state loads under any hosts and workers
    (bit-identical global batches with the same global batch size; with another, every step of
    the epoch once); a window-order state under the same ones. Every fingerprint difference is
    named in the ``ValueError``. Restoring reads one batch (global) or one window, never a
    replay.

    **Passes.** With ``repeat=True`` every ``iter()`` continues one endless stream. With
    ``repeat=False`` a pass is the rest of one epoch, and the next pass the next epoch
    (:meth:`set_epoch` picks another); a restored pass ends where the uninterrupted one would.

    **Batches.** With ``batch_size`` every item is a batch, equal bit for bit to
    :func:`torch_rlds.collate` of its samples, built straight into one buffer (shared memory in
    a DataLoader worker) with each frame decoded once into its row. A state saved by either
    form loads into the other. Frames are decoded by ``decode_threads`` threads and the next
    group of reads is done in a background thread; neither changes what is emitted or the
    state.

    **Corrupt episodes.** ``on_corrupt="raise"`` raises naming file and byte offset;
    ``"skip"`` logs and counts them (``skipped`` in the state): the window order leaves the
    episode out, the global order replaces each of its samples by the same position of the
    next epoch. Which are skipped is a function of the data, so resume stays exact.

    One object is not meant to be iterated from two threads, or by two live iterators, at once.

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
      fast_jpeg: decode JPEG with the fast DCT, the pixels of ``tf.io.decode_jpeg`` that the
        tf.data pipelines of Octo, OpenVLA and openpi train on (the default); ``False``: the
        accurate DCT, the pixels of TFDS's numpy decoding.
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
      trajectory: trajectory transforms applied to every episode before sampling (a
        :class:`torch_rlds.trajectory.TrajectoryConfig` or its YAML list; needs ``key_map``).
        Samples are then made from the transformed episode: ``meta["step_index"]`` is the
        step of the trajectory (``frame_steps`` maps it to the dataset's step for images).
      window_actions: an action chunk for every observation-window row: ``action`` is
        ``[obs_window, action_horizon, A]`` and ``action_is_pad`` ``[obs_window,
        action_horizon]``, ``True`` past the episode's end and on padded rows (Octo's layout).
      goal_relabel: every sample gets ``task``: each camera's frame at a goal step drawn
        uniformly from the current step to the episode's last (seeded by ``seed``, epoch,
        episode and step), and ``goal_step``.
      decode_sizes: ``{observation key: (height, width)}``: decode those JPEG cameras at the
        smallest of libjpeg's 1/2, 1/4 and 1/8 scales that is at least that size (the size
        ``sample_transform`` resizes them to), skipping most of the decode; the frames then
        arrive at that reduced size. Pixels differ from a full decode and resize (see
        :mod:`torch_rlds._images`). Usually set by ``data.transform.reduced_decode``.
      filters: episode and sample filters (a :class:`torch_rlds.trajectory.FilterConfig` or
        its YAML mapping; needs ``key_map``): either order covers exactly the kept steps. The
        global order counts them once per dataset (numbers only, cached per shard).
    """

    def __init__(self, source: RLDSSource | str | os.PathLike, split: str = "train", *,
                 obs_window: int = 1, action_horizon: int = 16,
                 observation_keys: Sequence[str] | None = None, action_key: str = "action",
                 language_key: str | None = "language_instruction", shuffle: bool = True,
                 seed: int = 0, shuffle_window: int = 16, repeat: bool = True,
                 process_index: int = 0, process_count: int = 1, fast_jpeg: bool = True,
                 data_dir: str | os.PathLike | None = None, key_map: KeyMap | None = None,
                 sample_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 batch_size: int | None = None, drop_last: bool = False,
                 decode_threads: int | None = None, on_corrupt: str = "raise",
                 order: str = "auto", trajectory: Any = None, filters: Any = None,
                 window_actions: bool = False, goal_relabel: bool = False,
                 decode_sizes: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        check_int("obs_window", obs_window, 1)
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        if decode_threads is not None:
            check_int("decode_threads", decode_threads, 1)
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {list(ON_CORRUPT)} (got {on_corrupt!r})")
        check_int("action_horizon", action_horizon, 1)
        check_int("shuffle_window", shuffle_window, 1)
        check_int("process_count", process_count, 1)
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
        self.window_actions = bool(window_actions)
        # The seed of the goal steps (the order's: a goal is a function of the sample's id).
        self.goal_seed = seed if goal_relabel else None
        self.decode_sizes = tuple((str(k), (int(v[0]), int(v[1])))
                                  for k, v in (decode_sizes or {}).items())
        self.key_map = key_map
        self.sample_transform = sample_transform
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.decode_threads = decode_threads
        self.on_corrupt = on_corrupt
        if key_map is not None:
            check_plain_keys(observation_keys, action_key, language_key)
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
        self._plan: EpisodePlan | None = None
        if trajectory is not None or filters is not None:
            self._plan = EpisodePlan(key_map, trajectory, filters, seed=seed,
                                     action_horizon=action_horizon)
            self._plan.validate(source)
        # What the configuration adds to the data in deciding the samples (the key map, the
        # trajectory transforms and filters): part of the global order's fingerprint.
        self._recipe = (self._plan.digest if self._plan is not None
                        else key_map.digest() if key_map is not None else "")
        self._stream = self._make_stream(order)
        # Where the next pass starts; a batching view shares it (see batching_view).
        self._progress = Progress(self._stream.initial(self))

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
        kept = None
        if self._plan is not None:
            kept = self._plan.kept(files, lengths, StepReader(files, lengths),
                                   on_corrupt=self.on_corrupt)
        stream = GlobalStream(files, lengths, seed=self.seed, shuffle=self.shuffle, kept=kept)
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

    def _samples_of(self, episode: dict[str, Any], index: int, name: str, *,
                    check_images: bool | None = None) -> EpisodeSamples:
        """The step samples of the read ``episode`` (in the standard layout where a plan made
        it; mapped here by the key map otherwise). Frame headers are checked under
        ``on_corrupt="skip"`` unless ``check_images`` says otherwise (a sparse read)."""
        if self.key_map is not None and self._plan is None:
            episode = self.key_map.apply(episode, name=name)
        return EpisodeSamples(episode, self.observation_keys, self.action_key,
                              self.language_key, index, name,
                              check_images=(self.on_corrupt == "skip" if check_images is None
                                            else check_images),
                              keep_recent=not self.shuffle and self.obs_window > 1)

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

    def __repr__(self) -> str:
        return (f"RLDSDataset({self.source!r}, obs_window={self.obs_window}, "
                f"action_horizon={self.action_horizon}, shuffle={self.shuffle}, "
                f"seed={self.seed}, shuffle_window={self.shuffle_window}, repeat={self.repeat}, "
                f"process {self.process_index}/{self.process_count})")


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
