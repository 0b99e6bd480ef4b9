"""`dfkd methods`: every synthesis method and its hyper-parameters (the keys of `--set`), with defaults, meanings and
bounds: what each config field declares (store.toolbox.declared.setting), written once beside its default.
"""

from __future__ import annotations

import dataclasses

from ..store.toolbox.declared import bounds


def meanings(cls: type) -> dict[str, str]:
    """Each declared field's meaning, with its choices or bounds: {name: text}."""
    out = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "help" in m:
            extra = f" (one of {', '.join(m['choices'])})" if m["choices"] else bounds(f)
            out[f.name] = m["help"] + extra
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
    notes = meanings(cls.Config)
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
    notes = meanings(cls.Config)
    return [f.name for f in dataclasses.fields(cls.Config) if not notes.get(f.name)]


