"""Recipe validation shared by every stage's config: ``Literal`` choices and types checked in
``__post_init__`` (:class:`ValidatedArguments`), range checks with messages that name the fix."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from difflib import get_close_matches
from typing import Any, Literal

from .errors import GVBSMError


class RecipeError(GVBSMError):
    """A recipe value is invalid; the message names the field and the fix."""


def _suggest(value: Any, choices: typing.Sequence[Any]) -> str:
    close = get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def check_choice(name: str, value: Any, choices: typing.Sequence[Any]) -> None:
    """Raise :class:`RecipeError` naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise RecipeError(f"{name}={value!r} is not one of {list(choices)}{_suggest(value, choices)}. "
                          f"Set `{name}:` in the recipe or `--{name}` to one of them.")


def check_range(name: str, value: float | int | None, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """Raise :class:`RecipeError` unless ``low <= value <= high`` (open ends as flagged) and finite."""
    if value is None:
        if allow_none:
            return
        raise RecipeError(f"{name} must be set.")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise RecipeError(f"{name}={value!r} is out of range: it must be a finite number in {interval}. "
                          f"Fix `{name}:` in the recipe or `--{name}`.")


class ValidatedArguments:
    """Mixin: type-check every field and enforce ``Literal`` choices in ``__post_init__``.

    Subclasses add range checks in ``validate()``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in hints:
                continue
            check_value(f.name, hints[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Range checks of the subclass (raise :class:`RecipeError`)."""


def check_value(name: str, tp: Any, value: Any) -> None:
    """Raise :class:`RecipeError` unless ``value`` fits the annotation ``tp`` (Literal choices included)."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return
        raise RecipeError(f"{name} must not be null; remove it from the recipe to use the default.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        check_choice(name, value, typing.get_args(tp))
    elif tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{name}={value!r} must be true or false.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name}={value!r} must be an integer (got {type(value).__name__}).")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{name}={value!r} must be a number (got {type(value).__name__}).")
    elif tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{name}={value!r} must be a string (got {type(value).__name__}).")
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{name}={value!r} must be a list, e.g. `{name}: [a, b]` or `--{name} a b`.")
        (item,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(value):
            check_value(f"{name}[{i}]", item, v)


def check_crop_scale(name: str, scale: list[float]) -> None:
    if len(scale) != 2 or not (0 < float(scale[0]) <= float(scale[1]) <= 1):
        raise RecipeError(f"{name}={scale} must be [min, max] with 0 < min <= max <= 1, e.g. [0.08, 1.0].")
