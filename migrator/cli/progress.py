"""tqdm bars for the library's progress events (one bar per phase, on stderr)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from migrator.streams import ProgressEvent


class Bars:
    """A progress callback drawing one tqdm bar per phase; silent when stderr is no tty
    unless forced, so scripts and ``--format json`` get clean output."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        self.phase = ""

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if event.phase != self.phase:
            from tqdm import tqdm  # on the first event: `migrate --help` need not load it

            self.close()
            self.phase = event.phase
            self.bar = tqdm(total=event.total, desc=event.phase, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, leave=False)
        if event.total is not None and self.bar.total != event.total:
            self.bar.total = event.total
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
