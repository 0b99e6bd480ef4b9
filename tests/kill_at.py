"""Run the dfkd CLI in this process and die as by SIGKILL (`os._exit`, no cleanup, no flush) right after the N-th
call of one function returns: an exact, replayable kill point, where polling a live run for progress is neither.

python -m tests.kill_at N module:Class.method dfkd-arguments...
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

KILLED = 9  # the exit status of a run this ends


def kill_after(n: int, target: str) -> None:
    """Patch `target` (module:attribute.path) so its n-th call returns and the process ends at once."""
    module, qualname = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = qualname.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real, calls = getattr(owner, name), [0]

    def counted(*a: Any, **k: Any) -> Any:
        out = real(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            os._exit(KILLED)
        return out

    setattr(owner, name, counted)


if __name__ == "__main__":
    kill_after(int(sys.argv[1]), sys.argv[2])
    from dfkd.pipelines.cli import cli

    cli(sys.argv[3:], standalone_mode=True)
