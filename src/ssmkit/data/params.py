"""Task parameter dataclasses: declared with :func:`param`, validated on construction.

Every task declares its parameters as a frozen, keyword-only dataclass subclassing :class:`TaskParams`. Each field
carries a one-line help text and optional bounds (``ge``, ``gt``, ``le``, ``lt``) or ``choices``; types are checked
from the annotations (``int``, ``float``, ``bool``, ``str`` and ``X | None``). Cross-field constraints go in
``validate``. A bad value raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the parameter, the value
and the constraint.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import numpy as np

from .._annotations import NO_MATCH, allowed_types, match_type, type_name


def param(
    default: Any = MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with help text and bounds. Leave ``default`` out for a required parameter."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def _coerce_type(name: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the annotation; ints are accepted for floats, numpy scalars for Python ones."""
    if value is None:
        if allowed_types(annotation)[1]:
            return None
        raise TypeError(f"{name}=None is invalid: expected {type_name(annotation)}")
    if isinstance(value, np.generic):
        value = value.item()
    out = match_type(value, annotation)
    if out is NO_MATCH:
        raise TypeError(f"{name}={value!r} is invalid: expected {type_name(annotation)}, got {type(value).__name__}")
    return out


def constraint_text(meta: typing.Mapping[str, Any]) -> str:
    """Human-readable constraint of a field ('>= 1', 'one of ...'), '' when unconstrained."""
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
    return " and ".join(parts)


@dataclass(frozen=True, kw_only=True)
class TaskParams:
    """Base of every task's parameter dataclass (frozen, keyword-only, validated in ``__post_init__``)."""

    common_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce_type(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            meta = f.metadata
            bad = (
                (meta.get("gt") is not None and not value > meta["gt"])
                or (meta.get("ge") is not None and not value >= meta["ge"])
                or (meta.get("lt") is not None and not value < meta["lt"])
                or (meta.get("le") is not None and not value <= meta["le"])
                or (meta.get("choices") is not None and value not in meta["choices"])
            )
            if bad:
                raise ValueError(f"{f.name}={value!r} is invalid: must be {constraint_text(meta)}")
        self.validate()

    def validate(self) -> None:
        """Cross-field constraints; raise via :meth:`fail`."""

    def fail(self, name: str, constraint: str) -> typing.NoReturn:
        """Raise ValueError naming parameter ``name``, its value and the violated ``constraint``."""
        raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {constraint}")

    def to_dict(self) -> dict[str, Any]:
        """Parameter values by name, the task's own first and the shared ``common_fields`` last."""
        names = sorted((f.name for f in fields(self)), key=lambda n: n in self.common_fields)
        return {n: getattr(self, n) for n in names}


@dataclass(frozen=True, kw_only=True)
class GeneratedParams(TaskParams):
    """Split sizes shared by every generated (synthetic) task."""

    common_fields: ClassVar[tuple[str, ...]] = ("num_train", "num_val", "num_test")

    num_train: int = param(10_000, "examples per training epoch (regenerated for every seed)", ge=1)
    num_val: int = param(500, "examples in the validation split", ge=1)
    num_test: int = param(500, "examples in the test split", ge=1)


def parse_value(name: str, text: str, annotation: Any) -> Any:
    """Parse a command-line string into the parameter's type ('none'/'null' -> None for optional ones)."""
    base, optional = allowed_types(annotation)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    for t in base:
        try:
            if t is bool:
                low = text.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError("not a boolean (true/false)")
            if t is int:
                return int(text)
            if t is float:
                return float(text)
            if t is str:
                return text
        except ValueError:
            continue
    raise ValueError(f"{name}={text!r} is invalid: expected {type_name(annotation)}")
