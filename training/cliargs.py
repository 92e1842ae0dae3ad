"""Command-line flags generated from a config dataclass, so defaults and choices are written once, at the field.

A field's metadata (see ``arg``) carries its help text and, where needed, its choices, a value parser, a flag
name other than ``--field-name``, or ``cli=False`` for fields that are not flags. Types come from the
annotations: ``bool`` becomes a switch (``--no-x`` flags store False), ``X | None`` an optional ``X``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def arg(
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    type: Callable[[str], Any] | None = None,
    flag: str | None = None,
    positional: bool = False,
    cli: bool = True,
) -> dict[str, Any]:
    """Field metadata for ``add_arguments``: ``field(default=..., metadata=arg("help", ...))``."""
    return {"help": help, "choices": choices, "type": type, "flag": flag, "positional": positional, "cli": cli}


def _base_type(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (base,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base
    return annotation


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag (or positional argument) per field of the dataclass ``cls``, with its default in the help."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: use field(metadata=arg(...))")
        base = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        if meta["positional"]:
            parser.add_argument(f.name, type=meta["type"] or base, help=meta["help"])
            continue
        name = meta["flag"] or "--" + f.name.replace("_", "-")
        if base is bool:
            action = "store_false" if name.startswith("--no-") else "store_true"
            if default is not (action == "store_false"):
                raise TypeError(f"{cls.__name__}.{f.name}: a {name} switch needs the default {action == 'store_false'}")
            parser.add_argument(name, dest=f.name, action=action, help=meta["help"])
            continue
        help_text = meta["help"] + ("" if default is None else " (default: %(default)s)")
        parser.add_argument(
            name,
            dest=f.name,
            type=meta["type"] or base,
            choices=meta["choices"],
            default=default,
            required=required,
            metavar=None if meta["choices"] else name.removeprefix("--").replace("-", "_").upper(),
            help=help_text,
        )


def from_arguments(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """The dataclass built from the parsed flags (plus ``extra`` for fields that are not flags)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)}, **extra)
