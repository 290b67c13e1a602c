"""One container network across hosts: three test hosts whose bridges are joined by VXLAN.

Hosts a, b and c (``mt16o-*``) are made with ``network_="shared"``: every bridge has its own
address on 192.0.2.0/24, every host its own range (a .10-.39, b .40-.69, c .70-.99), and
each host's VXLAN device sends to the other two over the private link. A container answers
on its address from every host, keeps it when it moves (stateless and live), and two hosts
never hand out the same address. Dir pools and busybox only: the network is under test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.core.netns import netns_path
from testrigs import testhosts
from testrigs.testhosts import TestHostSpec
from tests.conftest import IN_CI
from tests.integration.test_remote import MIGRATE, add_to_inventory, build_workload, m, rootfs

BASE = Path("/var/tmp/migrator-tests/overlay")
PREFIX = "mt16o"
PORT = 7000


@pytest.fixture(scope="module")
def netstream_bin(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return build_workload(tmp_path_factory, "netstream")


@pytest.fixture(scope="module")
def trio(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    if shutil.which("/usr/sbin/sshd") is None:
        msg = "overlay tests need sshd (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    testhosts.down(BASE, PREFIX)
    try:
        a, b, c = testhosts.up(("a", "b", "c"), BASE, pools=("dir",), images=("busybox",),
                               prefix=PREFIX, network_="shared")
        add_to_inventory(a, b)
        yield a, b, c
    finally:
        problems = testhosts.down(BASE, PREFIX)
        assert not problems, problems
        assert testhosts.leftovers(BASE, PREFIX) == []


@pytest.fixture
def hosts(trio):  # type: ignore[no-untyped-def]
    """The three hosts, every container deleted after the test, and the hosts' ARP caches
    emptied: the next test's containers reuse the addresses with other MACs, and a host
    keeps sending to a MAC it saw answer for up to 45 s (the next container sends no
    gratuitous ARP)."""
    yield trio
    for spec in trio:
        _rc, out, _e = m(spec, "list", "--format", "json")
        for ct in json.loads(out):
            m(spec, "delete", "--force", ct["name"])
    for spec in trio:
        subprocess.run(["ip", "-n", spec.netns, "neigh", "flush", "all"], check=True)


def answers(spec: TestHostSpec, ip: str, within: float = 15) -> bool:
    """Whether ``ip`` answers a ping from host ``spec``'s namespace within ``within`` s
    (a stateless move gives the container a fresh NIC: neighbours re-learn its MAC)."""
    deadline = time.monotonic() + within
    while True:
        r = subprocess.run(["ip", "netns", "exec", spec.netns, "busybox", "ping", "-c", "1",
                            "-W", "1", ip], capture_output=True, text=True)
        if r.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


def address(spec: TestHostSpec, name: str) -> str:
    _rc, out, _e = m(spec, "info", name, "--format", "json")
    return str(json.loads(out)["ipv4"])


def in_range(spec: TestHostSpec, ip: str) -> bool:
    _rc, out, _e = m(spec, "host", "overlay", "show", "--format", "json")
    lo, hi = (ipaddress.IPv4Address(x) for x in json.loads(out)["range"].split("-"))
    return lo <= ipaddress.IPv4Address(ip) <= hi


def test_shared_topology(trio) -> None:  # type: ignore[no-untyped-def]
    a, b, c = trio
    for spec, bridge, others in ((a, "192.0.2.1/24", {b, c}), (b, "192.0.2.2/24", {a, c}),
                                 (c, "192.0.2.3/24", {a, b})):
        _rc, out, _e = m(spec, "host", "overlay", "show", "--format", "json")
        shown = json.loads(out)
        assert shown["address"] == bridge
        assert shown["vxlan_id"] == testhosts.SHARED_VNI
        assert shown["peers"] == shown["peers_now"] == sorted(o.link_ip for o in others)
        fdb = subprocess.run(["bridge", "-n", spec.netns, "fdb", "show", "dev", "vx-migbr0"],
                             capture_output=True, text=True, check=True).stdout
        assert sorted(line.split()[2] for line in fdb.splitlines()
                      if line.startswith("00:00:00:00:00:00")) == shown["peers"]
        # unicast only: no multicast group on the device
        link = subprocess.run(["ip", "-n", spec.netns, "-d", "link", "show", "vx-migbr0"],
                              capture_output=True, text=True, check=True).stdout
        vxlan = next(line for line in link.splitlines() if "vxlan id" in line)
        assert " group " not in vxlan and " remote " not in vxlan, vxlan
        assert "master migbr0" in link
    assert answers(a, "192.0.2.3") and answers(c, "192.0.2.2")  # bridge to bridge
    # nothing of it in the root namespace
    assert "vx-migbr0" not in subprocess.run(["ip", "link"], capture_output=True,
                                             text=True).stdout


def test_container_answers_everywhere_and_keeps_its_address_when_moved(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b, c = hosts
    m(a, "launch", "busybox", "c1", "-p", "dir")
    ip = address(a, "c1")
    assert in_range(a, ip)
    assert answers(b, ip) and answers(c, ip)
    m(a, "move", "c1", "b")
    assert address(b, "c1") == ip
    _rc, out, _e = m(a, "list", "--format", "json")
    assert json.loads(out) == []
    assert answers(a, ip) and answers(c, ip) and answers(b, ip)
    # a launches again: its range's first address answers on b, so a skips it; b's own
    # launch comes from b's range. No two containers share an address.
    m(a, "launch", "busybox", "c2", "-p", "dir")
    m(b, "launch", "busybox", "c3", "-p", "dir")
    ip2, ip3 = address(a, "c2"), address(b, "c3")
    assert len({ip, ip2, ip3}) == 3, (ip, ip2, ip3)
    assert in_range(a, ip2) and in_range(b, ip3) and not in_range(a, ip3)
    for x in (ip2, ip3):
        assert answers(c, x)


def test_live_move_keeps_the_address_reachable_from_every_host(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b, c = hosts
    m(a, "launch", "busybox", "l1", "-p", "dir", "-c", "security.privileged=true")
    ip = address(a, "l1")
    assert answers(c, ip)
    m(a, "live", "local", "b", "l1")
    assert address(b, "l1") == ip
    assert answers(a, ip, within=5) and answers(c, ip, within=5) and answers(b, ip, within=5)


def run_in_container(spec: TestHostSpec, name: str, binary: Path, command: str) -> None:
    dest = rootfs(spec, name) / "netstream"
    shutil.copy(binary, dest)
    dest.chmod(0o755)
    m(spec, "exec", name, "--", "/bin/sh", "-c",
      f"setsid {command} </dev/null >/dev/null 2>&1 &")


def stream(spec: TestHostSpec, name: str) -> dict[str, int]:
    text = (rootfs(spec, name) / "root" / "stream").read_text()
    return {k: int(v) for k, v in (f.split("=") for f in text.split())}


def wait_stream(spec: TestHostSpec, name: str, above: int, timeout: float = 30
                ) -> dict[str, int]:
    """The reader's state once its sequence passed ``above``; fails at once when its
    connection broke (errors=1: it never reconnects)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            s = stream(spec, name)
            assert s["errors"] == 0, f"the TCP connection read by {name} broke: {s}"
            if s["seq"] > above:
                return s
        time.sleep(0.1)
    raise AssertionError(f"the TCP stream read by {name} on {spec.name} stopped above {above}")


def test_tcp_stream_from_another_host_survives_the_servers_live_move(hosts, netstream_bin  # type: ignore[no-untyped-def]
                                                                     ) -> None:
    """A reader on b streams from a server on a; the server moves live a -> b. The one
    connection keeps flowing: the same reader, no reconnect, no number missing."""
    a, b, _c = hosts
    m(a, "launch", "busybox", "srv", "-p", "dir", "-c", "security.privileged=true")
    ip = address(a, "srv")
    run_in_container(a, "srv", netstream_bin, f"/netstream serve {PORT}")
    m(b, "launch", "busybox", "rdr", "-p", "dir")
    time.sleep(0.3)  # the server listening
    run_in_container(b, "rdr", netstream_bin, f"/netstream read {ip} {PORT} /root/stream")
    before = wait_stream(b, "rdr", 25)
    _rc, out, _e = m(a, "live", "local", "b", "srv", "--format", "json")
    assert address(b, "srv") == ip
    after = wait_stream(b, "rdr", before["seq"] + 50)  # 1 s more of the stream, at least
    assert after["gaps"] == 0 and after["pid"] == before["pid"], (before, after, out)


@pytest.mark.parametrize(("args", "said"), [
    (["--vxlan-peer", "host-b"], "VXLAN peer 'host-b' is not an IPv4 address"),
    (["--vxlan-peer", "198.51.100.11/24"], "is not an IPv4 address"),
    (["--vxlan-peer", "224.0.0.1"], "is not a unicast address"),
    (["--vxlan-id", "0"], "VXLAN id 0 is out of range"),
    (["--vxlan-id", "16777216"], "VXLAN id 16777216 is out of range"),
    (["--range", "192.0.2.40-198.51.100.1"], "192.0.2.40-198.51.100.1' is not inside"),
])
def test_hostile_overlay_settings_are_refused_and_nothing_is_made(trio, tmp_path, args,  # type: ignore[no-untyped-def]
                                                                  said) -> None:
    _a, _b, c = trio
    _rc, before, _e = m(c, "host", "overlay", "show", "--format", "json")
    rc, _out, err = m(c, "init", "--vxlan-id", "16", "--vxlan-local", c.link_ip, *args,
                      check=False)
    assert rc != 0 and said in err and "Hint:" in err, err
    _rc, after, _e = m(c, "host", "overlay", "show", "--format", "json")
    assert after == before  # nothing recorded, the device and its peers untouched
    # a new host: refused before its namespace (or any device in it) exists
    ns = f"{PREFIX}-x"
    r = subprocess.run([*MIGRATE, "--root", str(tmp_path / "root"), "init", "--netns", ns,
                        "--vxlan-id", "16", "--vxlan-local", "198.51.100.99", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and said in r.stderr, r.stderr
    assert not Path(netns_path(ns)).exists()


def test_teardown_removes_the_vxlan_device(trio) -> None:  # type: ignore[no-untyped-def]
    """Last in the module (it takes host c down). A process of ours holds c's namespace
    open past ``teardown``, so what teardown left in it can be seen: no VXLAN device (a
    host in the root namespace would otherwise keep it). Before that, ``init`` with no
    option makes the device again from what is recorded, as after a reboot."""
    from migrator.runtime.host import Host
    from migrator.runtime.teardown import teardown

    a, b, c = trio
    subprocess.run(["ip", "-n", c.netns, "link", "del", "vx-migbr0"], check=True)
    assert not answers(c, "192.0.2.1", within=1)
    m(c, "init")  # the record brings it back
    _rc, out, _e = m(c, "host", "overlay", "show", "--format", "json")
    shown = json.loads(out)
    assert shown["peers_now"] == shown["peers"] == [a.link_ip, b.link_ip]
    assert answers(c, "192.0.2.1")
    holder = subprocess.Popen(["ip", "netns", "exec", c.netns, "sleep", "60"])
    try:
        time.sleep(0.2)
        assert teardown(Host(c.root)) == []
        assert not Path(netns_path(c.netns)).exists()
        links = subprocess.run(["nsenter", f"--target={holder.pid}", "--net", "ip", "-o",
                                "link"], capture_output=True, text=True, check=True).stdout
        assert "migbr0" in links  # the namespace seen is c's
        assert "vx-migbr0" not in links
    finally:
        holder.kill()
        holder.wait()
