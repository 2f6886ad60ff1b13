"""The one rule for names a user gives the product (class names), torch-free.

A class name travels everywhere: checkpoints, edge files, ONNX metadata, the device's replies and state,
``predict``'s output lines. So it is checked once, here, wherever it enters (a model's config, class
addition, an image folder's sub-folders, a model uploaded to the device): a string of 1 to ``MAX_NAME``
printable characters (no newline, tab or other control character; not only spaces).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgeff.errors import InputError

MAX_NAME = 64  # characters of a class name


def name_problem(v: Any) -> str | None:
    """Why ``v`` is not a valid class name, or None when it is."""
    if not isinstance(v, str):
        return f"a class name must be a string, got {type(v).__name__}"
    if not v.strip():
        return "a class name must not be empty or only spaces"
    if len(v) > MAX_NAME:
        return f"a class name has at most {MAX_NAME} characters, got {len(v)}"
    if not v.isprintable():
        return f"a class name must be printable characters (no newline, tab or control character), got {_short(v)}"
    return None


def checked_name(v: Any) -> str:
    """A new class name as a user typed it, surrounding spaces removed; ``InputError`` when it breaks the rule."""
    v = v.strip() if isinstance(v, str) else v
    if (why := name_problem(v)) is not None:
        raise InputError(why)
    return v


def names_problem(names: Iterable[Any]) -> str | None:
    """Why ``names`` is not a valid list of class names (each valid, none repeated), or None."""
    seen: set[str] = set()
    for v in names:
        if (why := name_problem(v)) is not None:
            return why
        if v in seen:
            return f"class name {v!r} appears twice"
        seen.add(v)
    return None


def _short(v: str) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
