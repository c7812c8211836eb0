"""``torch-rlds bench``: the whole suite, from the dataset to the report.

Order of a run: write (or reuse) the dataset and read it once so every pipeline finds it in
the page cache; then torch_rlds throughput per worker count, the decode limit, torch_rlds
resume and state cost, then the same for tf.data. Every measurement is a fresh process
(:func:`torch_rlds.bench._subprocess.run_task`); a failed one is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch_rlds.bench import _report
from torch_rlds.bench._data import bench_dataset
from torch_rlds.bench._settings import CAMERAS, BenchSettings
from torch_rlds.bench._subprocess import run_task

DEFAULT_OUT = "bench_results"


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
                        help="take obs_window, action_horizon, shuffle_window, seed, "
                             "fast_jpeg, batch_size and num_workers (resume) from this config; "
                             "the dataset stays the synthetic one")
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
    if args.config_name is not None:
        from torch_rlds.config import load_config

        config = load_config(args.config_name)
        overrides.update(
            obs_window=config.data.obs_window, action_horizon=config.data.action_horizon,
            shuffle_window=config.data.shuffle_window, seed=config.data.seed,
            fast_jpeg=config.data.fast_jpeg, batch_size=config.loader.batch_size,
            resume_workers=config.loader.num_workers)
    if args.quick:
        return BenchSettings.quick(**overrides)
    if "episodes" in overrides:
        overrides["num_shards"] = min(BenchSettings.num_shards, overrides["episodes"])
    return BenchSettings(**overrides)


BUSY_PCT = 25.0  # CPU use by others, before a measurement, above which it waits
FOREIGN_PCT = 10.0  # CPU share others took during a measurement above which it is redone


def machine_busy_pct(seconds: float = 0.3) -> float | None:
    """System-wide CPU use (%) over ``seconds`` while this suite runs nothing: what other
    processes take from the measurement that comes next. ``None`` without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.cpu_percent(interval=seconds))


class _Steps:
    """Runs the measurements one by one and prints a line for each.

    Other processes on the machine skew timings. Before each measurement, while others use
    more than :data:`BUSY_PCT` of the CPUs, it waits up to ``wait_idle_s``; a measurement
    during which they took more than :data:`FOREIGN_PCT` (``foreign_cpu_pct``) is redone up
    to ``retries`` times, and the least disturbed attempt is kept. The report flags figures
    that stayed disturbed.
    """

    def __init__(self, total: int, timeout_s: float, wait_idle_s: float, retries: int) -> None:
        self.total = total
        self.done = 0
        self.timeout_s = timeout_s
        self.wait_idle_s = wait_idle_s
        self.retries = retries
        self.failed: list[str] = []

    def _idle(self) -> float | None:
        if self.wait_idle_s <= 0:
            return None
        deadline = time.monotonic() + self.wait_idle_s
        busy = machine_busy_pct()
        while busy is not None and busy > BUSY_PCT and time.monotonic() < deadline:
            print(f"      waiting: the machine is {busy:.0f}% busy with other processes",
                  flush=True)
            time.sleep(2)
            busy = machine_busy_pct(1.0)
        return busy

    def run(self, label: str, task: str, kwargs: dict[str, Any],
            show: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        self.done += 1
        print(f"[{self.done}/{self.total}] {label}", flush=True)
        record: dict[str, Any] = {}
        for attempt in range(1 + self.retries):
            busy = self._idle()
            candidate = run_task(task, kwargs, timeout_s=self.timeout_s)
            candidate.update(machine_busy_pct=busy, attempts=attempt + 1)
            if not record or _better(candidate, record):
                record = candidate
            if not candidate.get("ok") or _foreign(candidate) <= FOREIGN_PCT:
                break
            if attempt < self.retries:
                print(f"      redoing: other processes took {_foreign(candidate):.0f}% of the "
                      "CPUs meanwhile", flush=True)
        if record.get("ok"):
            memory = record.get("memory") or {}
            print(f"      {show(record['result'])}; peak RSS {memory.get('peak_rss_mb')} MiB "
                  f"({record.get('wall_s', 0):.1f} s)", flush=True)
        else:
            self.failed.append(f"{label}: {record.get('error')}")
            print(f"      FAILED: {record.get('error')}", flush=True)
        return record


def _foreign(record: dict[str, Any]) -> float:
    return record.get("foreign_cpu_pct") or 0.0


def _better(candidate: dict[str, Any], record: dict[str, Any]) -> bool:
    """A measurement that worked beats one that failed; then the less disturbed one wins."""
    if bool(candidate.get("ok")) != bool(record.get("ok")):
        return bool(candidate.get("ok"))
    return _foreign(candidate) < _foreign(record)


def _rate(r: dict[str, Any]) -> str:
    return f"{r['samples_per_s']:,.0f} samples/s"


def _first(r: dict[str, Any]) -> str:
    exact = "" if r.get("exact") is None else f", exact: {r['exact']}"
    return f"first batch after {r['first_batch_s']:.2f} s{exact}"


def _plan_size(settings: BenchSettings, windows: Sequence[int], with_tf: bool) -> int:
    positions = len(settings.resume_positions)
    torch_steps = len(settings.workers) + 1 + len(windows) * (2 + positions) + 1
    tf_steps = 3 + 2 * positions + len(settings.checkpoint_buffers)
    return torch_steps + (tf_steps if with_tf else 0)


def run(settings: BenchSettings, out_dir: str, *, cache_dir: str | None = None,
        skip_tf: bool = False, timeout_s: float = 1800, wait_idle_s: float = 0,
        retries: int = 0) -> dict[str, Any]:
    """Run every measurement and write ``results.json``, ``results.md`` and ``chart.png`` into
    ``out_dir``; returns the results."""
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
    dataset = dataset_record["path"]
    # the configured window first (its ratio is the headline), then the one that mixes as
    # many steps as tf.data's buffer, so that resume costs compare at equal shuffling
    windows = list(dict.fromkeys([settings.shuffle_window,
                                  settings.window_for_buffer(settings.tf_shuffle_buffer)]))
    steps = _Steps(_plan_size(settings, windows, with_tf), timeout_s, wait_idle_s, retries)
    s = settings.to_dict()
    positions = dict(zip(settings.resume_positions, settings.resume_batches()))
    results: dict[str, Any] = {
        "settings": s,
        "machine": _machine(),
        "dataset": dataset_record,
        "throughput": {"torch_rlds": {}},
        "resume": {"torch_rlds": {}},
        "checkpoint": {},
    }
    work = tempfile.mkdtemp(prefix="torch_rlds_bench_work_")
    try:
        for w in settings.workers:
            results["throughput"]["torch_rlds"][str(w)] = steps.run(
                f"torch_rlds throughput, num_workers={w}", "torch_throughput",
                {"settings": s, "dataset": dataset, "workers": w}, _rate)
        results["throughput"]["limit"] = _limit(steps, settings, dataset, work)
        for window in windows:
            results["resume"]["torch_rlds"][f"window {window}"] = _torch_resume(
                steps, settings, dataset, window, positions, work)
        results["checkpoint"]["torch_rlds"] = steps.run(
            f"torch_rlds state size and save time, num_workers={settings.resume_workers}",
            "torch_state_cost",
            {"settings": s, "dataset": dataset, "workers": settings.resume_workers,
             "buffers": list(settings.checkpoint_buffers), "out_dir": work},
            lambda rows: ", ".join(f"{r['bytes']} B in {1e3 * r['save_s']:.2f} ms"
                                   for r in rows))
        if with_tf:
            _tf_measurements(steps, settings, dataset, positions, work, results)
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
    """``<commit>`` or ``<commit>+changes`` of the git checkout torch_rlds runs from, so that
    figures can be told apart while the loader is being optimised; ``None`` outside git."""
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _limit(steps: _Steps, settings: BenchSettings, dataset: str, work: str) -> dict[str, Any]:
    from torch_rlds.bench._limit import export_frames

    frames = os.path.join(work, "limit")
    os.makedirs(frames, exist_ok=True)
    export_frames(dataset, settings.limit_episodes, CAMERAS, frames)
    return steps.run(f"decode limit: simplejpeg alone in {settings.limit_processes} processes",
                     "limit", {"settings": settings.to_dict(), "frames_dir": frames,
                               "cameras": len(CAMERAS)},
                     lambda r: f"{r['samples_per_s']:,.0f} samples/s, "
                               f"{r['us_per_image']:.0f} us per image")


def _torch_resume(steps: _Steps, settings: BenchSettings, dataset: str, window: int,
                  positions: dict[float, int], work: str) -> dict[str, Any]:
    s = settings.to_dict()
    workers = settings.resume_workers
    common = {"settings": s, "dataset": dataset, "workers": workers, "shuffle_window": window}
    saved = steps.run(
        f"torch_rlds: save states at {sorted(positions.values())} batches (window {window})",
        "torch_save_states", {**common, "batches": sorted(positions.values()), "out_dir": work},
        lambda r: ", ".join(f"{x['bytes']} B in {1e3 * x['save_s']:.2f} ms" for x in r["saves"]))
    by_position: dict[str, Any] = {"fresh": steps.run(
        f"torch_rlds fresh start (window {window})", "torch_resume",
        {**common, "state_path": None, "expected_digest": None}, _first)}
    saves = {x["batch"]: x for x in (saved.get("result") or {}).get("saves", [])}
    for position, batch in positions.items():
        save = saves.get(batch)
        if save is None:
            by_position[str(position)] = {"ok": False, "error": "no state was saved"}
            steps.done += 1
            continue
        record = steps.run(f"torch_rlds resume at {position:.0%} (batch {batch}, window {window})",
                           "torch_resume", {**common, "state_path": save["path"],
                                            "expected_digest": save["next_digest"]}, _first)
        if record.get("ok"):
            record["result"].update(batch=batch, state_bytes=save["bytes"],
                                    save_s=save["save_s"])
        by_position[str(position)] = record
    return by_position


def _tf_measurements(steps: _Steps, settings: BenchSettings, dataset: str,
                     positions: dict[float, int], work: str, results: dict[str, Any]) -> None:
    s = settings.to_dict()
    common = {"settings": s, "dataset": dataset}
    results["throughput"]["tf_data"] = steps.run(
        f"tf.data throughput (shuffle buffer {settings.tf_shuffle_buffer:,} steps)",
        "tf_throughput", common, _rate)
    saved = steps.run(f"tf.data: save iterator checkpoints at {sorted(positions.values())} "
                      "batches", "tf_save_checkpoints",
                      {**common, "batches": sorted(positions.values()), "out_dir": work},
                      lambda r: ", ".join(f"{x['bytes']:,} B in {x['save_s']:.2f} s"
                                          for x in r["saves"]))
    saves = {x["batch"]: x for x in (saved.get("result") or {}).get("saves", [])}
    checkpoint: dict[str, Any] = {"fresh": steps.run(
        "tf.data fresh start", "tf_resume_checkpoint",
        {**common, "prefix": None, "expected_digest": None}, _first)}
    skip: dict[str, Any] = {}
    for position, batch in positions.items():
        save = saves.get(batch)
        if save is None:
            checkpoint[str(position)] = {"ok": False, "error": "no checkpoint was saved"}
            steps.done += 1
        else:
            record = steps.run(f"tf.data resume from its iterator checkpoint at {position:.0%}",
                               "tf_resume_checkpoint",
                               {**common, "prefix": save["prefix"],
                                "expected_digest": save["next_digest"]}, _first)
            if record.get("ok"):
                record["result"].update(batch=batch, state_bytes=save["bytes"],
                                        save_s=save["save_s"])
            checkpoint[str(position)] = record
        record = steps.run(f"tf.data resume with skip({batch} batches) at {position:.0%}",
                           "tf_resume_skip",
                           {**common, "skip_batches": batch,
                            "expected_digest": save["next_digest"] if save else None}, _first)
        if record.get("ok"):
            record["result"]["batch"] = batch
        skip[str(position)] = record
    results["resume"]["tf_data"] = {"checkpoint": checkpoint, "skip(n)": skip}
    results["checkpoint"]["tf_data"] = {
        str(buffer): steps.run(
            f"tf.data iterator checkpoint at a {buffer:,}-step shuffle buffer",
            "tf_checkpoint_cost", {**common, "buffer": buffer, "out_dir": work},
            lambda r: f"{r['bytes']:,} B in {r['save_s']:.2f} s (buffer filled in "
                      f"{r['fill_s']:.1f} s)")
        for buffer in settings.checkpoint_buffers
    }


def _comparison_notes(results: dict[str, Any], settings: BenchSettings,
                      windows: Sequence[int]) -> list[str]:
    notes = [
        f"Shuffling: tf.data mixes a buffer of {settings.tf_shuffle_buffer:,} steps; "
        f"torch_rlds mixes windows of {', '.join(map(str, windows))} episodes (about "
        + ", ".join(f"{round(w * (settings.min_steps + settings.max_steps) / 2):,}"
                    for w in windows)
        + " steps); its resume is measured at each.",
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
    busy = [f"{label} ({_foreign(record):.0f}%)" for label, record in _records(results)
            if _foreign(record) > FOREIGN_PCT]
    if busy:
        notes.append("Other processes took a share of the CPUs during these measurements, so "
                     "their figures are suspect: " + "; ".join(busy))
    stats = [(r.get("result") or {}).get("stats") for r in torch_rates.values()]
    if not any(stats):
        notes.append("DataLoader.stats() is not available in this torch_rlds; not recorded.")
    return notes


def _records(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, record)`` of every measurement in ``results``."""
    out = [(f"torch_rlds num_workers={w}", r)
           for w, r in results["throughput"]["torch_rlds"].items()]
    out += [(name, results["throughput"][key]) for key, name in
            (("limit", "decode limit"), ("tf_data", "tf.data")) if key in results["throughput"]]
    for name, runs in results["resume"]["torch_rlds"].items():
        out += [(f"torch_rlds resume {name} at {p}", r) for p, r in runs.items()]
    for method, runs in results["resume"].get("tf_data", {}).items():
        out += [(f"tf.data resume {method} at {p}", r) for p, r in runs.items()]
    if "torch_rlds" in results["checkpoint"]:
        out.append(("torch_rlds state cost", results["checkpoint"]["torch_rlds"]))
    out += [(f"tf.data checkpoint at {b}", r)
            for b, r in results["checkpoint"].get("tf_data", {}).items()]
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
    print(f"results in {os.path.abspath(out_dir)}/ (results.json, results.md, chart.png)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns 1 when a torch_rlds or decode-limit measurement failed (tf.data
    failures are results about tf.data and are reported, not fatal)."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    print(f"torch_rlds bench: {dataclasses.asdict(settings)}", flush=True)
    wait_idle = args.wait_idle if args.wait_idle is not None else (0 if args.quick else 300)
    retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    results = run(settings, args.out, cache_dir=args.cache_dir, skip_tf=args.skip_tf,
                  timeout_s=args.timeout, wait_idle_s=wait_idle, retries=retries)
    _print_summary(results, args.out)
    fatal = [f for f in results["failed"] if not f.startswith("tf.data")]
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
