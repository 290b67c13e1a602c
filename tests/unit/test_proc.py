"""The one subprocess wrapper: every way of starting a child maps a missing program to
MissingDependency, and an interrupted wait leaves no child behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from migrator.core import proc
from migrator.core.errors import MissingDependency
from migrator.streams import SendStream, receive_with

MISSING = "migrator-no-such-program"


@pytest.mark.parametrize("start", [
    lambda: proc.run([MISSING]),
    lambda: proc.run_interactive([MISSING]),
    lambda: proc.start_process([MISSING]),
    lambda: proc.spawn([MISSING]),
    lambda: proc.spawn_piped([MISSING]),
    lambda: proc.exec_replace([MISSING]),
    lambda: SendStream([MISSING], "tar", "x"),
])
def test_a_missing_program_is_named_with_the_install_hint(start: Callable[[], object]) -> None:
    with pytest.raises(MissingDependency) as e:
        start()
    assert MISSING in str(e.value)
    assert "make setup" in e.value.hint


def test_a_missing_receiver_kills_the_sender() -> None:
    sender = SendStream(["sleep", "30"], "tar", "x")
    with pytest.raises(MissingDependency):
        receive_with([MISSING], sender)
    assert sender.proc.poll() is not None


def test_an_interrupted_wait_kills_the_child() -> None:
    child = proc.start_process(["sleep", "30"])
    with pytest.raises(proc.TimeoutExpired):
        proc.wait_or_kill(child, timeout=0.1)
    assert child.poll() is not None


def test_spawn_appends_stdout_and_stderr_to_its_output(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    out.write_text("before\n")
    child = proc.spawn(["sh", "-c", "echo out; echo err >&2"], output=out)
    assert proc.wait_or_kill(child, timeout=10) == 0
    assert out.read_text().splitlines() == ["before", "out", "err"]
