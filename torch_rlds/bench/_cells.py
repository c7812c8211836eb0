"""The cells of the report's tables: a record's result, a figure, a record's error."""

from __future__ import annotations

from typing import Any


def ok(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The result of a measurement that worked, else ``None``."""
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
