"""Progress: a bar on a terminal, a plain line now and then anywhere else.

tqdm redraws its bar many times a second with carriage returns; in a file or a CI log every
redraw stays, and one training epoch left hundreds of such lines. So the choice is made once,
here, and every loop that shows progress (decoding, caching, training, prediction, downloads)
asks :func:`progress_bar` for its bar:

- stderr is a terminal, or the code runs in a notebook kernel: tqdm's bar (``tqdm.auto``);
- otherwise: a :class:`PlainProgress` with tqdm's interface that logs one line every
  :data:`LINE_EVERY_S` seconds, and nothing for a loop shorter than that (a training epoch's own
  line is ``EpochLog``'s), as Lightning's and Ultralytics' logs do.

``RESFIT_PROGRESS=bar|lines|off`` overrides the choice. Imports no torch (tqdm only on a
terminal).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

log = logging.getLogger("resfit")

LINE_EVERY_S = 30.0  # seconds between two plain progress lines of one loop
MODES = ("bar", "lines", "off")


def _in_notebook() -> bool:
    """A Jupyter kernel: its stderr is no terminal, but it shows tqdm's widget well."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off``: ``RESFIT_PROGRESS`` when set, else ``bar`` on a terminal
    or in a notebook and ``lines`` anywhere else (a file, a pipe, CI)."""
    forced = os.environ.get("RESFIT_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        tty = False
    return "bar" if tty or _in_notebook() else "lines"


class PlainProgress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``, ``with``) writing one
    log line every ``every`` seconds instead of redrawing a bar."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | float | None = None,
        desc: str = "",
        unit: str = "it",
        every: float = LINE_EVERY_S,
        clock: Any = time.monotonic,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every, self.clock, self.n, self.postfix = every, clock, 0, ""
        self.start = self.last = clock()
        self.lines = 0  # lines written (tests and callers may look)

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "  ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int | float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        rate = f"{self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        tail = f"  {self.postfix}" if self.postfix else ""
        log.info("%s: %s  %.0fs  %s%s", self.desc or "progress", done, elapsed, rate, tail)
        self.lines += 1

    def close(self) -> None:
        """Nothing to clear: a plain log has no bar to erase."""


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
    unit_scale: bool = False,
) -> Any:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``): tqdm's on a
    terminal, a :class:`PlainProgress` elsewhere, and a silent one when ``enabled`` is false
    or ``RESFIT_PROGRESS=off``. Every bar has tqdm's ``update``, ``set_postfix``, ``close``."""
    mode = progress_mode() if enabled else "off"
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                    leave=False)  # fmt: skip
    return PlainProgress(iterable, total, desc, unit,
                         every=LINE_EVERY_S if mode == "lines" else float("inf"))  # fmt: skip
