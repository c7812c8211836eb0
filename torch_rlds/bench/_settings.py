"""What the benchmark measures: the dataset it writes and the sample every pipeline emits."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch_rlds import synthetic
from torch_rlds._rules import check_int


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The sizes of one benchmark run; validated on construction.

    Every pipeline emits the same sample: ``obs_window`` steps of every camera (decoded) and of
    ``observation/state``, an action chunk of ``action_horizon`` steps, the language instruction,
    in batches of ``batch_size``.

    Attributes:
      episodes, min_steps, max_steps: the synthetic dataset (episode lengths drawn uniformly).
      image_size: height and width of each of the two JPEG cameras.
      num_shards: tfrecord shards of the train split.
      batch_size, obs_window, action_horizon: the sample and batch every pipeline makes.
      shuffle_window: torch_rlds episodes whose steps are mixed.
      tf_shuffle_buffer: tf.data shuffle buffer (steps) for throughput and resume.
      checkpoint_buffers: tf.data shuffle buffers (steps) whose iterator checkpoints are sized.
      workers: torch_rlds DataLoader worker counts measured for throughput.
      resume_workers: the worker count of the torch_rlds resume measurements.
      resume_positions: fractions of an epoch at which a state is saved and resumed.
      warmup_batches, measure_batches: throughput is timed over ``measure_batches`` batches
        after ``warmup_batches``.
      throughput_rounds: every throughput figure is measured this many times, the pipelines
        taking turns (torch_rlds with fewer workers, tf.data, torch_rlds with the most, the
        limit; the reverse order in the next round), and the median is reported: a machine
        whose speed drifts during the run then drifts for every pipeline alike.
      resume_rounds: every time to a first batch (fresh start, resume) is measured this many
        times, the positions taking turns in the same way; the median is reported.
      limit_processes: processes that decode JPEGs for the decode limit.
      limit_episodes, limit_rounds: the limit decodes every frame of the first
        ``limit_episodes`` episodes ``limit_rounds`` times.
      save_repeats: torch_rlds ``save_state`` calls whose median is the save time.
      fast_jpeg: fast-DCT JPEG decoding everywhere (the pixels of ``tf.io.decode_jpeg`` with its
        defaults, as Octo and openpi run it); otherwise the accurate DCT everywhere.
      seed: seeds the dataset, torch_rlds and tf.data.
      order_workers: the worker count at which the global and the window order are compared
        (throughput, worker memory); one of ``workers``.
      elastic_topologies: ``(hosts, workers)`` under which a state saved by one host with
        ``resume_workers`` workers is restored besides its own (hosts simulated with
        ``process_index`` / ``process_count`` in one process); each host count divides
        ``batch_size``.
      shuffle_steps, shuffle_droid_steps: steps of the simulated bridge- and fractal-like
        datasets, and of the DROID-like one (more, so that its i.i.d. figure is not held down
        by a small episode count).
      shuffle_batch, shuffle_buffer: the global batch scored, and tf.data's shuffle buffer.
      shuffle_topology, shuffle_readers: the window order's many-reader row (hosts x workers).
      memory_episodes: the episode counts of the episode-count axis of worker memory (episodes
        of ``memory_count_steps`` steps of one ``memory_count_image`` px flat camera).
      memory_size_steps: the steps per episode of the episode-size axis
        (``memory_size_episodes`` episodes of one ``memory_size_image`` px textured camera).
      memory_batches: batches a loader hands out while its workers' memory is sampled.
      group_processes: run a section's measurements in one process rather than one each (the
        quick run, whose figures only show that every measurement works).
    """

    episodes: int = 400
    min_steps: int = 40
    max_steps: int = 80
    image_size: int = 256
    num_shards: int = 16
    batch_size: int = 32
    obs_window: int = 1
    action_horizon: int = 16
    shuffle_window: int = 16
    tf_shuffle_buffer: int = 10_000
    checkpoint_buffers: tuple[int, ...] = (10_000, 100_000)
    workers: tuple[int, ...] = (0, 1, 2)
    resume_workers: int = 2
    resume_positions: tuple[float, ...] = (0.05, 0.95)
    warmup_batches: int = 20
    measure_batches: int = 300
    throughput_rounds: int = 3
    resume_rounds: int = 3
    limit_processes: int = 2
    limit_episodes: int = 40
    limit_rounds: int = 3
    save_repeats: int = 20
    fast_jpeg: bool = True
    seed: int = 0
    order_workers: int = 2
    elastic_topologies: tuple[tuple[int, int], ...] = ((2, 1), (4, 0))
    shuffle_steps: int = 600_000
    shuffle_droid_steps: int = 4_000_000
    shuffle_batch: int = 256
    shuffle_buffer: int = 250_000
    shuffle_topology: tuple[int, int] = (8, 32)
    memory_episodes: tuple[int, ...] = (1_000, 100_000)
    memory_count_steps: int = 2
    memory_count_image: int = 32
    memory_size_steps: tuple[int, ...] = (45, 900)
    memory_size_episodes: int = 32
    memory_size_image: int = 256
    memory_batches: int = 40
    group_processes: bool = False

    def __post_init__(self) -> None:
        for name in ("episodes", "min_steps", "num_shards", "batch_size", "obs_window",
                     "action_horizon", "shuffle_window", "tf_shuffle_buffer", "measure_batches",
                     "throughput_rounds", "resume_rounds", "limit_processes", "limit_episodes",
                     "limit_rounds", "save_repeats"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_batches", "resume_workers", "seed"):
            check_int(name, getattr(self, name), 0)
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps must be >= min_steps ({self.min_steps}) (got "
                             f"{self.max_steps})")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (got {self.image_size})")
        if self.num_shards > self.episodes:
            raise ValueError(f"num_shards must be <= episodes ({self.episodes}) (got "
                             f"{self.num_shards})")
        if (not self.workers or any(type(w) is not int or w < 0 for w in self.workers)
                or len(set(self.workers)) != len(self.workers)):
            raise ValueError(f"workers must be distinct ints >= 0 (got {self.workers!r})")
        if not self.checkpoint_buffers or any(
                type(b) is not int or b < 1 for b in self.checkpoint_buffers):
            raise ValueError(f"checkpoint_buffers must be ints >= 1 (got "
                             f"{self.checkpoint_buffers!r})")
        if any(not 0 < p < 1 for p in self.resume_positions):
            raise ValueError(f"resume_positions must lie in (0, 1) (got "
                             f"{self.resume_positions!r})")
        if self.epoch_batches() < 2:
            raise ValueError(f"an epoch of {self.epoch_steps()} steps holds fewer than 2 "
                             f"batches of batch_size {self.batch_size}; use more episodes")
        if self.resume_workers > self.episodes:
            raise ValueError(f"resume_workers must be <= episodes ({self.episodes}) (got "
                             f"{self.resume_workers})")
        if self.order_workers not in self.workers:
            raise ValueError(f"order_workers must be one of workers {self.workers} (got "
                             f"{self.order_workers!r})")
        for hosts, workers in self.elastic_topologies:
            if type(hosts) is not int or hosts < 1 or self.batch_size % hosts \
                    or type(workers) is not int or workers < 0:
                raise ValueError(f"elastic_topologies must be (hosts, workers) with hosts "
                                 f"dividing batch_size {self.batch_size} (got "
                                 f"{(hosts, workers)!r})")
        for name in ("shuffle_steps", "shuffle_droid_steps", "shuffle_batch", "shuffle_buffer",
                     "memory_count_steps", "memory_size_episodes", "memory_batches"):
            check_int(name, getattr(self, name), 1)
        hosts, readers = self.shuffle_topology
        if self.shuffle_batch % hosts:
            raise ValueError(f"shuffle_topology {hosts} must divide shuffle_batch "
                             f"{self.shuffle_batch}")
        check_int("shuffle_topology workers", readers, 1)
        for name in ("memory_episodes", "memory_size_steps"):
            values = getattr(self, name)
            if len(values) < 2 or any(type(v) is not int or v < 1 for v in values):
                raise ValueError(f"{name} must hold at least two ints >= 1 (got {values!r})")
        for name in ("memory_count_image", "memory_size_image"):
            check_int(name, getattr(self, name), 32)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """Tiny sizes that run every measurement in seconds (the smoke test)."""
        # tf_shuffle_buffer mixes as many steps as shuffle_window: one resume window to measure
        sizes = dict(episodes=6, min_steps=8, max_steps=16, image_size=64, num_shards=2,
                     batch_size=8, tf_shuffle_buffer=192, checkpoint_buffers=(32, 128),
                     warmup_batches=1, measure_batches=3, throughput_rounds=1, resume_rounds=1,
                     limit_episodes=6, limit_rounds=1, save_repeats=3,
                     shuffle_steps=6_000, shuffle_droid_steps=12_000, shuffle_batch=64,
                     shuffle_buffer=2_000, shuffle_topology=(2, 2), memory_episodes=(20, 200),
                     memory_size_steps=(4, 40), memory_size_episodes=4, memory_size_image=64,
                     memory_batches=4, group_processes=True)
        return cls(**{**sizes, **overrides})

    def spec(self) -> synthetic.SyntheticSpec:
        """The synthetic dataset every pipeline reads."""
        cameras = tuple(synthetic.Camera(name, self.image_size, self.image_size)
                        for name in CAMERAS)
        return synthetic.SyntheticSpec(
            name="torch_rlds_bench", version="1.0.0", num_episodes=self.episodes,
            min_steps=self.min_steps, max_steps=self.max_steps, cameras=cameras, state_dim=8,
            action_dim=7, num_shards=self.num_shards, texture=True, seed=self.seed,
        )

    def epoch_steps(self) -> int:
        """Steps in one epoch of the train split."""
        return sum(self.spec().lengths())

    def epoch_batches(self) -> int:
        """Whole batches in one epoch."""
        return self.epoch_steps() // self.batch_size

    def resume_batches(self) -> list[int]:
        """The batch counts after which a state is saved: one per resume position, each >= 1
        and inside the first epoch."""
        total = self.epoch_batches()
        return [min(max(1, round(p * total)), max(1, total - 1)) for p in self.resume_positions]

    def window_for_buffer(self, steps: int) -> int:
        """The torch_rlds shuffle window (episodes) that mixes about ``steps`` steps."""
        mean = (self.min_steps + self.max_steps) / 2
        return max(1, math.ceil(steps / mean))

    def memory_specs(self) -> dict[str, list[synthetic.SyntheticSpec]]:
        """The synthetic datasets of the worker-memory section, by axis (``episodes``: one per
        count in ``memory_episodes``; ``size``: one per length in ``memory_size_steps``)."""
        count_camera = synthetic.Camera("image", self.memory_count_image,
                                        self.memory_count_image)
        size_camera = synthetic.Camera("image", self.memory_size_image, self.memory_size_image)
        episodes = [synthetic.SyntheticSpec(
            name="torch_rlds_bench_count", num_episodes=n, min_steps=self.memory_count_steps,
            max_steps=self.memory_count_steps, cameras=(count_camera,), state_dim=8,
            action_dim=7, num_shards=min(16, n), texture=False, seed=self.seed)
            for n in self.memory_episodes]
        size = [synthetic.SyntheticSpec(
            name="torch_rlds_bench_size", num_episodes=self.memory_size_episodes,
            min_steps=steps, max_steps=steps, cameras=(size_camera,), state_dim=8, action_dim=7,
            num_shards=min(8, self.memory_size_episodes), texture=True, seed=self.seed)
            for steps in self.memory_size_steps]
        return {"episodes": episodes, "size": size}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchSettings:
        """The settings :meth:`to_dict` wrote."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"bench settings: unknown fields {unknown}")
        return cls(**{k: _tuples(v) for k, v in values.items()})


CAMERAS = ("image", "wrist_image")


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples the fields hold (nested too)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value



