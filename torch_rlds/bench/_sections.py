"""The measurements of a run, section by section: throughput, resume, checkpoint, and the
sections of the global order: shuffle quality, worker memory, the step index."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from torch_rlds.bench._settings import CAMERAS, BenchSettings
from torch_rlds.bench._shuffle import GLOBAL
from torch_rlds.bench._steps import Job, Steps

ORDERS = ("global", "window")


class Bench:
    """The measurements of one run, section by section; each fills its part of the results.

    ``cache_dir`` is where the datasets of the worker-memory section are written once (the
    benchmark dataset's folder, default the torch_rlds cache)."""

    def __init__(self, steps: Steps, settings: BenchSettings, dataset: str, work: str,
                 windows: Sequence[int], cache_dir: str | None = None) -> None:
        self.steps = steps
        self.settings = settings
        self.dataset = dataset
        self.work = work
        self.windows = windows
        self.cache_dir = cache_dir
        self.common = {"settings": settings.to_dict(), "dataset": dataset}
        self.positions = dict(zip(settings.resume_positions, settings.resume_batches()))

    def throughput(self, out: dict[str, Any], with_tf: bool) -> None:
        s = self.settings
        from torch_rlds.bench._limit import export_frames

        frames = os.path.join(self.work, "limit")
        os.makedirs(frames, exist_ok=True)
        export_frames(self.dataset, s.limit_episodes, CAMERAS, frames)

        def torch_job(w: int) -> tuple[str, str, dict[str, Any], Any]:
            return (f"torch_rlds throughput, num_workers={w}", "torch_throughput",
                    {**self.common, "workers": w}, _rate)

        # The highest worker count (the equal-cores figure) runs between tf.data and the limit,
        # the two figures it is compared with, and the window order beside them.
        *fewer, most = sorted(s.workers)
        jobs: dict[str, Job] = {str(w): torch_job(w) for w in fewer}
        if with_tf:
            jobs["tf_data"] = (f"tf.data throughput (shuffle buffer {s.tf_shuffle_buffer:,} steps)",
                               "tf_throughput", self.common, _rate)
        jobs[str(most)] = torch_job(most)
        jobs["window"] = (f"torch_rlds throughput, window order (window {s.shuffle_window}), "
                          f"num_workers={s.order_workers}", "torch_throughput",
                          {**self.common, "workers": s.order_workers, "order": "window"}, _rate)
        for resize in ("full", "reduced"):
            jobs[f"resize_{resize}"] = (
                f"torch_rlds throughput, cameras resized to half size after a {resize} decode, "
                f"num_workers={most}", "torch_throughput",
                {**self.common, "workers": most, "resize": resize}, _rate)
        jobs["limit"] = (
            f"decode limit: simplejpeg alone in {s.limit_processes} processes", "limit",
            {"settings": s.to_dict(), "frames_dir": frames, "cameras": len(CAMERAS)},
            lambda r: f"{r['samples_per_s']:,.0f} samples/s, {r['us_per_image']:.0f} us per image")
        runs = self._rounds(jobs, s.throughput_rounds)
        for w in s.workers:
            out["torch_rlds"][str(w)] = median_record(runs[str(w)])
        out["torch_rlds_window"] = {str(s.order_workers): median_record(runs["window"])}
        out["torch_rlds_resize"] = {resize: median_record(runs[f"resize_{resize}"])
                                    for resize in ("full", "reduced")}
        for key in ("tf_data", "limit"):
            if key in runs:
                out[key] = median_record(runs[key])

    def _rounds(self, jobs: dict[Any, Job], rounds: int) -> dict[Any, list[dict[str, Any]]]:
        """Every job of ``jobs`` run ``rounds`` times, the jobs taking turns (see
        :func:`in_turn`): each job's records in round order."""
        runs: dict[Any, list[dict[str, Any]]] = {key: [] for key in jobs}
        for r in range(rounds):
            turn = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
            keys = in_turn(list(jobs), r)
            records = self.steps.run_all([(jobs[k][0] + turn, *jobs[k][1:]) for k in keys])
            for key, record in zip(keys, records):
                runs[key].append(record)
        return runs

    def resume(self, out: dict[str, Any], with_tf: bool) -> None:
        """Time to the first batch after a restore: the global order under the hosts and
        workers that saved the state and under others (:attr:`BenchSettings.elastic_topologies`),
        the window order at each window, tf.data."""
        s = self.settings
        saved = (1, s.resume_workers)
        out["torch_rlds"].update(self._torch_resume("global", s.shuffle_window,
                                                    [saved, *s.elastic_topologies]))
        for window in self.windows:
            out["torch_rlds"].update(self._torch_resume("window", window, [saved]))
        if with_tf:
            out["tf_data"] = self._tf_resume()

    def checkpoint(self, out: dict[str, Any], with_tf: bool) -> None:
        s = self.settings
        out["torch_rlds"] = self.steps.run(
            f"torch_rlds state size and save time, num_workers={s.resume_workers}",
            "torch_state_cost",
            {**self.common, "workers": s.resume_workers,
             "buffers": list(s.checkpoint_buffers), "out_dir": self.work},
            lambda rows: ", ".join(f"{r['bytes']} B in {1e3 * r['save_s']:.2f} ms"
                                   for r in rows))
        if with_tf:
            out["tf_data"] = {
                str(buffer): self.steps.run(
                    f"tf.data iterator checkpoint at a {buffer:,}-step shuffle buffer",
                    "tf_checkpoint_cost",
                    {**self.common, "buffer": buffer, "out_dir": self.work},
                    lambda r: f"{r['bytes']:,} B in {r['save_s']:.2f} s (buffer filled in "
                              f"{r['fill_s']:.1f} s)")
                for buffer in s.checkpoint_buffers
            }

    def remote(self, out: dict[str, Any]) -> None:
        """Start-up and throughput from the simulated bucket (:mod:`torch_rlds.bench._remote`)."""
        from torch_rlds.bench._remote import LATENCY_S, sizes_for

        s = self.settings
        sizes = [list(size) for size in sizes_for(s.episodes)]
        out["startup"] = self.steps.run(
            f"start-up from a bucket at {LATENCY_S * 1e3:.0f} ms per request: "
            + ", ".join(label for label, _, _ in sizes_for(s.episodes)), "remote_startup",
            {"sizes": sizes, "latency_s": LATENCY_S, "work": self.work},
            lambda r: "; ".join(f"{label} cold {row['cold']['seconds']:.1f} s" for label, row
                                in r["sizes"].items()))
        workers = max(s.workers)
        out["throughput"] = self.steps.run(
            f"torch_rlds throughput from a bucket at {LATENCY_S * 1e3:.0f} ms, "
            f"num_workers={workers}", "remote_throughput",
            {**self.common, "workers": workers, "latency_s": LATENCY_S}, _rate)

    def _torch_resume(self, order: str, window: int,
                      topologies: Sequence[tuple[int, int]]) -> dict[str, dict[str, Any]]:
        """Save states at the resume positions with one host of ``resume_workers`` workers,
        then time the first batch of a fresh start and of every restore under each of
        ``topologies`` (hosts, workers), the first being the saving one. Returns
        ``{name: {"fresh" | position: record}}``."""
        s = self.settings
        what = f"window {window}" if order == "window" else "global order"
        common = {**self.common, "shuffle_window": window, "order": order}
        batches = sorted(self.positions.values())
        saved = self.steps.run(
            f"torch_rlds: save states at {batches} batches ({what}, "
            f"{_topology(1, s.resume_workers)})", "torch_save_states",
            {**common, "workers": s.resume_workers, "batches": batches, "out_dir": self.work},
            lambda r: ", ".join(f"{x['bytes']} B in {1e3 * x['save_s']:.2f} ms"
                                for x in r["saves"]))
        saves = _saves(saved)
        names = {t: what if i == 0 else f"{what}, restored on {_topology(*t)}"
                 for i, t in enumerate(topologies)}
        first = topologies[0]
        jobs: dict[Any, tuple[str, str, dict[str, Any]]] = {(names[first], "fresh"): (
            f"torch_rlds fresh start ({what})", "torch_resume",
            {**common, "workers": first[1], "hosts": first[0], "state_path": None,
             "expected_digest": None})}
        restores = {}
        for topology in topologies:
            hosts, workers = topology
            for position, batch in self.positions.items():
                save = saves.get(batch) or {}
                key = (names[topology], str(position))
                restores[key] = (save, batch)
                jobs[key] = (
                    f"torch_rlds resume at {position:.0%} (batch {batch}, {what}, on "
                    f"{_topology(hosts, workers)})", "torch_resume",
                    {**common, "workers": workers, "hosts": hosts,
                     "state_path": save.get("path"), "expected_digest": save.get("next_digest")})
        records = self._first_batches(jobs, restores)
        out: dict[str, dict[str, Any]] = {name: {} for name in names.values()}
        for (name, position), record in records.items():
            out[name][position] = record
        return out

    def _tf_resume(self) -> dict[str, Any]:
        batches = sorted(self.positions.values())
        saved = self.steps.run(
            f"tf.data: save iterator checkpoints at {batches} batches", "tf_save_checkpoints",
            {**self.common, "batches": batches, "out_dir": self.work},
            lambda r: ", ".join(f"{x['bytes']:,} B in {x['save_s']:.2f} s"
                                for x in r["saves"]))
        jobs: dict[Any, tuple[str, str, dict[str, Any]]] = {("checkpoint", "fresh"): (
            "tf.data fresh start", "tf_resume_checkpoint",
            {**self.common, "prefix": None, "expected_digest": None})}
        restores = {}
        skips = {}
        saves = _saves(saved)
        for position, batch in self.positions.items():
            save = saves.get(batch) or {}
            restores[("checkpoint", str(position))] = (save, batch)
            jobs[("checkpoint", str(position))] = (
                f"tf.data resume from its iterator checkpoint at {position:.0%}",
                "tf_resume_checkpoint", {**self.common, "prefix": save.get("prefix"),
                                         "expected_digest": save.get("next_digest")})
            skips[("skip(n)", str(position))] = batch
            jobs[("skip(n)", str(position))] = (
                f"tf.data resume with skip({batch} batches) at {position:.0%}",
                "tf_resume_skip", {**self.common, "skip_batches": batch,
                                   "expected_digest": save.get("next_digest")})
        records = self._first_batches(jobs, restores)
        out: dict[str, Any] = {"checkpoint": {}, "skip(n)": {}}
        for (method, position), record in records.items():
            if (method, position) in skips and record.get("ok"):
                record["result"]["batch"] = skips[(method, position)]
            out[method][position] = record
        return out

    def _first_batches(self, jobs: dict[Any, tuple[str, str, dict[str, Any]]],
                       restores: dict[Any, tuple[dict[str, Any], int]]) -> dict[Any, Any]:
        """Time to the first batch of each job, measured ``resume_rounds`` times with the jobs
        taking turns (see :func:`in_turn`): the median record of each. ``restores`` names the
        jobs that resume from a save of the uninterrupted run, with the save (empty when it
        failed) and its batch."""
        rounds = self.settings.resume_rounds
        missing: dict[Any, list[dict[str, Any]]] = {}
        for key, (save, _) in restores.items():
            if not save:
                label = jobs.pop(key)[0]
                self.steps.done += rounds
                self.steps.failed.append(f"{label}: nothing was saved to resume from")
                missing[key] = [{"ok": False, "error": "nothing was saved to resume from"}]
        runs = self._rounds({key: (*job, _first) for key, job in jobs.items()}, rounds)
        runs.update(missing)
        out = {key: median_record(records, "first_batch_s", higher_is_better=False)
               for key, records in runs.items()}
        for key, (save, batch) in restores.items():
            if out[key].get("ok"):
                out[key]["result"].update(batch=batch, state_bytes=save["bytes"],
                                          save_s=save["save_s"])
        return out


    def shuffle(self, out: dict[str, Any]) -> None:
        """Shuffle quality of every order, simulated over ids (:mod:`torch_rlds.bench._shuffle`)."""
        s = self.settings
        out.update(self.steps.run(
            f"shuffle quality: distinct episodes per batch of {s.shuffle_batch} (ids only)",
            "shuffle_quality", {"settings": s.to_dict()},
            lambda r: "; ".join(
                f"{name} {p['orders'][GLOBAL]['distinct_episodes']:.1f} distinct"
                for name, p in r["profiles"].items())))

    def memory(self, out: dict[str, Any]) -> None:
        """Each worker's private memory over datasets of more and of larger episodes, in the
        global and in the window order (``out[axis][order][point]``)."""
        from torch_rlds.bench._data import bench_dataset

        s = self.settings
        jobs: list[Job] = []
        where: list[tuple[str, str, str]] = []
        for axis, specs in s.memory_specs().items():
            for spec in specs:
                path = os.fspath(bench_dataset(spec, self.cache_dir))
                point = str(spec.num_episodes if axis == "episodes" else spec.min_steps)
                unit = "episodes" if axis == "episodes" else "steps per episode"
                for order in ORDERS:
                    where.append((axis, order, point))
                    jobs.append((f"worker memory, {order} order, {point} {unit}",
                                 "torch_worker_memory",
                                 {"settings": s.to_dict(), "dataset": path, "order": order,
                                  "workers": s.order_workers},
                                 lambda r: f"USS {r['max_uss_mb']:.0f} MiB, PSS "
                                           f"{r['max_pss_mb']:.0f} MiB per worker "
                                           f"({r['episode_mb']:.2f} MiB episodes)"))
        for (axis, order, point), record in zip(where, self.steps.run_all(jobs)):
            out.setdefault(axis, {}).setdefault(order, {})[point] = record

    def index(self, out: dict[str, Any]) -> None:
        """The step index build against a sequential read, and the first batch with an empty
        cache (a never-seen dataset) and with the cache that build filled."""
        s = self.settings
        caches = tempfile.mkdtemp(prefix="caches_", dir=self.work)
        out["build"] = build = self.steps.run(
            "step index build (record index, step counts, step index) into an empty cache",
            "torch_index_build", {**self.common, "cache_dir": caches},
            lambda r: f"{r['build_mb_per_s']:,.0f} MB/s (sequential read "
                      f"{r['read_mb_per_s']:,.0f} MB/s)")
        first = {"settings": s.to_dict(), "dataset": self.dataset, "workers": s.order_workers}
        jobs = {"never seen": (f"first batch, never-seen dataset (empty cache), num_workers="
                               f"{s.order_workers}", "torch_first_batch",
                               {**first, "cache_dir": caches, "fresh": True})}
        if build.get("ok"):
            jobs["indexed"] = (f"first batch, indexed dataset, num_workers={s.order_workers}",
                               "torch_first_batch", {**first, "cache_dir": build["result"]["cache"],
                                                     "fresh": False})
        out["first_batch"] = self._first_batches(jobs, {})


def _topology(hosts: int, workers: int) -> str:
    return f"{hosts} host{'s' * (hosts != 1)} x {workers} worker{'s' * (workers != 1)}"


def in_turn(keys: Sequence[Any], round_index: int) -> list[Any]:
    """The order in which the jobs ``keys`` run in round ``round_index``: as given in even
    rounds, reversed in odd ones. A machine whose speed drifts during a round then favours the
    first jobs of one round and the last of the next; the paired ratios and medians over rounds
    cancel that instead of carrying it."""
    return list(keys) if round_index % 2 == 0 else list(reversed(keys))


def median_record(records: list[dict[str, Any]], key: str = "samples_per_s",
                  higher_is_better: bool = True) -> dict[str, Any]:
    """The record of the median ``result[key]`` among the rounds that worked, with every
    round's figure in ``result["rounds_" + key]`` in round order (``None`` for a round that
    failed, so that the rounds of two pipelines pair up); the first record when none worked.
    Of an even count, the middle figure that flatters less."""
    ok = [r for r in records if r.get("ok")]
    if not ok:
        return records[0]
    ranked = sorted(ok, key=lambda r: r["result"][key], reverse=not higher_is_better)
    chosen = ranked[(len(ok) - 1) // 2]
    values = [r["result"][key] if r.get("ok") else None for r in records]
    return {**chosen, "result": {**chosen["result"], f"rounds_{key}": values}}


def _saves(record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {x["batch"]: x for x in (record.get("result") or {}).get("saves", [])}


def _rate(r: dict[str, Any]) -> str:
    return f"{r['samples_per_s']:,.0f} samples/s"


def _first(r: dict[str, Any]) -> str:
    exact = "" if r.get("exact") is None else f", exact: {r['exact']}"
    return f"first batch after {r['first_batch_s']:.2f} s{exact}"
