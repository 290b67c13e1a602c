"""Per-host networking: one bridge, static addresses from the host's subnet, and optionally
one container network across hosts (a VXLAN overlay with unicast peers).

A host may live in a network namespace (test hosts, the demo): its bridge is made there and
every LXC command runs there (see nsexec.py). Nothing forwards or NATs container traffic: the
bridge is a private segment with TEST-NET addresses by default, so containers can reach each
other and the host, and nothing else.

The overlay joins the bridges of several hosts into one layer-2 segment: a VXLAN device on
each host is a port of its bridge, and every frame it cannot place is sent to every peer (one
all-zero fdb entry per peer: head-end replication, no multicast). The VXLAN device learns no
MAC and its bridge port learns none either: a frame for a container on another host is
always sent to every peer, and each peer's bridge delivers it to its own port if the container
is there. That costs bandwidth (fine for a handful of hosts) but needs no coordination when a
container moves: the instant its NIC is on the new host's bridge it is reachable from
everywhere, with no stale forwarding entry to age out. On a shared segment every bridge has
its own address and every host allocates from its own range, so fresh allocations never
collide; a moved container keeps its address (it stays inside the shared subnet).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from migrator.core import proc
from migrator.core.errors import InvalidInput, NetworkError
from migrator.core.netns import call_in_netns

DEFAULT_SUBNET = "203.0.113.1/24"
DEFAULT_BRIDGE = "migbr0"
FIRST_HOST_OFFSET = 10  # .1 is the bridge; containers from .10 up
VXLAN_PORT = 4789  # IANA's VXLAN port
VNI_MAX = 2**24 - 1
VXLAN_OVERHEAD = 50  # outer Ethernet, IPv4, UDP and VXLAN headers
CONTAINER_MTU = 1500  # what LXC gives a container's NIC
ZERO_MAC = "00:00:00:00:00:00"  # the fdb entry for frames with no known destination


@dataclass(frozen=True)
class Overlay:
    """This host's VXLAN: its network identifier, its own address on the hosts' network
    (the tunnel's source) and the other hosts' addresses there (unicast peers)."""

    vni: int
    local: ipaddress.IPv4Address
    peers: tuple[ipaddress.IPv4Address, ...] = ()
    port: int = VXLAN_PORT

    def to_json(self) -> str:
        return json.dumps({"vni": self.vni, "local": str(self.local), "port": self.port,
                           "peers": [str(p) for p in self.peers]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Overlay:
        d = json.loads(text)
        return make_overlay(d["vni"], d["local"], d.get("peers", []), d.get("port", VXLAN_PORT))


@dataclass(frozen=True)
class NetworkConfig:
    netns: str | None
    bridge: str
    address: ipaddress.IPv4Interface  # the bridge's address; its network is the subnet
    # the addresses this host hands out (inclusive); None: from .10 to the end of the subnet
    ip_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    overlay: Overlay | None = None
    # addresses this host must not hand out (containers of its range living elsewhere)
    reserved: frozenset[str] = field(default_factory=frozenset)

    @property
    def gateway(self) -> str:
        return str(self.address.ip)

    @property
    def prefixlen(self) -> int:
        return self.address.network.prefixlen


def parse_subnet(text: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as e:
        raise InvalidInput(
            f"invalid subnet {text!r}", "write it as BRIDGE-ADDRESS/PREFIX, e.g. 192.0.2.1/24"
        ) from e
    if iface.network.prefixlen > 28 or iface.ip in (
        iface.network.network_address, iface.network.broadcast_address
    ):
        raise InvalidInput(
            f"subnet {text!r} is unusable",
            "give the bridge's own address and a prefix of at most /28, e.g. 192.0.2.1/24",
        )
    return iface


def validate_ifname(name: str) -> str:
    if (
        not name.isascii()
        or not (1 <= len(name) <= 15)
        or not all(c.isalnum() or c in "-_" for c in name)
    ):
        raise InvalidInput(
            f"invalid interface or namespace name {name!r}",
            "use up to 15 letters, digits, '-' or '_'",
        )
    return name


def address_range(net: NetworkConfig) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The first and last address this host hands out."""
    if net.ip_range is not None:
        return net.ip_range
    hosts = list(net.address.network.hosts())
    return hosts[FIRST_HOST_OFFSET - 1], hosts[-1]


InUse = Callable[["NetworkConfig", str], bool]


def allocate_ipv4(net: NetworkConfig, used: set[str], in_use: InUse | None = None) -> str:
    """The lowest free address of this host's range (by default from .10 up; deterministic,
    so tests can predict it), never the bridge's own nor a reserved one.

    On a shared network (an overlay) an address is also skipped when something on the
    segment answers for it (``in_use``, by default an ARP probe): a container of this
    host's range that moved to another host keeps its address, and this host's records no
    longer show it. (A stopped one answers nothing: ``Host.reserve_ipv4`` keeps it out.)"""
    first, last = address_range(net)
    probe = in_use if in_use is not None else (arp_in_use if net.overlay else None)
    for n in range(int(first), int(last) + 1):
        ip = ipaddress.IPv4Address(n)
        s = str(ip)
        if s not in used and s not in net.reserved and ip != net.address.ip and \
                not (probe and probe(net, s)):
            return s
    where = f"{first}-{last}" if net.ip_range else str(net.address.network)
    raise NetworkError(
        f"no free address left in {where}",
        "delete unused containers or use a larger subnet"
        + (" or range (`migrate init --range FIRST-LAST`)" if net.ip_range else ""),
    )


ARP_WAIT = 0.3  # seconds for an answer on the segment (replies come in well under 10 ms)
_ETH_P_ARP = 0x0806


def arp_request(mac: bytes, sender: ipaddress.IPv4Address, target: ipaddress.IPv4Address
                ) -> bytes:
    """A broadcast ARP "who has ``target``" frame from ``mac``/``sender``."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", _ETH_P_ARP)
    return eth + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, sender.packed,
                             b"\x00" * 6, target.packed)


def arp_reply_from(frame: bytes, target: ipaddress.IPv4Address) -> bool:
    """Whether ``frame`` is an ARP reply sent by whoever holds ``target``."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", _ETH_P_ARP):
        return False
    _ht, pt, _hl, _pl, op, _sha, spa = struct.unpack("!HHBBH6s4s", frame[14:32])
    return pt == 0x0800 and op == 2 and spa == target.packed


def arp_in_use(net: NetworkConfig, address: str, wait: float = ARP_WAIT) -> bool:
    """Whether something on this host's bridge answers ARP for ``address`` (a container on
    another host of a shared network), asked from the bridge in the host's namespace."""
    target = ipaddress.IPv4Address(address)

    def ask() -> bool:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as s:
            s.bind((net.bridge, _ETH_P_ARP))
            mac = s.getsockname()[4]
            request = arp_request(mac, net.address.ip, target)
            deadline = time.monotonic() + wait
            s.send(request)
            resent = False
            while (left := deadline - time.monotonic()) > 0:
                if not resent and left < wait / 2:
                    s.send(request)  # once more, in case the first was lost
                    resent = True
                s.settimeout(min(left, wait / 2) if not resent else left)
                try:
                    if arp_reply_from(s.recv(128), target):
                        return True
                except TimeoutError:
                    continue
            return False

    try:
        return call_in_netns(net.netns, ask) if net.netns else ask()
    except OSError as e:
        raise NetworkError(f"could not ask the network whether {address} is free: {e}",
                           f"is the bridge {net.bridge} up? `migrate init` makes it") from e


def parse_range(text: str, subnet: ipaddress.IPv4Interface
                ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """``FIRST-LAST`` inside ``subnet``: the addresses one host hands out. On a shared network
    each host gets a range of its own, so two hosts never hand out the same address."""
    hint = (f"write it as FIRST-LAST inside {subnet.network}, e.g. "
            f"{subnet.network.network_address + 10}-{subnet.network.network_address + 49}")
    parts = text.split("-")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        first, last = (ipaddress.IPv4Address(p.strip()) for p in parts)
    except ValueError as e:
        raise InvalidInput(f"invalid address range {text!r}", hint) from e
    usable = (subnet.network.network_address, subnet.network.broadcast_address)
    if first > last or any(a not in subnet.network or a in usable for a in (first, last)):
        raise InvalidInput(f"address range {text!r} is not inside {subnet.network}, in order",
                           hint)
    if first == last == subnet.ip:
        raise InvalidInput(f"address range {text!r} holds only the bridge's address", hint)
    return first, last


def format_range(r: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> str:
    return f"{r[0]}-{r[1]}"


def parse_ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    """A unicast IPv4 address given on the command line (a VXLAN endpoint): no name, no
    prefix, no IPv6, nothing multicast, loopback or unspecified."""
    hint = f"give {what} as a dotted IPv4 address, e.g. 198.51.100.11"
    try:
        ip = ipaddress.IPv4Address(str(text).strip())
    except ValueError as e:
        raise InvalidInput(f"{what} {text!r} is not an IPv4 address", hint) from e
    if ip.is_multicast or ip.is_loopback or ip.is_unspecified or ip.is_link_local or \
            ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidInput(f"{what} {text!r} is not a unicast address", hint)
    return ip


def parse_vni(value: int | str) -> int:
    try:
        vni = int(str(value).strip(), 10)
    except ValueError:
        vni = -1
    if not 1 <= vni <= VNI_MAX:
        raise InvalidInput(f"VXLAN id {value!r} is out of range",
                           f"give a number from 1 to {VNI_MAX}, the same on every host")
    return vni


def make_overlay(vni: int | str, local: str, peers: Iterable[str] = (),
                 port: int | str = VXLAN_PORT) -> Overlay:
    """An ``Overlay`` from untrusted values, every one checked before anything is made. The
    host's own address may be among the peers (so every host can be given the same list):
    it is left out; duplicates go too."""
    try:
        p = int(str(port).strip(), 10)
    except ValueError:
        p = 0
    if not 1 <= p <= 65535:
        raise InvalidInput(f"VXLAN port {port!r} is out of range",
                           f"give a UDP port from 1 to 65535 (the standard one is {VXLAN_PORT})")
    me = parse_ipv4(local, "this host's VXLAN address")
    mine = tuple(dict.fromkeys(ip for ip in (parse_ipv4(x, "VXLAN peer") for x in peers)
                               if ip != me))
    return Overlay(parse_vni(vni), me, mine, p)


def vxlan_device(bridge: str) -> str:
    """The name of the VXLAN device joined to ``bridge`` (at most 15 characters)."""
    return ("vx-" + bridge)[:15]


def vxlan_add_argv(ns: Sequence[str], dev: str, ov: Overlay, mtu: int) -> list[str]:
    # nolearning: the tunnel keeps no MAC -> peer entries, so a moved container is never
    # sent to the host it left (see the module docstring)
    return ["ip", *ns, "link", "add", dev, "mtu", str(mtu), "type", "vxlan", "id", str(ov.vni),
            "dstport", str(ov.port), "local", str(ov.local), "nolearning"]


def fdb_argv(ns: Sequence[str], verb: str, dev: str, peer: ipaddress.IPv4Address) -> list[str]:
    """``bridge fdb append|del``: the all-zero entry that sends unplaced frames to ``peer``."""
    if verb not in ("append", "del"):
        raise ValueError(verb)
    return ["bridge", *ns, "fdb", verb, ZERO_MAC, "dev", dev, "dst", str(peer)]


_FDB_DST = re.compile(r"^00:00:00:00:00:00 .*\bdst (\d+\.\d+\.\d+\.\d+)\b")


def parse_fdb_peers(text: str) -> set[str]:
    """The peers of ``bridge fdb show dev VX`` output (its all-zero entries)."""
    return {m.group(1) for line in text.splitlines() if (m := _FDB_DST.match(line.strip()))}


def vxlan_matches(details: str, ov: Overlay) -> bool:
    """Whether ``ip -d -o link show dev VX`` describes a device made for ``ov``."""
    words = details.split()

    def after(key: str) -> str | None:
        return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == key), None)

    return ("vxlan" in words and after("id") == str(ov.vni) and after("local") == str(ov.local)
            and after("dstport") == str(ov.port))


def overlay_mtu(underlay_mtu: int) -> int:
    """The VXLAN device's MTU: what a container sends (1500) when the hosts' network carries
    it with the tunnel's 50 bytes, less otherwise."""
    return min(CONTAINER_MTU, underlay_mtu - VXLAN_OVERHEAD)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def ensure_netns(name: str) -> None:
    if not netns_exists(name):
        proc.run(["ip", "netns", "add", name])
        proc.run(["ip", "-n", name, "link", "set", "lo", "up"])


def ensure_bridge(net: NetworkConfig) -> None:
    """Create the host's bridge (idempotent). Never touches forwarding or NAT."""
    if net.netns:
        ensure_netns(net.netns)
    ns = ["-n", net.netns] if net.netns else []
    shown = proc.run(["ip", *ns, "-o", "link", "show", "dev", net.bridge], check=False)
    if shown.returncode != 0:
        proc.run(["ip", *ns, "link", "add", net.bridge, "type", "bridge"])
    addrs = proc.run(["ip", *ns, "-o", "-4", "addr", "show", "dev", net.bridge]).stdout
    if str(net.address) not in addrs:
        proc.run(["ip", *ns, "addr", "add", str(net.address), "dev", net.bridge])
    proc.run(["ip", *ns, "link", "set", net.bridge, "up"])


def _underlay_mtu(ns: Sequence[str], local: ipaddress.IPv4Address) -> int | None:
    """The MTU of the device holding ``local``, or None if no device here has it."""
    out = proc.run(["ip", *ns, "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        words = line.split()
        if "inet" in words and words[words.index("inet") + 1].split("/")[0] == str(local):
            dev = words[1].split("@")[0]
            link = proc.run(["ip", *ns, "-o", "link", "show", "dev", dev]).stdout.split()
            if "mtu" in link:
                return int(link[link.index("mtu") + 1])
    return None


def ensure_overlay(net: NetworkConfig) -> list[str]:
    """Make (or correct) this host's VXLAN device, a port of its bridge, and its peer entries;
    remove it when ``net.overlay`` is None. Idempotent; returns warnings for the operator.
    The bridge must exist (``ensure_bridge`` first)."""
    ns = ["-n", net.netns] if net.netns else []
    dev = vxlan_device(net.bridge)
    ov = net.overlay
    shown = proc.run(["ip", *ns, "-d", "-o", "link", "show", "dev", dev], check=False)
    if ov is None:
        if shown.returncode == 0:
            delete_link(net, dev)
        return []
    warnings = []
    mtu = _underlay_mtu(ns, ov.local)
    if mtu is None:
        raise NetworkError(
            f"no device of this host has the address {ov.local}",
            "give as --vxlan-local the host's own address on the network the hosts share")
    if shown.returncode == 0 and not vxlan_matches(shown.stdout, ov):
        delete_link(net, dev)  # another id, port or address: made again below
        shown = proc.run(["ip", *ns, "-d", "-o", "link", "show", "dev", dev], check=False)
    vx_mtu = overlay_mtu(mtu)
    if shown.returncode != 0:
        proc.run(vxlan_add_argv(ns, dev, ov, vx_mtu),
                 hint="this kernel needs VXLAN (modprobe vxlan)")
    else:
        proc.run(["ip", *ns, "link", "set", dev, "mtu", str(vx_mtu)])
    proc.run(["ip", *ns, "link", "set", dev, "master", net.bridge])
    # the bridge learns nothing on the tunnel's port either, see the module docstring
    proc.run(["bridge", *ns, "link", "set", "dev", dev, "learning", "off"])
    proc.run(["ip", *ns, "link", "set", dev, "up"])
    have = parse_fdb_peers(proc.run(["bridge", *ns, "fdb", "show", "dev", dev]).stdout)
    want = {str(p): p for p in ov.peers}
    for peer in sorted(have - set(want)):
        proc.run(fdb_argv(ns, "del", dev, ipaddress.IPv4Address(peer)), check=False)
    for peer in sorted(set(want) - have):
        proc.run(fdb_argv(ns, "append", dev, want[peer]))
    if vx_mtu < CONTAINER_MTU:
        warnings.append(
            f"the hosts' network has MTU {mtu}: the overlay carries only {vx_mtu}-byte "
            f"frames, so containers' full-size ({CONTAINER_MTU}) packets to other hosts are "
            f"dropped; raise the MTU of the device holding {ov.local} to "
            f"{CONTAINER_MTU + VXLAN_OVERHEAD} or more")
    return warnings


def overlay_peers_now(net: NetworkConfig) -> list[str] | None:
    """The peers this host's VXLAN device sends to now, or None without the device."""
    ns = ["-n", net.netns] if net.netns else []
    dev = vxlan_device(net.bridge)
    r = proc.run(["bridge", *ns, "fdb", "show", "dev", dev], check=False)
    if r.returncode != 0 or proc.run(["ip", *ns, "-o", "link", "show", "dev", dev],
                                     check=False).returncode != 0:
        return None
    return sorted(parse_fdb_peers(r.stdout), key=ipaddress.IPv4Address)


def restore_nic(net: NetworkConfig) -> tuple[str, str]:
    """A veth pair made by this host for a CRIU restore: (the end CRIU moves into the
    container and renames to its NIC, the end left on the bridge, up).

    Why the host makes it: CRIU 4.1 creates a restored veth from inside the container's user
    namespace with its peer in the host's namespace, which this kernel refuses for an
    unprivileged container (the rtnetlink peer-netns check wants CAP_NET_ADMIN over the
    peer's namespace). A device that already exists is instead moved in by CRIU's usernsd,
    which runs with the host's privileges (``--external netdev[eth0]:DEV``, what LXC passes
    for a ``phys`` NIC): the container keeps its MAC, addresses and routes from the images,
    and nothing about it becomes privileged. When the container stops, its network
    namespace goes and the pair with it."""
    token = os.urandom(3).hex()
    inner, outer = f"mgr{token}", f"veth{token}"
    ns = ["-n", net.netns] if net.netns else []
    proc.run(["ip", *ns, "link", "add", inner, "type", "veth", "peer", "name", outer],
             hint="the host could not make the restored container's network device")
    try:
        proc.run(["ip", *ns, "link", "set", outer, "master", net.bridge, "up"])
    except BaseException:
        delete_link(net, outer)
        raise
    return inner, outer


def delete_link(net: NetworkConfig, name: str) -> None:
    """Remove a network device of this host if it exists (a veth takes its peer along)."""
    ns = ["-n", net.netns] if net.netns else []
    proc.run(["ip", *ns, "link", "del", name], check=False)


def delete_netns(name: str) -> None:
    if netns_exists(name):
        proc.run(["ip", "netns", "del", name])
