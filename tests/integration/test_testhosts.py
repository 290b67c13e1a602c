"""Test hosts: two network namespaces on a private TEST-NET link, an sshd in each.

Uses its own base and namespace prefix (``mt2-*``), so it never collides with a developer's
``make hosts`` (``mh-*`` under /var/tmp/migrator-hosts) or the other fixtures (``mt-*``).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from migrator.core import proc
from migrator.core.netns import socket_in_netns
from testrigs import testhosts
from testrigs.testhosts import TestHostSpec
from tests.conftest import IN_CI

BASE = Path("/var/tmp/migrator-tests/testhosts")
PREFIX = "mt2"
TOOLS = ["ip", "nsenter", "sysctl", "ssh-keygen", "/usr/sbin/sshd"]


def _require_environment() -> None:
    problems = [] if os.geteuid() == 0 else ["test hosts need root"]
    problems += [f"{t} is not installed" for t in TOOLS if shutil.which(t) is None]
    if problems:
        msg = "; ".join(problems) + " (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie waits for PID 1, it runs no more


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[TestHostSpec, TestHostSpec]]:
    _require_environment()
    testhosts.down(BASE, PREFIX)  # an interrupted earlier run
    pids: list[int] = []
    try:
        a, b = testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX)
        pids = [int(s.pid_file.read_text()) for s in (a, b)]
        yield a, b
    finally:
        problems = testhosts.down(BASE, PREFIX)
        assert not problems, problems
        assert testhosts.leftovers(BASE, PREFIX) == []
        for pid in pids:
            assert not _running(pid), f"sshd {pid} is still running"


def _connect(src: TestHostSpec, dst: TestHostSpec, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            dst.link_ip, port=dst.port, username="root", key_filename=str(src.client_key),
            sock=socket_in_netns(src.netns, (dst.link_ip, dst.port), 5),
            allow_agent=False, look_for_keys=False, timeout=10, banner_timeout=10,
            auth_timeout=10,
        )
    except BaseException:
        client.close()
        raise
    return client


def test_topology(pair: tuple[TestHostSpec, TestHostSpec]) -> None:
    a, b = pair
    assert (a.netns, a.link_ip) == ("mt2-a", "198.51.100.10")
    assert (b.netns, b.link_ip) == ("mt2-b", "198.51.100.11")
    for spec in pair:
        link = testhosts.run_in(spec.name, ["ip", "-o", "-4", "addr", "show"], base=BASE).stdout
        assert f"{spec.link_ip}/24" in link
        assert "192.0.2.1/24" in link  # the same container subnet on every host
        assert testhosts.run_in(spec.name, ["ip", "route", "show", "default"],
                                base=BASE).stdout == ""
    for ns in (a.netns, b.netns, testhosts.switch_netns(PREFIX)):
        fwd = proc.run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-n",
                                  "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"])
        assert fwd.stdout.split() == ["0", "0"], ns


def test_ssh_banner_through_socket_in_netns(pair: tuple[TestHostSpec, TestHostSpec]) -> None:
    a, b = pair
    for src, dst in ((a, b), (b, a), (a, a)):
        with socket_in_netns(src.netns, (dst.link_ip, dst.port), 5) as s:
            s.settimeout(5)
            assert s.recv(64).startswith(b"SSH-2.0-OpenSSH")


def test_paramiko_verifies_host_key_and_logs_in(pair: tuple[TestHostSpec, TestHostSpec]) -> None:
    a, b = pair
    client = _connect(a, b, a.known_hosts)
    try:
        _, out, _ = client.exec_command("echo ok; ip -o -4 addr show dev link0")
        text = out.read().decode()
        assert out.channel.recv_exit_status() == 0
    finally:
        client.close()
    assert text.startswith("ok\n")
    assert "198.51.100.11/24" in text  # the session runs on host b


def test_unknown_or_wrong_host_key_is_refused(
    pair: tuple[TestHostSpec, TestHostSpec], tmp_path: Path
) -> None:
    a, b = pair
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _connect(a, b, empty)
    # host a's key claimed for b's address: a man in the middle
    key_a = " ".join(a.host_key.with_name(a.host_key.name + ".pub").read_text().split()[:2])
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{b.link_ip} {key_a}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        _connect(a, b, wrong)


def test_isolated_from_the_root_namespace_and_the_outside(
    pair: tuple[TestHostSpec, TestHostSpec],
) -> None:
    a, b = pair
    # nothing of the link is in the root namespace
    root_addrs = proc.run(["ip", "-o", "addr", "show"]).stdout
    assert "198.51.100." not in root_addrs
    route = proc.run(["ip", "-o", "route", "get", b.link_ip]).stdout
    assert "dev link0" not in route
    # so the root namespace cannot reach b's sshd. (Its default route may lead to a gateway
    # that accepts any TCP connection, so the proof is that no SSH banner ever arrives.)
    t0 = time.monotonic()
    try:
        with socket.create_connection((b.link_ip, b.port), timeout=1) as s:
            s.settimeout(1)
            data = s.recv(64)
    except OSError:
        data = b""
    assert not data.startswith(b"SSH-"), data
    assert time.monotonic() - t0 < 5
    # and a host reaches nothing beyond the link (no default route, no forwarding)
    for addr in ("203.0.113.1", "8.8.8.8"):
        with pytest.raises(OSError):
            socket_in_netns(a.netns, (addr, 22), 1).close()


def test_up_again_is_quick_and_changes_nothing(pair: tuple[TestHostSpec, TestHostSpec]) -> None:
    pids = [s.pid_file.read_text() for s in pair]
    known = pair[0].known_hosts.read_text()
    t0 = time.monotonic()
    again = testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX)
    assert time.monotonic() - t0 < 5
    assert again == list(pair)
    assert [s.pid_file.read_text() for s in again] == pids
    assert pair[0].known_hosts.read_text() == known
    assert testhosts.namespaces(PREFIX) == ["mt2-a", "mt2-b", "mt2-sw"]


def _send_seconds(src: TestHostSpec, dst: TestHostSpec, size: int) -> float:
    """Seconds to push ``size`` bytes from ``src`` to ``dst``'s sshd (discarded there)."""
    client = _connect(src, dst, src.known_hosts)
    try:
        chan = client.get_transport().open_session()  # type: ignore[union-attr]
        chan.exec_command("cat > /dev/null")
        block = b"\0" * (256 << 10)
        t0 = time.monotonic()
        for _ in range(size // len(block)):
            chan.sendall(block)
        chan.shutdown_write()
        assert chan.recv_exit_status() == 0
        return time.monotonic() - t0
    finally:
        client.close()


def test_shaped_link_is_slower_and_unshaped_again(
    pair: tuple[TestHostSpec, TestHostSpec],
) -> None:
    a, b = pair
    size = 8 << 20  # 64 Mbit: 3.2 s at 20 Mbit/s, well under 1 s unshaped
    try:
        assert "tbf rate 20mbit" in testhosts.shape(a, "20mbit")
        assert testhosts.shaped_rate(a) == "20Mbit" and testhosts.shaped_rate(b) is None
        slow = _send_seconds(a, b, size)
        assert slow > 2.5, slow  # the limit holds (a burst of 256 kB aside)
        back = _send_seconds(b, a, size)  # only what a sends is shaped
        assert back < slow / 2, (back, slow)
        with pytest.raises(testhosts.InvalidInput, match="bad rate"):
            testhosts.shape(a, "fast")
        assert testhosts.shaped_rate(a) == "20Mbit"  # a bad rate changes nothing
    finally:
        testhosts.shape(a, None)
    assert testhosts.shaped_rate(a) is None
    assert _send_seconds(a, b, size) < slow / 2


def test_api_hosts_are_isolated_and_a_shared_network_is_not_mixed_in(
    pair: tuple[TestHostSpec, TestHostSpec],
) -> None:
    """``up`` without ``network_`` makes isolated hosts (what every other test relies on:
    no VXLAN device, the same bridge address on each); asking for a shared network on a
    base that holds isolated hosts is refused, and nothing changes."""
    from migrator.core.errors import InvalidInput

    assert testhosts.network_mode(BASE) == "isolated"
    with pytest.raises(InvalidInput) as ei:
        testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX,
                     network_="shared")
    assert "isolated" in str(ei.value) and "down" in ei.value.hint
    assert testhosts.network_mode(BASE) == "isolated"
    for spec in pair:
        links = testhosts.run_in(spec.name, ["ip", "-o", "link"], base=BASE).stdout
        assert "vxlan" not in links and "vx-migbr0" not in links
