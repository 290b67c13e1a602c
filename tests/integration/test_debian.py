"""Debian with systemd as init: boots to `running` on both drivers, (un)privileged."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(
    ("pool", "privileged"),
    [
        pytest.param("dir", False, id="dir-unprivileged"),
        pytest.param("btrfs", True, id="btrfs-privileged"),
    ],
)
def test_debian_systemd_reaches_running(make_host, pool: str, privileged: bool) -> None:
    host = make_host(images=("debian/bookworm",), pools=(pool,))
    conf = ["-c", "security.privileged=true"] if privileged else []
    r = host.cli("launch", "debian/bookworm", "deb", "-p", pool, *conf, "--wait", check=True)
    failed = host.cts.exec("deb", ["systemctl", "--failed", "--no-legend"])[1]
    assert "deb booted: running" in r.stderr, (r.stderr, failed)
    rc, out, _ = host.cts.exec("deb", ["cat", "/proc/1/comm"])
    assert out.strip() == "systemd"
    rc, out, _ = host.cts.exec("deb", ["hostname"])
    assert out.strip() == "deb"
    host.cli("stop", "deb", "--timeout", "60", check=True)
    assert host.cts.status("deb") == "STOPPED"


def test_debian_moves_live_between_drivers_and_keeps_running(make_host) -> None:  # type: ignore[no-untyped-def]
    """A booted systemd container with a snapshot moves btrfs -> dir -> btrfs while running.

    zfs-fuse cannot store the ACLs systemd puts on /var/log/journal: that move is refused
    with a clear error and the container keeps running where it was.
    """
    host = make_host(images=("debian/bookworm",), pools=("btrfs", "zfs", "dir"))
    host.cli("launch", "debian/bookworm", "deb", "-p", "btrfs", "--wait", check=True)
    host.cts.exec("deb", ["sh", "-c", "echo kept > /root/marker"])
    host.cli("snapshot", "create", "deb", "s0", check=True)
    ip = host.cts.get("deb").ipv4
    r = host.cli("move", "deb", "--pool", "zfs")
    assert r.returncode == 11 and "ACL" in r.stderr, r.stderr
    assert host.cts.get("deb").pool == "btrfs" and host.cts.status("deb") == "RUNNING"
    assert not host.host.backend("zfs").volume_exists(host.cts.volume(host.cts.get("deb")))
    for pool in ("dir", "btrfs"):
        r = host.cli("move", "deb", "--pool", pool, check=True, timeout=600)
        assert "down for" in r.stderr, r.stderr
        assert host.cts.get("deb").pool == pool and host.cts.get("deb").ipv4 == ip
        assert host.cts.wait_booted("deb") == "running"
        assert host.cts.exec("deb", ["cat", "/root/marker"])[1].strip() == "kept"
    assert [s.name for s in host.cts.snapshot_list("deb")] == ["s0"]
