"""``MixtureDataset``: several resumable datasets sampled with weights, as one resumable stream."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch.utils.data

from torch_rlds._mixture_stream import MixtureStream
from torch_rlds._streamed import Progress, StreamedDataset
from torch_rlds.transforms import uniform

MIXTURE_STATE_VERSION = 1
_MIXTURE_TAG = 0x4D495854
_STATE_FIELDS = {"version", "fingerprint", "samples", "exhausted", "weights", "datasets"}


class MixtureDataset(torch.utils.data.IterableDataset):
    """Step samples drawn from several datasets with sampling weights.

    **Which dataset.** Sample ``k`` (counted per reader: per DataLoader worker of each
    process) comes from dataset ``i`` where ``u = hash(seed, reader, k)`` falls in the ``i``-th
    interval of the cumulative normalized weights of the datasets that have not ended. The
    choice is a pure function of ``(seed, reader, k)``, the weights and which datasets have
    ended; with one reader, of ``(seed, k)``. Over many samples the share of dataset ``i``
    converges to its weight (independent draws: the count after ``n`` samples is binomial).

    **Weights** are used as given, or multiplied by each dataset's size when ``balance=True``
    (``sizes``, else the episode count ``len(dataset.source)``: give step counts as ``sizes``
    to balance by steps, e.g. ``Stats.count`` from :mod:`torch_rlds.stats`), then normalized.

    **Datasets that end** (``repeat=False``): when the chosen dataset has no sample left, it is
    marked ended and the same ``u`` chooses again among the others, renormalized. The mixture
    ends when every dataset has; so every sample of every dataset is emitted exactly once.
    Iterating again after that starts the next pass (each dataset's next epoch). With
    ``repeat=True`` datasets it never ends.

    **State.** ``{"version", "fingerprint": {"num_datasets", "seed"}, "samples", "exhausted",
    "weights", "datasets": [each dataset's own state]}``: JSON-serialisable, its size grows with
    the number of datasets only. Each dataset resumes from its own state, so restoring reads
    at most one shuffle window per dataset. The fingerprint must match on load (each dataset
    also checks its own).

    **Weights may change on restore.** ``weights`` in a saved state records the weights in
    force, for reference; loading it into a mixture with other weights (or another
    ``balance``) is allowed: the samples already emitted stay emitted, every dataset continues
    exactly where it stopped (no sample repeats or is skipped within a dataset), and the new
    weights choose from sample ``samples`` on. With unchanged weights the resumed stream is
    bit-identical to the uninterrupted one. This supports curricula and re-weighting a run
    without losing the datasets' positions; what fixes the order within each dataset (seed,
    shuffle window...) remains in the datasets' fingerprints and may not change.

    Every sample gets ``meta["dataset_index"]`` (int64). Under a DataLoader each worker holds a
    copy; the object is not meant to be iterated from two threads at once.

    Args:
      datasets: resumable iterable datasets (``state_dict`` / ``load_state_dict``), e.g.
        :class:`torch_rlds.RLDSDataset` or :class:`torch_rlds.transforms.TransformedDataset`.
      weights: one positive number per dataset (default: equal).
      seed: the seed of the choice of dataset (>= 0).
      balance: multiply the weights by the dataset sizes.
      sizes: the sizes ``balance`` uses (default: episode counts).
    """

    def __new__(cls, datasets: Sequence[Any] = (), *args: Any, **kwargs: Any) -> Any:
        if cls is MixtureDataset and _in_the_global_order(datasets):
            cls = GlobalMixture
        return super().__new__(cls)

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float] | None = None, *,
                 seed: int = 0, balance: bool = False,
                 sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.datasets = list(datasets)
        n = len(self.datasets)
        if n < 1:
            raise ValueError("a mixture needs at least one dataset (got none)")
        for i, d in enumerate(self.datasets):
            if not (callable(getattr(d, "state_dict", None))
                    and callable(getattr(d, "load_state_dict", None))):
                raise TypeError(f"dataset {i} ({type(d).__name__}) has no state_dict / "
                                "load_state_dict, so the mixture could not resume it")
        if type(seed) is not int or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (got {seed!r})")
        self.seed = seed
        self.balance = bool(balance)
        raw = [1.0] * n if weights is None else list(weights)
        if len(raw) != n:
            raise ValueError(f"{len(raw)} weights for {n} datasets")
        for i, w in enumerate(raw):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) \
                    or w <= 0:
                raise ValueError(f"weights[{i}] must be a finite number > 0 (got {w!r})")
        effective = np.asarray(raw, dtype=np.float64)
        if balance:
            sizes = self._sizes(sizes)
            effective = effective * np.asarray(sizes, dtype=np.float64)
        elif sizes is not None:
            raise ValueError("sizes is used only with balance=True")
        self.weights = effective / effective.sum()
        self._cumulative: dict[tuple[int, ...], list[float]] = {}
        self._samples = 0
        self._exhausted = [False] * n

    def _sizes(self, sizes: Sequence[int] | None) -> list[int]:
        if sizes is None:
            sizes = []
            for i, d in enumerate(self.datasets):
                source = getattr(d, "source", None)
                if source is None:
                    raise ValueError(f"balance=True: dataset {i} ({type(d).__name__}) has no "
                                     "source to count episodes of; pass sizes")
                sizes.append(len(source))
        sizes = list(sizes)
        if len(sizes) != len(self.datasets):
            raise ValueError(f"{len(sizes)} sizes for {len(self.datasets)} datasets")
        for i, s in enumerate(sizes):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise ValueError(f"sizes[{i}] must be an int >= 1 (got {s!r})")
        return sizes

    # -- the choice ------------------------------------------------------------------------
    def _reader_index(self) -> int:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        process = getattr(self.datasets[0], "process_index", 0)
        return int(process) * workers + worker

    def choose(self, k: int, reader: int = 0, exhausted: Sequence[bool] | None = None) -> int:
        """The dataset sample ``k`` of ``reader`` comes from, with ``exhausted`` datasets out."""
        active = tuple(i for i in range(len(self.datasets)) if not (exhausted and exhausted[i]))
        if not active:
            raise ValueError("every dataset of the mixture has ended")
        cumulative = self._cumulative.get(active)
        if cumulative is None:
            sums = np.cumsum(self.weights[list(active)])
            cumulative = self._cumulative[active] = [float(c / sums[-1]) for c in sums]
        position = bisect.bisect_right(cumulative, uniform(self.seed, reader, k, _MIXTURE_TAG))
        return active[min(position, len(active) - 1)]

    # -- Stateful protocol -----------------------------------------------------------------
    def fingerprint(self) -> dict[str, int]:
        """What a state must match to be loaded here (the weights need not: see above)."""
        return {"num_datasets": len(self.datasets), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The mixture's position and every dataset's state; JSON-serialisable."""
        return self._state_mark()()

    def _state_mark(self) -> Any:
        """What :meth:`state_dict` returns now, made when called (each dataset's own mark where
        it has one, else its state now)."""
        samples, exhausted = self._samples, [int(e) for e in self._exhausted]
        marks = [_mark(d) for d in self.datasets]
        return lambda: {
            "version": MIXTURE_STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "samples": samples,
            "exhausted": list(exhausted),
            "weights": [repr(float(w)) for w in self.weights],
            "datasets": [mark() for mark in marks],
        }

    def _check_state(self, state_dict: Any, num_workers: int, worker_index: int,
                     ended: bool = False) -> None:
        """Check ``state_dict`` as worker ``worker_index`` of ``num_workers`` would load it,
        without loading it (each dataset checks its own part); ``ended``: its iterator had
        ended, which only a mixture whose every dataset ended can be."""
        self._parse(state_dict, lambda i, d, state: d._check_state(state, num_workers,
                                                                   worker_index))
        if ended and not all(state_dict["exhausted"]):
            raise ValueError("state field 'fetcher_ended' is true, but mixture datasets "
                             f"{[i for i, e in enumerate(state_dict['exhausted']) if not e]} "
                             "have not ended")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` on the next ``iter()``; raises ``ValueError`` naming the
        field on a malformed state or another mixture's."""
        samples, exhausted = self._parse(state_dict,
                                         lambda i, d, state: d.load_state_dict(state))
        self._samples = samples
        self._exhausted = [bool(e) for e in exhausted]

    def _parse(self, state_dict: Any, each: Any) -> tuple[int, list[int]]:
        """Check ``state_dict``'s own fields, then hand each dataset its state with
        ``each(index, dataset, state)``; returns ``(samples, exhausted)``."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"mixture state must be a dict (got {type(state_dict).__name__})")
        version = state_dict.get("version")
        if type(version) is not int or version != MIXTURE_STATE_VERSION:
            raise ValueError(f"mixture state field 'version': {version!r} is not a version this "
                             f"torch_rlds reads (expected {MIXTURE_STATE_VERSION})")
        if set(state_dict) != _STATE_FIELDS:
            raise ValueError(f"mixture state: fields {sorted(state_dict)}, expected "
                             f"{sorted(_STATE_FIELDS)}")
        fingerprint = state_dict["fingerprint"]
        expected = self.fingerprint()
        if not isinstance(fingerprint, dict) or set(fingerprint) != set(expected):
            raise ValueError(f"mixture state field 'fingerprint' must have fields "
                             f"{sorted(expected)} (got {fingerprint!r:.200})")
        differ = [f"{k} in checkpoint: {fingerprint[k]!r} / in this mixture: {expected[k]!r}"
                  for k in expected if fingerprint[k] != expected[k]]
        if differ:
            raise ValueError("state belongs to another mixture: " + "; ".join(differ))
        samples = state_dict["samples"]
        if type(samples) is not int or samples < 0:
            raise ValueError(f"mixture state field 'samples' must be an int >= 0 (got "
                             f"{samples!r})")
        n = len(self.datasets)
        exhausted = state_dict["exhausted"]
        if not isinstance(exhausted, list) or len(exhausted) != n or \
                any(type(e) is not int or e not in (0, 1) for e in exhausted):
            raise ValueError(f"mixture state field 'exhausted' must be a list of {n} 0/1 ints "
                             f"(got {exhausted!r:.200})")
        states = state_dict["datasets"]
        if not isinstance(states, list) or len(states) != n:
            raise ValueError(f"mixture state field 'datasets' must be a list of {n} states")
        for i, (dataset, state) in enumerate(zip(self.datasets, states)):
            try:
                each(i, dataset, state)
            except ValueError as e:
                raise ValueError(f"mixture dataset {i}: {e}") from e
        return samples, exhausted

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader_index()
        if all(self._exhausted):
            # A new pass after the mixture ended: every dataset goes on to its next epoch.
            self._exhausted = [False] * len(self.datasets)
        iterators = [iter(d) for d in self.datasets]
        while not all(self._exhausted):
            i = self.choose(self._samples, reader, self._exhausted)
            try:
                sample = next(iterators[i])
            except StopIteration:
                self._exhausted[i] = True
                continue
            self._samples += 1
            out = dict(sample)
            out["meta"] = {**sample["meta"], "dataset_index": np.int64(i)}
            yield out

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return (f"MixtureDataset({len(self.datasets)} datasets, weights=[{weights}], "
                f"seed={self.seed})")


def _mark(dataset: Any) -> Any:
    """``dataset``'s state as of now, made when called: its own mark, else its state now."""
    mark = getattr(dataset, "_state_mark", None)
    if mark is not None:
        return mark()
    state = dataset.state_dict()
    return lambda: state


def _in_the_global_order(datasets: Sequence[Any]) -> bool:
    """Whether a mixture of ``datasets`` reads in the global order: every one an endless
    RLDSDataset in the global order, all of one host's part (see :class:`GlobalMixture`)."""
    from torch_rlds.dataset import RLDSDataset

    datasets = list(datasets)
    return bool(datasets) and all(
        isinstance(d, RLDSDataset) and d.order == "global" and d.repeat
        and d.batch_size is None
        and (d.process_index, d.process_count) == (datasets[0].process_index,
                                                  datasets[0].process_count)
        for d in datasets)


class GlobalMixture(StreamedDataset, MixtureDataset):
    """A :class:`MixtureDataset` of endless datasets in the global order, which
    ``MixtureDataset(...)`` is when its datasets allow (see
    :mod:`torch_rlds._mixture_stream`).

    **Which dataset.** Global sample ``k`` comes from dataset ``i`` where ``u = hash(seed, k)``
    falls in the ``i``-th interval of the cumulative normalised weights: a pure function of the
    seed, the weights and ``k``, whatever the hosts and workers. It is the next sample of
    dataset ``i``'s own global order.

    **State.** ``{"version": 2, "order": "global-mixture", "fingerprint": {"num_datasets",
    "seed", "datasets": [each dataset's fingerprint]}, "start", "batch_size", "done", "counts",
    "skipped", "weights"}``: the position in the stream and, per dataset, the samples drawn
    from it before it. It names no host or worker: it resumes under any other topology, with
    bit-identical global batches at the same global batch size. The weights may change on
    restore: every dataset goes on from its own count, and the new weights draw from the
    position on.

    **Batches.** With ``batch_size`` (or through :class:`torch_rlds.DataLoader`) a worker
    builds whole batches of samples of several datasets with one decode pool and one batch
    builder: each dataset's samples are made as it says (windows, transform), and a batch of
    samples made alike is built straight into its buffer. Every sample has
    ``meta["dataset_index"]``.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float] | None = None, *,
                 seed: int = 0, balance: bool = False,
                 sizes: Sequence[int] | None = None) -> None:
        MixtureDataset.__init__(self, datasets, weights, seed=seed, balance=balance,
                                sizes=sizes)
        first = self.datasets[0]
        self.process_index, self.process_count = first.process_index, first.process_count
        self.repeat = True
        self.batch_size, self.drop_last, self._host_batch = None, False, 1
        self.decode_threads = first.decode_threads
        self.obs_window, self.action_horizon = first.obs_window, first.action_horizon
        self.fast_jpeg, self.sample_transform = first.fast_jpeg, None
        self._stream = MixtureStream(self.datasets, self.weights, seed)
        self._progress = Progress(self._stream.initial(self))

    def __repr__(self) -> str:
        return "Global" + MixtureDataset.__repr__(self)


__all__ = ["GlobalMixture", "MixtureDataset"]
