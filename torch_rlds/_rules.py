"""What a config field allows, written once: for its check, its error and ``torch-rlds config``.

A config section is a frozen dataclass whose fields carry a :class:`Rule` in their metadata
(made with :func:`field`); its ``__post_init__`` calls :func:`check_fields`. An error names the
field, the value found and what is allowed: ``data.obs_window must be an int >= 1 (got 0)``.
Nothing here imports the rest of torch_rlds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A config field with a value outside what it allows, or an unknown field."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a config field allows: ``allowed`` in words, ``check(value)`` whether ``value``
    fits, and ``normalise`` the stored form of a fitting value (a list becomes a tuple)."""

    allowed: str
    check: Callable[[Any], bool]
    normalise: Callable[[Any], Any] = lambda value: value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_rule(low: int) -> Rule:
    """An int (not a bool) >= ``low``."""
    return Rule(f"an int >= {low}", lambda value: type(value) is int and value >= low)


def number_rule(low: float, high: float, *, low_open: bool = False) -> Rule:
    """A number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    return Rule(f"a number in {interval}",
                lambda v: _is_number(v) and (low < v if low_open else low <= v) and v <= high,
                float)


def choice_rule(options: Sequence[str]) -> Rule:
    """One of ``options``."""
    return Rule(f"one of {list(options)}", lambda value: value in options)


def nullable(rule: Rule) -> Rule:
    """``rule``, or ``None``."""
    return Rule(f"{rule.allowed}, or null", lambda v: v is None or rule.check(v),
                lambda v: None if v is None else rule.normalise(v))


BOOL = Rule("true or false", lambda value: type(value) is bool)
TEXT = Rule("a non-empty string", lambda value: isinstance(value, str) and bool(value))
STRINGS = Rule("a list of strings",
               lambda value: isinstance(value, (list, tuple))
               and all(isinstance(k, str) for k in value), tuple)
ANY_MAPPING = Rule("a mapping, or null", lambda value: True)


def field(default: Any, rule: Rule, help: str = "") -> Any:
    """A dataclass field with its :class:`Rule` and a one-line ``help``."""
    return dataclasses.field(default=default, metadata={"rule": rule, "help": help})


def check_value(where: str, value: Any, rule: Rule, error: type[Exception] = ConfigError) -> Any:
    """``value`` in its stored form if it fits ``rule``; else raise ``error`` naming ``where``,
    the value and what is allowed."""
    if not rule.check(value):
        raise error(f"{where} must be {rule.allowed} (got {value!r})")
    return rule.normalise(value)


def check_int(where: str, value: Any, low: int, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) >= ``low``; else raise ``error`` naming ``where``
    (the one range check of arguments, config fields and state fields alike)."""
    return check_value(where, value, int_rule(low), error)


def check_fields(section: Any, where: str, error: type[Exception] = ConfigError) -> None:
    """Check every field of the frozen dataclass ``section`` that has a rule, in field order,
    and store each normalised value."""
    for f in dataclasses.fields(section):
        rule = f.metadata.get("rule")
        if rule is not None:
            value = check_value(f"{where}.{f.name}", getattr(section, f.name), rule, error)
            object.__setattr__(section, f.name, value)


def describe(section: Any) -> list[tuple[str, Any, str, str]]:
    """``(field, value, allowed, help)`` of every field of ``section`` with a rule."""
    return [(f.name, getattr(section, f.name), f.metadata["rule"].allowed, f.metadata["help"])
            for f in dataclasses.fields(section) if "rule" in f.metadata]
