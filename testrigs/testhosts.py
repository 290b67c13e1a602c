"""Test hosts on this one machine: network namespaces joined by a private TEST-NET link, each
with its own sshd, migrator state root, pools and images, so code can SSH from host to host.

Topology (prefix ``mh``, hosts ``a`` and ``b``; ``c`` would be .12, and so on)::

    mh-sw   bridge br0, no address     ports p-a, p-b (veth ends)
    mh-a    link0 198.51.100.10/24     (veth peer of p-a)   sshd on 198.51.100.10:22
            migbr0 192.0.2.1/24        containers' bridge (Host.init), lo up
    mh-b    link0 198.51.100.11/24     (veth peer of p-b)   sshd on 198.51.100.11:22
            migbr0 192.0.2.1/24        the same container subnet: containers keep their
                                       address when moved, and each bridge is in its own
                                       namespace, so the two never meet (``isolated``)

With ``network="shared"`` (``make hosts``: ``up --network shared``) the container bridges
are one segment instead, joined over the link by VXLAN (id 16, unicast to every other host,
see runtime/network.py), as real hosts are joined with ``migrate init --vxlan-*``::

    mh-a    link0 198.51.100.10/24 mtu 1550   vx-migbr0 (VXLAN 16, peers .11 .12, port of migbr0)
            migbr0 192.0.2.1/24   containers 192.0.2.10-39
    mh-b    link0 198.51.100.11/24 mtu 1550   vx-migbr0 (VXLAN 16, peers .10 .12)
            migbr0 192.0.2.2/24   containers 192.0.2.40-69
    mh-c    ... 192.0.2.3/24, containers 192.0.2.70-99 (up to 8 hosts: 30 addresses each)

Every bridge has its own address and every host its own range, so each host reaches every
container, and a container answers on its address from every host wherever it runs. The
link's MTU is 1550 so that the tunnel carries containers' full 1500-byte frames. The mode is
recorded in hosts.json: hosts under one base are all shared or all isolated. The Python API
(``up``) makes isolated hosts unless asked; the command line makes shared ones.

Nothing of it is in the root namespace (no veth end, no address, no route), every namespace
has forwarding off and no default route, and no NAT or iptables rule is made anywhere: the
link and the container bridges reach nothing outside their namespaces.

Files under the base (``/var/tmp/migrator-hosts``)::

    hosts.json                  prefix and host names in order (a name's index is its address)
    client/id_ed25519[.pub]     the one client key every host authorizes
    client/known_hosts          "198.51.100.10 ssh-ed25519 AAAA..." for every host
    NAME/root/                  the host's migrator state root
    NAME/ssh/                   host key, sshd_config, authorized_keys, sshd.pid, sshd.log

sshd is started with ``nsenter --net`` rather than ``ip netns exec``: the latter also gives
the daemon a private (slave) mount namespace, so a pool that ``migrate agent`` mounted in an
SSH session would be invisible to the rest of the machine and would keep its loop device
until the session's namespace died. With ``nsenter --net`` sessions share the machine's mounts
like every other migrator process (lxc commands still get their own /sys via nsexec.py).

``up`` is idempotent (a second run only checks); ``down`` finds everything by the hosts it
recorded, the PID files it wrote and the namespace prefix, so it also cleans up after a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrator.backends import zfs
from migrator.core import proc
from migrator.core.errors import InvalidInput, MigratorError, NotFound
from migrator.core.netns import netns_path, socket_in_netns
from migrator.runtime import network
from migrator.runtime.host import Host
from migrator.runtime.images import ImageStore
from migrator.runtime.lxc import LxcDriver
from migrator.runtime.teardown import teardown

DEFAULT_BASE = Path("/var/tmp/migrator-hosts")
DEFAULT_PREFIX = "mh"
LINK_NET = "198.51.100.0/24"
LINK_FIRST = 10  # host i gets 198.51.100.(10 + i)
LINK_IF = "link0"
SWITCH_BRIDGE = "br0"
CONTAINER_SUBNET = "192.0.2.1/24"  # the same on every isolated host, see the module docstring
NETWORKS = ("isolated", "shared")
SHARED_VNI = 16
SHARED_MTU = 1550  # the link's MTU on a shared network: 1500 + VXLAN's 50 bytes
SHARED_RANGE = 30  # addresses per host on a shared network: host i has 10+30i .. 39+30i
SHARED_MAX = 8
SSH_PORT = 22
SSHD = "/usr/sbin/sshd"
POOL_SIZES = {"btrfs": "3GiB", "zfs": "2GiB"}
SSHD_READY = 10.0  # seconds for a fresh sshd to write its PID file and send its banner
SSHD_STOP = 5.0  # seconds for SIGTERM before SIGKILL
LEFTOVER_GRACE = 10.0  # seconds an orphaned agent gets to exit on its own
_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # PREFIX-NAME and p-NAME stay within 15 chars

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[hosts] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TestHostSpec:
    """Where one test host lives and how to reach it (all paths absolute)."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    netns: str
    root: Path  # the migrator state root
    link_ip: str
    port: int
    home: Path  # <base>/<name>
    client_key: Path  # private key the host authorizes (shared by all hosts)
    known_hosts: Path  # every host's link IP and host key

    @property
    def ssh_dir(self) -> Path:
        return self.home / "ssh"

    @property
    def host_key(self) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key"

    @property
    def sshd_config(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def pid_file(self) -> Path:
        return self.ssh_dir / "sshd.pid"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def sshd_log(self) -> Path:
        return self.ssh_dir / "sshd.log"


# layout ----------------------------------------------------------------------------------
def _validate(kind: str, name: str) -> str:
    if not _NAME.match(name) or name == "sw":
        raise InvalidInput(
            f"invalid test host {kind} {name!r}",
            "use 1-6 lowercase letters or digits, starting with a letter (not 'sw')",
        )
    return name


def switch_netns(prefix: str) -> str:
    return f"{prefix}-sw"


def _spec(base: Path, prefix: str, name: str, index: int) -> TestHostSpec:
    return TestHostSpec(
        name=name,
        netns=f"{prefix}-{name}",
        root=base / name / "root",
        link_ip=_link_ip(index),
        port=SSH_PORT,
        home=base / name,
        client_key=base / "client" / "id_ed25519",
        known_hosts=base / "client" / "known_hosts",
    )


def _link_ip(index: int) -> str:
    net = ipaddress.IPv4Network(LINK_NET)
    if not 0 <= index < 240:
        raise InvalidInput(f"too many test hosts ({index + 1})")
    return str(net.network_address + LINK_FIRST + index)


def _read_record(base: Path) -> tuple[str, list[str]] | None:
    """(prefix, host names in address order) from ``hosts.json``, or None."""
    try:
        data = json.loads((base / "hosts.json").read_text())
        return str(data["prefix"]), [str(n) for n in data["hosts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def network_mode(base: Path = DEFAULT_BASE) -> str | None:
    """``shared`` or ``isolated`` as recorded under ``base`` (older records: isolated)."""
    try:
        data = json.loads((base.absolute() / "hosts.json").read_text())
    except (OSError, ValueError):
        return None
    mode = data.get("network", "isolated") if isinstance(data, dict) else None
    return mode if mode in NETWORKS else None


def _write_record(base: Path, prefix: str, names: list[str], network_: str = "isolated"
                  ) -> None:
    tmp = base / ".hosts.json.tmp"
    tmp.write_text(json.dumps({"prefix": prefix, "hosts": names, "network": network_},
                              indent=2) + "\n")
    tmp.replace(base / "hosts.json")


def shared_network(index: int, link_ips: Sequence[str]) -> tuple[str, str, network.Overlay]:
    """Host ``index``'s bridge address, address range and VXLAN on a shared network."""
    if not 0 <= index < SHARED_MAX:
        raise InvalidInput(f"a shared test network holds at most {SHARED_MAX} hosts",
                           "use fewer hosts, or isolated ones (--network isolated)")
    net = ipaddress.IPv4Interface(CONTAINER_SUBNET).network
    first = net.network_address + network.FIRST_HOST_OFFSET + SHARED_RANGE * index
    return (f"{net.network_address + 1 + index}/{net.prefixlen}",
            f"{first}-{first + SHARED_RANGE - 1}",
            network.make_overlay(SHARED_VNI, link_ips[index], link_ips))



def hosts(base: Path = DEFAULT_BASE) -> list[TestHostSpec]:
    """The hosts recorded under ``base`` (those ``up`` made), in address order."""
    base = base.absolute()
    rec = _read_record(base)
    if rec is None:
        return []
    prefix, names = rec
    return [_spec(base, prefix, n, i) for i, n in enumerate(names)]


def get(name: str, base: Path = DEFAULT_BASE) -> TestHostSpec:
    for spec in hosts(base):
        if spec.name == name:
            return spec
    raise NotFound(f"no test host {name!r} under {base}", "bring it up: make hosts")


# network ---------------------------------------------------------------------------------
def _ip(netns: str, *args: str, check: bool = True) -> proc.Completed:
    return proc.run(["ip", "-n", netns, *args], check=check)


def _link_exists(netns: str, ifname: str) -> bool:
    return _ip(netns, "-o", "link", "show", "dev", ifname, check=False).returncode == 0


def _no_forwarding(netns: str) -> None:
    """Forwarding off, explicitly: a new namespace inherits IPv4 settings from the root one."""
    proc.run(["nsenter", f"--net={netns_path(netns)}", "sysctl", "-q", "-w",
              "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])


def _ensure_namespace(netns: str) -> None:
    network.ensure_netns(netns)
    _ip(netns, "link", "set", "lo", "up")
    _no_forwarding(netns)


def _ensure_switch(prefix: str) -> None:
    sw = switch_netns(prefix)
    _ensure_namespace(sw)
    if not _link_exists(sw, SWITCH_BRIDGE):
        _ip(sw, "link", "add", SWITCH_BRIDGE, "type", "bridge")
    _ip(sw, "link", "set", SWITCH_BRIDGE, "up")


def _ensure_link(spec: TestHostSpec, prefix: str, mtu: int | None = None) -> None:
    """veth link0 (in the host) <-> p-NAME (a port of the switch bridge); made in place."""
    sw, port = switch_netns(prefix), f"p-{spec.name}"
    if not _link_exists(sw, port):
        if _link_exists(spec.netns, LINK_IF):  # a pair half-made: start it again
            _ip(spec.netns, "link", "del", LINK_IF)
        # created inside the host namespace with its peer placed straight into the switch:
        # no end of it ever appears in the root namespace
        _ip(spec.netns, "link", "add", LINK_IF, "type", "veth", "peer", "name", port,
            "netns", sw)
    _ip(sw, "link", "set", port, "master", SWITCH_BRIDGE)
    if mtu is not None:
        _ip(sw, "link", "set", port, "mtu", str(mtu))
        _ip(spec.netns, "link", "set", LINK_IF, "mtu", str(mtu))
    _ip(sw, "link", "set", port, "up")
    _ip(spec.netns, "addr", "replace", f"{spec.link_ip}/24", "dev", LINK_IF)
    _ip(spec.netns, "link", "set", LINK_IF, "up")


# ssh -------------------------------------------------------------------------------------
def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    os.chmod(path, 0o600)


def _public_key(private: Path) -> str:
    """``ssh-ed25519 AAAA...`` without the comment."""
    return " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])


def _sshd_config(spec: TestHostSpec) -> str:
    # Our own file, not /etc/ssh/sshd_config: no Include, no Subsystem (no sftp), no
    # AcceptEnv (no client environment accepted), no SetEnv or ForceCommand. StrictModes
    # is off because the keys live under /var/tmp, whose sticky 1777 mode it would refuse.
    return "\n".join([
        f"# test host {spec.name} ({spec.netns}); written by testrigs/testhosts.py",
        f"Port {spec.port}",
        "AddressFamily inet",
        f"ListenAddress {spec.link_ip}:{spec.port}",
        f"HostKey {spec.host_key}",
        f"PidFile {spec.pid_file}",
        f"AuthorizedKeysFile {spec.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "",
    ])


def _pid_of(spec: TestHostSpec) -> int | None:
    """The PID in our PID file if that process is still our sshd (not a reused PID)."""
    try:
        pid = int(spec.pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        # sshd rewrites its argv into one title: "sshd: /usr/sbin/sshd -f CONFIG ... [listener]"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if comm != "sshd" or str(spec.sshd_config).encode() not in cmdline:
        return None
    return pid


def _in_netns(pid: int, netns: str) -> bool:
    try:
        a, b = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns_path(netns))
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                tree.setdefault(ppid, []).append(int(d.name))
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _kill_tree(pid: int, timeout: float = SSHD_STOP) -> None:
    """SIGTERM the process and its descendants (SSH sessions), then SIGKILL what is left."""
    tree, todo, pids = _children(), [pid], []
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(tree.get(p, []))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        if not any(_alive(p) for p in pids):
            return


def _banner(netns: str, ip: str, port: int, timeout: float = 2.0) -> bytes:
    with socket_in_netns(netns, (ip, port), timeout) as s:
        s.settimeout(timeout)
        return s.recv(256)


def _ensure_sshd(spec: TestHostSpec) -> int:
    spec.ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _keygen(spec.host_key, f"{spec.netns} host key")
    authorized = f'from="{LINK_NET}" {_public_key(spec.client_key)} migrator test client\n'
    if not spec.authorized_keys.exists() or spec.authorized_keys.read_text() != authorized:
        spec.authorized_keys.write_text(authorized)
    config = _sshd_config(spec)
    changed = not spec.sshd_config.exists() or spec.sshd_config.read_text() != config
    if changed:
        spec.sshd_config.write_text(config)
    pid = _pid_of(spec)
    if pid is not None and not changed and _in_netns(pid, spec.netns):
        return pid
    if pid is not None:  # old config, or left in a namespace that was deleted meanwhile
        _kill_tree(pid)
    spec.pid_file.unlink(missing_ok=True)
    # the privilege separation directory sshd insists on (PID 1 is no systemd to make it)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    # sshd daemonizes: the command returns once it is listening, and the daemon writes the
    # PID file. -E: there is no syslog daemon here, so the log goes to our file.
    proc.run(["nsenter", f"--net={netns_path(spec.netns)}", SSHD, "-f", str(spec.sshd_config),
              "-E", str(spec.sshd_log)], timeout=30,
             hint=f"see {spec.sshd_log}")
    deadline = time.monotonic() + SSHD_READY
    while True:
        pid = _pid_of(spec)
        if pid is not None:
            with contextlib.suppress(OSError):
                if _banner(spec.netns, spec.link_ip, spec.port).startswith(b"SSH-2.0-"):
                    return pid
        if time.monotonic() > deadline:
            raise MigratorError(f"sshd of test host {spec.name} did not come up",
                                f"see {spec.sshd_log}")
        time.sleep(0.05)


def _write_known_hosts(specs: Iterable[TestHostSpec], path: Path) -> None:
    lines = [f"{s.link_ip} {_public_key(s.host_key)}\n" for s in specs
             if s.host_key.with_name(s.host_key.name + ".pub").exists()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)


# state root ------------------------------------------------------------------------------
def _ensure_state(spec: TestHostSpec, pools: Sequence[str], images: Sequence[str],
                  log: Log, shared: tuple[str, str, network.Overlay] | None = None) -> None:
    h = Host(spec.root)
    try:
        if shared is None:
            h.init(spec.netns, CONTAINER_SUBNET, None)
        else:
            subnet, addr_range, overlay = shared
            for w in h.init(spec.netns, subnet, None, addr_range=addr_range, overlay=overlay):
                log(f"warning: host {spec.name}: {w}")
        existing = {p.name for p in h.state.list_pools()}
        for driver in pools:
            if driver == "zfs" and not zfs.daemon_running():
                log(f"warning: host {spec.name}: no zfs pool, zfs-fuse is not running "
                    "(make setup starts it)")
                continue
            if driver in existing:
                h.backend(driver)  # mounted again if it is not (e.g. after a reboot)
            else:
                h.create_pool(driver, driver, None, POOL_SIZES.get(driver))
        store = ImageStore(h.images_dir, h.state)
        for recipe in images:
            try:
                store.find(recipe)
            except NotFound:
                store.build(recipe, None, lambda m: None)  # cached machine-wide: an import
    finally:
        h.close()


# up / down -------------------------------------------------------------------------------
def up(
    names: Sequence[str] = ("a", "b"),
    base: Path = DEFAULT_BASE,
    pools: Sequence[str] = ("dir", "btrfs", "zfs"),
    images: Sequence[str] = ("busybox",),
    prefix: str = DEFAULT_PREFIX,
    log: Log = _stderr,
    network_: str | None = None,
) -> list[TestHostSpec]:
    """Bring up (or check) the named hosts; returns their specs in the order given.

    ``network_``: ``isolated`` (each host's containers on its own bridge, the same subnet
    everywhere) or ``shared`` (one segment over VXLAN, see the module docstring); by default
    what the base records, else isolated. Hosts added to a shared network later are added
    to every running host's peers."""
    _validate("prefix", prefix)
    if not names:
        raise InvalidInput("no test host named", "give one or more names, e.g. a,b")
    for n in names:
        _validate("name", n)
    base = base.absolute()
    rec = _read_record(base)
    if rec is not None and rec[0] != prefix:
        raise InvalidInput(
            f"{base} holds test hosts with prefix {rec[0]!r}, not {prefix!r}",
            "take them down first (python -m testrigs.testhosts down), or use another base",
        )
    recorded = rec[1] if rec else []
    was = network_mode(base) if rec else None
    mode = network_ or was or "isolated"
    if mode not in NETWORKS:
        raise InvalidInput(f"unknown test network {mode!r}", "shared or isolated")
    if was is not None and was != mode and recorded:
        raise InvalidInput(
            f"{base} holds {was} test hosts, not {mode} ones",
            "take them down first (python -m testrigs.testhosts down), or use another base")
    all_names = recorded + [n for n in dict.fromkeys(names) if n not in recorded]
    if mode == "shared" and len(all_names) > SHARED_MAX:
        raise InvalidInput(f"a shared test network holds at most {SHARED_MAX} hosts",
                           "use fewer hosts, or isolated ones (--network isolated)")
    # 0711 down to each state root: unprivileged containers' root must traverse to rootfs
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    _write_record(base, prefix, all_names, mode)  # first, so `down` finds whatever follows
    client = base / "client"
    client.mkdir(mode=0o700, exist_ok=True)
    specs = {n: _spec(base, prefix, n, i) for i, n in enumerate(all_names)}
    _keygen(specs[all_names[0]].client_key, "migrator test client")

    link_ips = [specs[n].link_ip for n in all_names]

    def shared(n: str) -> tuple[str, str, network.Overlay] | None:
        return shared_network(all_names.index(n), link_ips) if mode == "shared" else None

    _ensure_switch(prefix)
    for n in dict.fromkeys(names):
        spec = specs[n]
        spec.home.mkdir(exist_ok=True)
        os.chmod(spec.home, 0o711)
        _ensure_namespace(spec.netns)
        _ensure_link(spec, prefix, SHARED_MTU if mode == "shared" else None)
        _ensure_state(spec, pools, images, log, shared(n))  # also migbr0 (and its VXLAN)
        _ensure_sshd(spec)
    for n in all_names:  # hosts up before: every host of a shared network is their peer
        spec = specs[n]
        if mode == "shared" and n not in names and (spec.root / "state.db").exists() \
                and network.netns_exists(spec.netns):
            h = Host(spec.root)
            try:
                subnet, addr_range, overlay = shared_network(all_names.index(n), link_ips)
                h.init(spec.netns, subnet, None, addr_range=addr_range, overlay=overlay)
            finally:
                h.close()
    _write_known_hosts(specs.values(), specs[all_names[0]].known_hosts)
    return [specs[n] for n in dict.fromkeys(names)]


_RATE = re.compile(r"^\d+(\.\d+)?[kmg]?(bit|bps)$")


def shape(spec: TestHostSpec, rate: str | None) -> str:
    """Limit what host ``spec`` sends on its link to ``rate`` (a tc rate such as ``1gbit`` or
    ``100mbit``; None removes the limit), so a benchmark or a test sees a slower network.

    A token bucket (tbf) on the host's own end of the veth, replaced in place: shaping again
    changes the rate, and ``down`` needs no extra step since the device goes with the
    namespace. Only the host's outgoing traffic is shaped, which is the direction a push
    from that host uses. Returns what is now in force, for the log.
    """
    if rate is None:
        proc.run(["tc", "-n", spec.netns, "qdisc", "del", "dev", LINK_IF, "root"], check=False)
        return f"{spec.netns} {LINK_IF}: not shaped"
    if not _RATE.match(rate):
        raise InvalidInput(f"bad rate {rate!r}", "a tc rate such as 1gbit, 100mbit or 500kbit")
    proc.run(["tc", "-n", spec.netns, "qdisc", "replace", "dev", LINK_IF, "root", "tbf",
              "rate", rate, "burst", "256kb", "latency", "50ms"])
    return f"{spec.netns} {LINK_IF}: tbf rate {rate} burst 256kb latency 50ms"


def shaped_rate(spec: TestHostSpec) -> str | None:
    """The tbf rate on the host's link as tc reports it, or None when it is not shaped."""
    r = proc.run(["tc", "-n", spec.netns, "qdisc", "show", "dev", LINK_IF], check=False)
    m = re.search(r"qdisc tbf .*?\brate (\S+)", r.stdout)
    return m.group(1) if m else None


def namespaces(prefix: str) -> list[str]:
    """The network namespaces named ``PREFIX-*`` (hosts and switch), sorted."""
    r = proc.run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return sorted(ns for ns in names if ns.startswith(prefix + "-"))


def _mounts_under(base: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ").replace("\\011", "\t")
            if mnt == str(base) or mnt.startswith(str(base) + "/"):
                out.append(mnt)
    return out


def _zpools_under(base: Path) -> list[str]:
    if shutil.which("zpool") is None or not zfs.daemon_running():
        return []
    r = proc.run(["zpool", "list", "-H", "-o", "name"], check=False)
    found = []
    for name in r.stdout.split() if r.returncode == 0 else []:
        st = proc.run(["zpool", "status", name], check=False).stdout
        files = [w for line in st.splitlines() for w in line.split()[:1] if w.startswith("/")]
        if any(f.startswith(str(base) + "/") for f in files):
            found.append(name)
    return found


def _loops_under(base: Path) -> list[str]:
    r = proc.run(["losetup", "--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
                 check=False)
    loops = []
    for line in r.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(str(base) + "/"):
            loops.append(parts[0])
    return loops


def _procs_in(held: dict[str, int]) -> list[str]:
    """Processes still in one of the namespaces whose fds are in ``held`` (pid, comm, ns)."""
    want = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino): ns for ns, fd in held.items()}
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                st = os.stat(d / "ns" / "net")
                ns = want.get((st.st_dev, st.st_ino))
                if ns:
                    found.append(f"{d.name} ({(d / 'comm').read_text().strip()}) in {ns}")
    return found


def _stop_containers(root: Path) -> list[str]:
    h = Host(root)
    try:
        netns = h.netns
        if netns and not network.netns_exists(netns):
            return []  # no namespace, so nothing can run in it
        lxc = LxcDriver(h.lxcpath, netns)
        for name, (st, _ip) in lxc.states().items():
            if st != "STOPPED":
                lxc.stop(name, force=True)
    except MigratorError as e:
        return [f"stopping containers: {e}"]
    finally:
        h.close()
    return []


def down(base: Path = DEFAULT_BASE, prefix: str | None = None) -> list[str]:
    """Remove everything ``up`` made under ``base`` and every ``PREFIX-*`` namespace.

    Best effort on every step (one failure does not stop the rest); returns the problems.
    """
    base = base.absolute()
    rec = _read_record(base)
    prefix = prefix or (rec[0] if rec else DEFAULT_PREFIX)
    _validate("prefix", prefix)
    problems: list[str] = []
    ours = namespaces(prefix)
    # Hold each namespace open: its identity cannot be reused while we look for leftovers.
    held: dict[str, int] = {}
    for ns in ours:
        with contextlib.suppress(OSError):
            held[ns] = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        homes = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        # 1. our sshds, found by the PID files they wrote, with their sessions
        for home in homes:
            spec = _spec(base, prefix, home.name, 0)
            pid = _pid_of(spec)
            if pid is not None:
                _kill_tree(pid)
                if _alive(pid):
                    problems.append(f"sshd {pid} of {home.name} did not exit")
        roots = [home / "root" for home in homes if (home / "root" / "state.db").exists()]
        # 2. every host's containers stopped before any pool is unmounted: a running
        # container's mount namespace holds copies of the mounts that existed when it
        # started, including other hosts' pools, and zfs-fuse then refuses to export those
        for root in roots:
            problems += [f"{root.parent.name}: {p}" for p in _stop_containers(root)]
        # 3. each state root: pools unmounted, namespace deleted
        for root in roots:
            try:
                problems += [f"{root.parent.name}: {p}" for p in teardown(Host(root))]
            except MigratorError as e:
                problems.append(f"{root.parent.name}: teardown: {e}")
        # 4. leftovers of a crash: zpools, mounts, loop devices under the base
        for name in _zpools_under(base):
            r = proc.run(["zpool", "destroy", "-f", name], check=False, timeout=300)
            if r.returncode != 0:
                problems.append(f"zpool {name}: {r.stderr.strip()}")
        for mnt in sorted(_mounts_under(base), key=len, reverse=True):
            r = proc.run(["umount", mnt], check=False)
            if r.returncode != 0:
                problems.append(f"umount {mnt}: {r.stderr.strip()}")
        for loop in _loops_under(base):
            r = proc.run(["losetup", "-d", loop], check=False)
            if r.returncode != 0:
                problems.append(f"losetup -d {loop}: {r.stderr.strip()}")
        # 5. anything still running in our namespaces was not started by us: report it.
        # An agent whose session closed just before the sshd was stopped is no longer in
        # the sshd's tree and may still be finishing its clean-up: give it a moment.
        deadline = time.monotonic() + LEFTOVER_GRACE
        while _procs_in(held) and time.monotonic() < deadline:
            time.sleep(0.1)
        problems += [f"process {p} is left" for p in _procs_in(held)]
        # 6. the namespaces (deleting the switch also deletes every veth pair)
        for ns in namespaces(prefix):
            try:
                network.delete_netns(ns)
            except MigratorError as e:
                problems.append(f"netns {ns}: {e}")
    finally:
        for fd in held.values():
            os.close(fd)
    # 7. the files, unless something is still mounted there (rmtree would descend into it)
    left = _mounts_under(base)
    if left:
        problems.append(f"still mounted, {base} kept: {', '.join(left)}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return problems


def leftovers(base: Path = DEFAULT_BASE, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """What ``down`` should have removed and did not (empty when all is gone)."""
    base = base.absolute()
    left = [f"netns {ns}" for ns in namespaces(prefix)]
    left += [f"mount {m}" for m in _mounts_under(base)]
    left += [f"loop device {d}" for d in _loops_under(base)]
    left += [f"zpool {z}" for z in _zpools_under(base)]
    return left + ([f"directory {base}"] if base.exists() else [])


def run_in(
    name: str, argv: Sequence[str], *, base: Path = DEFAULT_BASE, check: bool = True,
    timeout: float | None = proc.DEFAULT_TIMEOUT,
) -> proc.Completed:
    """Run ``argv`` inside host ``name``'s namespace (with its own /sys, as lxc-* need)."""
    return proc.run(argv, netns=get(name, base).netns, check=check, timeout=timeout)


# command line ----------------------------------------------------------------------------
def _describe(spec: TestHostSpec) -> str:
    pid = _pid_of(spec)
    up_ = network.netns_exists(spec.netns)
    rate = shaped_rate(spec) if up_ else None
    return (f"{spec.name}  netns {spec.netns}{'' if up_ else ' (missing)'}  link {spec.link_ip}"
            f"{f' (sends at most {rate})' if rate else ''}"
            f"  ssh {spec.link_ip}:{spec.port} "
            f"({f'sshd {pid}' if pid and _in_netns(pid, spec.netns) else 'sshd down'})"
            f"  root {spec.root}{_describe_network(spec) if up_ else ''}")


def _describe_network(spec: TestHostSpec) -> str:
    if not (spec.root / "state.db").exists():
        return ""
    h = Host(spec.root)
    try:
        n = h.network_config()
    finally:
        h.close()
    lo, hi = network.address_range(n)
    text = f"\n   bridge {n.bridge} {n.address}  containers {lo}-{hi}"
    if n.overlay is not None:
        now = network.overlay_peers_now(n)
        text += (f"  VXLAN {n.overlay.vni} {network.vxlan_device(n.bridge)} peers "
                 + (", ".join(now) if now else "none" if now is not None else "(device missing)"))
    return text


def _print_all(specs: Sequence[TestHostSpec]) -> None:
    for spec in specs:
        print(_describe(spec))
    if specs:
        print(f"client key {specs[0].client_key}  known_hosts {specs[0].known_hosts}")
        print(f"ssh: ip netns exec {specs[0].netns} ssh -i {specs[0].client_key} "
              f"-o UserKnownHostsFile={specs[0].known_hosts} -o StrictHostKeyChecking=yes "
              f"root@{specs[-1].link_ip}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testrigs.testhosts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"where keys, state roots and hosts.json live ({DEFAULT_BASE})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", parents=[common], help="bring up (or check) test hosts")
    p_up.add_argument("--hosts", default="a,b", help="comma-separated names (default a,b)")
    p_up.add_argument("--prefix", default=DEFAULT_PREFIX)
    p_up.add_argument("--pools", default="dir,btrfs,zfs")
    p_up.add_argument("--images", default="busybox")
    p_up.add_argument("--network", choices=NETWORKS, default=None,
                      help="shared: the container bridges joined into one network over VXLAN "
                           "(the default for new hosts); isolated: each host's containers "
                           "on its own bridge (default: what the base holds, else shared)")
    p_down = sub.add_parser("down", parents=[common],
                            help="remove every test host under the base")
    p_down.add_argument("--prefix", default=None)
    sub.add_parser("status", parents=[common], help="show the test hosts under the base")
    p_shape = sub.add_parser("shape", parents=[common],
                             help="limit what one host sends on its link (tc tbf), or "
                                  "remove the limit with 'off'")
    p_shape.add_argument("host", help="a test host's name, e.g. a")
    p_shape.add_argument("rate", help="a tc rate (1gbit, 100mbit) or off")
    args = ap.parse_args(argv)

    def split(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            up(split(args.hosts), args.base, split(args.pools), split(args.images),
               args.prefix, network_=args.network or network_mode(args.base) or "shared")
            _print_all(hosts(args.base))
            print(f"up in {time.monotonic() - t0:.1f}s")
        elif args.cmd == "down":
            t0 = time.monotonic()
            problems = down(args.base, args.prefix)
            for p in problems:
                print(f"problem: {p}", file=sys.stderr)
            print(f"down in {time.monotonic() - t0:.1f}s" + (" with problems" if problems
                                                                else ""))
            return 1 if problems else 0
        elif args.cmd == "shape":
            print(shape(get(args.host, args.base), None if args.rate == "off" else args.rate))
        else:
            specs = hosts(args.base)
            if not specs:
                print(f"no test hosts under {args.base}")
                for thing in leftovers(args.base):
                    print(f"left over: {thing} (make hosts-down removes it)")
            _print_all(specs)
    except MigratorError as e:
        print(f"error: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
