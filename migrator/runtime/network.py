"""Per-host networking: one bridge, static addresses from the host's subnet.

A host may live in a network namespace (test hosts, the demo): its bridge is made there and
every LXC command runs there (see nsexec.py). Nothing forwards or NATs container traffic: the
bridge is a private segment with TEST-NET addresses by default, so containers can reach each
other and the host, and nothing else.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from migrator.core import proc
from migrator.core.errors import InvalidInput, NetworkError

DEFAULT_SUBNET = "203.0.113.1/24"
DEFAULT_BRIDGE = "migbr0"
FIRST_HOST_OFFSET = 10  # .1 is the bridge; containers from .10 up


@dataclass(frozen=True)
class NetworkConfig:
    netns: str | None
    bridge: str
    address: ipaddress.IPv4Interface  # the bridge's address; its network is the subnet

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


def allocate_ipv4(net: NetworkConfig, used: set[str]) -> str:
    """The lowest free address from .10 up (deterministic, so tests can predict it)."""
    hosts = list(net.address.network.hosts())
    for ip in hosts[FIRST_HOST_OFFSET - 1 :]:
        s = str(ip)
        if s not in used and ip != net.address.ip:
            return s
    raise NetworkError(
        f"no free address left in {net.address.network}",
        "delete unused containers or use a larger subnet",
    )


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
