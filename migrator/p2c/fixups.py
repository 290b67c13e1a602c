"""Conversion fixups: what a machine's root needs to boot cleanly as a system container.

Each fixup is a plain function over the rootfs path that changes files and returns what it
changed, one sentence each, so the same list goes into ``/root/p2c-report.txt`` inside the
container and to the CLI. They run on the target host (agent op ``p2c_finish``) on the
received tree, before the uid shift, and are idempotent: a resumed conversion re-syncs the
tree (which undoes them) and runs them again.

- ``/etc/fstab``: disk, swap and kernel-filesystem entries are commented out (the
  container's root is its volume; the runtime mounts /proc, /sys, /dev);
- units that cannot work in a container are masked: udev, kernel modules, swap, fsck,
  clock synchronisation (no CAP_SYS_TIME), gettys on ttys (no ttys here), hardware
  monitors, plus what this runtime masks in its own Debian images for LXC/CRIU reasons;
- the network is configured for ``eth0``: the address the runtime gives the container
  (LXC configures it before init starts, so ifupdown is told ``manual``; systemd-networkd
  and netplan get it written out), or DHCP; other interfaces' files are set aside;
- the hostname is kept (``/etc/hostname`` is not touched).

The tree is the source machine's, so any name in it may be a planted symlink: every read and
write goes through ``migrator.runtime.inroot.RootDir``, which resolves links inside the rootfs only
and replaces (never writes through) a link at the name being written. What cannot be done
inside the tree raises ``InvalidInput``.
"""

from __future__ import annotations

import fnmatch
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from migrator.runtime.images import DEBIAN_MASKED_UNITS, PROTECT_HOSTNAME_UNITS
from migrator.runtime.inroot import RootDir

UNIT_DIRS = ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")
DISK_FSTYPES = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
                "vfat", "exfat", "ntfs", "ntfs3", "fuseblk", "swap", "iso9660", "udf",
                "bcachefs", "auto"}
RUNTIME_FSTYPES = {"proc", "sysfs", "devpts", "devtmpfs", "cgroup", "cgroup2", "securityfs",
                   "debugfs", "efivarfs"}
# units that cannot work in a container, with the reason written into the report
CONTAINER_UNFIT = {
    "systemd-udevd.service": "udev: devices belong to the host",
    "systemd-udevd-control.socket": "udev: devices belong to the host",
    "systemd-udevd-kernel.socket": "udev: devices belong to the host",
    "systemd-udev-trigger.service": "udev: devices belong to the host",
    "systemd-udev-settle.service": "udev: devices belong to the host",
    "systemd-modules-load.service": "kernel modules are the host's",
    "kmod-static-nodes.service": "kernel modules are the host's",
    "systemd-timesyncd.service": "the clock is the host's (no CAP_SYS_TIME)",
    "chrony.service": "the clock is the host's (no CAP_SYS_TIME)",
    "chronyd.service": "the clock is the host's (no CAP_SYS_TIME)",
    "ntp.service": "the clock is the host's (no CAP_SYS_TIME)",
    "ntpsec.service": "the clock is the host's (no CAP_SYS_TIME)",
    "openntpd.service": "the clock is the host's (no CAP_SYS_TIME)",
    "systemd-fsck-root.service": "no block device to check",
    "systemd-fsck@.service": "no block device to check",
    "systemd-remount-fs.service": "the root is mounted by the runtime",
    "systemd-binfmt.service": "binfmt_misc is the host's",
    "proc-sys-fs-binfmt_misc.automount": "binfmt_misc is the host's",
    "getty@.service": "no ttys in these containers (lxc.tty.max = 0)",
    "serial-getty@.service": "no ttys in these containers (lxc.tty.max = 0)",
    "swap.target": "no swap in a container",
    "smartd.service": "hardware: disk health is the host's",
    "smartmontools.service": "hardware: disk health is the host's",
    "lm-sensors.service": "hardware: sensors are the host's",
    "irqbalance.service": "hardware: interrupts are the host's",
    "thermald.service": "hardware: thermal control is the host's",
    "mdmonitor.service": "hardware: RAID is the host's",
    "lvm2-monitor.service": "hardware: LVM is the host's",
    "multipathd.service": "hardware: multipath is the host's",
    "hdparm.service": "hardware: disks are the host's",
    "cpufrequtils.service": "hardware: CPU frequency is the host's",
    "rng-tools.service": "hardware: the RNG is the host's",
    "acpid.service": "hardware: ACPI is the host's",
}
RUNTIME_MASK_REASON = "masked in this runtime's own containers (LXC/CRIU)"
REPORT = "root/p2c-report.txt"
SIDE = ".p2c-orig"


@dataclass(frozen=True)
class NetworkPlan:
    """How ``eth0`` is configured: a static address (given by the runtime) or DHCP."""

    dhcp: bool
    address: str | None = None  # "192.0.2.10/24"
    gateway: str | None = None


def _fnmatch_names(root: RootDir, rel: str, pattern: str) -> list[str]:
    return [n for n in root.listdir(rel) if fnmatch.fnmatchcase(n, pattern)]


def fix_fstab(rootfs: Path) -> list[str]:
    """Comment out disk, swap and runtime-filesystem lines; keep tmpfs and the rest."""
    with RootDir(rootfs) as root:
        st = root.stat("etc/fstab")
        text = root.read_text("etc/fstab") if st and stat.S_ISREG(st.st_mode) else None
        if text is None or st is None:
            return []
        out, changes = [], []
        for line in text.splitlines():
            f = line.split()
            if not f or f[0].startswith("#") or len(f) < 3:
                out.append(line)
                continue
            src, fstype = f[0], f[2]
            disk = fstype in DISK_FSTYPES or src.startswith(("/dev/", "UUID=", "LABEL=",
                                                             "PARTUUID=", "PARTLABEL="))
            if fstype == "swap":
                why = "swap: a container has none of its own"
            elif fstype in RUNTIME_FSTYPES:
                why = f"{fstype}: mounted by the container runtime"
            elif disk and f[1] == "/":
                why = "the root disk: the container's root is its volume"
            elif disk:
                why = "a disk of the machine: its data was copied into the volume"
            else:
                out.append(line)
                continue
            out.append(f"# p2c: {line}")
            changes.append(f"/etc/fstab: commented out {' '.join(f[:3])} ({why})")
        if changes:
            root.write_text("etc/fstab", "\n".join(out) + "\n", st.st_mode & 0o7777)
        return changes


def _unit_exists(root: RootDir, unit: str) -> bool:
    return any(root.lexists(f"{d}/{unit}") for d in UNIT_DIRS)


def _mask(root: RootDir, unit: str) -> bool:
    link = f"etc/systemd/system/{unit}"
    if root.readlink(link) == "/dev/null":
        return False
    if root.lexists(link):
        root.rename(link, link + SIDE)
    root.symlink("/dev/null", link)
    return True


def mask_units(rootfs: Path) -> list[str]:
    """Mask what cannot run in a container (only units the machine has) and what this
    runtime masks in its own Debian containers; swap units too."""
    changes = []
    with RootDir(rootfs) as root:
        for unit, why in CONTAINER_UNFIT.items():
            if _unit_exists(root, unit) and _mask(root, unit):
                changes.append(f"masked {unit} ({why})")
        for unit in DEBIAN_MASKED_UNITS:
            if unit not in CONTAINER_UNFIT and _unit_exists(root, unit) and _mask(root, unit):
                changes.append(f"masked {unit} ({RUNTIME_MASK_REASON})")
        for name in _fnmatch_names(root, "etc/systemd/system", "*.swap"):
            if _mask(root, name):
                changes.append(f"masked {name} (no swap in a container)")
        for unit in PROTECT_HOSTNAME_UNITS:
            if not _unit_exists(root, f"{unit}.service"):
                continue
            conf = f"etc/systemd/system/{unit}.service.d/migrator-container.conf"
            st = root.lstat(conf)
            if st is None or not stat.S_ISREG(st.st_mode):  # a planted link is replaced
                root.write_text(conf, "[Service]\nProtectHostname=no\n")
                changes.append(f"{unit}.service: ProtectHostname=no (a nested UTS namespace "
                               "cannot be checkpointed for live migration)")
    return changes


def configure_network(rootfs: Path, plan: NetworkPlan) -> list[str]:
    """eth0 as planned, in whichever network stack the machine uses."""
    changes = []
    how = "DHCP" if plan.dhcp else f"{plan.address} via {plan.gateway}"
    with RootDir(rootfs) as root:
        ifaces = "etc/network/interfaces"
        old = root.read_text(ifaces) if root.is_file(ifaces) else None
        if old is not None:
            orig = ifaces + SIDE
            st = root.lstat(orig)
            if st is None or not stat.S_ISREG(st.st_mode):  # a planted link is replaced
                root.write_text(orig, old)
            eth0 = "iface eth0 inet dhcp\n" if plan.dhcp else (
                "iface eth0 inet manual\n"
                f"    # {plan.address} via {plan.gateway}: set on eth0 by the container "
                "runtime\n")
            root.write_text(ifaces, "# written by migrate p2c; the machine's own file is "
                            f"interfaces{SIDE}\nauto lo\niface lo inet loopback\n\n"
                            f"auto eth0\n{eth0}")
            changes.append(f"/etc/network/interfaces: eth0 only, {how} (was: "
                           f"{', '.join(_ifupdown_ifaces(old)) or 'nothing'})")
        nd = "etc/systemd/network"
        networks = _fnmatch_names(root, nd, "*.network")
        if root.is_dir(nd) and (networks or _networkd_enabled(root)):
            for name in networks:
                if name != "10-p2c-eth0.network":
                    changes.append(f"/etc/systemd/network/{name} set aside as {name}{SIDE}")
                    root.rename(f"{nd}/{name}", f"{nd}/{name}{SIDE}")
            body = ("DHCP=yes\n" if plan.dhcp
                    else f"Address={plan.address}\nGateway={plan.gateway}\n")
            root.write_text(f"{nd}/10-p2c-eth0.network",
                            f"[Match]\nName=eth0\n\n[Network]\n{body}")
            changes.append(f"/etc/systemd/network/10-p2c-eth0.network: eth0, {how}")
        npd = "etc/netplan"
        if root.is_dir(npd):
            for name in _fnmatch_names(root, npd, "*.yaml"):
                if name != "10-p2c.yaml":
                    changes.append(f"/etc/netplan/{name} set aside as {name}{SIDE}")
                    root.rename(f"{npd}/{name}", f"{npd}/{name}{SIDE}")
            eth0 = "      dhcp4: true\n" if plan.dhcp else (
                f"      addresses: [{plan.address}]\n      routes:\n"
                f"        - to: default\n          via: {plan.gateway}\n")
            root.write_text(f"{npd}/10-p2c.yaml",
                            f"network:\n  version: 2\n  ethernets:\n    eth0:\n{eth0}", 0o600)
            changes.append(f"/etc/netplan/10-p2c.yaml: eth0, {how}")
    return changes


def _networkd_enabled(root: RootDir) -> bool:
    etc = "etc/systemd/system"
    return any(root.lexists(f"{etc}/{d}/systemd-networkd.service")
               for d in _fnmatch_names(root, etc, "*.wants"))


def _ifupdown_ifaces(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines()
            if line.split()[:1] == ["iface"] and len(line.split()) > 1
            and line.split()[1] != "lo"]


def apply_all(rootfs: Path, plan: NetworkPlan) -> list[str]:
    """Every fixup, in order; the list of changes."""
    changes = fix_fstab(rootfs) + mask_units(rootfs) + configure_network(rootfs, plan)
    with RootDir(rootfs) as root:
        hostname = root.read_text("etc/hostname") if root.is_file("etc/hostname") else None
    if hostname is not None:
        changes.append(f"hostname kept: {hostname.strip()[:253]}")
    return changes


def write_report(rootfs: Path, header: dict[str, str], changes: list[str],
                 unreadable: list[str]) -> Path:
    """``/root/p2c-report.txt``: where the container came from and every change made."""
    lines = ["migrate p2c report", "=" * 18, ""]
    lines += [f"{k}: {v}" for k, v in header.items()]
    lines += [f"converted: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "", "Changes:"]
    lines += [f"- {c}" for c in changes] or ["- none"]
    lines += ["", "Files that could not be read on the source (not copied):"]
    lines += [f"- {u}" for u in unreadable] or ["- none"]
    with RootDir(rootfs) as root:
        root.write_text(REPORT, "\n".join(lines) + "\n", 0o600)
    return rootfs / REPORT


def append_report(rootfs: Path, text: str) -> None:
    """Add ``text`` to the report of a converted (and maybe already running) container:
    appended in place, keeping its shifted owner, and refused if it is no longer a plain
    file (the container's root may have replaced it with a link)."""
    with RootDir(rootfs) as root:
        root.append_text(REPORT, text)
