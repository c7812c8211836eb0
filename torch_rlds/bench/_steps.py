"""Running the measurements one at a time on a machine that others may share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch_rlds.bench._subprocess import run_task

# (label, task, kwargs, show): one measurement as Steps.run takes it; show gets the task's
# result (a dict, or a list of rows).
Job = tuple[str, str, dict[str, Any], Callable[[Any], str]]

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


class Steps:
    """Runs the measurements one by one and prints a line for each.

    Other processes on the machine skew timings. Before each measurement, while others use
    more than :data:`BUSY_PCT` of the CPUs, it waits up to ``wait_idle_s``; a measurement
    during which they took more than :data:`FOREIGN_PCT` (``foreign_cpu_pct``) is redone up
    to ``retries`` times, and the least disturbed attempt is kept. The report flags figures
    that stayed disturbed.
    """

    def __init__(self, total: int, timeout_s: float, wait_idle_s: float, retries: int,
                 group: bool = False) -> None:
        self.total = total
        self.done = 0
        self.timeout_s = timeout_s
        self.wait_idle_s = wait_idle_s
        self.retries = retries
        self.group = group
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
            show: Callable[[Any], str]) -> dict[str, Any]:
        """The record of ``task`` run in a fresh process (see the class docstring)."""
        self.done += 1
        print(f"[{self.done}/{self.total}] {label}", flush=True)
        record = self._attempts(task, kwargs)
        self._say(label, record, show)
        return record

    def run_all(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """The records of ``jobs`` in order: each in a fresh process, or, when the steps are
        grouped, consecutive jobs that need torch (or do not) together in one process (see
        :mod:`torch_rlds.bench._subprocess`)."""
        if not self.group:
            return [self.run(*job) for job in jobs]
        from torch_rlds.bench._subprocess import GROUP, TASKS

        records: list[dict[str, Any]] = []
        start = 0
        while start < len(jobs):
            stop = start + 1
            while stop < len(jobs) and TASKS[jobs[stop][1]][1] == TASKS[jobs[start][1]][1]:
                stop += 1
            part = jobs[start:stop]
            first = self.done + 1
            self.done += len(part)
            print(f"[{first}-{self.done}/{self.total}] in one process: "
                  + "; ".join(label for label, *_ in part), flush=True)
            group = self._attempts(GROUP, {"jobs": [{"task": task, "kwargs": kwargs}
                                                    for _, task, kwargs, _ in part]})
            results = group.get("result") if group.get("ok") else None
            for i, (label, _, _, show) in enumerate(part):
                if results is None:
                    record = dict(group)
                else:
                    record = {k: v for k, v in group.items() if k not in ("result", "error")}
                    record.update(results[i])
                self._say(label, record, show)
                records.append(record)
            start = stop
        return records

    def _attempts(self, task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for attempt in range(1 + self.retries):
            busy = self._idle()
            candidate = run_task(task, kwargs, timeout_s=self.timeout_s)
            candidate.update(machine_busy_pct=busy, attempts=attempt + 1)
            if not record or better(candidate, record):
                record = candidate
            if not candidate.get("ok") or foreign(candidate) <= FOREIGN_PCT:
                break
            if attempt < self.retries:
                print(f"      redoing: other processes took {foreign(candidate):.0f}% of the "
                      "CPUs meanwhile", flush=True)
        return record

    def _say(self, label: str, record: dict[str, Any],
             show: Callable[[Any], str]) -> None:
        if record.get("ok"):
            memory = record.get("memory") or {}
            print(f"      {show(record['result'])}; peak RSS {memory.get('peak_rss_mb')} MiB "
                  f"({record.get('wall_s', 0):.1f} s)", flush=True)
        else:
            self.failed.append(f"{label}: {record.get('error')}")
            print(f"      FAILED: {record.get('error')}", flush=True)


def foreign(record: dict[str, Any]) -> float:
    return record.get("foreign_cpu_pct") or 0.0


def better(candidate: dict[str, Any], record: dict[str, Any]) -> bool:
    """A measurement that worked beats one that failed; then the less disturbed one wins."""
    if bool(candidate.get("ok")) != bool(record.get("ok")):
        return bool(candidate.get("ok"))
    return foreign(candidate) < foreign(record)
