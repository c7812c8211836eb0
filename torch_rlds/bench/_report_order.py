"""The report of the sections about the order: shuffle quality, worker memory, the step index
(their tables in ``results.md`` and the figures their targets are about)."""

from __future__ import annotations

from typing import Any

from torch_rlds.bench._cells import error as _error
from torch_rlds.bench._cells import fmt as _fmt
from torch_rlds.bench._cells import ok as _ok
from torch_rlds.bench._shuffle import GLOBAL, TFDATA

SHUFFLE_DISTINCT = "shuffle: global order distinct episodes / tf.data's (lowest profile)"
SHUFFLE_LARGEST = "shuffle: global order largest share / tf.data's (highest profile)"
MEMORY_SPREAD = "worker USS max / min over the {axis} ({order} order)"
INDEX_SPEED = "step index build / sequential read (MB/s)"
FIRST_BATCH = "first batch s, never-seen / indexed dataset"
AXES = {"episodes": "episode counts", "size": "episode sizes"}


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """The figures of the order's targets (``None`` where unmeasured)."""
    out: dict[str, float | None] = {}
    shuffle = _ok(results.get("shuffle"))
    distinct, largest = [], []
    for profile in (shuffle or {}).get("profiles", {}).values():
        ours, theirs = profile["orders"][GLOBAL], profile["orders"][TFDATA]
        if theirs["batches"]:
            distinct.append(ours["distinct_episodes"] / theirs["distinct_episodes"])
            largest.append(ours["largest_share"] / theirs["largest_share"])
    out[SHUFFLE_DISTINCT] = min(distinct, default=None)
    out[SHUFFLE_LARGEST] = max(largest, default=None)
    for axis, orders in results.get("memory", {}).items():
        for order, points in orders.items():
            uss = [(_ok(r) or {}).get("max_uss_mb") for r in points.values()]
            measured = [u for u in uss if u]
            name = MEMORY_SPREAD.format(axis=AXES.get(axis, axis), order=order)
            out[name] = (max(measured) / min(measured) if uss and len(measured) == len(uss)
                         else None)
    index = results.get("index", {})
    build = _ok(index.get("build"))
    out[INDEX_SPEED] = build["build_mb_per_s"] / build["read_mb_per_s"] if build else None
    first = {k: _ok(r) for k, r in index.get("first_batch", {}).items()}
    cold, warm = first.get("never seen"), first.get("indexed")
    out[FIRST_BATCH] = (cold["first_batch_s"] / warm["first_batch_s"] if cold and warm
                        else None)
    return out


def shuffle_table(results: dict[str, Any]) -> list[str]:
    """Distinct episodes per global batch and the most samples one episode supplies to it, per
    order and profile."""
    record = results.get("shuffle")
    r = _ok(record)
    lines = ["", "## Shuffle quality (simulated over ids)", ""]
    if r is None:
        return lines + [_error(record)]
    profiles = r["profiles"]
    lines += [f"Global batch of {r['batch_size']}; tf.data's buffer {r['buffer']:,} steps; "
              "each cell: mean distinct episodes per batch / mean largest count from one "
              "episode. Profiles: " + "; ".join(
                  f"{name} {p['episodes']:,} episodes, {p['steps']:,} steps"
                  for name, p in profiles.items()) + ".", "",
              "| order | " + " | ".join(profiles) + " |",
              "|---|" + "---:|" * len(profiles)]
    orders = list(next(iter(profiles.values()))["orders"])
    for order in orders:
        cells = []
        for p in profiles.values():
            score = p["orders"][order]
            cells.append(f"{score['distinct_episodes']:.1f} / {score['largest_share']:.1f}")
        label = f"{order} ({r['buffer']:,} steps)" if order == TFDATA else order
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def memory_table(results: dict[str, Any]) -> list[str]:
    """Each worker's peak USS and PSS (MiB) per dataset, global order beside window order."""
    memory = results.get("memory", {})
    s = results["settings"]
    lines = ["", "## Worker memory (private to each worker)", "",
             f"num_workers={s['order_workers']}, batch {s['batch_size']}, peak over "
             f"{s['memory_batches']} batches; USS: pages only that worker maps; PSS: USS plus "
             "its share of shared pages (the step index, batch buffers). Episode count axis: "
             f"{s['memory_count_steps']} steps of one {s['memory_count_image']} px flat JPEG "
             f"camera per episode; episode size axis: {s['memory_size_episodes']} episodes of "
             f"one {s['memory_size_image']} px textured JPEG camera.", "",
             "| dataset | MiB per episode | global USS | global PSS | window USS | window PSS "
             "| |", "|---|---:|---:|---:|---:|---:|---|"]
    for axis, orders in memory.items():
        points = list(next(iter(orders.values()), {}))
        for point in points:
            records = [orders.get(order, {}).get(point) for order in ("global", "window")]
            results_ = [_ok(rec) or {} for rec in records]
            size = next((r["episode_mb"] for r in results_ if "episode_mb" in r), None)
            label = (f"{int(point):,} episodes" if axis == "episodes"
                     else f"{int(point):,} steps per episode")
            cells = []
            for r in results_:
                cells += [_fmt(r.get("max_uss_mb"), 1), _fmt(r.get("max_pss_mb"), 1)]
            errors = "; ".join(e for e in map(_error, records) if e)
            lines.append(f"| {label} | {_fmt(size, 2)} | " + " | ".join(cells) + f" | {errors} |")
    return lines


def index_table(results: dict[str, Any]) -> list[str]:
    """The step index build against a sequential read, and the first batches."""
    index = results.get("index", {})
    record = index.get("build")
    b = _ok(record) or {}
    lines = ["", "## Step index", "",
             "Both reads are of shards in the page cache (it cannot be emptied without root); "
             "the build starts from an empty cache.", "",
             "| MB | sequential read MB/s | record index s | step counts s | step index s | "
             "step index MB/s | index MB | |", "|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| {_fmt(b.get('bytes', 0) / 2**20 if b else None, 0)} | "
             f"{_fmt(b.get('read_mb_per_s'), 0)} | {_fmt(b.get('record_index_s'), 2)} | "
             f"{_fmt(b.get('count_steps_s'), 2)} | {_fmt(b.get('build_s'), 2)} | "
             f"{_fmt(b.get('build_mb_per_s'), 0)} | "
             f"{_fmt(b.get('index_bytes', 0) / 2**20 if b else None, 2)} | {_error(record)} |",
             "", "| first batch | num_workers | seconds | index build started | |",
             "|---|---:|---:|---|---|"]
    for name, rec in index.get("first_batch", {}).items():
        r = _ok(rec) or {}
        lines.append(f"| {name} | {_fmt(r.get('workers'))} | {_fmt(r.get('first_batch_s'), 2)} | "
                     f"{_fmt(r.get('index_build_started'))} | {_error(rec)} |")
    return lines
