"""The ``torch-rlds`` command: ``inspect``, ``demo`` and the other tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from torch_rlds._features import iter_leaves
    from torch_rlds.source import RLDSSource

    source = RLDSSource(args.path, args.split, data_dir=args.data_dir)
    info = source.info
    print(f"{info.name} {info.version}  ({info.path})")
    print(f"format: {info.file_format}")
    for name, split in info.splits.items():
        print(f"split {name}: {split.num_episodes} episodes in {len(split.shard_paths)} shards, "
              f"{split.num_bytes} bytes")
        for path, n in zip(split.shard_paths, split.shard_lengths):
            print(f"  {path.name}: {n} episodes")
    if args.steps:
        from tqdm import tqdm

        for name in info.splits:
            counted = RLDSSource(info.path, name)
            steps = [len(counted.decoder.decode(counted.read(i))["steps"][_first_step_key(counted)])
                     for i in tqdm(range(len(counted)), desc=f"counting steps of {name}",
                                   unit="episode", delay=1.0, file=sys.stderr)]
            print(f"split {name}: {sum(steps)} steps (episode length min {min(steps)}, "
                  f"mean {np.mean(steps):.1f}, max {max(steps)})")
    else:
        print("(step counts: add --steps, which reads every episode)")
    print("features:")
    for leaf in iter_leaves(source.features):
        shape = tuple(leaf.shape)
        time = "[T] + " if leaf.per_step else ""
        dtype = "str" if leaf.kind == "text" else str(leaf.dtype)
        print(f"  {leaf.name}: {leaf.kind} {time}{shape} {dtype} encoding={leaf.encoding}")
    return 0


def _first_step_key(source) -> str:
    return next(leaf.path[1] for leaf in source.leaves() if leaf.per_step)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torch-rlds``."""
    parser = argparse.ArgumentParser(prog="torch-rlds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="splits, shards and features of a dataset")
    inspect.add_argument("path", help="dataset version directory, or a name with --data-dir")
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--data-dir", default=None)
    inspect.add_argument("--steps", action="store_true",
                         help="also count steps (reads every episode)")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="load the embedded demo dataset, save, resume in a "
                                            "fresh process and check the batches")
    _config_arguments(demo)
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check", help="the user-facing checkpoint test of a config")
    _config_arguments(check)
    check.add_argument("--comprehensive", action="store_true",
                       help="several save/load cycles, id tracking, two processes")
    check.set_defaults(run=_check)

    stats = commands.add_parser("stats", help="normalization statistics of state and action "
                                              "(norm_stats.json, openpi's layout)")
    _config_arguments(stats)
    stats.add_argument("--output", default=None, help="also write norm_stats.json here")
    stats.add_argument("--recompute", action="store_true", help="ignore the cache")
    stats.add_argument("--no-progress", action="store_true", help="no progress bar")
    stats.set_defaults(run=_stats)

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


def _stats(args: argparse.Namespace) -> int:
    from torch_rlds.stats import main as stats_main

    argv = ["--config-name", args.config_name, *args.overrides]
    if args.output:
        argv += ["--output", args.output]
    if args.recompute:
        argv.append("--recompute")
    if args.no_progress:
        argv.append("--no-progress")
    return stats_main(argv)


def _check(args: argparse.Namespace) -> int:
    from torch_rlds.adapters.check import main as check_main

    argv = ["--config-name", args.config_name, *args.overrides]
    if args.comprehensive:
        argv.append("--comprehensive")
    return check_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torch-rlds`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the suite parses its own options, which may start with --
        from torch_rlds.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
