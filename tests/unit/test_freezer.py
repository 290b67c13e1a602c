"""The signs that a dump holds a container still (``runtime.freezer.is_frozen``,
``checkpoint.lxc.wait_frozen``) and the freezer driven through its files
(``runtime.freezer.freeze``/``thaw``): read and written as files, so they are checked here
on files made to say each."""

from __future__ import annotations

import os
import time
from pathlib import Path

from migrator.checkpoint.lxc import seized_by_criu, wait_frozen
from migrator.runtime.freezer import freeze, is_frozen, thaw


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


def test_freeze_writes_the_v1_request_and_waits_for_frozen(tmp_path: Path) -> None:
    """v1: the request and the state are one file; a kernel would move FREEZING on to
    FROZEN, which the file here says from the start (what is checked is what is written
    and that the wait ends)."""
    state = _file(tmp_path, "freezer.state", "THAWED\n")
    assert freeze(state, timeout=1)
    assert state.read_text() == "FROZEN"
    thaw(state)
    assert state.read_text() == "THAWED"


def test_freeze_on_cgroup_v2_writes_cgroup_freeze_and_gives_up_thawed(tmp_path: Path) -> None:
    """v2: the request goes to cgroup.freeze; a cgroup that never says "frozen 1" is
    given up after the timeout and thawed again, not left half-frozen."""
    events = _file(tmp_path, "cgroup.events", "populated 1\nfrozen 0\n")
    t0 = time.monotonic()
    assert not freeze(events, timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert (tmp_path / "cgroup.freeze").read_text() == "0"
    events.write_text("populated 1\nfrozen 1\n")
    assert freeze(events, timeout=1)
    assert (tmp_path / "cgroup.freeze").read_text() == "1"
