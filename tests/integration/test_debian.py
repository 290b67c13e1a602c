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
