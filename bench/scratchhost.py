"""What the bench scripts that make a throw-away host share: taking it down again, every
step best effort, and the mounts left under its directory (``bench_cli.py``,
``bench_runtime.py``, ``bench_storage.py``)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from migrator.runtime.host import Host
from migrator.runtime.teardown import teardown


def mounts_under(root: Path) -> list[str]:
    """Mount points below ``root``, deepest first (the order to unmount them in)."""
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        found = [line.split()[1] for line in f]
    return sorted((m for m in found if m.startswith(prefix)), key=len, reverse=True)


def tear_down(root: Path, netns: str | None, host: Host | None) -> list[str]:
    """The host's own teardown, then whatever is left under ``root`` (lazy unmounts), the
    namespace and the directory; returns what is still there (nothing, normally). A second
    Ctrl-C must not cut it short, so SIGINT is ignored from here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if host is not None:
        try:
            for problem in teardown(host, purge=True):
                print(f"cleanup: {problem}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - keep cleaning
            print(f"cleanup: teardown: {e}", file=sys.stderr)
    for mnt in mounts_under(root):
        subprocess.run(["umount", "-l", mnt], check=False)
    if netns and Path(f"/run/netns/{netns}").exists():
        subprocess.run(["ip", "netns", "del", netns], check=False)
    shutil.rmtree(root, ignore_errors=True)
    left = [f"mount {m}" for m in mounts_under(root)]
    if netns and Path(f"/run/netns/{netns}").exists():
        left.append(f"netns {netns}")
    if root.exists():
        left.append(str(root))
    return left


def interrupt(_signum: int, _frame: Any) -> None:
    """A SIGTERM handler: unwind as Ctrl-C does, so the ``finally`` that cleans up runs."""
    raise KeyboardInterrupt
