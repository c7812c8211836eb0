"""Episodes as a recipe makes them: trajectory transforms and filters between reading and sampling.

A dataset with ``trajectory`` or ``filters`` (:mod:`torch_rlds.trajectory`) does not sample the
episodes as stored but as its :class:`EpisodePlan` makes them:

1. the numbers, text and metadata an episode's transforms and filters read are read (never its
   frames), and the key map and the transforms make its :class:`~torch_rlds.trajectory.Trajectory`
   for the epoch being read (random choices are pure functions of seed, epoch and episode);
2. the filters decide which of its steps may be sampled: none when an episode filter rejects
   it, else the steps every sample filter keeps. They judge the trajectory as epoch 0 makes it,
   so the steps an epoch covers are the same in every epoch;
3. the sample of trajectory step ``t`` is made from the trajectory's numbers at the rows its
   windows need and from the frames of the cameras it chose at the dataset steps
   ``frame_steps`` of those rows: only those frames are read and decoded.

The orders cover exactly the kept steps. The window order reads episodes whole and judges
them as it reads; the global order needs the kept steps of every episode before it starts:
:meth:`EpisodePlan.kept` counts them in one pass over the records (numbers only), cached per
shard beside the step index (a changed shard, key map, transform or filter is counted again).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from torch_rlds._corrupt import CORRUPT_ERRORS
from torch_rlds._images import EncodedImages
from torch_rlds.keymap import ACTION, LANGUAGE, STATE, image_key, lookup
from torch_rlds.trajectory import (
    FilterConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryError,
    read_keys,
    trajectory_from_episode,
)

logger = logging.getLogger(__name__)

# Why an episode has no kept step: an episode filter's index, or one of these.
KEPT, UNREADABLE = -1, -2


class EpisodePlan:
    """What a dataset's trajectory transforms and filters make of its episodes. Picklable.

    Args:
      key_map: the dataset's :class:`~torch_rlds.KeyMap` (the standard names the sections use).
      trajectory: the ``data.trajectory`` section (or its YAML list), or ``None``.
      filters: the ``data.filters`` section (or its YAML mapping), or ``None``.
      seed: the seed of the transforms' random choices.
      action_horizon: what an ``idle_chunk`` filter without a horizon uses.
    """

    def __init__(self, key_map: Any, trajectory: Any, filters: Any, *, seed: int,
                 action_horizon: int) -> None:
        if key_map is None:
            raise ValueError("trajectory transforms and filters need a key_map (they read the "
                             "key map's state, action and instruction)")
        self.key_map = key_map
        self.trajectory_config = TrajectoryConfig.from_value(trajectory)
        self.filter_config = FilterConfig.from_dict(filters)
        self.transform = (self.trajectory_config.build() if self.trajectory_config else None)
        self.filters = (self.filter_config.build(action_horizon=action_horizon)
                        if self.filter_config else None)
        self.seed = seed
        self.keys = read_keys(self.trajectory_config, self.filter_config)
        self.episode_filters = self.filters.episode_names if self.filters else ()
        parts = [key_map.digest(),
                 self.trajectory_config.digest() if self.trajectory_config else "",
                 self.filter_config.digest() if self.filter_config else "", str(action_horizon)]
        self.digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def validate(self, source: Any) -> None:
        """Check what the sections read against ``source``'s features (no episode read)."""
        from torch_rlds.trajectory import validate_sections

        validate_sections(source, self.key_map, self.trajectory_config, self.filter_config)

    # -- what is read ---------------------------------------------------------------------------
    def number_features(self) -> tuple[str, ...]:
        """The features (``steps/...``, ``episode_metadata/...``) a trajectory is made from."""
        km = self.key_map
        steps = [*km.state_keys, *km.action_keys, *self.keys]
        if km.language_key is not None:
            steps.append(km.language_key)
        meta = self.filter_config.metadata_keys() if self.filter_config else ()
        return tuple(dict.fromkeys([f"steps/{k}" for k in steps]
                                   + [f"episode_metadata/{k}" for k in meta]))

    # -- making and judging ---------------------------------------------------------------------
    def trajectory(self, episode: Mapping[str, Any], episode_index: int, epoch: int,
                   name: str) -> Trajectory:
        """The trajectory of a (partly) read ``episode`` at ``epoch``, transformed."""
        traj = trajectory_from_episode(episode, self.key_map, keys=self.keys,
                                       episode_index=episode_index, seed=self.seed,
                                       epoch=epoch, name=name)
        if self.transform is not None:
            try:
                traj = self.transform(traj)
            except TrajectoryError as e:
                raise TrajectoryError(f"{name}: {e}") from None
        return traj

    def judge(self, traj: Trajectory) -> tuple[int, np.ndarray]:
        """``(reason, steps)``: :data:`KEPT` and the steps that may be sampled, or the index of
        the episode filter that rejects ``traj`` and no step."""
        if self.filters is None:
            return KEPT, np.arange(traj.num_steps, dtype=np.int64)
        rejecting = self.filters.rejecting(traj)
        if rejecting is not None:
            return rejecting, np.zeros(0, np.int64)
        return KEPT, np.flatnonzero(self.filters.sample_mask(traj)).astype(np.int64)

    def sampled(self, episode: Mapping[str, Any], episode_index: int, epoch: int,
                name: str) -> tuple[Trajectory, np.ndarray]:
        """The trajectory of ``episode`` at ``epoch`` and its kept steps (judged at epoch 0)."""
        traj = self.trajectory(episode, episode_index, epoch, name)
        judged = traj if epoch == 0 else self.trajectory(episode, episode_index, 0, name)
        if judged.num_steps != traj.num_steps:
            raise TrajectoryError(f"{name}: the trajectory has {traj.num_steps} steps at epoch "
                                  f"{epoch} but {judged.num_steps} at epoch 0; transforms may "
                                  "choose values at random, not the number of steps")
        return traj, self.judge(judged)[1]

    def standard_episode(self, traj: Trajectory, episode: Mapping[str, Any],
                         rows: np.ndarray | None = None) -> dict[str, Any]:
        """The episode in the key map's standard layout as ``traj`` makes it, one step per
        trajectory row: each camera's frames are those of its chosen feature in the read
        ``episode`` (over the dataset's steps) at the rows' ``frame_steps``; only ``rows`` get
        frames (all rows when ``None``)."""
        observation: dict[str, Any] = {}
        if STATE in traj.numeric:
            observation[STATE] = np.asarray(traj.numeric[STATE], dtype=np.float32)
        count = traj.num_steps
        wanted = range(count) if rows is None else np.unique(rows).tolist()
        for role in self.key_map.cameras():
            source = lookup(episode["steps"], traj.cameras[role])
            encoded: list[Any] = [None] * count
            for r in wanted:
                encoded[r] = source.encoded[int(traj.frame_steps[r])]
            observation[image_key(role)] = EncodedImages(encoded, source.shape, source.dtype,
                                                         name=source.name,
                                                         format=source.format)
        steps: dict[str, Any] = {"observation": observation,
                                 ACTION: np.asarray(traj.numeric[ACTION], dtype=np.float32)}
        if LANGUAGE in traj.text:
            steps[LANGUAGE] = traj.text[LANGUAGE]
        return {"steps": steps}

    # -- the kept steps of a whole split --------------------------------------------------------
    def kept(self, files: Any, lengths: np.ndarray, reader: Any, *, on_corrupt: str,
             progress: bool = True) -> KeptSteps:
        """The kept steps of every episode of ``files``' source (``lengths``: its stored steps),
        from the per-shard cache or counted now (numbers read through ``reader``)."""
        from tqdm import tqdm

        # shard -> {record: episode}, for the split's episodes
        episodes: list[dict[int, int]] = [{} for _ in range(files.num_shards)]
        for e, (s, r) in enumerate(zip(files.shard_of.tolist(), files.record_of.tolist())):
            episodes[s][r] = e
        per_shard: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        for shard in tqdm(range(files.num_shards), desc="Applying filters", unit="shard",
                          delay=1.0, leave=False, disable=not progress):
            per_shard.append(self._shard_kept(files, shard, episodes[shard], lengths, reader,
                                              on_corrupt))
        reasons = np.empty(len(lengths), np.int64)
        sizes = np.empty(len(lengths), np.int64)
        steps: list[np.ndarray] = [np.zeros(0, np.int64)] * len(lengths)
        for e, (s, r) in enumerate(zip(files.shard_of.tolist(), files.record_of.tolist())):
            reasons[e] = per_shard[s][0][r]
            sizes[e] = per_shard[s][1][r]
            steps[e] = per_shard[s][2][r]
        return KeptSteps(steps, reasons, sizes, self.episode_filters)

    def _shard_kept(self, files: Any, shard: int, by_record: dict[int, int],
                    lengths: np.ndarray, reader: Any, on_corrupt: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        index = files.shard(shard)
        records = index.num_records
        path = files._path(shard, f"{self.digest}.kept")
        sizes = files._sizes(shard)
        cached = _load_kept(path, sizes, len(self.episode_filters))
        if cached is not None:
            return cached
        reasons = np.full(records, UNREADABLE, np.int64)
        trajectory_steps = np.zeros(records, np.int64)
        kept: list[np.ndarray] = [np.zeros(0, np.int64)] * records
        features = self.number_features()
        for record in range(records):
            e = by_record.get(record)
            if e is None or lengths[e] < 0:
                continue
            name = files.source.describe(e)
            try:
                tree = reader.read(e, {k: (0, int(lengths[e]) - 1) for k in features})
                traj = self.trajectory(tree, e, 0, name)
            except CORRUPT_ERRORS as error:
                if on_corrupt == "raise":
                    raise
                logger.warning("torch_rlds: %s cannot be read to apply the filters (%s); left "
                               "out", name, error)
                continue
            reasons[record], kept[record] = self.judge(traj)
            trajectory_steps[record] = traj.num_steps
        if (reasons != UNREADABLE).all():
            files.save(path, _kept_bytes(sizes, reasons, trajectory_steps, kept))
        return reasons, trajectory_steps, kept


class KeptSteps:
    """The steps each episode of a split may be sampled at, under a plan.

    Attributes:
      counts: int64 ``[episodes]``, kept steps per episode.
      offsets: int64 ``[episodes + 1]``, where each episode's steps start in ``steps``.
      steps: int64, every episode's kept trajectory steps, ascending, one episode after another.
      reasons: int64 ``[episodes]``: :data:`KEPT`, :data:`UNREADABLE` or the rejecting episode
        filter's index.
      trajectory_steps: int64 ``[episodes]``, steps of each episode's trajectory.
      filter_names: the episode filters' names (``reasons`` index them).
    """

    def __init__(self, steps: list[np.ndarray], reasons: np.ndarray,
                 trajectory_steps: np.ndarray, filter_names: tuple[str, ...]) -> None:
        self.counts = np.fromiter((len(s) for s in steps), np.int64, len(steps))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.steps = (np.concatenate(steps).astype(np.int64) if steps
                      else np.zeros(0, np.int64))
        self.reasons = reasons
        self.trajectory_steps = trajectory_steps
        self.filter_names = filter_names

    def step_of(self, episodes: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """The trajectory step of the ``ks``-th kept step of ``episodes``."""
        return self.steps[self.offsets[episodes] + ks]

    def summary(self) -> dict[str, Any]:
        """Counts for reports: episodes kept, rejected per filter, unreadable; steps kept and
        left out by the sample filters."""
        kept = self.reasons == KEPT
        return {
            "episodes_kept": int(kept.sum()),
            "episodes_rejected": {name: int((self.reasons == i).sum())
                                  for i, name in enumerate(self.filter_names)},
            "episodes_unreadable": int((self.reasons == UNREADABLE).sum()),
            "steps_kept": int(self.counts.sum()),
            "steps_filtered": int((self.trajectory_steps[kept] - self.counts[kept]).sum()),
        }


def _kept_bytes(sizes: np.ndarray, reasons: np.ndarray, trajectory_steps: np.ndarray,
                kept: list[np.ndarray]) -> bytes:
    counts = np.fromiter((len(k) for k in kept), np.int64, len(kept))
    parts = [np.asarray([len(sizes)]), sizes, reasons, trajectory_steps, counts, *kept]
    return np.concatenate(parts).astype("<i8").tobytes()


def _load_kept(path: os.PathLike, sizes: np.ndarray, num_filters: int
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """A shard's cached kept steps, if the file is whole and of this shard as it is now."""
    from torch_rlds import _files

    records = len(sizes)
    if records == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    # Trajectories are no longer than their records hold bytes: a bound on the file's size.
    limit = 8 * (1 + 4 * records) + 8 * int(np.maximum(sizes, 0).sum())
    try:
        data = _files.read_regular(os.fspath(path), limit)
    except (OSError, _files.SpecialFileError):
        return None
    if data is None or len(data) % 8 or len(data) < 8 * (1 + 4 * records):
        return None
    values = np.frombuffer(data, dtype="<i8").astype(np.int64)
    if values[0] != records or not np.array_equal(values[1:1 + records], sizes):
        return None
    reasons, lengths, counts = values[1 + records:1 + 4 * records].reshape(3, records)
    rest = values[1 + 4 * records:]
    if (not ((reasons >= KEPT) & (reasons < num_filters)).all() or (lengths < 0).any()
            or (counts < 0).any() or (counts > lengths).any() or counts.sum() != len(rest)):
        return None
    kept = np.split(rest, np.cumsum(counts)[:-1])
    for k, n in zip(kept, lengths.tolist()):
        if len(k) and (k[0] < 0 or k[-1] >= n or (np.diff(k) <= 0).any()):
            return None
    return reasons, lengths, list(kept)


def count_kept(source: Any, plan: EpisodePlan, *, on_corrupt: str = "raise",
               progress: bool = True) -> KeptSteps:
    """The kept steps of every episode of ``source`` under ``plan``: through the per-shard
    cache for tfrecord shards (what the global order uses), else by reading every episode."""
    if source.info.file_format == "tfrecord":
        from torch_rlds._step_reader import StepFiles, StepReader

        files = StepFiles(source)
        lengths = np.maximum(files.lengths(progress=progress), -1)
        return plan.kept(files, lengths, StepReader(files, np.maximum(lengths, 0)),
                         on_corrupt=on_corrupt, progress=progress)
    from tqdm import tqdm

    steps, reasons, sizes = [], [], []
    for e in tqdm(range(len(source)), desc="Applying filters", unit="episode", delay=1.0,
                  leave=False, disable=not progress):
        traj = plan.trajectory(source.episode(e), e, 0, source.describe(e))
        reason, kept = plan.judge(traj)
        steps.append(kept)
        reasons.append(reason)
        sizes.append(traj.num_steps)
    return KeptSteps(steps, np.asarray(reasons, np.int64), np.asarray(sizes, np.int64),
                     plan.episode_filters)


def describe_kept(kept: KeptSteps) -> list[str]:
    """Report lines of what a plan's filters keep of a split."""
    s = kept.summary()
    total = len(kept.counts)
    lines = [f"filters: {s['episodes_kept']} of {total} episodes kept, "
             f"{s['steps_kept']} steps to sample"
             f" ({s['steps_filtered']} steps of kept episodes left out by the sample filters)"]
    for i, (name, n) in enumerate(s["episodes_rejected"].items()):
        lines.append(f"  rejected by data.filters.episode[{i}] ({name}): {n} episodes")
    if s["episodes_unreadable"]:
        lines.append(f"  unreadable: {s['episodes_unreadable']} episodes")
    return lines
