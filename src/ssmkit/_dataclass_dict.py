"""JSON round trips of frozen config dataclasses: tuples become lists and back, unknown keys are errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _tuple_field(f: dataclasses.Field) -> bool:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.startswith("tuple")


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict(obj)`` with the tuple-typed fields as lists (JSON/YAML friendly)."""
    d = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if _tuple_field(f) and isinstance(d[f.name], tuple):
            d[f.name] = list(d[f.name])
    return d


def dataclass_from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls(**d)`` after rejecting unknown keys (the message names them and lists the valid ones) and turning
    lists into tuples for the tuple-typed fields; the class validates the values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) and _tuple_field(fields[k]) else v for k, v in d.items()}
    return cls(**kw)
