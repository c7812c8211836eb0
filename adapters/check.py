"""``torch-rlds check``: does saving and restoring the data loader resume the stream exactly?

Runs the openpi-style loader of a config (:func:`torch_rlds.adapters.openpi.create_data_loader`)
through the steps a training script takes, and prints one ✓ or ✗ line per check::

    torch-rlds check --config-name demo
    torch-rlds check --config-name bridge data.data_dir=/data/tfds loader.batch_size=64
    torch-rlds check --config-name demo --comprehensive

1. create a loader with ``persistent_iterator=True``;
2. iterate 5 batches (prints ``obs.state`` and ``actions`` shapes);
3. save its state;
4. load the state into a new loader;
5. continue, and compare with the first loader's uninterrupted batches;
6. a loader made without ``persistent_iterator=True`` refuses to save or load.

``--comprehensive`` adds several save/load cycles (in new loaders and in the same one),
tracks every sample id (no duplicate, no gap against the uninterrupted stream, and a whole epoch
covered when the split is small enough to read through), and the two-process multi-host run of
:mod:`torch_rlds.adapters._multihost` (needs jax). Ends with ``ALL TESTS PASSED! ✓``, or exits
nonzero.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from torch_rlds._trees import array_digest

OK, FAIL, SKIP = "✓", "✗", "-"
FIRST_BATCHES = 5
COMPARED_BATCHES = 5
CYCLES = (3, 0, 7, 1)  # batches between saves; 0 saves straight after a load
MAX_COVER_EPISODES = 256
MAX_COVER_BATCHES = 400


class _Report:
    def __init__(self, out) -> None:
        self.out = out
        self.failed = 0
        self.started = time.perf_counter()

    def line(self, mark: str, text: str) -> None:
        print(f"{mark} {text}" if mark else text, file=self.out, flush=True)

    def check(self, passed: bool, text: str) -> bool:
        self.failed += not passed
        self.line(OK if passed else FAIL, text)
        return passed

    def step(self, text: str, fn: Callable[[], str]) -> bool:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except Exception as e:  # every failure is reported as a line, then counted
            self.failed += 1
            self.line(FAIL, f"{text}: {type(e).__name__}: {e}")
            return False
        self.line(OK, f"{text}{': ' + detail if detail else ''} "
                      f"({time.perf_counter() - t0:.2f} s)")
        return True


def _digest(tree: Any) -> dict[str, str]:
    """A digest of every leaf of an ``(observation, actions)`` batch, by path."""
    from torch_rlds.adapters.openpi import Observation

    out: dict[str, str] = {}

    def walk(x: Any, path: str) -> None:
        if isinstance(x, Observation):
            for field in ("images", "image_masks", "state", "action_is_pad", "meta", "prompt"):
                walk(getattr(x, field), f"{path}.{field}")
        elif isinstance(x, dict):
            for k in sorted(x):
                walk(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
            out[path] = hashlib.blake2b("\x00".join(x).encode(), digest_size=16).hexdigest()
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif x is not None:
            out[path] = array_digest(x)

    walk(tree, "batch")
    return out


def _ids(observation: Any) -> list[tuple[int, int, int]]:
    meta = observation.meta
    return list(zip(*(np.asarray(meta[k]).tolist()
                      for k in ("epoch", "episode_index", "step_index"))))


def _first_difference(expected: dict[str, str], got: dict[str, str]) -> str | None:
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            return key
    return None


class _Run:
    """The state shared between the steps of one check."""

    def __init__(self, config: Any, workdir: str, report: _Report) -> None:
        self.config = config
        self.workdir = workdir
        self.report = report
        self.loader: Any = None
        self.iterator: Any = None
        self.reference: list[dict[str, str]] = []  # digests of the uninterrupted stream
        self.reference_ids: list[list[tuple[int, int, int]]] = []
        self.checkpoint = os.path.join(workdir, "step3")

    def make(self, persistent: bool = True) -> Any:
        from torch_rlds.adapters.openpi import create_data_loader

        return create_data_loader(self.config, shuffle=self.config.data.shuffle,
                                  seed=self.config.data.seed, persistent_iterator=persistent)

    def extend_reference(self, n: int) -> None:
        """Pull the uninterrupted stream (the first loader, never restored) up to ``n``."""
        while len(self.reference) < n:
            observation, actions = next(self.iterator)
            self.reference.append(_digest((observation, actions)))
            self.reference_ids.append(_ids(observation))

    def compare(self, loader: Any, start: int, count: int, where: str) -> list:
        """Pull ``count`` batches from ``loader`` (resumed at ``start``) and compare them."""
        self.extend_reference(start + count)
        ids = []
        iterator = iter(loader)
        for i in range(start, start + count):
            observation, actions = next(iterator)
            diff = _first_difference(self.reference[i], _digest((observation, actions)))
            if diff is not None:
                raise AssertionError(f"{where}: batch {i} differs from the uninterrupted "
                                     f"run's at {diff}")
            ids.append(_ids(observation))
        return ids


def _basic(run: _Run) -> bool:
    report, config = run.report, run.config

    def create() -> str:
        run.loader = run.make()
        run.iterator = iter(run.loader)
        loader = run.loader.loader
        return (f"{run.loader.loader.dataset!r}; global batch {config.loader.batch_size}, "
                f"{loader.batch_size} per process, {loader.num_workers} workers, process "
                f"{run.loader.process_index} of {run.loader.process_count}")

    if not report.step("step 1: created a loader with persistent_iterator=True", create):
        return False

    shapes = {}

    def iterate() -> str:
        for _ in range(FIRST_BATCHES):
            observation, actions = next(run.iterator)
            run.reference.append(_digest((observation, actions)))
            run.reference_ids.append(_ids(observation))
        shapes["state"], shapes["actions"] = observation.state.shape, actions.shape
        images = ", ".join(f"{k} {tuple(v.shape)}" for k, v in observation.images.items())
        return (f"obs.state {tuple(observation.state.shape)}, actions {tuple(actions.shape)}"
                f"{', images ' + images if images else ''}")

    if not report.step(f"step 2: iterated {FIRST_BATCHES} batches", iterate):
        return False

    def save() -> str:
        path = run.loader.save_dataloader_state(run.checkpoint)
        seen = run.loader.get_batches_seen()
        if seen != FIRST_BATCHES:
            raise AssertionError(f"get_batches_seen() is {seen}, expected {FIRST_BATCHES}")
        return f"{path} ({os.path.getsize(path)} bytes, batches_seen {seen})"

    saved = report.step("step 3: saved the loader state", save)
    resumed: dict[str, Any] = {}

    def load() -> str:
        resumed["loader"] = run.make()
        seen = resumed["loader"].load_dataloader_state(run.checkpoint)
        if seen != FIRST_BATCHES:
            raise AssertionError(f"load_dataloader_state returned {seen}, expected "
                                 f"{FIRST_BATCHES}")
        return f"batches_seen {seen}"

    loaded = saved and report.step("step 4: loaded it into a new loader", load)

    def compare() -> str:
        run.compare(resumed["loader"], FIRST_BATCHES, COMPARED_BATCHES, "restored loader")
        resumed["loader"].close()
        return (f"batches {FIRST_BATCHES}..{FIRST_BATCHES + COMPARED_BATCHES - 1} are bit for "
                "bit the uninterrupted run's")

    if loaded:
        report.step("step 5: continued the restored loader", compare)

    def refuse() -> str:
        loader = run.make(persistent=False)
        messages = []
        for action in (loader.save_dataloader_state, loader.load_dataloader_state):
            try:
                action(run.checkpoint)
            except ValueError as e:
                if str(e) != "Dataloader must be created with persistent_iterator=True":
                    raise AssertionError(f"unexpected message: {e}") from e
                messages.append(str(e))
            else:
                raise AssertionError(f"{action.__name__} did not raise")
        missing = os.path.join(run.workdir, "empty")
        try:
            run.make().load_dataloader_state(missing)
        except FileNotFoundError as e:
            if str(e) != f"No checkpoint found in {missing}":
                raise AssertionError(f"unexpected message: {e}") from e
        else:
            raise AssertionError("loading from an empty directory did not raise")
        loader.close()
        return f"ValueError({messages[0]!r}); an empty directory: FileNotFoundError"

    report.step("step 6: a loader without persistent_iterator refuses to save and load", refuse)
    return True


def _comprehensive(run: _Run, args: argparse.Namespace) -> None:
    report, config = run.report, run.config
    source = run.loader.loader.dataset.source
    epoch_ids, limit = None, 0
    if len(source) <= MAX_COVER_EPISODES and run.loader.process_count == 1:
        from torch_rlds.adapters._multihost import epoch_step_ids, steps_for_epoch

        epoch_ids = epoch_step_ids(config)
        limit = steps_for_epoch(len(epoch_ids), run.loader.loader.batch_size, 1,
                                config.loader.num_workers)
        if limit > MAX_COVER_BATCHES:
            epoch_ids = None
    stream_ids: list[list[tuple[int, int, int]]] = list(run.reference_ids[:FIRST_BATCHES])

    def covered() -> set[tuple[int, int]]:
        return {(e, t) for batch in stream_ids for epoch, e, t in batch if epoch == 0}

    def cycle() -> str:
        position, state_dir, sizes = FIRST_BATCHES, run.checkpoint, []
        # The last cycle (None) goes on until every step of epoch 0 was seen, when it is small.
        for n, count in enumerate([*CYCLES, None] if epoch_ids else CYCLES):
            loader = run.make()
            if loader.load_dataloader_state(state_dir) != position:
                raise AssertionError(f"cycle {n}: restored batches_seen is not {position}")
            if count is None:
                count = 0
                while covered() != epoch_ids and position + count < limit:
                    stream_ids.extend(run.compare(loader, position + count, 1, f"cycle {n}"))
                    count += 1
            else:
                stream_ids.extend(run.compare(loader, position, count, f"cycle {n}"))
            position += count
            sizes.append(count)
            state_dir = os.path.join(run.workdir, f"cycle{n}")
            loader.save_dataloader_state(state_dir)
            if n == 1:  # rewind the same loader to its own save, twice
                for _ in range(2):
                    loader.load_dataloader_state(state_dir)
                    run.compare(loader, position, 2, f"cycle {n} (same loader)")
                loader.load_dataloader_state(state_dir)
            loader.close()
        return (f"{len(sizes)} cycles of {sizes} batches (new loaders, and one loader "
                f"restored twice) match the uninterrupted run up to batch {position - 1}")

    cycled = report.step("step 7: several save/load cycles", cycle)

    def track() -> str:
        if stream_ids != run.reference_ids[:len(stream_ids)]:
            first = next(i for i, (a, b) in enumerate(zip(stream_ids, run.reference_ids))
                         if a != b)
            raise AssertionError(f"batch {first}: sample ids differ from the uninterrupted "
                                 "stream (a gap or a duplicate)")
        flat = [i for batch in stream_ids for i in batch]
        if len(set(flat)) != len(flat):
            raise AssertionError(f"{len(flat) - len(set(flat))} samples repeat")
        text = (f"{len(stream_ids)} batches, {len(flat)} samples across the save/load "
                "cycles: no duplicate, no gap")
        if epoch_ids is not None:
            seen = covered()
            if seen != epoch_ids:
                raise AssertionError(f"epoch 0 covered {len(seen)} of {len(epoch_ids)} steps "
                                     f"in {len(stream_ids)} batches")
            text += f", every one of the {len(epoch_ids)} steps of epoch 0 seen once"
        return text

    if cycled:
        report.step("step 8: batch identifiers", track)
    run.loader.close()

    try:
        import jax  # noqa: F401
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        report.line(SKIP, f"step 9: multi-host: skipped ({e.name} is not installed; pip install "
                          "'torch-rlds[jax]')")
        return
    from torch_rlds.adapters import _multihost

    t0 = time.perf_counter()
    try:
        cover = len(source) <= MAX_COVER_EPISODES
        checks, figures = _multihost.run_two_hosts(
            os.path.join(run.workdir, "multihost"), config=args.config_name,
            overrides=args.overrides, cover_epoch=cover, timeout=args.timeout)
    except Exception as e:
        report.check(False, f"step 9: multi-host (2 processes): {type(e).__name__}: {e}")
        return
    report.line(OK if all(ok for ok, _ in checks) else FAIL,
                f"step 9: multi-host: 2 processes x 2 CPU devices on 127.0.0.1, "
                f"{figures['steps']} global batches, saved after {figures['save_at']}, "
                f"restarted ({time.perf_counter() - t0:.1f} s)")
    for ok, text in checks:
        report.check(ok, f"  {text}")


def add_command(commands: Any) -> None:
    """Add ``check`` to the ``torch-rlds`` command's subparsers ``commands``: how the command
    line finds this adapter (the ``torch_rlds.commands`` entry point in ``setup.cfg``), so that
    the core imports no adapter."""
    parser = commands.add_parser("check", help="the user-facing checkpoint test of a config")
    add_arguments(parser)
    parser.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0 when every check passed)."""
    parser = argparse.ArgumentParser(
        prog="torch-rlds check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``torch-rlds check``, added to ``parser``."""
    parser.add_argument("--config-name", default="demo",
                        help="a shipped config name or a YAML path (default: demo)")
    parser.add_argument("--comprehensive", action="store_true",
                        help="add save/load cycles, sample id tracking and the multi-host run")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed to each multi-host phase")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. loader.batch_size=64")


def run(args: argparse.Namespace) -> int:
    """``torch-rlds check`` with parsed ``args``; returns the exit status."""
    report = _Report(sys.stdout)
    from torch_rlds.config import load_config

    try:
        config = load_config(args.config_name, args.overrides)
    except Exception as e:
        report.check(False, f"config {args.config_name}: {type(e).__name__}: {e}")
        return 1
    report.line("", f"torch-rlds check: config {config.name!r}"
                    f"{' ' + ' '.join(args.overrides) if args.overrides else ''}"
                    f"{' (comprehensive)' if args.comprehensive else ''}")
    with tempfile.TemporaryDirectory(prefix="torch_rlds_check_") as workdir:
        run = _Run(config, workdir, report)
        if _basic(run) and args.comprehensive and not report.failed:
            _comprehensive(run, args)
        if run.loader is not None:
            run.loader.close()
    elapsed = time.perf_counter() - report.started
    if report.failed:
        report.line(FAIL, f"{report.failed} CHECK{'S' if report.failed > 1 else ''} FAILED "
                          f"({elapsed:.1f} s)")
        return 1
    report.line("", f"{elapsed:.1f} s")
    report.line("", f"ALL TESTS PASSED! {OK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
