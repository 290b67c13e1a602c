"""The signs that a dump holds a container still (``checkpoint.lxc.is_frozen``,
``wait_frozen``): read from files, so they are checked here on files made to say each."""

from __future__ import annotations

import os
import time
from pathlib import Path

from migrator.checkpoint.lxc import is_frozen, seized_by_criu, wait_frozen


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_v1_freezer_state(tmp_path: Path) -> None:
    assert is_frozen(_file(tmp_path, "freezer.state", "FROZEN\n"))
    assert not is_frozen(_file(tmp_path, "freezer.state", "FREEZING\n"))
    assert not is_frozen(_file(tmp_path, "freezer.state", "THAWED\n"))


def test_v2_cgroup_events(tmp_path: Path) -> None:
    assert is_frozen(_file(tmp_path, "cgroup.events", "populated 1\nfrozen 1\n"))
    assert not is_frozen(_file(tmp_path, "cgroup.events", "populated 1\nfrozen 0\n"))


def test_this_process_is_not_seized() -> None:
    assert not seized_by_criu(os.getpid())


def test_wait_gives_up_when_told_and_on_timeout(tmp_path: Path) -> None:
    thawed = _file(tmp_path, "freezer.state", "THAWED\n")
    t = time.monotonic()
    assert not wait_frozen(os.getpid(), thawed, 5, lambda: time.monotonic() - t > 0.05)
    assert time.monotonic() - t < 1
    assert not wait_frozen(os.getpid(), thawed, 0.05, lambda: False)
    assert wait_frozen(os.getpid(), _file(tmp_path, "freezer.state", "FROZEN\n"), 5,
                       lambda: False)
