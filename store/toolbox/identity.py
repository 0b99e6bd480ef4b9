"""One identity decides "the same run" everywhere: store resume, generator training checkpoints, trainer
resume and pipeline fingerprints all compare (or hash) a plain-JSON identity with these functions, so a
resume with any setting changed is refused with one line naming the setting and its two values."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import DfkdError


class ResumeError(DfkdError):
    """A resume whose settings differ from those of the run it would continue."""


def plain(obj: Any) -> Any:
    """The identity as plain JSON values (tuples as lists, keys as strings), so saved and fresh ones compare."""
    return json.loads(json.dumps(obj, default=str))


def first_difference(old: Any, new: Any) -> tuple[str, Any, Any] | None:
    """(dotted setting, old value, new value) of the first place two identities differ; None when equal."""
    return _diff(plain(old), plain(new), "")


def _diff(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:  # the identity's own order: most telling first
            found = _diff(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _diff(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path or "identity", old, new)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_run(old: Any, new: Any, what: str, fix: str) -> None:
    """Refuse to continue `what` when its saved identity differs from this run's, naming the setting."""
    found = first_difference(old, new)
    if found:
        key, a, b = found
        raise ResumeError(f"cannot resume {what}: {key} was {_short(a)}, now {_short(b)}; {fix}")


def digest(identity: Any) -> str:
    """A short, stable hash of an identity (pipeline fingerprints)."""
    return hashlib.sha256(json.dumps(plain(identity), sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(state: dict[str, Any]) -> str:
    """sha256 of a state dict (names, dtypes, shapes, bytes): a network identified by its weights, not its file."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

