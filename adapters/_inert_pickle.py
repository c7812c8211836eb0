"""Reading the structure of a pickle as data, without unpickling it.

torch.distributed.checkpoint stores a checkpoint's table of contents (``.metadata``) as a
pickle. To find how large a saved entry is, torch_rlds reads that file's opcodes (Python's own
``pickletools`` decodes them) and runs them on a stack of plain values: a class or function
the pickle names becomes a :class:`Global` holding its module and name, and a call to it
(``REDUCE``, ``NEWOBJ``) a :class:`Call` holding the callee and its arguments. Nothing is
imported, no callable is called, no object of the pickle's choosing is made; the opcodes
that would do more (persistent ids, extension codes) are refused.
"""

from __future__ import annotations

import dataclasses
import pickletools
from typing import Any


class InertPickleError(ValueError):
    """Bytes that are not a pickle of plain values, named globals and calls."""


@dataclasses.dataclass(frozen=True)
class Global:
    """A class or function a pickle names (never imported)."""

    module: str
    name: str


@dataclasses.dataclass(eq=False)
class Call:
    """What a pickle would build by calling ``func`` with ``args`` (never called); ``state`` is
    what ``BUILD`` would then set on the result."""

    func: Any
    args: tuple
    kwargs: dict | None = None
    state: Any = None


_MARK = object()
_SIMPLE_PUSH = {
    "NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": (),
}
_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
            "BINSTRING", "SHORT_BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
            "BYTEARRAY8", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "INT",
            "FLOAT", "BINFLOAT")
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def read(data: bytes) -> Any:
    """The value the pickle ``data`` describes, with :class:`Global` and :class:`Call` in
    place of the objects it would make. Raises :class:`InertPickleError` for anything else."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        if not marks:
            raise InertPickleError("pickle pops a mark it never set")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def pop() -> Any:
        if not stack:
            raise InertPickleError("pickle pops an empty stack")
        return stack.pop()

    try:
        ops = pickletools.genops(data)
        arg: Any  # what the opcode carries: its kind depends on the opcode
        for opcode, arg, _ in ops:
            name = opcode.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise InertPickleError("pickle stops with a malformed stack")
                return stack[0]
            if name in _SIMPLE_PUSH:
                stack.append(_SIMPLE_PUSH[name])
            elif name in _STRINGS:
                stack.append(bytes(arg) if name == "BYTEARRAY8" else arg)
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_SET":
                stack.append(set())
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in _TUPLES:
                n = _TUPLES[name]
                if len(stack) < n:
                    raise InertPickleError("pickle builds a tuple of missing items")
                members = tuple(stack[-n:])
                del stack[-n:]
                stack.append(members)
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name == "FROZENSET":
                stack.append(frozenset(pop_mark()))
            elif name == "APPEND":
                value = pop()
                _target(stack, list).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                _target(stack, list).extend(items)
            elif name == "SETITEM":
                value, key = pop(), pop()
                _target(stack, dict)[_key(key)] = value
            elif name == "SETITEMS":
                items = pop_mark()
                target = _target(stack, dict)
                for key, value in zip(items[::2], items[1::2]):
                    target[_key(key)] = value
            elif name == "ADDITEMS":
                items = pop_mark()
                _target(stack, set).update(_key(i) for i in items)
            elif name in ("GLOBAL", "INST"):
                module, _, qualname = arg.partition(" ")
                stack.append(Global(module, qualname))
                if name == "INST":
                    stack.append(Call(stack.pop(), tuple(pop_mark())))
            elif name == "STACK_GLOBAL":
                qualname, module = pop(), pop()
                if not isinstance(module, str) or not isinstance(qualname, str):
                    raise InertPickleError("pickle names a global by something not a string")
                stack.append(Global(module, qualname))
            elif name == "REDUCE":
                args, func = pop(), pop()
                stack.append(Call(func, _args(args)))
            elif name == "NEWOBJ":
                args, cls = pop(), pop()
                stack.append(Call(cls, _args(args)))
            elif name == "NEWOBJ_EX":
                kwargs, args, cls = pop(), pop(), pop()
                stack.append(Call(cls, _args(args), kwargs if isinstance(kwargs, dict) else None))
            elif name == "OBJ":
                items = pop_mark()
                if not items:
                    raise InertPickleError("pickle builds an object of nothing")
                stack.append(Call(items[0], tuple(items[1:])))
            elif name == "BUILD":
                state = pop()
                target = _target(stack, Call)
                target.state = state
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not stack:
                    raise InertPickleError("pickle memoizes an empty stack")
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise InertPickleError("pickle memoizes an empty stack")
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise InertPickleError(f"pickle recalls memo {arg}, never stored")
                stack.append(memo[int(arg)])
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1] if stack else pop())
            else:  # PERSID, BINPERSID, EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER...
                raise InertPickleError(f"pickle uses opcode {name}, which torch_rlds does not "
                                       "read")
    except (ValueError, TypeError, IndexError, KeyError, RecursionError) as e:
        if isinstance(e, InertPickleError):
            raise
        raise InertPickleError(f"not a well-formed pickle ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    raise InertPickleError("pickle ends without STOP")


def _target(stack: list[Any], kind: type) -> Any:
    if not stack or not isinstance(stack[-1], kind):
        raise InertPickleError(f"pickle adds to something not a {kind.__name__}")
    return stack[-1]


def _args(args: Any) -> tuple:
    if not isinstance(args, tuple):
        raise InertPickleError("pickle calls with arguments that are not a tuple")
    return args


def _key(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise InertPickleError("pickle uses an unhashable key") from None
    return key
