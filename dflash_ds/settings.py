"""Settings as dataclass fields, and command-line flags generated from them.

Every setting is defined once, as a field of the component dataclass that uses it (``BlockConfig``,
``LossConfig``, ``LoRAConfig``, ...): its name, type, default, help and choices. :func:`add_flags` turns the fields
of a dataclass (recursively, one argument group per nested dataclass) into ``argparse`` flags, and
:func:`from_args` builds the dataclass back from the parsed namespace, so a default lives in one place and a new
setting is one new field::

    @dataclass
    class LossConfig:
        kl_weight: float = setting(1.0, "weight of the KL term")

gives ``--kl-weight`` (type ``float``, default 1.0) on every command whose config holds a ``LossConfig``.

Types are read from the annotations: ``int``, ``float``, ``str``, ``bool`` (a switch pair ``--x``/``--no-x``, so a
setting that defaults to True can be turned off), ``X | None`` (``none`` on the command line gives None, for ``str``
too), ``tuple[float, float]`` (``LO,HI``) and ``tuple[str, ...]``/``list[str]`` (one or more values).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

REQUIRED = dataclasses.MISSING  # ``setting(REQUIRED, ...)``: the flag must be given


def setting(
    default: Any = REQUIRED,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a command-line flag.

    ``flag`` is the flag's name without dashes (default: the field name with ``-`` for ``_``); ``choices`` are
    checked by argparse and by :func:`check_choices`; ``parse`` turns the flag's text into the value where the type
    alone does not say how; ``cli=False`` keeps the field off the command line (set by the program itself); a
    ``help`` of None keeps the flag out of ``--help``."""
    meta = {"help": help, "flag": flag, "choices": choices, "aliases": aliases, "metavar": metavar, "parse": parse,
            "cli": cli}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def check_choices(obj: Any) -> None:
    """Raise ValueError naming the flag when a field with ``choices`` holds another value."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{flag_name(f)} must be one of {'/'.join(map(str, choices))}, got {value!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _pair(text: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (numbers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
    return parts[0], parts[1]


def _argparse_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for one field of type ``hint``."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    default = None if f.default is dataclasses.MISSING else f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    kw: dict[str, Any] = {"default": default}
    if f.metadata.get("parse") is not None:
        kw["type"] = f.metadata["parse"]
    elif hint is bool:
        # --x / --no-x: a store_true switch could never turn off a setting whose default is True; a False default
        # keeps working as the old switch did (--x turns it on)
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is tuple and args == (float, float):
        kw.update(type=_pair, metavar="LO,HI")
    elif origin in (tuple, list):
        kw.update(nargs="+", type=args[0])
    elif hint in (int, float, str):
        # an optional setting: "none" on the command line gives None back (a str setting too: without it, a path
        # or name set in a wrapper script could not be unset again further down the command line)
        kw["type"] = _optional(hint) if optional else hint
    else:
        raise TypeError(f"setting {f.name}: no flag for type {hint!r}")
    if f.metadata.get("choices") is not None:
        kw["choices"] = f.metadata["choices"]
    if "action" not in kw and "choices" not in kw:
        kw.setdefault("metavar", f.metadata.get("metavar") or f.name.upper())
    return kw


def _help(f: dataclasses.Field, kw: dict[str, Any]) -> str:
    text = f.metadata.get("help", "")
    default = kw.get("default")
    if kw.get("action") is argparse.BooleanOptionalAction:
        # a switch that is on unless --no-x is given says so; one that is off reads as before
        if not default or "default" in text.lower():
            return text
        return f"{text} (default on)" if text else "default on"
    if default is None or "default" in text.lower():
        return text
    if isinstance(default, (tuple, list)):
        shown = ",".join(map(str, default)) if kw.get("type") is _pair else " ".join(map(str, default))
    else:
        shown = default
    return f"{text} (default {shown})" if text else f"default {shown}"


def add_flags(parser: argparse.ArgumentParser, cls: type, dest: str = "", title: str | None = None) -> None:
    """Add a flag for every field of dataclass ``cls`` to ``parser``; a nested dataclass field becomes an argument
    group of its own (titled by its class docstring's first line). Destinations are dotted paths (``loss.kl_weight``),
    so two components may use the same field name."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or not f.init:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            doc = (hint.__doc__ or hint.__name__).strip().splitlines()[0]
            add_flags(parser, hint, f"{dest}{f.name}.", doc.rstrip("."))
            continue
        kw = _argparse_kwargs(f, hint)
        names = [flag_name(f), *("--" + a for a in f.metadata.get("aliases", ()))]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        help_text = argparse.SUPPRESS if f.metadata.get("help") is None else _help(f, kw)
        group.add_argument(*names, dest=dest + f.name, required=required, help=help_text, **kw)


def from_args(cls: type, namespace: argparse.Namespace, dest: str = ""):
    """The dataclass ``cls`` built from a namespace parsed with the flags of :func:`add_flags` (fields kept off the
    command line take their defaults)."""
    hints = typing.get_type_hints(cls)
    values = vars(namespace)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and f.metadata.get("cli", True):
            kwargs[f.name] = from_args(hint, namespace, f"{dest}{f.name}.")
        elif dest + f.name in values:
            value = values[dest + f.name]
            kwargs[f.name] = tuple(value) if typing.get_origin(hint) is tuple and isinstance(value, list) else value
    return cls(**kwargs)
