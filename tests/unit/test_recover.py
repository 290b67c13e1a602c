"""migrator.recover: the backup check (repositories reached through their interface), and
what recovering a killed live migration relies on: its helpers found and killed by pid and
start time or by images directory, lxc-* commands bounded, the target's restore mark, the
agent noticing its channel end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from migrator import recover
from migrator.checkpoint.lxc import BoundedLxc, find_helpers, helper_record, kill_helpers
from migrator.core.errors import CommandTimeout, InvalidState, NetworkError
from migrator.pipelines.live_target import RestoreMark
from migrator.runtime.lxc import LxcDriver


class FakeTransport:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeRemoteRepo:
    """Stands for ``RemoteRepository``: answers ``ids`` like the agent would."""

    def __init__(self, have: set[str]) -> None:
        self.have, self.t = have, FakeTransport()

    def ids(self) -> list[str]:
        return sorted(self.have)

    def get(self, bid: str) -> Any:
        raise AssertionError("get needs a chunked repository's key: recover asks ids()")

    def close(self) -> None:
        self.t.close()


class Cts:
    host = object()


def test_ssh_repository_is_asked_through_the_interface(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    repo = FakeRemoteRepo({"c1-20261206T000000Z-abcdef"})

    def fake_open(host: Any, spec: str) -> FakeRemoteRepo:
        seen.append(spec)
        return repo

    monkeypatch.setattr(recover, "open_repository", fake_open)
    spec = "ssh://host-b/srv/backups"
    assert recover._backup_committed(Cts(), spec, "c1-20261206T000000Z-abcdef")
    assert not recover._backup_committed(Cts(), spec, "c1-20261206T000000Z-000000")
    assert seen == [spec, spec] and repo.t.closed  # the URL as given, never made a path


def test_unreachable_repository_decides_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Down(FakeRemoteRepo):
        def ids(self) -> list[str]:
            raise NetworkError("cannot reach host-b")

    monkeypatch.setattr(recover, "open_repository", lambda h, s: Down(set()))
    with pytest.raises(NetworkError):
        recover._backup_committed(Cts(), "ssh://host-b", "c1-20261206T000000Z-abcdef")


# a live migration's helpers, recovered ----------------------------------------------------
def _sleeper(tmp_path: Path, tag: str) -> subprocess.Popen[bytes]:
    """A stand-in helper whose command line names an images directory, as criu's does."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             str(tmp_path / tag)])


PROGRAM = (os.path.basename(sys.executable),)


def test_a_recorded_helper_is_killed_only_with_its_start_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _sleeper(tmp_path, "op1")
    try:
        rec = helper_record(p.pid, "criu lazy-pages")
        assert rec["start"] is not None
        reused = {**rec, "start": str(int(rec["start"]) - 1)}  # the pid of an older process
        assert kill_helpers([reused], None, PROGRAM, wait=1) == []
        assert p.poll() is None  # not ours: left alone
        assert kill_helpers([rec], None, PROGRAM, wait=5) == [p.pid]
        assert p.wait(timeout=5) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_helpers_are_found_by_their_images_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mine, other = _sleeper(tmp_path, "op1"), _sleeper(tmp_path, "op2")
    try:
        assert kill_helpers([], tmp_path / "op1", PROGRAM) == [mine.pid]
        assert mine.wait(timeout=5) == -signal.SIGKILL
        assert other.poll() is None  # another operation's images: not touched
        assert find_helpers([], tmp_path / "op1", ("criu",)) == []
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_a_hanging_lxc_command_ends_with_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bounded = BoundedLxc(LxcDriver(tmp_path, None), 0.3)
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as e:
        bounded._run(["sleep", "10"], timeout=None)
    assert time.monotonic() - t0 < 5
    assert "did not answer within" in e.value.message and "criu" in (e.value.hint or "")


def test_a_restore_given_up_cannot_complete(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mark = RestoreMark(tmp_path, "abc123")
    mark.advance("restoring")
    with mark.locked() as m:  # what live_settle does short of "complete"
        m["phase"] = "abandoned"
    with pytest.raises(InvalidState):
        mark.advance("complete")
    with mark.locked() as m:
        assert m["phase"] == "abandoned"
    mark.remove()
    mark.advance("restoring")  # a new mark after drop_images


def test_the_agent_notices_its_channel_end(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from migrator import agent

    signals: list[int] = []
    monkeypatch.setattr(agent.os, "kill", lambda pid, sig: signals.append(sig))
    r, w = os.pipe()
    try:
        done = threading.Event()
        th = threading.Thread(target=agent._watch_channel, args=(r, done), daemon=True)
        th.start()
        os.write(w, b"stray")  # bytes are not an end
        time.sleep(0.2)
        assert signals == []
        os.close(w)
        th.join(5)
        assert signals == [signal.SIGTERM]
        done2 = threading.Event()
        done2.set()  # the request finished first: no signal
        agent._watch_channel(r, done2)
        assert signals == [signal.SIGTERM]
    finally:
        os.close(r)


def test_old_restore_marks_are_swept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = RestoreMark(tmp_path, "0a1"), RestoreMark(tmp_path, "0e3")
    old.advance("complete")
    new.advance("complete")
    os.utime(old.path, (time.time() - 8 * 86400,) * 2)
    RestoreMark.sweep(tmp_path)
    assert not old.path.exists() and new.path.exists()
