"""Values declared once: a dataclass field carries its help, choices and bounds (`setting`), and `check_declared`
refuses a value outside them with one line. Command settings (pipelines/settings.py) and synthesis methods'
hyper-parameters (synth/methods) are both declared this way, so the CLI, pipeline files, `--set` and the API check
the same things in one place."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Callable


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
            low_open: bool = False, high: float | None = None, high_open: bool = False,
            cli_help: str | None = None) -> Any:
    """A dataclass field with what a user reads about it; `cli_help` where the command line says it otherwise."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "low_open": low_open,
                                            "high": high, "high_open": high_open, "cli_help": cli_help})


def redeclared(base: type, name: str, default: Any) -> Any:
    """`name` declared as in `base` (its help and bounds) with another default: a subclass's preset."""
    f = next(f for f in dataclasses.fields(base) if f.name == name)
    return field(default=default, metadata=f.metadata)


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a hint such as `float | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def setting_fields(cls: type) -> list[tuple[dataclasses.Field, Any, bool]]:
    """(field, base type, optional) of every declared setting of `cls`, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, *base_type(hints[f.name])) for f in dataclasses.fields(cls) if "help" in f.metadata]


def bounds(f: dataclasses.Field) -> str:
    """A field's bounds as a user reads them: ' (>= 0, < 1)', or ''."""
    m = f.metadata
    parts = ([] if m["low"] is None else [f"{'>' if m['low_open'] else '>='} {m['low']:g}"]) + \
        ([] if m.get("high") is None else [f"{'<' if m.get('high_open') else '<='} {m['high']:g}"])
    return f" ({', '.join(parts)})" if parts else ""


def check_declared(obj: Any, fail: Callable[[str, str], Exception]) -> None:
    """Refuse a declared value outside its type, choices or bounds: `fail(name, reason)` is raised (one line);
    an int where a float is declared becomes that float."""
    for f, kind, optional in setting_fields(type(obj)):
        v, m = getattr(obj, f.name), f.metadata
        if v is None and optional:
            continue
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
            object.__setattr__(obj, f.name, v)
        if type(v) is not kind:
            raise fail(f.name, f"must be {kind.__name__}{' or unset' if optional else ''}, got {v!r}")
        if m["choices"] and v not in m["choices"]:
            raise fail(f.name, f"must be one of {', '.join(m['choices'])}, got {v!r}")
        if kind is float and not math.isfinite(v):  # NaN passes every bound: a NaN rate trained a NaN student
            raise fail(f.name, f"must be a finite number, got {v!r}")
        low, high = m["low"], m.get("high")
        if (low is not None and (v < low or (m["low_open"] and v == low))) or \
                (high is not None and (v > high or (m.get("high_open") and v == high))):
            raise fail(f.name, f"must be{bounds(f)}, got {v!r}")
