"""Simple type annotations of config dataclass fields: ``int``, ``float``, ``bool``, ``str`` and ``X | None``.

Shared by the task parameters (``data.params``) and the training config (``train.config``), which differ only in
the errors they raise.
"""

from __future__ import annotations

import types
import typing
from typing import Any

#: returned by :func:`match_type` when the value fits none of the annotation's types
NO_MATCH = object()


def allowed_types(annotation: Any) -> tuple[tuple[Any, ...], bool]:
    """(base types, None allowed) for an annotation like ``int`` or ``int | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        base = tuple(a for a in args if a is not type(None))
        return base, len(base) < len(args)
    return (annotation,), False


def type_name(annotation: Any) -> str:
    """Readable name of an annotation: 'int', 'float | None', ..."""
    base, optional = allowed_types(annotation)
    name = " | ".join(getattr(t, "__name__", str(t)) for t in base)
    return f"{name} | None" if optional else name


def match_type(value: Any, annotation: Any) -> Any:
    """``value`` if it fits one of the annotation's base types (an int also fits float and becomes a float; a bool
    is never an int), else :data:`NO_MATCH`. None is the caller's business."""
    for t in allowed_types(annotation)[0]:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    return NO_MATCH
