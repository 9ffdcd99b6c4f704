"""Every option a user can set is declared once: in a config dataclass of the library, with its default,
its help text and its check.

    @dataclass
    class SearchConfig(Options):
        k: int = option(10, "Results per query.", check=positive)

The library's functions take these configs (or their fields as keywords) and
check them, so a library caller gets the same one-line HashsearchError as the
command line; the CLI generates its click options from the same fields
(`click_options`), so a default or a help text cannot drift between the two,
and the HTTP service reads them for its query parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable

from .errors import HashsearchError

_INT64_MAX = (1 << 63) - 1


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HashsearchError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):        # a NaN passes every comparison check and trains NaN weights
        raise HashsearchError(f"{name} must be finite, got {value}")


def positive(name: str, value) -> None:
    _number(name, value)
    if value <= 0:
        raise HashsearchError(f"{name} must be positive, got {value}")
    if value > _INT64_MAX:
        raise HashsearchError(f"{name} is too large: {value}")


def not_negative(name: str, value) -> None:
    _number(name, value)
    if value < 0:
        raise HashsearchError(f"{name} must be zero or more, got {value}")
    if value > _INT64_MAX:
        raise HashsearchError(f"{name} is too large: {value}")


def seed_range(name: str, value) -> None:
    """numpy and torch both take seeds from 0 to 2**32 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise HashsearchError(f"{name} must be an integer from 0 to {(1 << 32) - 1}, got {value!r}")


def in_range(low, high):
    """A check that the value lies in [low, high]."""
    def check(name: str, value) -> None:
        not_negative(name, value)
        if not low <= value <= high:
            raise HashsearchError(f"{name} must be from {low} to {high}, got {value}")
    return check


def fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise HashsearchError(f"{name} must be at least 0 and below 1, got {value!r}")


def option(default: Any, help: str, *, check: Callable | None = None, choices: tuple | None = None,  # noqa: A002
           flag: str | None = None, cli: bool = True) -> Any:
    """A config field: its default, its help, and how it is checked (None is always allowed for a None default)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "check": check, "choices": choices, "flag": flag, "cli": cli})


class Options:
    """Base of the config dataclasses: checks every field on construction."""

    def __post_init__(self):
        for f, kind in _field_kinds(type(self)):
            value = getattr(self, f.name)
            if value is None:
                continue
            label = cli_name(f).lstrip("-")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise HashsearchError(f"{label} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise HashsearchError(f"{label} must be a number, got {value!r}")
            if f.metadata.get("choices") and value not in f.metadata["choices"]:
                raise HashsearchError(f"{label} must be one of {', '.join(map(str, f.metadata['choices']))}, "
                                      f"got {value!r}")
            if f.metadata.get("check"):
                f.metadata["check"](label, value)

    def given(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _field_kinds(cls) -> tuple:
    """(field, base type) of each field of a config class, worked out once: a search builds a SearchConfig
    per call, and resolving the type hints every time cost more than the search."""
    hints = typing.get_type_hints(cls)
    return tuple((f, _base_type(hints[f.name])) for f in dataclasses.fields(cls))


def cli_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(hint) -> type:
    """int for `int` and `int | None`, and so on."""
    for kind in (bool, int, float, str):
        if hint is kind or kind in typing.get_args(hint):
            return kind
    return object


def _click_type(f: dataclasses.Field, hints: dict):
    import click
    if f.metadata.get("choices"):
        return click.Choice([str(c) for c in f.metadata["choices"]])
    kind = _base_type(hints[f.name])
    return str if kind is object else kind


def click_options(config: type, *, skip: tuple = ()):
    """A decorator adding one click option per CLI field of `config`, with its default and help."""
    import click
    hints = typing.get_type_hints(config)

    def decorate(command):
        for f in reversed(dataclasses.fields(config)):
            if f.name in skip or not f.metadata.get("cli", False):
                continue
            kind = _click_type(f, hints)
            flags = [cli_name(f)]
            if kind is bool:
                command = click.option(*flags, f.name, is_flag=True, default=bool(f.default),
                                       help=f.metadata["help"])(command)
                continue
            command = click.option(*flags, f.name, type=kind, default=f.default,
                                   show_default=f.default is not None, help=f.metadata["help"])(command)
        return command
    return decorate
