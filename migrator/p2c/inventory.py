"""What is on the machine before anything moves: ``migrate p2c --dry-run`` stops here.

The parsers are pure functions over the text of the source's files and commands
(``/etc/os-release``, ``/proc/self/mountinfo``, ``ip -j``, ``systemctl``...), so they are
unit-tested on samples; ``gather`` runs the commands through a ``SourceMachine``.

The decision that matters is which mounts are copied. Included: the root and real
filesystems on block devices (ext4, xfs, btrfs, zfs...). Skipped, each with its reason:
kernel and memory filesystems (proc, sysfs, devtmpfs, tmpfs, cgroup...), network and FUSE
mounts (another machine's data), overlay/squashfs (container and snap images), a second
mount of what is already included (bind mounts), and the state directories of container
and VM managers. A skipped mount point stays as an empty directory in the container.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from migrator.core.errors import InvalidInput
from migrator.p2c.source import SourceMachine

MEMORY_FS = {"tmpfs", "ramfs"}
VIRTUAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2",
              "securityfs", "debugfs", "tracefs", "pstore", "bpf", "mqueue", "hugetlbfs",
              "configfs", "fusectl", "autofs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs",
              "selinuxfs", "nfsd"}
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs",
              "lustre", "davfs", "sshfs"}
IMAGE_FS = {"overlay": "an overlay (container image layers)",
            "squashfs": "a squashfs image (snap or live media)",
            "iso9660": "a CD/DVD image", "udf": "optical media"}
DISK_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
           "bcachefs", "fuseblk", "vfat", "exfat", "ntfs", "ntfs3"}
# state of container and VM managers: their data are other machines, not this one
MANAGER_DIRS = ("/var/lib/docker", "/var/lib/containerd", "/var/lib/containers",
                "/var/lib/lxc", "/var/lib/lxd", "/var/lib/incus", "/var/lib/machines",
                "/var/lib/libvirt/images", "/var/lib/migrator", "/var/snap/lxd", "/snap")
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/run")
FIRMWARE_DIRS = ("/boot/efi",)


@dataclass(frozen=True)
class Mount:
    path: str
    fstype: str
    source: str
    device: str  # major:minor
    root: str  # the mounted directory inside its filesystem (bind mounts, subvolumes)
    included: bool
    reason: str
    size: int | None = None  # bytes to transfer (included mounts)


@dataclass
class Inventory:
    source: str
    distribution: str
    os_id: str
    version: str
    hostname: str
    init: str
    kernel: str
    mounts: list[Mount]
    interfaces: list[dict[str, Any]]
    routes: list[str]
    network_config: list[str]  # files that configure the network
    services: list[str]
    services_from: str  # "systemctl" or "wants symlinks"
    excludes: list[str] = field(default_factory=list)
    total_size: int = 0
    tools: dict[str, bool] = field(default_factory=dict)

    @property
    def included(self) -> list[Mount]:
        return [m for m in self.mounts if m.included]

    @property
    def skipped(self) -> list[Mount]:
        return [m for m in self.mounts if not m.included]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mounts"] = [asdict(m) for m in self.mounts]
        return d


# parsers --------------------------------------------------------------------------------------
def parse_os_release(text: str) -> dict[str, str]:
    """``KEY=value`` lines, values unquoted (os-release(5) allows single or double quotes)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[k.strip()] = v
    return out


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _under(path: str, dirs: tuple[str, ...]) -> str | None:
    for d in dirs:
        if path == d or path.startswith(d.rstrip("/") + "/"):
            return d
    return None


def classify(path: str, fstype: str, source: str, device: str, root: str,
             seen: dict[str, list[str]], skipped_at: list[str]) -> tuple[bool, str]:
    """Whether one mount is copied, and why. ``seen``: device -> roots already included;
    ``skipped_at``: mount points already skipped (what is under them is skipped too)."""
    if path != "/":
        parent = _under(path, tuple(skipped_at))
        if parent:
            return False, f"under {parent}, which is skipped"
    if fstype in MEMORY_FS:
        return False, f"{fstype}: in memory, emptied at every boot"
    if fstype in VIRTUAL_FS:
        return False, f"{fstype}: made by the kernel at boot, not data"
    if fstype in NETWORK_FS or (fstype.startswith("fuse.") and fstype != "fuseblk"):
        return False, f"{fstype}: a network or FUSE mount (another machine's data)"
    if fstype in IMAGE_FS:
        return False, f"{fstype}: {IMAGE_FS[fstype]}"
    where = _under(path, MANAGER_DIRS)
    if where:
        return False, f"{where}: a container or VM manager's state"
    where = _under(path, SYSTEM_DIRS)
    if where:
        return False, f"under {where}: recreated by the container's init"
    if _under(path, FIRMWARE_DIRS):
        return False, "the firmware (EFI) partition: a container does not boot from it"
    if device in seen:
        if root in seen[device]:
            return False, "a second mount of a filesystem already included"
        if fstype not in ("btrfs", "zfs") and any(r == "/" for r in seen[device]):
            return False, f"a bind mount of {root} (already included)"
    if fstype in DISK_FS:
        return True, f"{fstype} on {source}" if path != "/" else f"the root ({fstype} on {source})"
    if source.startswith("/dev/"):
        return True, f"{fstype} on the block device {source}"
    return False, f"{fstype} from {source}: not a disk filesystem"


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of ``/proc/self/mountinfo``, classified (mount order is kept)."""
    mounts: list[Mount] = []
    seen: dict[str, list[str]] = {}
    skipped_at: list[str] = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        pre, _, post = line.partition(" - ")
        f = pre.split()
        g = post.split()
        if len(f) < 6 or len(g) < 2:
            continue
        device, root, path = f[2], _unescape(f[3]), _unescape(f[4])
        fstype, source = g[0], _unescape(g[1])
        if any(m.path == path for m in mounts):  # over-mounted: the later one is visible
            mounts = [m for m in mounts if m.path != path]
            skipped_at = [p for p in skipped_at if p != path]
        included, reason = classify(path, fstype, source, device, root, seen, skipped_at)
        if included:
            seen.setdefault(device, []).append(root)
        else:
            skipped_at.append(path)
        mounts.append(Mount(path, fstype, source, device, root, included, reason))
    return mounts


def _ip_json(text: str) -> list[Any]:
    """The list ``ip -j`` printed, or an empty one when its output is empty or not a JSON
    list (the command failed, or an ``ip`` without ``-j``): the inventory then shows no
    interfaces or routes rather than failing."""
    try:
        data = json.loads(text or "[]")
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def parse_ip_addr(text: str) -> list[dict[str, Any]]:
    """``ip -j addr``: interfaces (not lo) with their addresses."""
    out = []
    for link in _ip_json(text):
        name = link.get("ifname", "?")
        if name == "lo":
            continue
        addrs = [f"{a.get('local')}/{a.get('prefixlen')}" for a in link.get("addr_info", [])
                 if a.get("family") in ("inet", "inet6") and a.get("scope") != "link"]
        out.append({"name": name, "mac": link.get("address", ""),
                    "state": link.get("operstate", ""), "addresses": addrs})
    return out


def parse_ip_route(text: str) -> list[str]:
    """``ip -j route``: one line per route (``default via G dev D``, ``NET dev D``)."""
    out = []
    for r in _ip_json(text):
        parts = [str(r.get("dst", "?"))]
        if r.get("gateway"):
            parts += ["via", str(r["gateway"])]
        if r.get("dev"):
            parts += ["dev", str(r["dev"])]
        out.append(" ".join(parts))
    return out


def parse_enabled_units(text: str) -> list[str]:
    """``systemctl list-unit-files --state=enabled --no-legend``: unit names."""
    return sorted({line.split()[0] for line in text.splitlines()
                   if line.strip() and "." in line.split()[0]})


def parse_wants_links(text: str) -> list[str]:
    """``find /etc/systemd/system -mindepth 2 -maxdepth 2`` output: units pulled in by a
    ``*.wants`` directory (what ``enable`` made), for when systemctl cannot run."""
    units = set()
    for line in text.splitlines():
        parent, _, unit = line.strip().rpartition("/")
        if parent.endswith((".wants", ".requires")) and "." in unit:
            units.add(unit)
    return sorted(units)


def init_name(comm: str, sbin_init: str) -> str:
    """The init system from PID 1's name and where ``/sbin/init`` points."""
    comm = comm.strip()
    target = sbin_init.strip()
    if comm == "systemd" or target.endswith("/systemd"):
        return "systemd"
    for name in ("openrc-init", "runit", "busybox", "upstart", "s6-svscan"):
        if name in comm or target.endswith(name):
            return name
    if comm == "init" and target.endswith("/init"):
        return "sysvinit"
    return comm or "unknown"


def rsync_pattern(path: str) -> str:
    """An anchored rsync pattern matching exactly ``path`` (wildcards escaped)."""
    return "/" + re.sub(r"([*?\[\\])", r"\\\1", path.strip("/"))


def exclude_rules(mounts: list[Mount], excludes: list[str]) -> list[str]:
    """rsync filter rules: a skipped mount keeps its (empty) directory, its content does
    not come; a user's ``--exclude`` leaves the path out entirely."""
    rules = []
    for m in mounts:
        if not m.included and m.path != "/":
            rules.append(f"- {rsync_pattern(m.path)}/*")
    rules += [f"- {rsync_pattern(p)}" for p in excludes]
    return rules


def check_excludes(excludes: list[str]) -> list[str]:
    out = []
    for p in excludes:
        if not p.startswith("/") or "\n" in p or "\x00" in p or p.rstrip("/") == "":
            raise InvalidInput(f"--exclude {p!r} must be an absolute path below /")
        if ".." in p.split("/"):
            raise InvalidInput(f"--exclude {p!r} must not contain ..")
        out.append("/" + p.strip("/"))
    return out


# gathering ------------------------------------------------------------------------------------
def gather(src: SourceMachine, excludes: list[str]) -> Inventory:
    """Ask the source everything the conversion needs to know (a few small commands)."""
    excludes = check_excludes(excludes)
    osr = parse_os_release(src.read("/etc/os-release") or src.read("/usr/lib/os-release") or "")
    comm = src.read("/proc/1/comm") or ""
    sbin = src.run(["readlink", "-f", "/sbin/init"]).stdout
    mountinfo = src.read("/proc/self/mountinfo") or ""
    mounts = parse_mountinfo(mountinfo)
    sized = []
    total = 0
    for m in mounts:
        if m.included:
            size = _du(src, m.path)
            sized.append(Mount(**{**asdict(m), "size": size}))
            total += size or 0
        else:
            sized.append(m)
    for p in excludes:
        total -= _du(src, p) or 0
    ip_ok = src.has("ip")
    interfaces = parse_ip_addr(src.run(["ip", "-j", "addr"]).stdout) if ip_ok else []
    routes = parse_ip_route(src.run(["ip", "-j", "route"]).stdout) if ip_ok else []
    netconf = []
    for d in ("/etc/network/interfaces", "/etc/systemd/network", "/etc/netplan",
              "/etc/NetworkManager/system-connections", "/etc/sysconfig/network-scripts"):
        r = src.run(["ls", "-1", "--", d])
        if r.status == 0:
            netconf += [d] if d.endswith("interfaces") else \
                [f"{d}/{n}" for n in r.stdout.split() if n]
    r = src.run(["systemctl", "list-unit-files", "--state=enabled", "--no-legend", "--no-pager"])
    services, source_of = parse_enabled_units(r.stdout), "systemctl"
    if r.status != 0 or not services:
        found = src.run(["find", "/etc/systemd/system", "-mindepth", "2", "-maxdepth", "2"])
        services, source_of = parse_wants_links(found.stdout), "wants symlinks"
    tools = {t: src.has(t) for t in ("rsync", "tar")}
    return Inventory(
        source=str(src.spec), distribution=osr.get("PRETTY_NAME", "unknown"),
        os_id=osr.get("ID", "unknown"), version=osr.get("VERSION_ID", ""),
        hostname=(src.read("/etc/hostname") or "").strip(),
        init=init_name(comm, sbin), kernel=src.run(["uname", "-r"]).stdout.strip(),
        mounts=sized, interfaces=interfaces, routes=routes, network_config=netconf,
        services=services, services_from=source_of, excludes=excludes,
        total_size=max(total, 0), tools=tools)


def _du(src: SourceMachine, path: str) -> int | None:
    r = src.run(["du", "-sx", "--block-size=1", "--", path], timeout=600)
    try:
        return int(r.stdout.split()[0])
    except (IndexError, ValueError):
        return None
