"""The matrix's progress bar: one tick per cell (deep matrix) or model type (breadth matrix), on stderr."""

from __future__ import annotations

import sys
from typing import Callable


class Progress:
    """A tqdm bar of ``total`` ticks on stderr, with the run's log lines printed above it.

    No bar when ``enabled`` is false, when stderr is not a terminal (CI logs and redirected output keep only the
    log lines) or when tqdm is not installed (the ``bench`` extra brings it); the log lines are printed either way.
    Use as a context manager: the bar closes on the way out.
    """

    def __init__(self, total: int, desc: str, unit: str, log: Callable[[str], None] = print, enabled: bool = True):
        self._log = log
        self._tqdm, self._bar = None, None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        # disable=None: tqdm's own "no bar where the file is not a terminal"
        self._tqdm = tqdm
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)

    def log(self, line: str) -> None:
        """``log(line)`` with the bar cleared while it prints (whatever stream ``log`` writes to)."""
        if self._bar is None:
            self._log(line)
            return
        with self._tqdm.external_write_mode(file=sys.stderr):
            self._log(line)

    def now(self, what: str) -> None:
        """Name what runs now next to the bar."""
        if self._bar is not None:
            self._bar.set_postfix_str(what)

    def tick(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
