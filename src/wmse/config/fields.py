"""The fields of a run configuration and how command-line text becomes their values.

A field is declared once, as an attribute of a dataclass: the run's own fields in
:class:`wmse.config.schema.RunFields`, each method's in its ``Options`` dataclass (wmse.methods).
:func:`all_fields` gathers them into one table; parsing reads each field's type from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["Field", "fields_of", "parse_text", "coerce", "type_name"]


@dataclass(frozen=True)
class Field:
    """One config field: its name, type (``int``, ``Optional[int]``, ``tuple[float, float]`` ...), default,
    and who declares it (``"run"`` or a method's name)."""

    name: str
    type: Any
    default: Any
    owner: str = dataclasses.field(default="run", compare=False)


def fields_of(cls: type, owner: str) -> list[Field]:
    """The fields of dataclass ``cls`` (types resolved from its annotations)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            raise ValueError(f"{owner}: config field {f.name!r} needs a default value")
        out.append(Field(f.name, hints[f.name], f.default, owner))
    return out


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) of ``Optional[X]`` / ``X | None``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n"}
_NONE = {"none", "null", ""}


def type_name(tp: Any) -> str:
    """How a type reads in an error message: "an int", "2 comma-separated floats or none", ..."""
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        elem = args[0].__name__
        kind = f"comma-separated {elem}s" if args[-1] is Ellipsis else f"{len(args)} comma-separated {elem}s"
    else:
        kind = {bool: "a boolean (yes/no)", int: "an int", float: "a float", str: "a string"}[inner]
    return kind + (" or none" if optional else "")


def _parse_scalar(name: str, text: str, tp: type) -> Any:
    s = text.strip()
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError(f"field {name!r} expects a boolean (yes/no/true/false/1/0), got {text!r}")
    if tp is str:
        return s
    try:
        return tp(s)
    except ValueError:
        article = "an" if tp is int else "a"
        raise ValueError(f"field {name!r} expects {article} {tp.__name__}, got {text!r}") from None


def parse_text(field: Field, text: str) -> Any:
    """Parse command-line ``text`` by the field's type.

    ints, floats, bools (yes/no/true/false/1/0), strings, ``none`` for optional fields, and
    comma-separated tuples such as ``"0.2,1.0"``.
    """
    name = field.name
    tp, optional = _strip_optional(field.type)
    if optional and text.strip().lower() in _NONE:
        return None
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        parts = [p for p in text.replace(" ", "").split(",") if p != ""]
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not variadic and len(parts) != len(args):
            raise ValueError(f"field {name!r} expects {type_name(tp)}, got {text!r}")
        elem = args[0]
        try:
            return tuple(elem(p) for p in parts)
        except ValueError:
            raise ValueError(f"field {name!r} expects {type_name(tp)}, got {text!r}") from None
    return _parse_scalar(name, text, tp)


def coerce(field: Field, value: Any) -> Any:
    """Bring a value read from JSON (lists, ints for floats, strings) to the field's type."""
    inner, _ = _strip_optional(field.type)
    if isinstance(value, str):
        return value if inner is str else parse_text(field, value)
    if isinstance(value, list):
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
