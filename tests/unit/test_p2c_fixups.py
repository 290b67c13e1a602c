"""p2c fixups on sample trees, rsync error parsing and the relay's allow-lists (pure)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from migrator.core.errors import InvalidInput
from migrator.p2c.fixups import (
    NetworkPlan,
    append_report,
    apply_all,
    configure_network,
    fix_fstab,
    mask_units,
    write_report,
)
from migrator.p2c.pull import check_rules, drop_unreadable, parse_rsync_errors, parse_stats
from migrator.runtime import inroot
from migrator.transport.rsync_relay import sender_args

FSTAB = """\
# /etc/fstab: static file system information.
UUID=1234-abcd  /          ext4  errors=remount-ro  0 1
/dev/sdb1       /home      xfs   defaults           0 2
/swapfile       none       swap  sw                 0 0
proc            /proc      proc  defaults           0 0
tmpfs           /tmp       tmpfs mode=1777          0 0
nas:/export     /mnt/share nfs4  defaults,_netdev   0 0
"""
STATIC = NetworkPlan(False, "192.0.2.10/24", "192.0.2.1")


def machine(tmp_path: Path) -> Path:
    """A small Debian-like tree: fstab, units, ifupdown, networkd and netplan configs."""
    root = tmp_path / "rootfs"
    for d in ("etc/systemd/system/multi-user.target.wants", "lib/systemd/system",
              "etc/network", "etc/systemd/network", "etc/netplan", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc/fstab").write_text(FSTAB)
    for unit in ("systemd-udevd.service", "systemd-timesyncd.service", "getty@.service",
                 "ssh.service", "systemd-logind.service", "smartd.service",
                 "systemd-networkd.service"):
        (root / "lib/systemd/system" / unit).write_text("[Unit]\n")
    (root / "etc/systemd/system/dev-sdb2.swap").write_text("[Swap]\nWhat=/dev/sdb2\n")
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\nauto ens3\niface ens3 inet static\n"
        "  address 198.51.100.50/24\n")
    (root / "etc/systemd/network/50-ens3.network").write_text("[Match]\nName=ens3\n")
    (root / "etc/netplan/01-netcfg.yaml").write_text("network: {version: 2}\n")
    (root / "etc/hostname").write_text("web1\n")
    return root


def test_fstab_disks_swap_and_kernel_filesystems_are_commented_out(tmp_path: Path) -> None:
    root = machine(tmp_path)
    changes = fix_fstab(root)
    text = (root / "etc/fstab").read_text()
    assert "# p2c: UUID=1234-abcd  /" in text and "# p2c: /dev/sdb1" in text
    assert "# p2c: /swapfile" in text and "# p2c: proc" in text
    assert "\ntmpfs           /tmp" in text and "\nnas:/export" in text  # kept
    assert len(changes) == 4 and any("swap" in c for c in changes)
    assert fix_fstab(root) == []  # idempotent


def test_units_that_cannot_work_are_masked_only_if_present(tmp_path: Path) -> None:
    root = machine(tmp_path)
    changes = mask_units(root)
    etc = root / "etc/systemd/system"
    for unit in ("systemd-udevd.service", "systemd-timesyncd.service", "getty@.service",
                 "smartd.service", "systemd-logind.service"):
        assert os.readlink(etc / unit) == "/dev/null", unit
    assert not (etc / "ssh.service").exists()
    assert not (etc / "chrony.service").exists()  # not on this machine: not masked
    assert os.readlink(etc / "dev-sdb2.swap") == "/dev/null"
    assert (etc / "dev-sdb2.swap.p2c-orig").read_text().startswith("[Swap]")
    assert (etc / "systemd-logind.service.d/migrator-container.conf").read_text() == \
        "[Service]\nProtectHostname=no\n"
    assert any("udev" in c for c in changes)
    assert mask_units(root) == []  # idempotent


def test_network_static_in_every_stack(tmp_path: Path) -> None:
    root = machine(tmp_path)
    changes = configure_network(root, STATIC)
    ifaces = (root / "etc/network/interfaces").read_text()
    assert "iface eth0 inet manual" in ifaces and "192.0.2.10/24" in ifaces
    assert "ens3" not in ifaces
    assert "ens3" in (root / "etc/network/interfaces.p2c-orig").read_text()
    assert (root / "etc/systemd/network/50-ens3.network.p2c-orig").exists()
    nd = (root / "etc/systemd/network/10-p2c-eth0.network").read_text()
    assert "Name=eth0" in nd and "Address=192.0.2.10/24" in nd and "Gateway=192.0.2.1" in nd
    plan = (root / "etc/netplan/10-p2c.yaml").read_text()
    assert "eth0" in plan and "192.0.2.10/24" in plan
    assert not (root / "etc/netplan/01-netcfg.yaml").exists()
    assert any("was: ens3" in c for c in changes)


def test_network_dhcp_and_no_networkd_file_when_unused(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc/network").mkdir(parents=True)
    (root / "etc/systemd/network").mkdir(parents=True)
    (root / "etc/network/interfaces").write_text("auto eth0\niface eth0 inet static\n")
    configure_network(root, NetworkPlan(True))
    assert "iface eth0 inet dhcp" in (root / "etc/network/interfaces").read_text()
    assert list((root / "etc/systemd/network").iterdir()) == []


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways migrator.runtime.inroot resolves paths: openat2 and the O_NOFOLLOW walk."""
    monkeypatch.setattr(inroot, "_use_openat2", request.param == "openat2")
    return str(request.param)


def test_a_symlinked_etc_leads_inside_the_tree_only(tmp_path: Path, resolution: str) -> None:
    root = tmp_path / "r"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (root / "etc").symlink_to(outside)  # inside the tree this is root/<tmp_path>/outside
    assert fix_fstab(root) == []
    assert (outside / "fstab").read_text().startswith("/dev/sda1")


# Every path the fixups and the report read or write, relative to the rootfs.
WRITTEN = [
    "etc/fstab",
    "etc/network/interfaces", "etc/network/interfaces.p2c-orig",
    "etc/systemd/network/10-p2c-eth0.network", "etc/systemd/network/50-ens3.network.p2c-orig",
    "etc/netplan/10-p2c.yaml", "etc/netplan/01-netcfg.yaml.p2c-orig",
    "etc/systemd/system/systemd-udevd.service", "etc/systemd/system/getty@.service",
    "etc/systemd/system/systemd-timesyncd.service", "etc/systemd/system/smartd.service",
    "etc/systemd/system/systemd-logind.service",
    "etc/systemd/system/dev-sdb2.swap.p2c-orig",
    "etc/systemd/system/systemd-logind.service.d/migrator-container.conf",
    "etc/hostname", "root/p2c-report.txt",
]
READ = {"etc/fstab", "etc/network/interfaces", "etc/hostname"}
PARENTS = ["etc/network", "etc/systemd/network", "etc/netplan", "root",
           "etc/systemd/system/systemd-logind.service.d"]


def _host_state(top: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every entry under ``top``: mode, mtime and content (or link target)."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            body: bytes | str = (os.readlink(p) if p.is_symlink() else
                                 p.read_bytes() if p.is_file() else b"")
            out[str(p.relative_to(top))] = (st.st_mode, st.st_mtime_ns, body)
    return out


def _plant(root: Path, rel: str, target: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
    p.symlink_to(target)


@pytest.mark.parametrize("how", ["absolute-dangling", "absolute-existing", "relative-up",
                                 "read-names-too", "parents-absolute", "parents-relative"])
def test_a_hostile_machine_with_links_at_every_path_writes_nothing_outside(
        tmp_path: Path, how: str, resolution: str) -> None:
    """A converted machine plants a symlink at every name the fixups touch (and at their
    parent directories): a host canary directory the links aim at stays byte for byte and
    mtime for mtime the same, and each write either lands inside the tree or is refused."""
    root = machine(tmp_path)
    host = tmp_path / "host"  # stands for the host's /etc: the links aim here
    (host / "cron.d").mkdir(parents=True)
    (host / "cron.d/keep").write_text("# host cron\n")
    for rel in WRITTEN:
        (host / rel.replace("/", "_")).write_text(f"host file {rel}\n")
    os.utime(host / "cron.d", ns=(1, 10**18))  # an mtime no write would leave
    up = "../" * (len(root.parts) + 3)  # far more .. than the tree is deep
    if how.startswith("parents"):
        for rel in PARENTS:
            dest = host / ("dir_" + rel.replace("/", "_"))
            dest.mkdir()
            (dest / "canary").write_text("host\n")
            _plant(root, rel, str(dest) if how == "parents-absolute" else up + str(dest)[1:])
    else:  # the names only written; the files read too, when they must lead nowhere
        for rel in WRITTEN:
            if rel in READ and how != "read-names-too":
                continue
            name = rel.replace("/", "_")
            target = {"absolute-dangling": str(host / "cron.d" / name),
                      "absolute-existing": str(host / name),
                      "read-names-too": str(host / name),
                      "relative-up": up + str(host / name)[1:]}[how]
            _plant(root, rel, target)
    before = _host_state(host)
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    try:
        changes = apply_all(root, STATIC)
        write_report(root, {"source": "root@evil"}, changes, [])
    except InvalidInput as e:  # a refusal must say what it refused
        assert "refusing /" in str(e) and str(root) in str(e)
        refused = True
    else:
        refused = False
        report = root / "root/p2c-report.txt"
        if report.is_symlink() or not report.is_file():
            raise AssertionError("the report went somewhere else")
        assert "source: root@evil" in report.read_text()
    assert _host_state(host) == before, how
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
    if not how.startswith("parents"):
        assert not refused  # links at the leaves are replaced, never written through
        for unit in ("systemd-udevd.service", "getty@.service"):
            assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null"
        written = [rel for rel in WRITTEN if rel not in READ and "@" not in rel
                   and not rel.endswith((".service", ".swap.p2c-orig"))]
        if how == "read-names-too":  # nothing read from the host, so nothing to change
            assert "host file" not in report.read_text()
            written = ["root/p2c-report.txt"]
        for rel in written:
            p = root / rel
            assert p.is_file() and not p.is_symlink(), rel
        if how != "read-names-too":
            assert "ens3" in (root / "etc/network/interfaces.p2c-orig").read_text()


def test_fifo_and_huge_files_are_refused_not_read(tmp_path: Path, resolution: str) -> None:
    root = machine(tmp_path)
    (root / "etc/fstab").unlink()
    os.mkfifo(root / "etc/fstab")
    assert fix_fstab(root) == []  # not a regular file: nothing read, nothing blocked
    (root / "etc/hostname").unlink()
    os.mkfifo(root / "etc/hostname")
    changes = apply_all(root, STATIC)
    assert not any(c.startswith("hostname") for c in changes)
    big = root / "etc/network/interfaces"
    with open(big, "wb") as f:
        f.truncate(inroot.MAX_READ + 1)
    with pytest.raises(InvalidInput, match="more than"):
        configure_network(root, STATIC)


def test_report_append_refuses_a_link_the_container_put_there(tmp_path: Path,
                                                              resolution: str) -> None:
    root = machine(tmp_path)
    write_report(root, {"source": "root@web1"}, [], [])
    append_report(root, "First boot: running\n")
    assert (root / "root/p2c-report.txt").read_text().endswith("First boot: running\n")
    victim = tmp_path / "victim"
    victim.write_text("host\n")
    (root / "root/p2c-report.txt").unlink()
    (root / "root/p2c-report.txt").symlink_to(victim)
    with pytest.raises(InvalidInput, match="p2c-report.txt"):
        append_report(root, "more\n")
    assert victim.read_text() == "host\n"


def test_report_lists_every_change(tmp_path: Path) -> None:
    root = machine(tmp_path)
    changes = apply_all(root, STATIC)
    assert changes[-1] == "hostname kept: web1"
    path = write_report(root, {"source": "root@web1"}, changes, ["/srv/bad.bin"])
    text = path.read_text()
    assert path == root / "root/p2c-report.txt" and path.stat().st_mode & 0o777 == 0o600
    assert "source: root@web1" in text and "- /srv/bad.bin" in text
    assert all(c in text for c in changes)


STDERR = """\
rsync: [sender] read errors mapping "/srv/archive/bad-sector.bin": Input/output error (5)
rsync: [sender] send_files failed to open "/var/secret": Permission denied (13)
rsync: [sender] opendir "/srv/locked" failed: Permission denied (13)
ERROR: srv/archive/bad-sector.bin failed verification -- update discarded.
file has vanished: "/var/log/rotated.1"
rsync error: some files/attrs were not transferred (see previous errors) (code 23)
"""


def test_rsync_errors_name_the_files() -> None:
    unreadable, vanished = parse_rsync_errors(STDERR)
    assert unreadable == ["/srv/archive/bad-sector.bin", "/var/secret", "/srv/locked"]
    assert vanished == ["/var/log/rotated.1"]
    stats = parse_stats("Number of regular files transferred: 1,234\nLiteral data: 5,000\n")
    assert stats == {"Number of regular files transferred": 1234, "Literal data": 5000}


def test_filter_rules_are_exclusions_only() -> None:
    assert check_rules(["- /proc/*", "- /var/cache"]) == ["- /proc/*", "- /var/cache"]
    for bad in (["+ /etc"], ["- relative"], ["merge /x"], "- /proc", ["- /a\n+ /b"]):
        with pytest.raises(InvalidInput):
            check_rules(bad)


SENDER = ["rsync", "--server", "--sender", "-lHogDtpAXrSe.LsfxCIvu", "--numeric-ids", ".", "/"]


def test_the_sender_our_client_asks_for_is_accepted() -> None:
    assert sender_args(SENDER) == SENDER


@pytest.mark.parametrize("bad", [
    ["rsync", "--server", "-lHogDtpAXrSe.LsfxCIvu", ".", "/"],  # a receiver: would write
    [*SENDER[:4], "--remove-source-files", ".", "/"],
    [*SENDER[:4], "--log-file=/etc/passwd", ".", "/"],
    [*SENDER[:5], ".", "/etc"],  # not the root
    ["sh", *SENDER[1:]],
    [*SENDER[:3], "-lHogDtpAXrSTe.Lsfx", ".", "/"],  # -T: a temp dir there
    "rsync --server --sender . /",
])
def test_any_other_sender_is_refused(bad: object) -> None:
    with pytest.raises(InvalidInput):
        sender_args(bad)


def test_unreadable_files_are_removed_never_through_a_symlink(tmp_path: Path) -> None:
    dest = tmp_path / "rootfs"
    (dest / "srv").mkdir(parents=True)
    (dest / "srv/bad.bin").write_bytes(bytes(4096))  # what --partial kept: zeros
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (dest / "link").symlink_to(outside)
    drop_unreadable(dest, ["/srv/bad.bin", "/link/keep", "/../outside/keep", "/srv/none"])
    assert not (dest / "srv/bad.bin").exists()
    assert (outside / "keep").exists()
