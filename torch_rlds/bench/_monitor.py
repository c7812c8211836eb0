"""What a measuring process and everything it started (DataLoader workers, decode processes)
cost the machine, and what other processes took from it meanwhile.

Memory, three figures because each misleads alone:

* ``peak_rss_mb``: the largest sum of RSS over the process tree seen by a sampler thread.
  Forked workers share pages with their parent and each count them again, so this overstates
  a multi-process loader.
* ``peak_pss_mb``: PSS (shared pages split between their sharers), which is what the tree
  really costs; Linux only (``/proc/PID/smaps_rollup``), else ``None``. Reading it walks the
  process's page tables under its memory-map lock, which slows a process with a large address
  space (tf.data's by 15-20% when read ten times a second), so it is sampled only every
  ``pss_interval_s``; RSS comes from a counter and costs nothing to read.
* ``maxrss_mb``: the kernel's exact high-water mark of the measuring process alone
  (``getrusage``), which no sampling interval can miss.

CPU: ``foreign_cpu_pct`` is the share of the machine's CPU time, while the process ran, that
went to processes outside its tree (other users, other test runs). A timing taken while it is
high says little about the pipeline.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

_MB = 1024 * 1024


class ResourceMonitor:
    """Samples memory of this process and its descendants, and counts foreign CPU time, from
    ``with`` entry (or :meth:`start`) until :meth:`stop`. Needs psutil for everything but
    ``maxrss_mb``.

    Not thread-safe: start and stop it from one thread.
    """

    def __init__(self, interval_s: float = 0.1, pss_interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.peak_rss = 0
        self.peak_pss: int | None = None
        self.foreign_cpu_pct: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-monitor", daemon=True)
        self._cpu_start: tuple[float, float, float] | None = None

    def __enter__(self) -> ResourceMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._cpu_start = _cpu_snapshot()
        self._thread.start()

    def stop(self) -> None:
        """End the sampler and count the CPU time since :meth:`start`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        end = _cpu_snapshot()
        if self._cpu_start is not None and end is not None:
            (t0, busy0, mine0), (t1, busy1, mine1) = self._cpu_start, end
            capacity = (t1 - t0) * (os.cpu_count() or 1)
            if capacity > 0:
                foreign = (busy1 - busy0) - (mine1 - mine0)
                self.foreign_cpu_pct = max(0.0, 100 * foreign / capacity)

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        next_pss = time.monotonic()
        while True:
            rss, pss, pss_known = 0, 0, True
            with_pss = time.monotonic() >= next_pss
            if with_pss:
                next_pss = time.monotonic() + self.pss_interval_s
            for process in _tree(me):
                try:
                    rss += process.memory_info().rss
                except psutil.Error:
                    continue
                value = _pss(process.pid) if with_pss else None
                if value is None:
                    pss_known = False
                else:
                    pss += value
            self.peak_rss = max(self.peak_rss, rss)
            if with_pss and pss_known:
                self.peak_pss = max(self.peak_pss or 0, pss)
            if self._stop.wait(self.interval_s):
                return

    def memory(self) -> dict[str, Any]:
        """The memory peaks in MiB (see the module docstring)."""
        return {
            "peak_rss_mb": round(self.peak_rss / _MB, 1) if self.peak_rss else None,
            "peak_pss_mb": round(self.peak_pss / _MB, 1) if self.peak_pss else None,
            "maxrss_mb": round(_maxrss_bytes() / _MB, 1),
        }


def _tree(me: Any) -> list[Any]:
    import psutil

    try:
        return [me, *me.children(recursive=True)]
    except psutil.Error:
        return [me]


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this tree).

    The tree's time includes descendants already reaped (``children_*``), so workers that
    exited and were joined still count as this tree's.
    """
    try:
        import psutil
    except ImportError:
        return None
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, field, 0.0)
               for field in ("user", "nice", "system", "irq", "softirq", "steal"))
    mine = 0.0
    for process in _tree(psutil.Process()):
        try:
            t = process.cpu_times()
        except psutil.Error:
            continue
        mine += t.user + t.system + t.children_user + t.children_system
    return time.monotonic(), busy, mine


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB
