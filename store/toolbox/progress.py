"""Progress for every long loop: a tqdm bar on a terminal, a log line every few percent otherwise, or nothing.

`progress=None` (the default everywhere) means: a bar when stderr is a terminal, else log lines (so jobs under
nohup, CI or `dfkd run` say where they are); `False` or `--quiet` silences; `True` forces a bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

_QUIET = False
LOG_EVERY_PCT = 5  # a log line each time this many percent more is done ...
MIN_INTERVAL_S = 2.0  # ... and at least this long after the last one (a loop of a second says nothing)


def set_quiet(quiet: bool = True) -> None:
    """Silence every progress bar and log line of this process (`--quiet`)."""
    global _QUIET
    _QUIET = quiet


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class LogProgress:
    """tqdm's small interface (update, set_postfix, close, iteration) as one stderr line every few percent."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, stream: Any = None) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.postfix = ""
        self.next_pct = LOG_EVERY_PCT * (100 * initial // max(self.total or 1, 1) // LOG_EVERY_PCT + 1)

    def line(self) -> str:
        """The current state: done/total, percent, rate and time left."""
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/{self.unit}"
        if not self.total:
            return f"{head}{self.n} {self.unit} ({speed}){self.postfix}"
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        left = _duration(eta) if eta == eta else "?"
        return (f"{head}{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {speed}, "
                f"elapsed {_duration(elapsed)}, left {left}{self.postfix}")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and (100 * self.n / self.total >= self.next_pct or self.n >= self.total):
            while self.next_pct <= 100 * self.n / self.total:
                self.next_pct += LOG_EVERY_PCT
            now = time.monotonic()
            if now - self.last >= MIN_INTERVAL_S or (self.n >= self.total and self.printed):  # the end, once begun
                print(self.line(), file=self.stream, flush=True)
                self.last, self.printed = now, True

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = "".join(f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in items.items())

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()


class _Silent(LogProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, show: bool | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress bar over `iterable` (or updated by hand): tqdm on a terminal, log lines otherwise, see module doc."""
    if _QUIET or show is False:
        return _Silent(iterable, total, desc, unit, initial)
    if show is None and not sys.stderr.isatty():
        return LogProgress(iterable, total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **tqdm_kwargs)
