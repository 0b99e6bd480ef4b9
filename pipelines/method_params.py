"""`dfkd methods`: every synthesis method and its hyper-parameters (the keys of `--set`), with defaults and meanings.

A meaning is the trailing comment on the config field's line in the method's source, so it is written once,
beside the default it explains.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize


def field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # meaning` lines of a dataclass and its bases, as {name: meaning}."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        last_name = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
                last_name, line = tok.string, tok.start[0]
            elif tok.type == tokenize.COMMENT and last_name is not None and tok.start[0] == line:
                out[last_name] = tok.string.lstrip("#").strip()
                last_name = None
    return out


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def _summary(cls: type) -> str:
    """What a method does: its class docstring's first line, else its config's."""
    return _first_line(cls.__doc__) or _first_line(cls.Config.__doc__)


def describe_methods() -> str:
    """One line per method: its name and what it does."""
    from ..synth.methods import list_methods, method_class

    width = max(len(n) for n in list_methods())
    lines = [f"{n:<{width}}  {_summary(method_class(n))}" for n in list_methods()]
    return "\n".join(lines + ["", "dfkd methods METHOD lists its hyper-parameters (dfkd synth --set KEY=VALUE)."])


def describe_method(name: str) -> str:
    """The method's hyper-parameters: key, type, default and meaning, one line each."""
    from ..synth.methods import method_class

    cls = method_class(name)
    config = cls.Config()
    notes = field_comments(cls.Config)
    rows = [(f.name, type(getattr(config, f.name)).__name__, repr(getattr(config, f.name)), notes.get(f.name, ""))
            for f in dataclasses.fields(config)]
    w = [max(len(r[i]) for r in rows + [("key", "type", "default", "")]) for i in range(3)]
    head = f"{name}: {_summary(cls)}\n"
    lines = [f"{'key':<{w[0]}}  {'type':<{w[1]}}  {'default':<{w[2]}}  meaning"]
    lines += [f"{k:<{w[0]}}  {t:<{w[1]}}  {d:<{w[2]}}  {m}".rstrip() for k, t, d, m in rows]
    return head + "\n".join(lines)


def undocumented(name: str) -> list[str]:
    """The method's hyper-parameters that have no meaning written beside them."""
    from ..synth.methods import method_class

    cls = method_class(name)
    notes = field_comments(cls.Config)
    return [f.name for f in dataclasses.fields(cls.Config) if not notes.get(f.name)]


