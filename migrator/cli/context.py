"""The per-invocation context shared by the CLI modules (host and container manager)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Ctx:
    """Per-invocation objects, opened lazily so `--help` never touches the state root."""

    def __init__(self, root: Path | None, verbose: bool) -> None:
        self.root = root
        self.verbose = verbose
        self._host: Any = None
        self._cts: Any = None

    @property
    def host(self) -> Any:
        if self._host is None:
            from migrator.runtime.host import Host, root_from_env

            self._host = Host(root_from_env(self.root))
        return self._host

    @property
    def containers(self) -> Any:
        if self._cts is None:
            from migrator.runtime.containers import Containers

            self._cts = Containers(self.host)
        return self._cts


_CURRENT: list[Ctx] = []


def _ctx() -> Ctx:
    return _CURRENT[-1]
