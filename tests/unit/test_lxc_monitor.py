"""Container state without a process where LXC itself would answer STOPPED, and the light
namespace entry for the lxc-* commands that only ask (issue 18: one namespace entry per
command, not one per lxc-* call).

LXC answers STOPPED for a container whose monitor socket (``@LXCPATH/NAME/command``) is not
bound in the host's network namespace; the driver reads the namespace's socket list instead
of starting lxc-ls or lxc-info to hear that. Anything it cannot decide goes to LXC.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrator.core import proc
from migrator.core.errors import MissingDependency
from migrator.runtime.lxc import LxcDriver, abstract_socket_names
from tests.conftest import unavailable

PROC_NET_UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
00000000ccb8c5e3: 00000002 00000000 00010000 0001 01 6214622 @/var/lib/m/lxc/web-1/command
0000000008155734: 00000002 00000000 00010000 0001 01  15278 @/srv/with blank/lxc/db/command
0000000008155735: 00000003 00000000 00000000 0001 03 6215279
0000000008155736: 00000002 00000000 00010000 0001 01 6215280 /run/systemd/notify
"""


def test_abstract_names_are_read_whole() -> None:
    assert abstract_socket_names(PROC_NET_UNIX) == {
        "@/var/lib/m/lxc/web-1/command", "@/srv/with blank/lxc/db/command"}
    assert abstract_socket_names("Num RefCount Protocol Flags Type St Inode Path\n") == set()


@pytest.fixture
def driver(tmp_path: Path) -> LxcDriver:
    (tmp_path / "web-1").mkdir()  # a container LXC knows
    return LxcDriver(tmp_path, "mig-no-such-ns")


def _sockets(monkeypatch: pytest.MonkeyPatch, names: set[str] | None) -> None:
    monkeypatch.setattr(LxcDriver, "_command_sockets", lambda self: names)


def _no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **kw: Any) -> Any:
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(proc, "run", refuse)


def test_no_monitor_means_stopped_without_a_process(driver: LxcDriver,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _sockets(monkeypatch, {"@/elsewhere/lxc/web-1/command"})  # another host's container
    _no_process(monkeypatch)
    assert driver.states() == {}
    assert driver.state("web-1") == "STOPPED"
    assert driver.init_pid("web-1") is None


class FakeRun:
    """proc.run as the driver calls it; records the calls and answers like LXC."""

    def __init__(self, stdout: str) -> None:
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.stdout = stdout

    def __call__(self, argv: list[str], **kw: Any) -> proc.Completed:
        self.calls.append((list(argv), kw))
        return proc.Completed(list(argv), 0, self.stdout, "")


@pytest.mark.parametrize("socks", [
    lambda d: {f"@{d.lxcpath}/web-1/command"},  # its own monitor
    lambda d: {"@lxc/0123456789abcdef/command"},  # a hashed name: cannot tell whose
    lambda d: None,  # unreadable
])
def test_a_possible_monitor_asks_lxc_once(driver: LxcDriver, monkeypatch: pytest.MonkeyPatch,
                                         socks: Any) -> None:
    _sockets(monkeypatch, socks(driver))
    fake = FakeRun("NAME  STATE   IPV4\nweb-1 FROZEN  10.0.3.5, \ndb    STOPPED -\n")
    monkeypatch.setattr(proc, "run", fake)
    assert driver.states() == {"web-1": ("FROZEN", "10.0.3.5"), "db": ("STOPPED", "")}
    (argv, kw), = fake.calls
    assert argv[0] == "lxc-ls" and kw["netns"] == "mig-no-such-ns"
    assert kw["mounts"] is False  # a query: the light namespace entry
    fake.stdout = "FROZEN\n"
    assert driver.state("web-1") == "FROZEN"
    assert fake.calls[-1][0][0] == "lxc-info" and fake.calls[-1][1]["mounts"] is False


def test_an_empty_lxcpath_asks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sockets(monkeypatch, None)
    _no_process(monkeypatch)
    assert LxcDriver(tmp_path, "mig-no-such-ns").states() == {}


# --- the light namespace entry, in a real namespace -----------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        unavailable("needs root (a network namespace)")
    name = f"mig-unit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_light_entry_runs_in_the_namespace(netns: str) -> None:
    inside = proc.run(["ip", "-o", "link", "show"], netns=netns, mounts=False).stdout
    outside = proc.run(["ip", "-o", "link", "show"]).stdout
    assert [line.split(":")[1].strip() for line in inside.splitlines()] == ["lo"]
    assert inside != outside
    # the same as the full entry sees, without the helper in front
    full = proc.run(["ip", "-o", "link", "show"], netns=netns)
    assert full.stdout == inside
    assert full.argv[0] != "ip"
    assert proc.run(["true"], netns=netns, mounts=False).argv == ["true"]


def test_light_entry_reads_the_namespace_sockets(netns: str) -> None:
    """What the driver reads: a socket bound in the namespace shows there, not outside."""
    import socket

    from migrator.core.netns import call_in_netns

    name = f"\0mig-unit-{uuid.uuid4().hex}/command"

    def bind() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(name)
        s.listen()
        return s

    s = call_in_netns(netns, bind)
    try:
        d = LxcDriver(Path("/nonexistent"), netns)
        socks = d._command_sockets()
        assert socks is not None and "@" + name[1:] in socks
        assert "@" + name[1:] not in (LxcDriver(Path("/nonexistent"), None)._command_sockets()
                                      or set())
    finally:
        s.close()


def test_light_entry_errors_match_the_helpers() -> None:
    gone = proc.run(["true"], netns="mig-no-such-ns", mounts=False, check=False)
    assert gone.returncode == 125 and "not found" in gone.stderr
    helper = proc.run(["true"], netns="mig-no-such-ns", check=False)
    assert helper.returncode == 125 and "not found" in helper.stderr


def test_light_entry_names_a_missing_program(netns: str) -> None:
    with pytest.raises(MissingDependency):
        proc.run(["migrator-no-such-program"], netns=netns, mounts=False)

