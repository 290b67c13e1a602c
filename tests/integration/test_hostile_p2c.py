"""A hostile p2c machine: a link planted at every path the fixups write, through p2c_finish.

The received tree is made by hand in the volume ``migrator.p2c.target.prepare_volume`` gives (what
rsync would have filled), then the agent's ``finish`` runs on a real test host: fixups,
report, uid shift and record. Links aimed at a canary directory standing for the host's
/etc must change nothing there; with the links at the leaves the conversion completes with
every file inside the tree; with a parent directory linked out it is refused by name and
nothing is recorded. Containers are named ``hp-*``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from migrator.core.errors import InvalidInput
from migrator.p2c.target import finish, prepare_volume
from tests.integration.conftest import TEST_BASE

LEAVES = ["etc/fstab.p2c-orig", "etc/network/interfaces.p2c-orig",
          "etc/systemd/network/10-p2c-eth0.network", "etc/netplan/10-p2c.yaml",
          "etc/netplan/01-netcfg.yaml.p2c-orig", "etc/systemd/system/systemd-udevd.service",
          "etc/systemd/system/systemd-logind.service.d/migrator-container.conf",
          "root/p2c-report.txt"]


def machine(root: Path) -> None:
    for d in ("etc/systemd/system", "lib/systemd/system", "etc/network",
              "etc/systemd/network", "etc/netplan", "root", "sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text("UUID=1 / ext4 defaults 0 1\n")
    for unit in ("systemd-udevd.service", "systemd-logind.service", "systemd-networkd.service"):
        (root / "lib/systemd/system" / unit).write_text("[Unit]\n")
    (root / "etc/network/interfaces").write_text("auto ens3\niface ens3 inet dhcp\n")
    (root / "etc/systemd/network/50-ens3.network").write_text("[Match]\nName=ens3\n")
    (root / "etc/netplan/01-netcfg.yaml").write_text("network: {version: 2}\n")
    (root / "etc/hostname").write_text("evil\n")


def canary_state(top: Path) -> dict[str, Any]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(top))] = (st.st_mode, st.st_uid, st.st_mtime_ns,
                                            p.read_bytes() if p.is_file() else b"")
    return out


@pytest.mark.parametrize("where", ["leaves", "parent"])
def test_links_at_every_fixup_path_change_nothing_on_the_host(make_host, where: str) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("btrfs",))
    canary = TEST_BASE / f"hp-canary-{os.getpid()}-{where}"  # stands for the host's /etc
    (canary / "cron.d").mkdir(parents=True)
    (canary / "cron.d/keep").write_text("host\n")
    (canary / "dir").mkdir()
    try:
        name = f"hp-{where}"
        rootfs = prepare_volume(th.cts, name, "btrfs", False)
        machine(rootfs)
        if where == "leaves":
            for rel in LEAVES:  # absolute dangling links into the canary's cron.d
                (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
                (rootfs / rel).symlink_to(canary / "cron.d" / rel.replace("/", "_"))
        else:
            (rootfs / "root").rmdir()
            (rootfs / "root").symlink_to(canary / "dir")
        before = canary_state(canary)
        req = {"name": name, "pool": "btrfs", "dhcp": False, "header": {"source": "evil"},
               "unreadable": [], "start": False}
        if where == "leaves":
            result = finish(th.cts, req)
            assert th.cts.state.has_container(name)
            report = rootfs / "root/p2c-report.txt"
            assert report.is_file() and not report.is_symlink()
            assert "source: evil" in report.read_text()
            for rel in ("etc/network/interfaces.p2c-orig", "etc/netplan/10-p2c.yaml"):
                assert (rootfs / rel).is_file() and not (rootfs / rel).is_symlink(), rel
            assert os.readlink(rootfs / "etc/systemd/system/systemd-udevd.service") == \
                "/dev/null"
            assert any("interfaces" in c for c in result["changes"])
        else:
            with pytest.raises(InvalidInput, match="refusing /root in "):
                finish(th.cts, req)
            assert not th.cts.state.has_container(name)
        assert canary_state(canary) == before
    finally:
        for dirpath, _dirs, files in os.walk(canary, topdown=False):
            for f in files:
                os.unlink(os.path.join(dirpath, f))
            os.rmdir(dirpath)
