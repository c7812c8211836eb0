"""The results of a run: ratios against the targets, ``results.json``, ``results.md`` and
``chart.png`` (matplotlib, imported only here and only when present)."""

from __future__ import annotations

import json
import os
from typing import Any

from torch_rlds.bench import _report_order
from torch_rlds.bench._cells import error as _error
from torch_rlds.bench._cells import fmt as _fmt
from torch_rlds.bench._cells import memory as _memory
from torch_rlds.bench._cells import ok as _ok
from torch_rlds.bench._cells import paired_ratio
from torch_rlds.bench._cells import rates as _rates

REDUCED_FULL = "torch_rlds resized to half: reduced decode / full decode"
REDUCED_LIMIT = "torch_rlds resized to half, reduced decode / full-size decode limit"
GLOBAL_LIMIT = "torch_rlds global order / decode limit (order_workers)"
GLOBAL_TF = "torch_rlds global order / tf.data (order_workers)"
WINDOW_LIMIT = "torch_rlds window order / decode limit (order_workers)"
GLOBAL_WINDOW = "torch_rlds global / window order (order_workers)"

# (ratio name, target, True when higher is better): the targets of issues 6 and 15.
TARGETS = {
    "torch_rlds / tf.data (samples/s, equal cores)": (1.3, True),
    "torch_rlds / decode limit": (0.8, True),
    GLOBAL_LIMIT: (0.85, True),
    GLOBAL_TF: (1.3, True),
    "torch_rlds resume 95% / 5%": (1.2, False),
    "torch_rlds state bytes per worker": (1024, False),
    "torch_rlds save_state ms": (5.0, False),
    _report_order.SHUFFLE_DISTINCT: (1.0, True),
    _report_order.SHUFFLE_LARGEST: (1.0, False),
    _report_order.MEMORY_SPREAD.format(axis="episode counts", order="global"): (1.1, False),
    _report_order.MEMORY_SPREAD.format(axis="episode sizes", order="global"): (1.1, False),
}


def _best_rates(results: dict[str, Any]) -> list[float | None]:
    """Round by round, the best torch_rlds samples/s over its worker counts."""
    per_workers = [_rates(r) for r in results["throughput"]["torch_rlds"].values()]
    if not per_workers:
        return [None]
    rounds = max(len(rates) for rates in per_workers)
    best: list[float | None] = []
    for i in range(rounds):
        measured = [rates[i] for rates in per_workers if i < len(rates)]
        best.append(max((rate for rate in measured if rate), default=None))
    return best


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are about, from a results dict (``None`` where unmeasured)."""
    out: dict[str, float | None] = {}
    through = results["throughput"]
    best = _best_rates(results)
    tf_rates = _rates(through.get("tf_data"))
    limit = _rates(through.get("limit"))
    equal = max(through["torch_rlds"], key=int, default=None)
    equal_rates = _rates(through["torch_rlds"].get(equal))
    out["torch_rlds / tf.data (samples/s, equal cores)"] = paired_ratio(equal_rates, tf_rates)
    out["torch_rlds best / tf.data"] = paired_ratio(best, tf_rates)
    out["torch_rlds / decode limit"] = paired_ratio(best, limit)
    out["tf.data / decode limit"] = paired_ratio(tf_rates, limit)
    compared = str(results.get("settings", {}).get("order_workers", 2))
    global_rates = _rates(through["torch_rlds"].get(compared))
    window_rates = _rates(through.get("torch_rlds_window", {}).get(compared))
    out[GLOBAL_LIMIT] = paired_ratio(global_rates, limit)
    out[GLOBAL_TF] = paired_ratio(global_rates, tf_rates)
    out[WINDOW_LIMIT] = paired_ratio(window_rates, limit)
    out[GLOBAL_WINDOW] = paired_ratio(global_rates, window_rates)
    resized = through.get("torch_rlds_resize", {})
    reduced_rates = _rates(resized.get("reduced"))
    out[REDUCED_FULL] = paired_ratio(reduced_rates, _rates(resized.get("full")))
    out[REDUCED_LIMIT] = paired_ratio(reduced_rates, limit)
    first_window = next(iter(results["resume"]["torch_rlds"]), None)
    for name, runs in results["resume"]["torch_rlds"].items():
        key = ("torch_rlds resume 95% / 5%" if name == first_window
               else f"torch_rlds resume 95% / 5% ({name})")
        out[key] = _position_ratio(runs)
    for method, runs in results["resume"].get("tf_data", {}).items():
        out[f"tf.data {method} resume 95% / 5%"] = _position_ratio(runs)
    rows = _ok(results["checkpoint"].get("torch_rlds")) or []
    out["torch_rlds state bytes per worker"] = max((r["bytes_per_worker"] for r in rows),
                                                   default=None)
    out["torch_rlds save_state ms"] = max((1e3 * r["save_s"] for r in rows), default=None)
    out.update(_report_order.ratios(results))
    return out


def _position_ratio(runs: dict[str, Any]) -> float | None:
    positions = sorted((float(p), _ok(r)) for p, r in runs.items() if p != "fresh")
    if len(positions) < 2 or positions[0][1] is None or positions[-1][1] is None:
        return None
    first, last = positions[0][1], positions[-1][1]
    return paired_ratio(last.get("rounds_first_batch_s") or [last["first_batch_s"]],
                        first.get("rounds_first_batch_s") or [first["first_batch_s"]])


def target_status(name: str, value: float | None) -> str:
    """``met`` / ``missed`` against the issue's target, ``-`` where there is none."""
    if name not in TARGETS or value is None:
        return "-"
    target, higher = TARGETS[name]
    return "met" if (value >= target if higher else value <= target) else "missed"


def write_json(results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``results.md``: one per section that ran, then ratios and notes."""
    sections = results.get("sections", ("throughput", "resume", "checkpoint"))
    lines = _header(results)
    if "throughput" in sections:
        lines += _throughput_table(results)
    if "resume" in sections:
        lines += _resume_table(results)
    if "checkpoint" in sections:
        lines += _checkpoint_table(results)
    if "remote" in sections:
        from torch_rlds.bench._remote import report_lines

        lines += report_lines(results)
    if "shuffle" in sections:
        lines += _report_order.shuffle_table(results)
    if "memory" in sections:
        lines += _report_order.memory_table(results)
    if "index" in sections:
        lines += _report_order.index_table(results)
    lines += ["", "## Ratios and targets", "", "| figure | value | target | |",
              "|---|---:|---:|---|"]
    for name, value in results["ratios"].items():
        target = TARGETS.get(name)
        bound = "-" if target is None else f"{'>=' if target[1] else '<='} {target[0]:g}"
        lines.append(f"| {name} | {_fmt(value)} | {bound} | {target_status(name, value)} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _header(results: dict[str, Any]) -> list[str]:
    s, machine, dataset = results["settings"], results["machine"], results["dataset"]
    source = machine.get("torch_rlds_source") or "not a git checkout"
    return [
        "# torch_rlds benchmark",
        "",
        f"{dataset['episodes']} episodes, {dataset['steps']:,} steps, two "
        f"{s['image_size']}x{s['image_size']} JPEG cameras; sample: obs_window "
        f"{s['obs_window']}, action chunk {s['action_horizon']}, batch {s['batch_size']}; "
        f"JPEG {'fast' if s['fast_jpeg'] else 'accurate'} DCT; {machine['cpus']} CPUs; "
        f"torch_rlds {machine['torch_rlds']} (source {source}).",
        "",
        "Every figure comes from its own process. Memory: peak RSS summed over the process "
        "tree (shared pages counted once per process) and peak PSS (shared pages split), MiB.",
    ]


def _throughput_table(results: dict[str, Any]) -> list[str]:
    s, through = results["settings"], results["throughput"]
    lines = ["", "## Throughput", "",
             "| pipeline | order | samples/s | rounds | / tf.data | / limit | first batch s | "
             "metrics() | peak RSS | peak PSS | |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    tf_rates = _rates(through.get("tf_data"))
    limit = _rates(through.get("limit"))
    rows = [(f"torch_rlds num_workers={w}", r) for w, r in through["torch_rlds"].items()]
    rows += [(f"torch_rlds num_workers={w}", r)
             for w, r in through.get("torch_rlds_window", {}).items()]
    rows += [(f"torch_rlds num_workers={(_ok(r) or {}).get('workers')}, resized to half after "
              f"a {k} decode", r) for k, r in through.get("torch_rlds_resize", {}).items()]
    rows += [("tf.data (Octo/openpi)", through.get("tf_data")),
             (f"decode limit ({s['limit_processes']} processes)", through.get("limit"))]
    for name, record in rows:
        r = _ok(record) or {}
        rates = _rates(record)
        order = r.get("order") or "-"
        if order == "window":
            order = f"window {s['shuffle_window']}"
        lines.append(f"| {name} | {order} | {_fmt(r.get('samples_per_s'), 0)} | {_rounds(r)} | "
                     f"{_fmt(paired_ratio(rates, tf_rates))} | "
                     f"{_fmt(paired_ratio(rates, limit))} | {_fmt(r.get('first_batch_s'))} | "
                     f"{_stats(r.get('metrics'))} | {' | '.join(_memory(record))} | "
                     f"{_error(record)} |")
    rounds = s.get("throughput_rounds", 1)
    if rounds > 1:
        lines += ["", f"samples/s: the median of {rounds} rounds in which the pipelines took "
                      "turns (each round's figure under rounds). A ratio is the median of the "
                      "rounds' ratios: each compares pipelines measured side by side."]
    return lines


def _rounds(result: dict[str, Any], key: str = "samples_per_s") -> str:
    """Every round's figure, the range the median comes from."""
    values = result.get(f"rounds_{key}") or []
    if len(values) < 2:
        return "-"
    return " / ".join("-" if x is None else f"{x:,.0f}" if key == "samples_per_s"
                      else f"{x:.2f}" for x in values)


def _stats(stats: dict[str, Any] | None) -> str:
    """What ``DataLoader.metrics()`` said at the end of a run (warm-up included)."""
    if not stats or "samples_per_s" not in stats:
        return "-"
    wait = stats.get("wait_fraction")
    return (f"{stats['samples_per_s']:,.0f}/s"
            + ("" if wait is None else f", waited {100 * wait:.0f}%"))


def _resume_table(results: dict[str, Any]) -> list[str]:
    workers = results["settings"].get("resume_workers")
    lines = ["", "## Resume: time to the first batch in a fresh process", "",
             f"torch_rlds states are saved by one host with {workers} workers; the global order "
             "restores them under other hosts (simulated with process_index / process_count in "
             "one process, the first batch being every host's) and workers too.", "",
             "| pipeline | position | batch | restore s | first batch s | rounds | exact | "
             "peak RSS | peak PSS | |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    resume = results["resume"]
    runs = [(f"torch_rlds {name}", r) for name, r in resume["torch_rlds"].items()]
    runs += [(f"tf.data {method}", r) for method, r in resume.get("tf_data", {}).items()]
    for name, by_position in runs:
        for position, record in by_position.items():
            r = _ok(record) or {}
            label = "fresh" if position == "fresh" else f"{float(position):.0%}"
            lines.append(f"| {name} | {label} | {_fmt(r.get('batch'))} | "
                         f"{_fmt(r.get('restore_s'))} | {_fmt(r.get('first_batch_s'))} | "
                         f"{_rounds(r, 'first_batch_s')} | {_fmt(r.get('exact'))} | {' | '.join(_memory(record))} | "
                         f"{_error(record)} |")
    return lines


def _checkpoint_table(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Checkpoint size and save time", "",
             "| pipeline | shuffle (steps) | bytes | bytes per worker | save ms | peak RSS | "
             "peak PSS | |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    checkpoint = results["checkpoint"]
    record = checkpoint.get("torch_rlds")
    for r in _ok(record) or [{}]:
        save = r.get("save_s")
        what = ("global order, every step of the epoch" if r.get("order") == "global"
                else f"window {_fmt(r.get('shuffle_window'))} episodes")
        lines.append(f"| torch_rlds ({what}) | "
                     f"{_fmt(r.get('buffer_steps'))} | {_fmt(r.get('bytes'))} | "
                     f"{_fmt(r.get('bytes_per_worker'), 0)} | "
                     f"{_fmt(None if save is None else 1e3 * save, 3)} | "
                     f"{' | '.join(_memory(record))} | {_error(record)} |")
    for buffer, record in checkpoint.get("tf_data", {}).items():
        r = _ok(record) or {}
        save = r.get("save_s")
        lines.append(f"| tf.data iterator | {_fmt(int(buffer))} | {_fmt(r.get('bytes'))} | "
                     f"{_fmt(r.get('bytes'))} | {_fmt(None if save is None else 1e3 * save, 1)}"
                     f" | {' | '.join(_memory(record))} | {_error(record)} |")
    return lines


def write_markdown(results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write(markdown(results))
    return path


NOT_RUN = "not run"


def write_chart(results: dict[str, Any], out_dir: str) -> str | None:
    """``chart.png`` (see :func:`chart_figure`). Returns ``None`` (and writes nothing) when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = chart_figure(results)
    path = os.path.join(out_dir, "chart.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_figure(results: dict[str, Any]) -> Any:
    """Throughput bars, resume time against position, checkpoint sizes. A pipeline that did
    not run is labelled "not run" where its bar would stand (no bar of 0); sizes are on a log
    scale from 1 byte, where states a few bytes apart look alike and tf.data's buffers stand
    orders of magnitude above."""
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_resume, ax_size) = plt.subplots(1, 3, figsize=(16, 4.8))
    through = results["throughput"]
    bars = [(f"torch_rlds\nw={w}", _ok(r)) for w, r in through["torch_rlds"].items()]
    bars += [("tf.data", _ok(through.get("tf_data"))), ("decode\nlimit", _ok(through.get("limit")))]
    colors = ["tab:blue"] * (len(bars) - 2) + ["tab:orange", "tab:gray"]
    _bars(ax_rate, [name for name, _ in bars],
          [r["samples_per_s"] if r else None for _, r in bars], colors, "{:,.0f}")
    ax_rate.set_ylabel("samples/s")
    ax_rate.set_title("Throughput")

    resume = results["resume"]
    series = [(f"torch_rlds {n}", r) for n, r in resume["torch_rlds"].items()]
    series += [(f"tf.data {m}", r) for m, r in resume.get("tf_data", {}).items()]
    for name, runs in series:
        points = sorted((0.0 if p == "fresh" else float(p), _ok(r)["first_batch_s"])
                        for p, r in runs.items() if _ok(r))
        if points:
            ax_resume.plot([100 * x for x, _ in points], [y for _, y in points], marker="o",
                           label=name)
    ax_resume.set_xlabel("position in the epoch (%; 0 = fresh start)")
    ax_resume.set_ylabel("time to first batch (s)")
    ax_resume.set_yscale("log")
    ax_resume.set_title("Resume")
    if ax_resume.lines:
        ax_resume.legend(fontsize=7)
        times = [y for line in ax_resume.lines for y in line.get_ydata()]
        # At least a decade: times a few percent apart should look alike.
        ax_resume.set_ylim(min(times) / 3, max(max(times) * 3, min(times) * 10))

    checkpoint = results["checkpoint"]
    labels, sizes, colors = [], [], []
    for r in _ok(checkpoint.get("torch_rlds")) or []:
        labels.append(f"torch_rlds\n{r['buffer_steps']:,}")
        sizes.append(r["bytes"])
        colors.append("tab:blue")
    for buffer, record in checkpoint.get("tf_data", {}).items():
        r = _ok(record)
        labels.append(f"tf.data\n{int(buffer):,}")
        sizes.append(r["bytes"] if r else None)
        colors.append("tab:orange")
    ax_size.set_yscale("log")
    _bars(ax_size, labels, sizes, colors, "{:,.0f} B")
    measured = [v for v in sizes if v]
    ax_size.set_ylim(1, max(10.0 * max(measured, default=1), 1e4))
    ax_size.set_ylabel("checkpoint bytes (log scale)")
    ax_size.set_title("Checkpoint size by shuffle size (steps)")
    fig.tight_layout()
    return fig


def _bars(ax: Any, names: list[str], values: list[float | None], colors: list[str],
          label: str) -> None:
    """One bar per measured value, labelled with it; :data:`NOT_RUN` where there is none."""
    for i, (value, color) in enumerate(zip(values, colors)):
        if value is None:
            ax.text(i, 0.5, NOT_RUN, ha="center", va="center", rotation=90, fontsize=9,
                    color="0.4", transform=ax.get_xaxis_transform())
        else:
            ax.bar(i, value, color=color)
            ax.text(i, value, label.format(value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
