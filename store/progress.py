"""Progress bars for long loops: shown on a terminal, silent in logs and CI."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "unit", **kw: Any) -> Iterable[T]:
    """Wrap a loop in a tqdm bar, disabled when stderr is not a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not sys.stderr.isatty(), leave=False, **kw)
