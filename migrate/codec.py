"""Frozen dataclasses to and from JSON-ready dicts, driven by their type hints.

One pair for every report type, so serialiser and deserialiser cannot drift apart:
``from_dict(cls, to_dict(x)) == x`` is tested for each of them.
Supports nested dataclasses, ``X | None``, tuples, lists, dicts with str keys,
StrEnums, and plain JSON scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """``obj`` as JSON-ready data (dataclasses become dicts, tuples lists, enums values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any) -> T:
    """Rebuild a ``cls`` from :func:`to_dict` output. Raises ValueError on a mismatch."""
    return typing.cast(T, _decode(cls, data, cls.__name__))


def _decode(tp: Any, data: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if data is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: null where {tp} was expected")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(arg, data, where)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {data!r} fits none of {tp}: {errors}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}")
        upgrade = getattr(tp, "upgrade_legacy", None)
        if upgrade is not None:
            data = upgrade(data)  # an older form of this type, read as today's
        hints = get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if not f.init:
                continue  # derived in __post_init__: written for readers, not read back
            if f.name in data:
                kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(data)
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        return tuple(
            _decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True))
        )
    if origin is list:
        (arg,) = get_args(tp)
        return [_decode(arg, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        _, val = get_args(tp)
        return {str(k): _decode(val, v, f"{where}[{k}]") for k, v in data.items()}
    if tp is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    if tp in (int, str, bool) and type(data) is tp:
        return data
    if tp is type(None) and data is None:
        return None
    raise ValueError(f"{where}: {data!r} is not a {getattr(tp, '__name__', tp)}")
