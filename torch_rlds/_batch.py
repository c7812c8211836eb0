"""Whole batches of step samples, built straight into one buffer, frames decoded by threads.

A batch built here equals, bit for bit, :func:`torch_rlds.collate` of the same samples as
:meth:`EpisodeSamples.sample` makes them; it only skips the work in between: every image is
decoded straight into its row of the batch (in shared memory inside a DataLoader worker), a
frame that several samples of the batch show is decoded once, and index arithmetic, masks and
metadata are computed for the whole batch at once.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from torch_rlds._images import EncodedImages, ImageDecodeError, decode_image
from torch_rlds._limits import check_batch_bytes
from torch_rlds._samples import EpisodeSamples, Recipe, goal_step
from torch_rlds.collate import allocate, collate

# One step sample to make: (sampler, step, epoch).
Item = tuple[EpisodeSamples, int, int]


class BatchBuilder:
    """Makes batches from lists of :data:`Item`.

    ``start(items)`` lays the batch out, fills everything but the images and hands the frames to
    ``pool`` in chunks; ``result()`` of what it returns decodes the chunks no thread has started
    yet (all of them without a pool), waits for the others and gives the batch. Several batches
    may be in flight at once.

    Every item's sample is made as its sampler's :class:`~torch_rlds._samples.Recipe` says (a
    mixture's datasets each have theirs), else as ``recipe`` says. Items whose recipes make
    samples alike (the same windows and JPEG mode, no transform) and whose samplers lay steps
    out alike are built straight into the batch buffer, datasets mixed or not; others are made
    sample by sample, transformed, and stacked with :func:`collate`.

    Args:
      recipe: how the samples of samplers without a recipe of their own are made.
      pool: the threads that decode frames, or ``None``.
      threads: how many threads ``pool`` has (the batch's frames are cut into a few chunks per
        thread, which keeps them busy without a task per frame).
    """

    def __init__(self, recipe: Recipe, *, pool: concurrent.futures.Executor | None,
                 threads: int) -> None:
        self.recipe = recipe
        self.pool = pool
        self.chunks = 4 * threads if pool is not None else 1

    def recipe_of(self, sampler: EpisodeSamples) -> Recipe:
        """The recipe ``sampler``'s samples are made by."""
        return sampler.recipe or self.recipe

    def start(self, items: Sequence[Item]) -> _Pending:
        """Begin the batch of ``items`` (at least one)."""
        layout = items[0][0].layout()
        first = self.recipe_of(items[0][0])
        if (layout is None or not first.same_sampling(first)
                or any(s.layout() is not layout and s.layout() != layout for s, _, _ in items)
                or any(not self.recipe_of(s).same_sampling(first) for s, _, _ in items)):
            return _SampleBySample(self, items)
        return self._direct(items, layout, first)

    def _direct(self, items: Sequence[Item], layout: tuple, recipe: Recipe) -> _Pending:
        size = len(items)
        w, h = recipe.obs_window, recipe.action_horizon
        obs_offsets = np.arange(1 - w, 1, dtype=np.int64)
        act_offsets = np.arange(h, dtype=np.int64)
        observations, action_shape = layout
        specs = [((size, w, *shape), _torch_dtype(dtype)) for _, shape, dtype, _ in observations]
        rows = (w,) if recipe.window_actions else ()
        goals = [(key, shape, dtype) for key, shape, dtype, is_image in observations if is_image
                 ] if recipe.goal_seed is not None else []
        specs += [((size, *shape), _torch_dtype(dtype)) for _, shape, dtype in goals]
        specs += [((size, w), torch.bool), ((size, *rows, h, *action_shape), torch.float32),
                  ((size, *rows, h), torch.bool), ((size,), torch.int64), ((size,), torch.int64),
                  ((size,), torch.int64)]
        check_batch_bytes(sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs),
                          items[0][0].name)
        tensors = allocate(specs)
        observation = dict(zip([key for key, _, _, _ in observations], tensors))
        task = dict(zip([key for key, _, _ in goals], tensors[len(observations):]))
        obs_pad, action, act_pad, episode, step, epoch = tensors[len(observations) + len(goals):]

        steps = np.fromiter((t for _, t, _ in items), np.int64, size)
        lengths = np.fromiter((s.num_steps for s, _, _ in items), np.int64, size)
        obs_raw = steps[:, None] + obs_offsets
        obs_idx = np.maximum(obs_raw, 0)  # a window ends at its own step: never past the end
        np.less(obs_raw, 0, out=obs_pad.numpy())
        if recipe.window_actions:  # every window row's chunk: [size, w, h]
            act_raw = obs_raw[:, :, None] + act_offsets
            act_idx = np.clip(act_raw, 0, lengths[:, None, None] - 1)
            np.logical_or(act_raw >= lengths[:, None, None], obs_raw[:, :, None] < 0,
                          out=act_pad.numpy())
        else:
            act_raw = steps[:, None] + act_offsets
            act_idx = np.minimum(act_raw, lengths[:, None] - 1)
            np.greater_equal(act_raw, lengths[:, None], out=act_pad.numpy())
        step.numpy()[:] = steps
        episode.numpy()[:] = [s.episode_index for s, _, _ in items]
        epoch.numpy()[:] = [e for _, _, e in items]
        action_out = action.numpy()
        for i, (sampler, _, _) in enumerate(items):
            np.take(sampler.action, act_idx[i], axis=0, out=action_out[i], mode="clip")

        frames: list[tuple[EncodedImages, int, np.ndarray, str]] = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        # The row each (sampler, camera, step) frame is decoded into: later uses copy it.
        decoded: dict[tuple[int, str, int], np.ndarray] = {}
        for key, _, _, is_image in observations:
            out = observation[key].numpy()
            if not is_image:
                for i, (sampler, _, _) in enumerate(items):
                    np.take(sampler.observation[key], obs_idx[i], axis=0, out=out[i],
                            mode="clip")
                continue
            for i, (sampler, _, _) in enumerate(items):
                images = sampler.observation[key]
                for j, t in enumerate(obs_idx[i].tolist()):
                    row = out[i, j]
                    seen = decoded.get((id(sampler), key, t))
                    if seen is not None:
                        copies.append((row, seen))
                    else:
                        decoded[id(sampler), key, t] = row
                        frames.append((images, t, row, sampler.name))
        if goals and recipe.goal_seed is not None:  # goals are made only with a seed
            goal_steps = [goal_step(recipe.goal_seed, e, s.episode_index, t, s.num_steps)
                          for s, t, e in items]
            for key, _, _ in goals:
                out = task[key].numpy()
                for i, (sampler, _, _) in enumerate(items):
                    seen = decoded.get((id(sampler), key, goal_steps[i]))
                    if seen is not None:
                        copies.append((out[i], seen))
                    else:
                        decoded[id(sampler), key, goal_steps[i]] = out[i]
                        frames.append((sampler.observation[key], goal_steps[i], out[i],
                                       sampler.name))
        meta = {"episode_index": episode, "step_index": step, "epoch": epoch}
        if any(self.recipe_of(s).dataset_index is not None for s, _, _ in items):
            meta["dataset_index"] = torch.tensor(
                [self.recipe_of(s).dataset_index for s, _, _ in items], dtype=torch.int64)
        batch = {
            "observation": observation,
            "observation_is_pad": obs_pad,
            "action": action,
            "action_is_pad": act_pad,
            "language_instruction": [s.text(t) for s, t, _ in items],
            "meta": meta,
        }
        if goals:
            batch["task"] = {**task, "goal_step": torch.tensor(goal_steps, dtype=torch.int64)}
        return _Direct(batch, self._decode(frames, recipe.fast_jpeg), copies, recipe.fast_jpeg)

    def _decode(self, frames: list, fast_jpeg: bool
                ) -> list[tuple[list, concurrent.futures.Future | None]]:
        """``frames`` cut into chunks, each with its task on the pool (``None`` without one:
        ``result()`` decodes it)."""
        if self.pool is None or not frames:
            return [(frames, None)]
        n = min(self.chunks, len(frames))
        bounds = [len(frames) * k // n for k in range(n + 1)]
        chunks = [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [(chunk, self.pool.submit(_decode_frames, chunk, fast_jpeg))
                for chunk in chunks]


class _Pending:
    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class _Direct(_Pending):
    def __init__(self, batch: dict[str, Any], jobs: list, copies: list, fast_jpeg: bool) -> None:
        self.batch = batch
        self.jobs = jobs
        self.copies = copies
        self.fast_jpeg = fast_jpeg

    def result(self) -> dict[str, Any]:
        errors: dict[int, ImageDecodeError] = {}
        # Chunks no thread has started are decoded here, from the back of the batch while the
        # threads work from its front: the thread that waits for the batch helps instead.
        for k in reversed(range(len(self.jobs))):
            chunk, future = self.jobs[k]
            if future is None or future.cancel():
                try:
                    _decode_frames(chunk, self.fast_jpeg)
                except ImageDecodeError as e:
                    errors[k] = e
        for k, (_, future) in enumerate(self.jobs):
            if future is not None and not future.cancelled():
                try:
                    future.result()
                except ImageDecodeError as e:
                    errors[k] = e
        # Every chunk is done before an error is raised, so no thread still writes into the
        # batch, and the error is that of the first frame in batch order, whoever finished first.
        if errors:
            raise errors[min(errors)]
        for row, seen in self.copies:
            row[...] = seen
        return self.batch


class _SampleBySample(_Pending):
    """Samples made one by one (frames on the pool), finished as their recipes say (in the
    thread that asks for the batch) and stacked with collate."""

    def __init__(self, builder: BatchBuilder, items: Sequence[Item]) -> None:
        self.recipes = [builder.recipe_of(s) for s, _, _ in items]
        make = [(s.sample, (t, r.obs_window, r.action_horizon, e), r.fast_jpeg,
                 r.window_actions, r.goal_seed, r.decode_sizes)
                for (s, t, e), r in zip(items, self.recipes)]
        # Each sample's call (made in result()) or, with a pool, its task on the pool.
        self.jobs: list[tuple[Any, ...] | concurrent.futures.Future[dict[str, Any]]]
        if builder.pool is None:
            self.jobs = list(make)
        else:
            self.jobs = [builder.pool.submit(_make, *job) for job in make]

    def result(self) -> dict[str, Any]:
        samples = []
        for job, recipe in zip(self.jobs, self.recipes):
            sample = job.result() if isinstance(job, concurrent.futures.Future) else _make(*job)
            samples.append(recipe.finish(sample))
        return collate(samples)


def _make(fn: Callable[..., dict[str, Any]], args: tuple, fast_jpeg: bool,
          window_actions: bool, goal_seed: int | None, decode_sizes: tuple) -> dict[str, Any]:
    return fn(*args, fast_jpeg=fast_jpeg, window_actions=window_actions, goal_seed=goal_seed,
              decode_sizes=decode_sizes)


def _decode_frames(frames: list, fast_jpeg: bool) -> None:
    for images, t, row, name in frames:
        try:
            decode_image(images.encoded[t], images.shape, images.dtype, fast=fast_jpeg,
                         out=row, name=f"{images.name}[{t}]", format=images.format)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{name}: {e}") from e


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
