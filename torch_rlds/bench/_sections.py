"""The measurements of a run, section by section: throughput, resume, checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch_rlds.bench._settings import CAMERAS, BenchSettings
from torch_rlds.bench._steps import Steps


class Bench:
    """The measurements of one run, section by section; each fills its part of the results."""

    def __init__(self, steps: Steps, settings: BenchSettings, dataset: str, work: str,
                 windows: Sequence[int]) -> None:
        self.steps = steps
        self.settings = settings
        self.dataset = dataset
        self.work = work
        self.windows = windows
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
        # the two figures it is compared with.
        *fewer, most = sorted(s.workers)
        jobs: dict[str, tuple[str, str, dict[str, Any], Any]] = {str(w): torch_job(w)
                                                                 for w in fewer}
        if with_tf:
            jobs["tf_data"] = (f"tf.data throughput (shuffle buffer {s.tf_shuffle_buffer:,} steps)",
                               "tf_throughput", self.common, _rate)
        jobs[str(most)] = torch_job(most)
        jobs["limit"] = (
            f"decode limit: simplejpeg alone in {s.limit_processes} processes", "limit",
            {"settings": s.to_dict(), "frames_dir": frames, "cameras": len(CAMERAS)},
            lambda r: f"{r['samples_per_s']:,.0f} samples/s, {r['us_per_image']:.0f} us per image")
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in jobs}
        rounds = s.throughput_rounds
        for r in range(rounds):
            turn = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
            for key in in_turn(list(jobs), r):
                label, task, kwargs, say = jobs[key]
                runs[key].append(self.steps.run(label + turn, task, kwargs, say))
        for w in s.workers:
            out["torch_rlds"][str(w)] = median_record(runs[str(w)])
        for key in ("tf_data", "limit"):
            if key in runs:
                out[key] = median_record(runs[key])

    def resume(self, out: dict[str, Any], with_tf: bool) -> None:
        for window in self.windows:
            out["torch_rlds"][f"window {window}"] = self._torch_resume(window)
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
            + ", ".join(label for label, _, _ in sizes), "remote_startup",
            {"sizes": sizes, "latency_s": LATENCY_S, "work": self.work},
            lambda r: "; ".join(f"{label} cold {row['cold']['seconds']:.1f} s" for label, row
                                in r["sizes"].items()))
        workers = max(s.workers)
        out["throughput"] = self.steps.run(
            f"torch_rlds throughput from a bucket at {LATENCY_S * 1e3:.0f} ms, "
            f"num_workers={workers}", "remote_throughput",
            {**self.common, "workers": workers, "latency_s": LATENCY_S}, _rate)

    def _torch_resume(self, window: int) -> dict[str, Any]:
        common = {**self.common, "workers": self.settings.resume_workers,
                  "shuffle_window": window}
        batches = sorted(self.positions.values())
        saved = self.steps.run(
            f"torch_rlds: save states at {batches} batches (window {window})",
            "torch_save_states", {**common, "batches": batches, "out_dir": self.work},
            lambda r: ", ".join(f"{x['bytes']} B in {1e3 * x['save_s']:.2f} ms"
                                for x in r["saves"]))
        jobs: dict[Any, tuple[str, str, dict[str, Any]]] = {"fresh": (
            f"torch_rlds fresh start (window {window})", "torch_resume",
            {**common, "state_path": None, "expected_digest": None})}
        saves = _saves(saved)
        restores = {}
        for position, batch in self.positions.items():
            save = saves.get(batch) or {}
            restores[str(position)] = (save, batch)
            jobs[str(position)] = (
                f"torch_rlds resume at {position:.0%} (batch {batch}, window {window})",
                "torch_resume", {**common, "state_path": save.get("path"),
                                 "expected_digest": save.get("next_digest")})
        return self._first_batches(jobs, restores)

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
        runs: dict[Any, list[dict[str, Any]]] = {key: [] for key in jobs}
        for key, (save, _) in restores.items():
            if not save:
                label = jobs.pop(key)[0]
                self.steps.done += rounds
                self.steps.failed.append(f"{label}: nothing was saved to resume from")
                runs[key] = [{"ok": False, "error": "nothing was saved to resume from"}]
        for r in range(rounds):
            turn = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
            for key in in_turn(list(jobs), r):
                label, task, kwargs = jobs[key]
                runs[key].append(self.steps.run(label + turn, task, kwargs, _first))
        out = {key: median_record(records, "first_batch_s", higher_is_better=False)
               for key, records in runs.items()}
        for key, (save, batch) in restores.items():
            if out[key].get("ok"):
                out[key]["result"].update(batch=batch, state_bytes=save["bytes"],
                                          save_s=save["save_s"])
        return out


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
