"""What LLaMA-Factory's train arguments are: names and types, read from its own dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from functools import lru_cache
from typing import Any, Literal

from llamafactory.hparams.parser import _TRAIN_ARGS  # the dataclasses `llamafactory-cli train` parses


@lru_cache(maxsize=1)
def train_fields() -> dict[str, Any]:
    """Field name -> resolved type, for every train argument of LLaMA-Factory."""
    fields: dict[str, Any] = {}
    for cls in _TRAIN_ARGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                fields[f.name] = hints.get(f.name, Any)
    return fields


KNOWN_KEYS = frozenset(train_fields())


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional
    return tp, False


def _accepts(tp: Any, value: Any) -> bool:
    tp, optional = _strip_optional(tp)
    if value is None:
        return optional or tp is Any
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple)) or isinstance(value, str)
    if origin is dict or tp is dict:
        return isinstance(value, (dict, str))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in {m.name for m in tp}
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True


def describe(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        text = "one of " + ", ".join(repr(m.value) for m in tp)
    elif isinstance(tp, type):
        text = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}.get(tp.__name__, tp.__name__)
    else:
        text = str(tp).replace("typing.", "")
    return text + (" (or null)" if optional else "")


def type_problems(args: dict[str, Any]) -> dict[str, str]:
    """Key -> problem, for unknown keys and values of the wrong type."""
    fields = train_fields()
    problems: dict[str, str] = {}
    for key, value in args.items():
        if key not in fields:
            problems[key] = "unknown key: not an argument of LLaMA-Factory 0.9.5 (check the spelling or remove it)"
        elif not _accepts(fields[key], value):
            problems[key] = f"wrong type: got {value!r}, expected {describe(fields[key])}"
    return problems


def coerce_types(args: dict[str, Any]) -> dict[str, Any]:
    """Whole-number floats in int fields become ints (sliders send 8.0 for 8), and numbers written
    as text become numbers: YAML 1.1 reads ``5e-4`` (no dot) as a string, which the trainer would
    only reject at run time."""
    fields = train_fields()
    out = {}
    for key, value in args.items():
        tp, _ = _strip_optional(fields.get(key, Any))
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif tp in (int, float) and isinstance(value, str):
            value = _number(value, tp)
        out[key] = value
    return out


def _number(text: str, tp: type) -> Any:
    try:
        number = float(text.strip())
    except ValueError:
        return text  # left for the type check to name
    if not math.isfinite(number):
        return text
    if tp is int:
        return int(number) if number.is_integer() else text
    return number
