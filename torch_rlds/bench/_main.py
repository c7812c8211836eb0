"""``torch-rlds bench``: the whole suite, from the dataset to the report.

Order of a run: write (or reuse) the dataset and read it once so every pipeline finds it in
the page cache; then throughput (torch_rlds per worker count and in the window order, tf.data,
the decode limit), resume, state cost, shuffle quality, worker memory and the step index. Every
measurement is a fresh process (:func:`torch_rlds.bench._subprocess.run_task`; ``--quick``
groups a section's measurements into one); a failed one is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from torch_rlds.bench import _report
from torch_rlds.bench._data import bench_dataset
from torch_rlds.bench._sections import Bench
from torch_rlds.bench._settings import BenchSettings
from torch_rlds.bench._steps import BUSY_PCT, FOREIGN_PCT, Steps, foreign

DEFAULT_OUT = "bench_results"
SECTIONS = ("throughput", "resume", "checkpoint", "remote", "shuffle", "memory", "index")


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``torch-rlds bench``."""
    parser = argparse.ArgumentParser(
        prog="torch-rlds bench",
        description="Benchmark torch_rlds against tf.data and the JPEG-decode limit.")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes in the synthetic dataset (default 400; 6 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: every measurement in seconds (the smoke test)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"results folder (default {DEFAULT_OUT}/)")
    parser.add_argument("--skip-tf", action="store_true",
                        help="measure torch_rlds and the decode limit only")
    parser.add_argument("--cache-dir", default=None,
                        help="where the dataset is written once and reused (default: the "
                             "torch_rlds cache, bench/)")
    parser.add_argument("--config-name", default=None,
                        help="take obs_window, action_horizon, shuffle_window, seed and "
                             "fast_jpeg, and (without --quick) batch_size and num_workers (for "
                             "resume) from this config; the dataset stays the synthetic one")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each throughput (the pipelines taking turns) and each "
                             "time to a first batch is measured; the median is reported "
                             "(default 3; 1 with --quick)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of "
                             f"{','.join(SECTIONS)})")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one measurement may take (default 1800)")
    parser.add_argument("--retries", type=int, default=None,
                        help="times a measurement disturbed by other processes is redone "
                             "(default 2, 0 with --quick)")
    parser.add_argument("--wait-idle", type=float, default=None,
                        help="seconds to wait, before each measurement, for other processes "
                             f"to leave the CPUs (below {BUSY_PCT:.0f}%% use; default 300, "
                             "0 with --quick)")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The :class:`BenchSettings` that ``args`` ask for."""
    overrides: dict[str, Any] = {}
    if args.episodes is not None:
        overrides["episodes"] = args.episodes
    if args.rounds is not None:
        overrides["throughput_rounds"] = overrides["resume_rounds"] = args.rounds
    if args.config_name is not None:
        from torch_rlds.config import load_config

        config = load_config(args.config_name)
        overrides.update(
            obs_window=config.data.obs_window, action_horizon=config.data.action_horizon,
            shuffle_window=config.data.shuffle_window, seed=config.data.seed,
            fast_jpeg=config.data.fast_jpeg)
        if not args.quick:  # the quick dataset is too small for a real config's loader sizes
            overrides.update(batch_size=config.loader.batch_size,
                             resume_workers=config.loader.num_workers)
    if args.quick:
        return BenchSettings.quick(**overrides)
    if "episodes" in overrides:
        overrides["num_shards"] = min(BenchSettings.num_shards, overrides["episodes"])
    return BenchSettings(**overrides)


def _plan_size(settings: BenchSettings, windows: Sequence[int], with_tf: bool,
               sections: Sequence[str]) -> int:
    positions = len(settings.resume_positions)
    rounds = settings.resume_rounds
    topologies = 1 + len(settings.elastic_topologies)
    sizes = {
        "throughput": settings.throughput_rounds * (len(settings.workers) + 4 + with_tf),
        "resume": (1 + rounds * (1 + topologies * positions)
                   + len(windows) * (1 + rounds * (1 + positions))
                   + with_tf * (1 + rounds * (1 + 2 * positions))),
        "checkpoint": 1 + with_tf * len(settings.checkpoint_buffers),
        "remote": 2,
        "shuffle": 1,
        "memory": 2 * (len(settings.memory_episodes) + len(settings.memory_size_steps)),
        "index": 1 + 2 * rounds,
    }
    return sum(sizes[name] for name in sections)


def run(settings: BenchSettings, out_dir: str, *, cache_dir: str | None = None,
        skip_tf: bool = False, sections: Sequence[str] = SECTIONS, timeout_s: float = 1800,
        wait_idle_s: float = 0, retries: int = 0) -> dict[str, Any]:
    """Run the measurements of ``sections`` (all by default) and write ``results.json``,
    ``results.md`` and ``chart.png`` into ``out_dir``; returns the results."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown} (sections: {list(SECTIONS)})")
    os.makedirs(out_dir, exist_ok=True)
    notes: list[str] = []
    with_tf = not skip_tf
    if with_tf and importlib.util.find_spec("tensorflow") is None:
        with_tf = False
        notes.append("tf.data not measured: tensorflow is not installed (pip install "
                     "'torch-rlds[bench]')")
    elif skip_tf:
        notes.append("tf.data not measured (--skip-tf)")

    dataset_record = _prepare_dataset(settings, cache_dir)
    # the configured window first (its ratio is the headline), then the one that mixes as
    # many steps as tf.data's buffer, so that resume costs compare at equal shuffling
    windows = list(dict.fromkeys([settings.shuffle_window,
                                  settings.window_for_buffer(settings.tf_shuffle_buffer)]))
    chosen = [name for name in SECTIONS if name in sections]
    steps = Steps(_plan_size(settings, windows, with_tf, chosen), timeout_s, wait_idle_s,
                  retries, group=settings.group_processes)
    results: dict[str, Any] = {
        "settings": settings.to_dict(),
        "machine": _machine(),
        "dataset": dataset_record,
        "sections": chosen,
        "throughput": {"torch_rlds": {}},
        "resume": {"torch_rlds": {}},
        "checkpoint": {},
        "remote": {},
        "shuffle": {},
        "memory": {},
        "index": {},
    }
    work = tempfile.mkdtemp(prefix="torch_rlds_bench_work_")
    bench = Bench(steps, settings, dataset_record["path"], work, windows, cache_dir)
    try:
        if "throughput" in chosen:
            bench.throughput(results["throughput"], with_tf)
        if "resume" in chosen:
            bench.resume(results["resume"], with_tf)
        if "checkpoint" in chosen:
            bench.checkpoint(results["checkpoint"], with_tf)
        if "remote" in chosen:
            bench.remote(results["remote"])
        if "shuffle" in chosen:
            bench.shuffle(results["shuffle"])
        if "memory" in chosen:
            bench.memory(results["memory"])
        if "index" in chosen:
            bench.index(results["index"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes += _comparison_notes(results, settings, windows)
    results["notes"] = notes
    results["failed"] = steps.failed
    results["ratios"] = _report.ratios(results)
    _report.write_json(results, out_dir)
    _report.write_markdown(results, out_dir)
    chart = _report.write_chart(results, out_dir)
    if chart is None:
        results["notes"].append("chart.png not written: matplotlib is not installed")
        _report.write_json(results, out_dir)
        _report.write_markdown(results, out_dir)
    return results


def _prepare_dataset(settings: BenchSettings, cache_dir: str | None) -> dict[str, Any]:
    spec = settings.spec()
    start = time.perf_counter()
    path = bench_dataset(spec, cache_dir)
    seconds = time.perf_counter() - start
    size = 0
    for name in sorted(os.listdir(path)):  # read once: every pipeline finds it in page cache
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    return {"path": os.fspath(path), "episodes": spec.num_episodes,
            "steps": settings.epoch_steps(), "bytes": size, "prepare_s": round(seconds, 2)}


def _machine() -> dict[str, Any]:
    import torch

    import torch_rlds

    return {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_rlds": torch_rlds.__version__,
        "torch_rlds_source": _source_revision(os.path.dirname(torch_rlds.__file__)),
    }


def _source_revision(folder: str) -> str | None:
    """``<commit>`` of the git checkout torch_rlds runs from, or ``<commit>+<digest>`` when
    its files differ from the commit (the digest covers every ``.py`` file of the package),
    so that figures taken while the loader changes can be told apart; ``None`` outside git."""
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    if not dirty.stdout.strip():
        return head.stdout.strip()
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{head.stdout.strip()}+{digest.hexdigest()[:8]}"


def _comparison_notes(results: dict[str, Any], settings: BenchSettings,
                      windows: Sequence[int]) -> list[str]:
    notes = [
        f"Shuffling: tf.data mixes a buffer of {settings.tf_shuffle_buffer:,} steps; "
        "torch_rlds's global order (its default here) mixes every step of the epoch; its "
        f"window order mixes windows of {', '.join(map(str, windows))} episodes (about "
        + ", ".join(f"{round(w * (settings.min_steps + settings.max_steps) / 2):,}"
                    for w in windows)
        + " steps); resume is measured for each.",
        "tf.data skip(n) skips the shuffled steps before decoding, the cheapest exact replay.",
    ]
    torch_rates = results["throughput"]["torch_rlds"]
    shapes = [(r.get("result") or {}).get("shapes") for r in torch_rates.values()]
    tf_shapes = ((results["throughput"].get("tf_data") or {}).get("result") or {}).get("shapes")
    if shapes and shapes[0] and tf_shapes:
        common = sorted(set(shapes[0]) & set(tf_shapes))
        differ = [k for k in common if shapes[0][k] != tf_shapes[k]]
        notes.append("Same sample in both pipelines: "
                     + (f"yes ({len(common)} arrays compared)" if not differ
                        else f"NO, shapes differ for {differ}"))
    busy = [f"{label} ({foreign(record):.0f}%)" for label, record in _records(results)
            if foreign(record) > FOREIGN_PCT]
    if busy:
        notes.append("Other processes took a share of the CPUs during these measurements, so "
                     "their figures are suspect: " + "; ".join(busy))
    stats = [(r.get("result") or {}).get("metrics") for r in torch_rates.values()]
    if torch_rates and not any(stats):
        notes.append("DataLoader.metrics() is not available in this torch_rlds; not recorded.")
    return notes


def _records(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, record)`` of every measurement in ``results``."""
    out = [(f"torch_rlds num_workers={w}", r)
           for w, r in results["throughput"]["torch_rlds"].items()]
    out += [(f"torch_rlds window order num_workers={w}", r)
            for w, r in results["throughput"].get("torch_rlds_window", {}).items()]
    out += [(f"torch_rlds resized after a {k} decode", r)
            for k, r in results["throughput"].get("torch_rlds_resize", {}).items()]
    out += [(name, results["throughput"][key]) for key, name in
            (("limit", "decode limit"), ("tf_data", "tf.data")) if key in results["throughput"]]
    for name, runs in results["resume"]["torch_rlds"].items():
        out += [(f"torch_rlds resume {name} at {p}", r) for p, r in runs.items()]
    for method, runs in results["resume"].get("tf_data", {}).items():
        out += [(f"tf.data resume {method} at {p}", r) for p, r in runs.items()]
    if "torch_rlds" in results["checkpoint"]:
        out.append(("torch_rlds state cost", results["checkpoint"]["torch_rlds"]))
    out += [(f"torch_rlds from a bucket: {k}", r) for k, r in results.get("remote", {}).items()]
    out += [(f"tf.data checkpoint at {b}", r)
            for b, r in results["checkpoint"].get("tf_data", {}).items()]
    if results.get("shuffle"):
        out.append(("shuffle quality", results["shuffle"]))
    for axis, orders in results.get("memory", {}).items():
        out += [(f"worker memory {order} order, {axis} {point}", r)
                for order, points in orders.items() for point, r in points.items()]
    index = results.get("index", {})
    if "build" in index:
        out.append(("step index build", index["build"]))
    out += [(f"first batch, {name}", r) for name, r in index.get("first_batch", {}).items()]
    return out


def _print_summary(results: dict[str, Any], out_dir: str) -> None:
    print("\nratios:")
    for name, value in results["ratios"].items():
        shown = "-" if value is None else f"{value:.3g}"
        status = _report.target_status(name, value)
        print(f"  {name}: {shown}" + ("" if status == "-" else f"  ({status})"))
    for note in results["notes"]:
        print(f"note: {note}")
    for failure in results["failed"]:
        print(f"FAILED: {failure}")
    files = [f for f in ("results.json", "results.md", "chart.png")
             if os.path.exists(os.path.join(out_dir, f))]
    print(f"results in {os.path.abspath(out_dir)}/ ({', '.join(files)})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns 1 when a torch_rlds or decode-limit measurement failed (tf.data
    failures are results about tf.data and are reported, not fatal)."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    print(f"torch_rlds bench: {dataclasses.asdict(settings)}", flush=True)
    wait_idle = args.wait_idle if args.wait_idle is not None else (0 if args.quick else 300)
    retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    results = run(settings, args.out, cache_dir=args.cache_dir, skip_tf=args.skip_tf,
                  sections=sections, timeout_s=args.timeout, wait_idle_s=wait_idle,
                  retries=retries)
    _print_summary(results, args.out)
    fatal = [f for f in results["failed"] if not f.startswith("tf.data")]
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
