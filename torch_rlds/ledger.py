"""The exposure ledger: which step of which episode every sample of given global batches is.

Under the global order (:mod:`torch_rlds._global_order`) the sequence of global batches is a
pure function of the data and the config, so the samples a run trained on in any batch follow
from the config alone, without the run and without reading a sample: "what did the loss spike
at step 12,000 train on" is ``torch-rlds ledger --config-name NAME --batches 12000:12010`` or
:func:`ledger`.

**Which batches.** Batch ``j`` is the ``j``-th global batch (``G = loader.batch_size`` samples,
every host's part of one training step together) of a run that started at stream position
``start`` (0: a run from the beginning) and kept that global batch size: stream positions
``start + j G .. start + (j + 1) G - 1``. A run that was saved and resumed with the same global
batch size, under any hosts and workers, keeps this numbering. A run resumed with another
global batch size goes on from the next sample it had not consumed: for the batches after the
change, give ``start`` = that position (``batches_seen * G_before`` of a run that had used
``G_before`` from position 0) and count ``j`` from the batch of the change. With
``data.repeat=false`` each epoch starts a new grid of batches at its first sample (the short
last batch of an epoch is not filled from the next one), as the loader's passes do.

**Where the answer comes from.** The dataset the config builds, built as each host builds it
(its step counts come from the step-count cache; no sample, record or frame is read and no
step index is built): its global order locates each stream position, its batch size and host
slicing say which host reads it. :func:`check_hosts` builds it once per host ``p`` of ``P``
(``process_index=p``, ``process_count=P``) and confirms from each host's own plan that the
hosts read disjoint samples that together are the global batches.

Each row names the batch, the row inside it (hosts' parts in host order), the host, the stream
position, the epoch, the dataset (its index in the mixture, 0 for a single dataset, as in a
mixture sample's ``meta["dataset_index"]``, and its name), the episode (index in the split
expression, as in a sample's ``meta["episode_index"]``) and step (``meta["step_index"]``), and
the tfrecord shard, record and byte offset of the episode. With ``data.on_corrupt: skip`` a
sample whose episode turns out to be corrupt when read is replaced by the same position of a
later epoch; the ledger, which reads nothing, lists the planned sample.

**Mixtures.** A mixture config whose datasets all read endlessly in the global order is a
:class:`~torch_rlds.mixture.GlobalMixture`: the dataset of global sample ``k`` is drawn from
the mixture's seed, its weights and ``k`` alone, and the sample is the next one of that
dataset's own global order (:mod:`torch_rlds._mixture_stream`), so the ledger answers for it
too: the epoch, episode and step are those of the sample's dataset. It counts the draws from
the stream's start, at the config's weights: for a run whose weights changed on a restore,
the rows after the change are not the ones it read. A mixture of datasets in the window
order, or of one-pass datasets, draws per reader as it goes, and is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Exposure", "LedgerError", "check_hosts", "format_table", "ledger"]


class LedgerError(ValueError):
    """The hosts of a run would not read disjoint samples that together make the global
    batches (what :func:`check_hosts` found), or a config the ledger cannot answer for."""


class Exposure(NamedTuple):
    """One sample of a global batch: where it sits, and which step of which episode it is."""

    batch: int
    row: int
    host: int
    position: int
    epoch: int
    dataset_index: int
    dataset: str
    episode: int
    step: int
    file: str
    record: int
    offset: int


def ledger(config: Any, batches: Iterable[int] | int, *, overrides: Sequence[str] = (),
           start: int = 0, hosts: int | None = None) -> list[Exposure]:
    """The samples of global batches ``batches`` of the run ``config`` describes, in batch and
    row order (see the module docstring for the numbering).

    Args:
      config: a :class:`torch_rlds.Config`, or a shipped config name or YAML path.
      batches: batch numbers (a ``range``, a list, or one int), each >= 0.
      overrides: ``key=value`` overrides when ``config`` is a name or path.
      start: the stream position of batch 0 (see "Which batches").
      hosts: the run's process count, which decides the ``host`` column (default: the
        config's ``process_count``, else what the runtime says, else 1).
    """
    config = _config(config, overrides)
    wanted = _batches(batches)
    _check_start(start)
    count = config.processes()[1] if hosts is None else hosts
    _check_hosts_arg("hosts", count)
    local = config.local_batch_size(count)
    # One planner of the whole global batch: the order does not depend on the hosts, and the
    # host of a row is where the host slicing puts it.
    plan = _Planner(config, 0, 1, config.loader.batch_size)
    rows = []
    for batch in wanted:
        positions = plan.host_positions(start, batch)
        for row, item in enumerate(plan.locate(batch, positions, row=0, host=0)):
            rows.append(item._replace(row=row, host=row // local))
    return rows


def check_hosts(config: Any, batches: Iterable[int] | int, hosts: int, *,
                overrides: Sequence[str] = (), start: int = 0) -> list[Exposure]:
    """The samples of ``batches`` as each of ``hosts`` hosts plans them, after confirming that
    the hosts read disjoint samples that together are exactly the global batches of
    :func:`ledger`: each host's dataset is built as that host builds it (``process_index=p``,
    ``process_count=hosts``, the host's share of ``loader.batch_size``) and asked for its own
    part. Raises :class:`LedgerError` naming the first batch and host that disagree."""
    config = _config(config, overrides)
    wanted = _batches(batches)
    _check_start(start)
    _check_hosts_arg("--check-hosts", hosts)
    local = config.local_batch_size(hosts)
    reference = ledger(config, wanted, start=start, hosts=hosts)
    planners = [_Planner(config, p, hosts, local) for p in range(hosts)]
    fingerprints = [p.fingerprint for p in planners]
    for p, fingerprint in enumerate(fingerprints):
        differ = sorted(k for k in set(fingerprint) | set(fingerprints[0])
                        if fingerprint.get(k) != fingerprints[0].get(k))
        if differ:
            raise LedgerError(f"host {p} builds another dataset than host 0: "
                              + ", ".join(f"{k} {fingerprints[0].get(k)!r} / "
                                          f"{fingerprint.get(k)!r}" for k in differ))
    rows: list[Exposure] = []
    by_batch: dict[int, list[Exposure]] = {}
    for item in reference:
        by_batch.setdefault(item.batch, []).append(item)
    for batch in wanted:
        expected = by_batch.get(batch, [])
        parts = [planner.host_positions(start, batch) for planner in planners]
        shared = _first_shared(parts)
        if shared is not None:
            raise LedgerError(f"batch {batch}: hosts {shared[0]} and {shared[1]} would both "
                              f"read stream position {shared[2]}")
        got: list[Exposure] = []
        for p, (planner, positions) in enumerate(zip(planners, parts)):
            got += planner.locate(batch, positions, row=len(got), host=p)
        if got != expected:
            where = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                         min(len(got), len(expected)))
            found = got[where] if where < len(got) else "nothing"
            wanted_row = expected[where] if where < len(expected) else "nothing"
            raise LedgerError(f"batch {batch}, row {where}: the hosts read {found}, the global "
                              f"batch holds {wanted_row}")
        rows += got
    return rows


class _Planner:
    """The dataset ``config`` builds for host ``process_index`` of ``process_count``, emitting
    host batches of ``host_batch`` samples (as the config's loader has it build them), and the
    parts of its global order the ledger asks for."""

    def __init__(self, config: Any, process_index: int, process_count: int,
                 host_batch: int) -> None:
        from torch_rlds._global_stream import global_batch_size
        from torch_rlds.mixture import GlobalMixture, MixtureDataset

        with _no_index_build():
            dataset = config.make_dataset(process_index, process_count)
        if isinstance(dataset, MixtureDataset):
            if not isinstance(dataset, GlobalMixture):
                names = ", ".join(e.config for e in config.mixture.datasets)
                raise LedgerError(
                    f"config {config.name} is a mixture ({names}) whose datasets do not all "
                    "read endlessly in the global order (data.order=global, data.repeat=true): "
                    "such a mixture draws its datasets per reader as it goes, which the "
                    "config alone does not tell")
            children = dataset.datasets
        elif dataset.order != "global":
            raise LedgerError(f"config {config.name} reads in the window order (data.order="
                              f"{config.data.order}); the ledger needs the global order, where "
                              "the batches do not depend on the hosts and workers")
        else:
            children = [dataset]
        self.mixture = isinstance(dataset, GlobalMixture)
        self.dataset = dataset.batching_view(host_batch)
        self.stream = self.dataset._stream
        self.batch_size = global_batch_size(self.dataset)
        self.fingerprint = self.stream.fingerprint(self.dataset)
        self._children = [_Files(child) for child in children]
        # A mixture's draws counted up to a position: (position, samples of each dataset
        # before it), so that batches asked for in order are counted once.
        self._counted: tuple[int, np.ndarray | None] = (0, None)

    def host_positions(self, start: int, batch: int) -> np.ndarray:
        """The stream positions this host reads of global batch ``batch`` (see the module
        docstring), as the dataset's plan cuts them."""
        from torch_rlds._global_order import host_samples

        grid, index, end = self._grid(start, batch)
        d = self.dataset
        positions = host_samples(grid, index, self.batch_size, d.process_index,
                                 d.process_count)
        return positions if end is None else positions[positions < end]

    def _grid(self, start: int, batch: int) -> tuple[int, int, int | None]:
        """``(grid start, batch index in it, end)``: batch ``batch`` of a stream from ``start``
        is batch ``index`` of the grid of global batches that starts at stream position
        ``grid``, cut at ``end`` (the end of its epoch for a one-pass dataset, else ``None``)."""
        if self.dataset.repeat:
            return start, batch, None
        steps = self.stream.num_steps
        first_end = self.stream.epoch_end(start)
        first = -(-(first_end - start) // self.batch_size)
        if batch < first:
            return start, batch, first_end
        per_epoch = -(-steps // self.batch_size)
        epochs, index = divmod(batch - first, per_epoch)
        grid = first_end + epochs * steps
        return grid, index, grid + steps

    def _locate(self, positions: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(dataset index, epoch, episode, step)`` of the ascending ``positions``."""
        if not self.mixture:
            epochs, episodes, steps = self.stream.locate(positions)
            return np.zeros(len(positions), dtype=np.int64), epochs, episodes, steps
        first = int(positions[0])
        at, counts = self._counted
        if counts is None or first < at:
            at, counts = 0, np.zeros(len(self._children), dtype=np.int64)
        counts = counts + self.stream.draws.counts(at, first)
        self._counted = (first, counts)
        return self.stream.locate(positions, counts, first)

    def locate(self, batch: int, positions: np.ndarray, *, row: int,
               host: int) -> list[Exposure]:
        """The rows of ``positions`` (this host's part of ``batch``), numbered from ``row``."""
        if positions.size == 0:
            return []
        located = self._locate(positions)
        return [self._children[d].exposure(batch, row + i, host, position, epoch, d, episode,
                                           step)
                for i, (position, d, epoch, episode, step) in enumerate(zip(
                    positions.tolist(), *(a.tolist() for a in located)))]


class _Files:
    """Where the episodes of one dataset (of a mixture) lie: its name, shards and records."""

    def __init__(self, dataset: Any) -> None:
        self.name = dataset.source.info.name
        files = dataset._stream.files
        self._shard_of, self._record_of = files.shard_of, files.record_of
        self._shards = [files.shard(s) for s in range(files.num_shards)]

    def exposure(self, batch: int, row: int, host: int, position: int, epoch: int,
                 dataset_index: int, episode: int, step: int) -> Exposure:
        """The row of step ``step`` of ``episode`` of this dataset."""
        shard = self._shards[int(self._shard_of[episode])]
        record = int(self._record_of[episode])
        return Exposure(batch, row, host, position, epoch, dataset_index, self.name, episode,
                        step, shard.path, record, int(shard.offsets[record]))


@contextlib.contextmanager
def _no_index_build() -> Iterator[None]:
    """Build datasets without starting the background step-index build (the ledger reads no
    step; an index would only cost a pass over the data)."""
    from torch_rlds.dataset import STEP_INDEX_ENV

    before = os.environ.get(STEP_INDEX_ENV)
    os.environ[STEP_INDEX_ENV] = "off"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STEP_INDEX_ENV, None)
        else:
            os.environ[STEP_INDEX_ENV] = before


def _config(config: Any, overrides: Sequence[str]) -> Any:
    from torch_rlds.config import Config, load_config

    if isinstance(config, (str, os.PathLike)):
        config = load_config(os.fspath(config), overrides)
    elif overrides:
        raise ValueError("overrides apply to a config name or path, not to a Config object "
                         "(use dataclasses.replace)")
    if not isinstance(config, Config):
        raise TypeError(f"config must be a torch_rlds.Config, a config name or a YAML path "
                        f"(got {type(config).__name__})")
    return config


def _batches(batches: Iterable[int] | int) -> list[int]:
    wanted = [batches] if isinstance(batches, int) else list(batches)
    for b in wanted:
        if type(b) is not int or b < 0:
            raise ValueError(f"batch numbers must be ints >= 0 (got {b!r})")
    return wanted


def _check_start(start: int) -> None:
    if type(start) is not int or start < 0:
        raise ValueError(f"start must be a stream position, an int >= 0 (got {start!r})")


def _check_hosts_arg(name: str, hosts: int) -> None:
    if type(hosts) is not int or hosts < 1:
        raise ValueError(f"{name} must be an int >= 1 (got {hosts!r})")


def _first_shared(parts: list[np.ndarray]) -> tuple[int, int, int] | None:
    """``(host, other host, position)`` of the first stream position two hosts' parts share,
    or ``None``."""
    owner: dict[int, int] = {}
    for p, positions in enumerate(parts):
        for position in positions.tolist():
            if position in owner:
                return owner[position], p, position
            owner[position] = p
    return None


COLUMNS = Exposure._fields


def format_table(rows: Sequence[Exposure]) -> str:
    """``rows`` as an aligned text table, one sample a line."""
    cells = [COLUMNS] + [tuple(str(v) for v in r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    text = [col.ljust(w) if col in ("dataset", "file") else col.rjust(w)
            for col, w in zip(COLUMNS, widths)]
    lines = ["  ".join(text).rstrip()]
    for r in cells[1:]:
        lines.append("  ".join(v.ljust(w) if col in ("dataset", "file") else v.rjust(w)
                               for v, col, w in zip(r, COLUMNS, widths)).rstrip())
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``torch-rlds ledger``, added to ``parser``."""
    parser.add_argument("--config-name", default="demo",
                        help="a shipped config name or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (loader.batch_size=64)")
    parser.add_argument("--batches", required=True, type=_batch_range,
                        help="global batches A:B (A to B-1) or one batch N")
    parser.add_argument("--start", type=int, default=0,
                        help="stream position of batch 0: for the batches after a resume with "
                             "another global batch size (default 0)")
    parser.add_argument("--hosts", type=int, default=None,
                        help="the run's process count, for the host column (default: the "
                             "config's process_count, else 1)")
    parser.add_argument("--check-hosts", type=int, default=None, metavar="P",
                        help="build the dataset as each of P hosts would and confirm they read "
                             "disjoint samples that together are the global batches")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows")


def _batch_range(text: str) -> range:
    first, sep, stop = text.partition(":")
    try:
        a = int(first)
        b = int(stop) if sep else a + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batches must be A:B or N (got {text!r})") from None
    if a < 0 or b <= a:
        raise argparse.ArgumentTypeError(f"--batches {text}: need 0 <= A < B")
    return range(a, b)


def run(args: argparse.Namespace) -> int:
    """``torch-rlds ledger`` with parsed ``args``: prints the rows (a table or ``--json``)."""
    if args.check_hosts is not None:
        if args.hosts is not None and args.hosts != args.check_hosts:
            raise ValueError(f"--hosts {args.hosts} and --check-hosts {args.check_hosts} "
                             "name different process counts")
        rows = check_hosts(args.config_name, args.batches, args.check_hosts,
                           overrides=args.overrides, start=args.start)
    else:
        rows = ledger(args.config_name, args.batches, overrides=args.overrides,
                      start=args.start, hosts=args.hosts)
    if args.json:
        print(json.dumps([r._asdict() for r in rows]))
    else:
        print(format_table(rows))
    if args.check_hosts is not None:
        b = args.batches
        print(f"check: {args.check_hosts} hosts read disjoint samples that together are global "
              f"batches {b.start}..{b.stop - 1} ({len(rows)} samples)",
              file=sys.stderr if args.json else sys.stdout)
    return 0
