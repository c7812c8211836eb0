"""``torch-rlds stats``: the normalisation statistics of a config's dataset (or of each dataset
of a mixture config), printed, cached and written as openpi's ``norm_stats.json``. The command
around :mod:`torch_rlds.stats`, which reads no config itself."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from etils import epath

from torch_rlds.config import load_config
from torch_rlds.keymap import key_map_from_config
from torch_rlds.source import RLDSSource
from torch_rlds.stats import dimension_labels, format_table, load_or_compute_stats, write_norm_stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``torch-rlds stats``, added to ``parser``."""
    parser.add_argument("--config-name", default="demo",
                        help="a shipped config name or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (data.split=train)")
    parser.add_argument("--output", default=None,
                        help="also write norm_stats.json here (a file or a folder; for a "
                             "mixture a folder, with one subfolder per dataset)")
    parser.add_argument("--recompute", action="store_true", help="ignore the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``torch-rlds stats`` on its own (:func:`main`)."""
    parser = argparse.ArgumentParser(
        prog="torch-rlds stats",
        description="Stream a dataset once (images stay encoded) and compute the per-dimension "
                    "mean, std, min, max, q01 and q99 of state and action; cached, and written "
                    "as openpi's norm_stats.json. For a mixture, each dataset's.")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """``torch-rlds stats`` with parsed ``args``: the statistics of the config's dataset, or
    of each dataset of a mixture config, printed and cached (and written to ``--output``)."""
    config = load_config(args.config_name, args.overrides)
    if config.mixture is None:
        _report(config, args, args.output)
        return 0
    if args.output and epath.Path(args.output).name.endswith(".json"):
        raise ValueError(f"--output {args.output}: config {config.name} is a mixture of "
                         f"{len(config.mixture.datasets)} datasets; give a folder (each "
                         "dataset's norm_stats.json goes into a subfolder of its own)")
    for i, entry in enumerate(config.mixture.datasets):
        overrides = config.mixture.entry_overrides(entry)
        child = load_config(entry.config, overrides)
        print(f"mixture {config.name}, dataset {i}: config {entry.config}"
              f"{' ' + ' '.join(overrides) if overrides else ''}")
        output = None
        if args.output:
            output = epath.Path(args.output) / f"{i}-{child.name}"
        _report(child, args, output)
    return 0


def _report(config: Any, args: argparse.Namespace, output: Any) -> None:
    key_map = key_map_from_config(config.data)
    source = RLDSSource(config.dataset_path(), config.data.split, data_dir=config.data.data_dir)
    plan = config.plan()
    stats, folder = load_or_compute_stats(source, key_map, recompute=args.recompute,
                                          progress=not args.no_progress, plan=plan)
    print(f"{source.info.name} {source.info.version} split {source.split!r}: "
          f"{stats['actions'].count or '?'} steps"
          + (" (the steps kept by the config's trajectory transforms and filters)"
             if plan is not None else ""))
    labels = dimension_labels(source, key_map)
    for name in ("state", "actions"):
        if name in stats:
            print(format_table(name, stats[name], labels[name]))
    print(f"cached in {folder}" if folder is not None else "not cached (the cache folder "
          "cannot be written)")
    if output:
        print(f"wrote {write_norm_stats(stats, output)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``torch-rlds stats --config-name NAME [overrides] [--output PATH]``."""
    return run(build_parser().parse_args(argv))
