"""The cells of the report's tables: a record's result, a figure, a record's error, its memory,
and the paired ratios of throughput rounds."""

from __future__ import annotations

import statistics
from typing import Any


def ok(record: dict[str, Any] | None) -> Any:
    """The result of a measurement that worked (a dict, or a list of rows: whatever its task
    returned), else ``None``."""
    return record["result"] if record and record.get("ok") else None


def fmt(value: Any, digits: int = 2) -> str:
    """A figure as a table cell: ``-`` for none, thousands separated, ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def error(record: dict[str, Any] | None) -> str:
    """The last cell of a row: empty, ``not run`` or the measurement's error."""
    if record is None:
        return "not run"
    return "" if record.get("ok") else f"error: {record.get('error', '?')}"

def rates(record: dict[str, Any] | None) -> list[float | None]:
    """A throughput record's samples/s, round by round (one round when it has no rounds)."""
    r = ok(record) or {}
    rounds = r.get("rounds_samples_per_s")
    return list(rounds) if rounds else [r.get("samples_per_s")]


def paired_ratio(a: list[float | None], b: list[float | None]) -> float | None:
    """The median over rounds of ``a / b`` in the same round: the pipelines of a round ran
    minutes apart at most, so a machine whose speed drifts during the run skews no ratio.
    Rounds where either failed are left out; lists of other lengths compare their medians."""
    if len(a) != len(b):
        a, b = [median([x for x in a if x])], [median([x for x in b if x])]
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return median(pairs)


def median(values: list[float]) -> float | None:
    """The median of ``values``; ``None`` of none."""
    return statistics.median(values) if values else None


def memory(record: dict[str, Any] | None) -> tuple[str, str]:
    """The peak RSS and PSS cells of a measurement's record."""
    memory = (record or {}).get("memory") or {}
    return fmt(memory.get("peak_rss_mb"), 0), fmt(memory.get("peak_pss_mb"), 0)
