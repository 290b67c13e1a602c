"""An LXC container's config (``lxc-create``'s ``config``): read, and mapped onto the
runtime's keys. Both are pure: nothing here looks at the machine beyond the config files.

``read_config`` follows the files the config ``lxc.include``s (the distribution's shared
configs only noted: the runtime's rendered config provides their settings). Legacy LXC 2.x
names (``lxc.network.*``, ``lxc.rootfs``, ``lxc.utsname``, ``lxc.id_map``...) are read as
their LXC 3+ names, the way ``lxc-update-config`` rewrites them, and the rewrite is noted.

The one design decision: every LXC key lands in exactly one of three lists of the
``Conversion`` - ``converted`` (it became a runtime key), ``replaced`` (the runtime sets the
same thing its own way: ttys, console, AppArmor, the distribution's ``common.conf``...) or
``unconvertible`` (something the container had that the runtime cannot give it: a host bind
mount, an environment variable, autostart). Nothing is dropped silently.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from migrator.core.errors import InvalidInput, NotFound
from migrator.runtime import config as cfg
from migrator.runtime.lxc import PRIVILEGED_DEVICES

# The distribution's shared configs (common.conf, userns.conf, nesting.conf...): their
# settings are what the runtime's own rendered config provides, so they are not expanded.
DIST_CONFIG_DIR = Path("/usr/share/lxc/config")
MAX_INCLUDE_DEPTH = 8
MAX_CONFIG_BYTES = 1 << 20

# LXC 2.x key -> LXC 3+ key (the renames ``lxc-update-config`` applies).
LEGACY_KEYS = {
    "lxc.id_map": "lxc.idmap",
    "lxc.pts": "lxc.pty.max",
    "lxc.tty": "lxc.tty.max",
    "lxc.devttydir": "lxc.tty.dir",
    "lxc.aa_profile": "lxc.apparmor.profile",
    "lxc.aa_allow_incomplete": "lxc.apparmor.allow_incomplete",
    "lxc.se_context": "lxc.selinux.context",
    "lxc.mount": "lxc.mount.fstab",
    "lxc.utsname": "lxc.uts.name",
    "lxc.seccomp": "lxc.seccomp.profile",
    "lxc.console": "lxc.console.path",
    "lxc.haltsignal": "lxc.signal.halt",
    "lxc.rebootsignal": "lxc.signal.reboot",
    "lxc.stopsignal": "lxc.signal.stop",
    "lxc.syslog": "lxc.log.syslog",
    "lxc.loglevel": "lxc.log.level",
    "lxc.logfile": "lxc.log.file",
    "lxc.init_cmd": "lxc.init.cmd",
    "lxc.init_uid": "lxc.init.uid",
    "lxc.init_gid": "lxc.init.gid",
    "lxc.rootfs": "lxc.rootfs.path",
}
REMOVED_KEYS = ("lxc.pivotdir", "lxc.kmsg", "lxc.rootfs.backend")
_LEGACY_LIMIT = re.compile(r"^lxc\.limit\.(.+)$")
_LEGACY_NET_INDEXED = re.compile(r"^lxc\.network\.(\d+)\.(.+)$")

# Keys the runtime sets its own way, with the reason shown in the plan.
REPLACED = {
    "lxc.tty.max": "the runtime gives no ttys (lxc.tty.max = 0: CRIU cannot dump them)",
    "lxc.tty.dir": "the runtime gives no ttys",
    "lxc.pty.max": "the runtime sets its own pty limit",
    "lxc.console.path": "the runtime gives no console (lxc.console.path = none, for CRIU)",
    "lxc.console.logfile": "the runtime gives no console",
    "lxc.console.size": "the runtime gives no console",
    "lxc.console.rotate": "the runtime gives no console",
    "lxc.console.buffer.size": "the runtime gives no console",
    "lxc.autodev": "the runtime sets lxc.autodev = 1",
    "lxc.mount.auto": "the runtime mounts proc, sys and cgroup itself",
    "lxc.signal.halt": "the runtime picks the halt signal for the container's init",
    "lxc.signal.reboot": "the runtime's default",
    "lxc.signal.stop": "the runtime's default",
    "lxc.log.file": "the runtime keeps its own LXC log per container",
    "lxc.log.level": "the runtime keeps its own LXC log per container",
    "lxc.log.syslog": "the runtime keeps its own LXC log per container",
    "lxc.apparmor.profile": "no AppArmor profile line (none on this kernel; CRIU restore "
                            "fails with one)",
    "lxc.apparmor.allow_nesting": "no AppArmor profile line",
    "lxc.apparmor.allow_incomplete": "no AppArmor profile line",
    "lxc.apparmor.raw": "no AppArmor profile line",
    "lxc.selinux.context": "no SELinux on these hosts",
    "lxc.rootfs.path": "copied into a volume of the pool",
    "lxc.rootfs.mount": "the runtime mounts the volume itself",
    "lxc.hook.clone": "cloning is the runtime's `copy`",
    "lxc.hook.destroy": "deleting is the runtime's `delete`",
}
# What the runtime drops for a privileged container (runtime/lxc.py's render_config).
RUNTIME_CAP_DROP = frozenset({"sys_module", "mac_admin", "mac_override", "sys_time",
                              "sys_rawio"})
STANDARD_DEVICES = frozenset({*PRIVILEGED_DEVICES, "c *:* m", "b *:* m"})
READABLE_ROOTFS = ("dir", "btrfs")  # a btrfs subvolume is a plain tree to read
RUNTIME_FUSE_MOUNT = ("/sys/fs/fuse/connections", "sys/fs/fuse/connections")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ARCH_NAMES = {"x86_64": {"x86_64", "amd64", "linux64", "x86-64"},
               "aarch64": {"aarch64", "arm64"}}


# parsing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigLine:
    """One ``key = value`` of an LXC config, its key in LXC 3+ form, and where it was."""

    key: str
    value: str
    where: str  # file:line
    written: str = ""  # the key as written, when it was a legacy name

    def __str__(self) -> str:
        return f"{self.key} = {self.value}"


@dataclass
class ParsedConfig:
    lines: list[ConfigLine] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)  # distribution includes, not expanded
    expanded: list[str] = field(default_factory=list)  # other files whose lines were read
    bad: list[str] = field(default_factory=list)  # lines that are not KEY = VALUE
    legacy: list[str] = field(default_factory=list)  # "old -> new" renames applied


class _Parser:
    """Turns config text into ``ConfigLine``s; keeps the legacy network counter across
    included files (a 2.x ``lxc.network.type`` line opens the next interface)."""

    def __init__(self) -> None:
        self.out = ParsedConfig()
        self.net_index = -1

    def feed(self, text: str, origin: str) -> list[ConfigLine]:
        fresh: list[ConfigLine] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{origin}:{number}"
            key, sep, value = line.partition("=")
            key, value = key.strip(), unquote(value.strip())
            if not sep or not key or " " in key:
                self.out.bad.append(f"{where}: {line!r} is not KEY = VALUE")
                continue
            new = self._modern(key)
            if new != key:
                self.out.legacy.append(f"{key} -> {new}")
            cl = ConfigLine(new, value, where, key if new != key else "")
            fresh.append(cl)
        return fresh

    def _modern(self, key: str) -> str:
        if key in LEGACY_KEYS:
            return LEGACY_KEYS[key]
        m = _LEGACY_LIMIT.match(key)
        if m:
            return f"lxc.prlimit.{m.group(1)}"
        m = _LEGACY_NET_INDEXED.match(key)
        if m:
            return f"lxc.net.{m.group(1)}.{_net_subkey(m.group(2))}"
        if key.startswith("lxc.network."):
            sub = key[len("lxc.network."):]
            if sub == "type":
                self.net_index += 1
            return f"lxc.net.{max(self.net_index, 0)}.{_net_subkey(sub)}"
        return key


def _net_subkey(sub: str) -> str:
    # 2.x wrote the address lists as lxc.network.ipv4 / ipv6
    return {"ipv4": "ipv4.address", "ipv6": "ipv6.address"}.get(sub, sub)


def unquote(value: str) -> str:
    """A value without the one pair of quotes around it, as LXC reads it."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_config_text(text: str, origin: str = "config") -> ParsedConfig:
    """Parse one config text (includes are kept as lines, not followed)."""
    p = _Parser()
    for cl in p.feed(text, origin):
        _apply(p.out.lines, cl)
    return p.out


def read_config(path: Path) -> ParsedConfig:
    """Parse ``path`` and every file it includes (a directory: its ``*.conf``, sorted),
    except the distribution's shared configs, which are only noted."""
    p = _Parser()

    def read(file: Path, depth: int) -> None:
        if depth > MAX_INCLUDE_DEPTH:
            raise InvalidInput(f"{file}: includes nest deeper than {MAX_INCLUDE_DEPTH}",
                               "is there an include loop?")
        try:
            with open(file, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise NotFound(f"cannot read LXC config {file}: {e.strerror}") from e
        if len(data) > MAX_CONFIG_BYTES:
            raise InvalidInput(f"{file} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
        for cl in p.feed(data.decode(errors="replace"), str(file)):
            if cl.key != "lxc.include":
                _apply(p.out.lines, cl)
                continue
            target = Path(cl.value)
            if not target.is_absolute():
                p.out.bad.append(f"{cl.where}: relative include {cl.value!r}")
            elif _is_under(target, DIST_CONFIG_DIR):
                p.out.includes.append(cl.value)
            elif target.is_dir():
                p.out.expanded.append(cl.value)
                for conf in sorted(target.glob("*.conf")):
                    read(conf, depth + 1)
            elif target.is_file():
                p.out.expanded.append(cl.value)
                read(target, depth + 1)
            else:
                p.out.bad.append(f"{cl.where}: included {cl.value} does not exist")

    read(path, 0)
    return p.out


def _apply(lines: list[ConfigLine], cl: ConfigLine) -> None:
    """Append ``cl``; an empty value clears what came before, as LXC does for list keys
    (``lxc.cap.drop =``, ``lxc.idmap =``, ``lxc.net.0 =``...)."""
    if cl.value == "" and cl.key not in REPLACED:
        lines[:] = [x for x in lines
                    if x.key != cl.key and not x.key.startswith(cl.key + ".")]
        return
    lines.append(cl)


def _is_under(path: Path, parent: Path) -> bool:
    try:
        Path(os.path.normpath(path)).relative_to(parent)
    except ValueError:
        return False
    return True


# conversion --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceIdMap:
    """The original's single id range: container 0.. -> host ``base``.. (uids and gids)."""

    base: int
    size: int


@dataclass
class Conversion:
    """What the LXC config becomes. ``problems`` block the import; everything else is
    reported in one of the three lists."""

    config: dict[str, str] = field(default_factory=dict)
    idmap: SourceIdMap | None = None
    rootfs: str | None = None
    rootfs_backend: str = "dir"
    ipv4: str | None = None
    hwaddr: str | None = None
    converted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unconvertible: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def privileged(self) -> bool:
        return self.idmap is None


def convert_config(parsed: ParsedConfig, name: str, machine: str | None = None) -> Conversion:
    """Map the parsed LXC config of container ``name`` onto the runtime's keys."""
    conv = Conversion()
    machine = machine or os.uname().machine
    conv.replaced += [f"lxc.include = {i} (the distribution's defaults; the runtime writes "
                      "its own equivalent)" for i in parsed.includes]
    conv.notes += [f"read the included {e}" for e in parsed.expanded]
    conv.notes += [f"legacy key {r}" for r in dict.fromkeys(parsed.legacy)]
    conv.unconvertible += parsed.bad
    nets: dict[int, list[ConfigLine]] = {}
    idmaps: list[ConfigLine] = []
    cap_drop: set[str] = set()
    cap_lines: list[ConfigLine] = []
    for cl in parsed.lines:
        key, value = cl.key, cl.value
        m = re.match(r"^lxc\.net\.(\d+)(?:\.(.+))?$", key)
        if m:
            nets.setdefault(int(m.group(1)), []).append(cl)
        elif key == "lxc.idmap":
            idmaps.append(cl)
        elif key == "lxc.cap.drop":
            cap_lines.append(cl)
            cap_drop.update(value.split())
        elif key == "lxc.rootfs.path":
            backend, sep, path = value.partition(":")
            if not sep or value.startswith("/"):
                backend, path = "dir", value
            conv.rootfs_backend, conv.rootfs = backend, path
            conv.replaced.append(f"{cl} ({REPLACED[key]})")
        elif key in REMOVED_KEYS:
            conv.replaced.append(f"{cl} (removed in LXC 3.0; ignored)")
        elif key in REPLACED:
            conv.replaced.append(f"{cl} ({REPLACED[key]})")
        elif key == "lxc.uts.name":
            if value == name:
                conv.replaced.append(f"{cl} (the runtime names the host after the container)")
            else:
                conv.unconvertible.append(f"{cl} (the runtime sets the hostname to {name!r})")
        elif key == "lxc.arch":
            if value in _ARCH_NAMES.get(machine, {machine}):
                conv.replaced.append(f"{cl} (this host's architecture)")
            else:
                conv.problems.append(f"{cl}: not this host's architecture ({machine})")
        elif key == "lxc.seccomp.profile":
            if Path(value) == DIST_CONFIG_DIR / "common.seccomp":
                conv.replaced.append(f"{cl} (the runtime uses the same profile)")
            else:
                conv.unconvertible.append(f"{cl} (the runtime applies LXC's common.seccomp)")
        elif key == "lxc.init.cmd":
            if value.split()[:1] == ["/sbin/init"]:
                conv.replaced.append(f"{cl} (the runtime runs /sbin/init)")
            else:
                conv.unconvertible.append(f"{cl} (the runtime always runs /sbin/init)")
        elif re.match(r"^lxc\.cgroup2?\.devices\.(allow|deny)$", key):
            standard = value in STANDARD_DEVICES or (key.endswith("deny") and value == "a")
            if standard:
                conv.replaced.append(f"{cl} (in the runtime's device list)")
            else:
                conv.unconvertible.append(f"{cl} (the runtime allows only LXC's standard "
                                          "devices)")
        elif key.startswith(("lxc.cgroup.", "lxc.cgroup2.")):
            _convert_cgroup(cl, conv)
        elif key in ("lxc.start.auto", "lxc.start.delay", "lxc.start.order", "lxc.group"):
            if value in ("", "0"):
                conv.replaced.append(f"{cl} (the default)")
            else:
                conv.unconvertible.append(f"{cl} (the runtime has no autostart: start it "
                                          f"with `migrate start {name}`)")
        elif key == "lxc.environment":
            conv.unconvertible.append(f"{cl} (the runtime has no environment keys; set it "
                                      "inside the container, e.g. in /etc/environment)")
        elif key == "lxc.mount.entry":
            _convert_mount(cl, conv)
        elif key == "lxc.mount.fstab":
            conv.unconvertible.append(f"{cl} (its mounts are not converted: the runtime has "
                                      "no mount entries)")
        elif (key, value) in (("lxc.ephemeral", "0"), ("lxc.rootfs.options", "")):
            conv.replaced.append(f"{cl} (the default)")
        elif key.startswith("lxc.hook."):
            conv.unconvertible.append(f"{cl} (the runtime runs no hooks)")
        elif not key.startswith("lxc."):
            conv.unconvertible.append(f"{cl.where}: {cl} (not an LXC key)")
        else:
            conv.unconvertible.append(f"{cl} (no equivalent in the runtime)")
    _convert_idmap(idmaps, conv)
    _convert_caps(cap_lines, cap_drop, conv)
    _convert_network(nets, conv)
    if conv.rootfs is None:
        conv.problems.append("no lxc.rootfs.path: where is the container's rootfs?")
    elif conv.rootfs_backend not in READABLE_ROOTFS:
        conv.problems.append(
            f"the rootfs is on a {conv.rootfs_backend!r} backing store "
            f"({conv.rootfs_backend}:{conv.rootfs}); only a directory rootfs (dir, or a btrfs "
            "subvolume) can be adopted")
    elif not conv.rootfs.startswith("/"):
        conv.problems.append(f"lxc.rootfs.path {conv.rootfs!r} is not an absolute path")
    conv.config["security.privileged"] = "true" if conv.privileged else "false"
    return conv


def _convert_cgroup(cl: ConfigLine, conv: Conversion) -> None:
    sub = cl.key.split(".", 2)[2]
    if sub in ("memory.limit_in_bytes", "memory.max"):
        if cl.value in ("-1", "max"):
            conv.replaced.append(f"{cl} (no limit, the default)")
            return
        try:
            conv.config["limits.memory"] = cfg.validate("limits.memory", cl.value)
        except InvalidInput as e:
            conv.unconvertible.append(f"{cl} ({e.message})")
            return
        conv.converted.append(f"{cl} -> limits.memory={conv.config['limits.memory']}")
    elif sub in ("cpuset.cpus",):
        try:
            cpus = parse_cpuset(cl.value)
            conv.config["limits.cpu"] = cfg.validate("limits.cpu", str(len(cpus)))
        except InvalidInput as e:
            conv.unconvertible.append(f"{cl} ({e.message})")
            return
        conv.converted.append(f"{cl} -> limits.cpu={len(cpus)}")
        if cpus != list(range(len(cpus))):
            conv.notes.append(f"the original was pinned to CPUs {cl.value}; the runtime pins "
                              f"limits.cpu={len(cpus)} to CPUs 0-{len(cpus) - 1}")
    else:
        conv.unconvertible.append(f"{cl} (the runtime has limits.memory and limits.cpu only)")


def parse_cpuset(text: str) -> list[int]:
    """``0-1,3`` -> [0, 1, 3] (the cgroup cpuset list format)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first = int(lo)
            last = int(hi) if sep else first
            if first < 0 or last < first:
                raise ValueError(part)
            out.update(range(first, last + 1))
    except ValueError as e:
        raise InvalidInput(f"invalid cpuset {text!r}", "e.g. 0-1,3") from e
    return sorted(out)


def _convert_mount(cl: ConfigLine, conv: Conversion) -> None:
    fields = cl.value.split()
    if len(fields) < 4:
        conv.unconvertible.append(f"{cl} (not an fstab line)")
        return
    src, target, fstype, options = fields[:4]
    if (src, target.strip("/")) == RUNTIME_FUSE_MOUNT:
        conv.replaced.append(f"{cl} (the runtime mounts it too)")
    elif "bind" in options.split(",") and src.startswith("/"):
        conv.unconvertible.append(
            f"{cl} (host directory {src} at /{target.strip('/')}: the runtime has no host-path "
            "disk devices; copy the data into a custom volume and attach it)")
    else:
        conv.unconvertible.append(f"{cl} ({fstype} mount at /{target.strip('/')}: the runtime "
                                  "has no mount entries)")


def _convert_idmap(lines: list[ConfigLine], conv: Conversion) -> None:
    if not lines:
        return
    ranges: dict[str, tuple[int, int, int]] = {}
    for cl in lines:
        parts = cl.value.split()
        try:
            kind, ns, host, size = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        except (IndexError, ValueError):
            conv.problems.append(f"{cl}: not 'u|g|b NSID HOSTID RANGE'")
            return
        kinds = ["u", "g"] if kind == "b" else [kind]
        for k in kinds:
            if k not in ("u", "g") or k in ranges:
                conv.problems.append(
                    f"{cl}: the runtime maps one range of uids and one of gids; this "
                    "container's map has more")
                return
            ranges[k] = (ns, host, size)
    u, g = ranges.get("u"), ranges.get("g")
    if u is None or g is None or u != g or u[0] != 0:
        conv.problems.append(
            "lxc.idmap: the runtime needs the same single range for uids and gids, from "
            f"container id 0 (found {' / '.join(str(x) for x in lines)})")
        return
    conv.idmap = SourceIdMap(u[1], u[2])
    conv.converted += [f"{cl} -> unprivileged (ids shifted to the runtime's map)" for cl in lines]


def _convert_caps(lines: list[ConfigLine], drop: set[str], conv: Conversion) -> None:
    runtime = RUNTIME_CAP_DROP if conv.privileged else frozenset()
    extra = sorted(drop - runtime)
    for cl in lines:
        if extra and set(cl.value.split()) & set(extra):
            keeps = "them" if conv.privileged else "them inside its user namespace"
            conv.unconvertible.append(
                f"{cl} (the runtime does not drop {', '.join(extra)}: the container keeps "
                f"{keeps})")
        else:
            conv.replaced.append(f"{cl} (the runtime drops the standard set)")
    more = sorted(runtime - drop)
    if lines and more:
        conv.notes.append(f"the runtime also drops {', '.join(more)}")


def _convert_network(nets: dict[int, list[ConfigLine]], conv: Conversion) -> None:
    for index in sorted(nets):
        lines = nets[index]
        if index != 0:
            conv.unconvertible += [f"{cl} (the runtime gives one interface, eth0)"
                                   for cl in lines]
            continue
        types = [cl.value for cl in lines if _net_sub(cl) == "type"]
        kind = types[-1] if types else "veth"
        if kind == "empty":
            conv.replaced += [f"{cl} (the original had no network)" for cl in lines]
            conv.notes.append("the original had no network; the runtime gives it eth0 on "
                              "its bridge")
            continue
        if kind == "none":
            conv.unconvertible += [f"{cl} (the original shared the host's network; the "
                                   "runtime gives it eth0 on its bridge)" for cl in lines]
            continue
        for cl in lines:
            _convert_nic_line(cl, _net_sub(cl), kind, conv)


def _net_sub(cl: ConfigLine) -> str:
    """``lxc.net.0.ipv4.address`` -> ``ipv4.address``."""
    parts = cl.key.split(".", 3)
    return parts[3] if len(parts) > 3 else ""


def _convert_nic_line(cl: ConfigLine, sub: str, kind: str, conv: Conversion) -> None:
    if sub == "type" and kind == "veth":
        conv.converted.append(f"{cl} -> eth0, a veth on the runtime's bridge")
    elif sub == "type":
        conv.unconvertible.append(f"{cl} (becomes a veth on the runtime's bridge)")
    elif sub == "link":
        conv.converted.append(f"{cl} -> the runtime's bridge")
    elif sub == "flags":
        conv.replaced.append(f"{cl} (the runtime brings eth0 up)")
    elif sub == "name" and cl.value == "eth0":
        conv.replaced.append(f"{cl} (the runtime names it eth0)")
    elif sub == "hwaddr":
        mac = cl.value.lower()
        if _MAC.match(mac):
            conv.hwaddr = mac
            conv.config["volatile.eth0.hwaddr"] = mac
            conv.converted.append(f"{cl} -> volatile.eth0.hwaddr (kept)")
        else:
            conv.replaced.append(f"{cl} (a template, not a MAC: the runtime makes one)")
    elif sub == "ipv4.address":
        first, *rest = cl.value.split() or [""]
        try:
            address = ipaddress.IPv4Interface(first)
        except ValueError:
            conv.unconvertible.append(f"{cl} (not an IPv4 address)")
            return
        if conv.ipv4 is not None or rest:
            conv.unconvertible.append(f"{cl} (the runtime gives one address; "
                                      f"{conv.ipv4 or address.ip} is kept)")
        if conv.ipv4 is None:
            conv.ipv4 = str(address.ip)
            conv.converted.append(f"{cl} -> the container's address, if free in the "
                                  "runtime's network")
    elif sub == "ipv4.gateway":
        conv.replaced.append(f"{cl} (the runtime's bridge is the gateway)")
    else:
        conv.unconvertible.append(f"{cl} (no equivalent in the runtime)")
