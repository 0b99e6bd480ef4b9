"""Run the dfkd CLI in this process and die as by SIGKILL (`os._exit`, no cleanup, no flush) right after the N-th
call of one function returns: an exact, replayable kill point, where polling a live run for progress is neither.

python -m tests.kill_at N module:Class.method dfkd-arguments...
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any, Callable, Iterator

KILLED = 9  # the exit status of a run this ends


def _owner(target: str) -> tuple[Any, str]:
    """The object holding `target` (module:attribute.path) and the attribute's name."""
    module, qualname = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = qualname.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def _patch(targets: tuple[str, ...], after: Callable[[int], None]) -> list[tuple[Any, str, Any]]:
    """Wrap every target so `after(total calls so far)` runs when one returns; returns what to restore."""
    calls, saved = [0], []
    for target in targets:
        owner, name = _owner(target)
        real = getattr(owner, name)

        def counted(*a: Any, _real: Any = real, **k: Any) -> Any:
            out = _real(*a, **k)
            calls[0] += 1
            after(calls[0])
            return out

        saved.append((owner, name, real))
        setattr(owner, name, counted)
    return saved


def kill_after(n: int, *targets: str) -> None:
    """Patch the targets so that the n-th call of any of them returns and the process ends at once."""
    def die(k: int) -> None:
        if k == n:
            os._exit(KILLED)

    _patch(targets, die)


@contextlib.contextmanager
def count_calls(*targets: str) -> Iterator[list[int]]:
    """How many calls of the targets a block makes ([count], filled as it runs): the kill points a run has."""
    calls = [0]
    saved = _patch(targets, lambda k: calls.__setitem__(0, k))
    try:
        yield calls
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


if __name__ == "__main__":
    kill_after(int(sys.argv[1]), sys.argv[2])
    from dfkd.pipelines.cli import cli

    cli(sys.argv[3:], standalone_mode=True)
