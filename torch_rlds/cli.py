"""The ``torch-rlds`` command: ``inspect``, ``demo`` and the other tools.

A command that fails prints one line, ``torch-rlds COMMAND: Error: message``, and exits with 1;
``--traceback`` (anywhere on the line) or ``TORCH_RLDS_TRACEBACK=1`` prints the whole trace
first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Sequence

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "TORCH_RLDS_TRACEBACK"


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from torch_rlds._features import iter_leaves
    from torch_rlds.source import RLDSSource

    plan = None
    if args.config_name is not None:
        from torch_rlds.config import load_config

        config = load_config(args.config_name, ([args.path] if args.path else [])
                             + args.overrides)
        args.path, args.data_dir = config.dataset_path(), config.data.data_dir
        args.split = args.split or config.data.split
        plan = config.plan()
    elif args.path is None:
        raise ValueError("inspect: give a dataset path, or --config-name NAME")
    elif args.overrides:
        raise ValueError(f"inspect: overrides {args.overrides} need --config-name")
    source = RLDSSource(args.path, args.split or "+".join(_splits(args)),
                        data_dir=args.data_dir)
    info = source.info
    print(f"{info.name} {info.version}  ({info.path})")
    print(f"format: {info.file_format}")
    selected = {name for name, _, _ in source.ranges}
    for name, split in info.splits.items():
        if name not in selected:
            continue
        print(f"split {name}: {split.num_episodes} episodes in {len(split.shard_paths)} shards, "
              f"{split.num_bytes} bytes")
        for path, n in zip(split.shard_paths, split.shard_lengths):
            print(f"  {path.name}: {n} episodes")
    if args.split:
        parts = ", ".join(f"{name}[{start}:{stop}]" for name, start, stop in source.ranges)
        print(f"--split {args.split}: {len(source)} episodes ({parts})")
    if args.steps:
        key = _first_step_key(source)
        first = 0
        for name, start, stop in source.ranges:
            whole = (start, stop) == (0, info.splits[name].num_episodes)
            label = name if whole else f"{name}[{start}:{stop}]"
            episodes = range(first, first + stop - start)
            first += stop - start
            steps = [len(source.decoder.decode(source.read(i))["steps"][key])
                     for i in tqdm(episodes, desc=f"counting steps of {label}", unit="episode",
                                   delay=1.0, file=sys.stderr)]
            if steps:
                print(f"split {label}: {sum(steps)} steps (episode length min {min(steps)}, "
                      f"mean {np.mean(steps):.1f}, max {max(steps)})")
            else:
                print(f"split {label}: no episodes")
    else:
        print("(step counts: add --steps, which reads every episode)")
    print("features:")
    for leaf in iter_leaves(source.features):
        shape = tuple(leaf.shape)
        time = "[T] + " if leaf.per_step else ""
        dtype = "str" if leaf.kind == "text" else str(leaf.dtype)
        print(f"  {leaf.name}: {leaf.kind} {time}{shape} {dtype} encoding={leaf.encoding}")
    if plan is not None:
        from torch_rlds._plan import count_kept, describe_kept

        print("\n".join(describe_kept(count_kept(source, plan))))
    return 0


def _index(args: argparse.Namespace) -> int:
    import time

    from torch_rlds._shared_index import publish
    from torch_rlds.source import RLDSSource

    start = time.perf_counter()
    source = RLDSSource(args.path, args.split or "+".join(_splits(args)), data_dir=args.data_dir)
    info = source.info
    indexes = source.record_indexes()
    print(f"{info.name} {info.version}  ({info.path})")
    if info.file_format != "tfrecord":
        print(f"format: {info.file_format}: records are read by number, there is no record "
              "index to publish")
        return 0
    print(f"record index: {len(indexes)} shards, {sum(len(i) for i in indexes)} records "
          f"({time.perf_counter() - start:.1f} s)")
    if args.publish is None:
        print("(not published: add --publish [DEST] to write it beside the data or into DEST)")
        return 0
    dest = None if args.publish == _BESIDE else args.publish
    done = publish(source, dest, step_index=not args.no_step_index)
    steps = (f", step lengths, {done.step_indexes} step index files" if done.lengths
             else "")
    print(f"published {done.url}: {done.shards} shards, {done.records} records, "
          f"{done.bytes} bytes{steps} ({time.perf_counter() - start:.1f} s)")
    if done.note:
        print(f"note: {done.note}")
    return 0


_BESIDE = "<beside the data>"


def _splits(args: argparse.Namespace) -> list[str]:
    """Every split of the dataset ``args`` names (what ``inspect`` shows without --split)."""
    from torch_rlds._info import DatasetInfo, resolve_dataset_dir

    return list(DatasetInfo.load(resolve_dataset_dir(args.path, args.data_dir)).splits)


def _first_step_key(source) -> str:
    return next(leaf.path[1] for leaf in source.leaves() if leaf.per_step)


COMMANDS_GROUP = "torch_rlds.commands"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torch-rlds``."""
    from torch_rlds import _stats_command as stats

    parser = argparse.ArgumentParser(prog="torch-rlds", description=__doc__.split("\n\n")[0])
    parser.add_argument(TRACEBACK_FLAG, action="store_true",
                        help=f"on an error, print the whole trace (or set {TRACEBACK_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="splits, shards and features of a dataset")
    inspect.add_argument("path", nargs="?", default=None,
                         help="dataset version directory, or a name with --data-dir")
    inspect.add_argument("--config-name", default=None,
                         help="the dataset of this config, and what its filters keep")
    inspect.add_argument("overrides", nargs="*", help="with --config-name: key=value overrides")
    inspect.add_argument("--split", default=None,
                         help="only this split expression (train, train[:10%%], train+val); "
                              "default: every split")
    inspect.add_argument("--data-dir", default=None)
    inspect.add_argument("--steps", action="store_true",
                         help="also count steps (reads every episode)")
    inspect.set_defaults(run=_inspect)

    index = commands.add_parser(
        "index", help="build the record index (and step index) of a dataset once, and "
                      "publish it for every host")
    index.add_argument("path", help="dataset version directory (local or gs://...), or a name "
                                    "with --data-dir")
    index.add_argument("--data-dir", default=None)
    index.add_argument("--split", default=None,
                       help="only this split expression (default: every split)")
    index.add_argument("--publish", nargs="?", const=_BESIDE, default=None, metavar="DEST",
                       help="write torch_rlds.index beside the data, or under "
                            "DEST/<name>/<version>/ (a folder or bucket that hosts find "
                            "through RLDSSource(index_dir=DEST) or TORCH_RLDS_INDEX_DIR)")
    index.add_argument("--no-step-index", action="store_true",
                       help="publish the record offsets and step lengths only, not each "
                            "shard's step index (which reads every record once)")
    index.set_defaults(run=_index)

    demo = commands.add_parser("demo", help="load the embedded demo dataset, save, resume in a "
                                            "fresh process and check the batches")
    _config_arguments(demo)
    demo.set_defaults(run=_demo)

    config = commands.add_parser("config", help="print a config as resolved, with what every "
                                                "field allows")
    _config_arguments(config)
    config.set_defaults(run=_config)

    stats_parser = commands.add_parser("stats", help="normalization statistics of state and "
                                                     "action (norm_stats.json, openpi's layout)")
    stats.add_arguments(stats_parser)
    stats_parser.set_defaults(run=stats.run)

    # torch_rlds.ledger is the function; its module's command parts are imported by name.
    from torch_rlds.ledger import add_arguments as ledger_arguments
    from torch_rlds.ledger import run as run_ledger

    ledger = commands.add_parser("ledger", help="the dataset, episode and step of every sample "
                                                "of given global batches")
    ledger_arguments(ledger)
    ledger.set_defaults(run=run_ledger)

    # Commands that adapters add (`check`): found through the torch_rlds.commands entry
    # points of the installed distribution, so the core names no adapter.
    for entry in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP),
                        key=lambda e: e.name):
        entry.load()(commands)

    # `bench` is dispatched in main() before parsing; listed here for the help text.
    commands.add_parser("bench", help="the benchmark suite (tf.data baseline when tensorflow "
                                      "is installed); `torch-rlds bench --help` for its options")
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-name", default="demo",
                        help="a shipped config name or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (loader.batch_size=64)")


def _demo(args: argparse.Namespace) -> int:
    from torch_rlds.demo import run_demo

    return run_demo(args.config_name, args.overrides)


def _config(args: argparse.Namespace) -> int:
    from torch_rlds.config import format_config, load_config

    print(format_config(load_config(args.config_name, args.overrides)))
    return 0


def one_line(error: BaseException) -> str:
    """``Type: message`` of ``error`` on one line (a message's line breaks become spaces)."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torch-rlds`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full_trace = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        if argv[:1] == ["bench"]:  # the suite parses its own options, which may start with --
            from torch_rlds.bench import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print(f"torch-rlds {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if full_trace:
            traceback.print_exc()
        hint = "" if full_trace else f" ({TRACEBACK_FLAG} for the whole trace)"
        print(f"torch-rlds {command}: {one_line(error)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
