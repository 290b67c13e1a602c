"""migrator.runtime.network: subnet parsing, address allocation, interface names (no namespaces)."""

from __future__ import annotations

import ipaddress

import pytest

from migrator.core.errors import InvalidInput, NetworkError
from migrator.runtime import network
from migrator.runtime.network import NetworkConfig, allocate_ipv4, parse_subnet, validate_ifname


def net(subnet: str) -> NetworkConfig:
    return NetworkConfig(netns=None, bridge="migbr0", address=parse_subnet(subnet))


# parse_subnet -----------------------------------------------------------------------------------
def test_parse_subnet_valid() -> None:
    iface = parse_subnet("192.0.2.1/24")
    assert iface == ipaddress.IPv4Interface("192.0.2.1/24")
    assert str(iface.network) == "192.0.2.0/24"


def test_parse_subnet_default_is_valid() -> None:
    n = net(network.DEFAULT_SUBNET)
    assert n.gateway == "203.0.113.1"
    assert n.prefixlen == 24


def test_parse_subnet_largest_prefix_is_28() -> None:
    assert parse_subnet("192.0.2.1/28").network.prefixlen == 28


@pytest.mark.parametrize("text", ["192.0.2.0/24", "10.0.0.0/8"])
def test_parse_subnet_refuses_network_address(text: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        parse_subnet(text)
    assert "unusable" in str(ei.value)
    assert ei.value.hint


@pytest.mark.parametrize("text", ["192.0.2.1/30", "192.0.2.1/29", "192.0.2.1/32", "192.0.2.1"])
def test_parse_subnet_refuses_small_prefix(text: str) -> None:
    # a bare address is a /32
    with pytest.raises(InvalidInput):
        parse_subnet(text)


@pytest.mark.parametrize(
    "text", ["garbage", "", "192.0.2.1/33", "300.0.0.1/24", "2001:db8::1/64", "192.0.2.1/24/1"]
)
def test_parse_subnet_refuses_garbage(text: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        parse_subnet(text)
    assert "192.0.2.1/24" in ei.value.hint


def test_parse_subnet_refuses_broadcast_address() -> None:
    with pytest.raises(InvalidInput):
        parse_subnet("192.0.2.255/24")


# allocate_ipv4 ----------------------------------------------------------------------------------
def test_allocate_starts_at_dot_10() -> None:
    assert allocate_ipv4(net("192.0.2.1/24"), set()) == "192.0.2.10"


def test_allocate_skips_used() -> None:
    used = {"192.0.2.10", "192.0.2.11", "192.0.2.13"}
    assert allocate_ipv4(net("192.0.2.1/24"), used) == "192.0.2.12"


def test_allocate_is_deterministic_lowest_free() -> None:
    n = net("192.0.2.1/24")
    used: set[str] = set()
    got = []
    for _ in range(5):
        ip = allocate_ipv4(n, used)
        used.add(ip)
        got.append(ip)
    assert got == [f"192.0.2.{i}" for i in range(10, 15)]


def test_allocate_never_hands_out_the_bridge_address() -> None:
    n = net("192.0.2.10/24")
    assert allocate_ipv4(n, set()) == "192.0.2.11"


def test_allocate_in_a_non_zero_aligned_subnet() -> None:
    # 192.0.2.16/28: hosts .17-.30; the 10th host is .26
    assert allocate_ipv4(net("192.0.2.17/28"), set()) == "192.0.2.26"


def test_allocate_exhausted_raises_network_error() -> None:
    n = net("192.0.2.1/28")  # hosts .1-.14 -> .10-.14 are for containers
    used: set[str] = set()
    for _ in range(5):
        used.add(allocate_ipv4(n, used))
    assert used == {f"192.0.2.{i}" for i in range(10, 15)}
    with pytest.raises(NetworkError) as ei:
        allocate_ipv4(n, used)
    assert "192.0.2.0/28" in str(ei.value)
    assert ei.value.hint


def test_allocate_never_returns_broadcast_or_network() -> None:
    n = net("192.0.2.1/28")
    used = {f"192.0.2.{i}" for i in range(10, 14)}
    assert allocate_ipv4(n, used) == "192.0.2.14"  # .15 is the broadcast address


# validate_ifname --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["migbr0", "a", "x" * 15, "test-host_1", "eth0"])
def test_ifname_accepts(name: str) -> None:
    assert validate_ifname(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a b", "a/b", "a:b", "a.b", "../x", "a\n"])
def test_ifname_rejects(name: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        validate_ifname(name)
    assert ei.value.hint


def test_ifname_rejects_non_ascii() -> None:
    with pytest.raises(InvalidInput):
        validate_ifname("é" * 15)
