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


# address ranges (one per host on a shared network) ----------------------------------------------
def ranged(subnet: str, text: str, reserved: frozenset[str] = frozenset()) -> NetworkConfig:
    iface = parse_subnet(subnet)
    return NetworkConfig(netns=None, bridge="migbr0", address=iface,
                         ip_range=network.parse_range(text, iface), reserved=reserved)


def test_range_parsed_and_used_for_allocation() -> None:
    n = ranged("192.0.2.2/24", "192.0.2.40-192.0.2.69")
    assert network.address_range(n) == (ipaddress.IPv4Address("192.0.2.40"),
                                        ipaddress.IPv4Address("192.0.2.69"))
    assert allocate_ipv4(n, set()) == "192.0.2.40"
    assert allocate_ipv4(n, {"192.0.2.40"}) == "192.0.2.41"


def test_default_range_is_dot_10_to_the_end() -> None:
    lo, hi = network.address_range(net("192.0.2.1/24"))
    assert (str(lo), str(hi)) == ("192.0.2.10", "192.0.2.254")


def test_range_exhausted_names_the_range() -> None:
    n = ranged("192.0.2.1/24", "192.0.2.40-192.0.2.41")
    with pytest.raises(NetworkError) as ei:
        allocate_ipv4(n, {"192.0.2.40", "192.0.2.41"})
    assert "192.0.2.40-192.0.2.41" in str(ei.value)
    assert "--range" in ei.value.hint


def test_range_skips_reserved_and_bridge() -> None:
    n = ranged("192.0.2.40/24", "192.0.2.40-192.0.2.45", frozenset({"192.0.2.41"}))
    assert allocate_ipv4(n, set()) == "192.0.2.42"


@pytest.mark.parametrize("text", ["192.0.2.50-192.0.2.40", "192.0.2.0-192.0.2.10",
                                  "192.0.2.10-192.0.2.255", "198.51.100.1-198.51.100.9",
                                  "192.0.2.10", "a-b", "192.0.2.10-192.0.2.20-192.0.2.30", "",
                                  "192.0.2.1-192.0.2.1"])
def test_range_refused(text: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        network.parse_range(text, parse_subnet("192.0.2.1/24"))
    assert "FIRST-LAST" in ei.value.hint


def test_shared_network_probe_skips_an_address_answering_elsewhere() -> None:
    ov = network.make_overlay(16, "198.51.100.10", ["198.51.100.11"])
    n = NetworkConfig(netns=None, bridge="migbr0", address=parse_subnet("192.0.2.1/24"),
                      overlay=ov)
    asked: list[str] = []

    def answering(cfg: NetworkConfig, address: str) -> bool:
        asked.append(address)
        return address == "192.0.2.10"  # a moved container of this range, running on b

    assert allocate_ipv4(n, set(), in_use=answering) == "192.0.2.11"
    assert asked == ["192.0.2.10", "192.0.2.11"]
    # locally used addresses are never asked about
    asked.clear()
    assert allocate_ipv4(n, {"192.0.2.10"}, in_use=answering) == "192.0.2.11"
    assert asked == ["192.0.2.11"]


def test_test_hosts_shared_ranges_never_overlap() -> None:
    from testrigs.testhosts import SHARED_MAX, shared_network

    ips = [f"198.51.100.{10 + i}" for i in range(SHARED_MAX)]
    seen: set[ipaddress.IPv4Address] = set()
    bridges = set()
    for i in range(SHARED_MAX):
        subnet, text, ov = shared_network(i, ips)
        iface = parse_subnet(subnet)
        lo, hi = network.parse_range(text, iface)
        mine = {ipaddress.IPv4Address(x) for x in range(int(lo), int(hi) + 1)}
        assert not mine & seen
        seen |= mine
        bridges.add(iface.ip)
        assert str(ov.local) == ips[i] and ov.local not in ov.peers
        assert len(ov.peers) == SHARED_MAX - 1
    assert len(bridges) == SHARED_MAX and not bridges & seen
    with pytest.raises(InvalidInput):
        shared_network(SHARED_MAX, ips + ["198.51.100.99"])


# the overlay: VXLAN id, endpoints, argv -----------------------------------------------------------
def test_overlay_drops_itself_and_duplicates_and_round_trips() -> None:
    ov = network.make_overlay("16", "198.51.100.10",
                              ["198.51.100.10", "198.51.100.11", " 198.51.100.11", "198.51.100.12"])
    assert ov.vni == 16 and ov.port == 4789
    assert [str(p) for p in ov.peers] == ["198.51.100.11", "198.51.100.12"]
    assert network.Overlay.from_json(ov.to_json()) == ov


@pytest.mark.parametrize("vni", [0, -1, 2**24, "sixteen", "1e3", ""])
def test_overlay_vni_out_of_range_refused(vni: object) -> None:
    with pytest.raises(InvalidInput) as ei:
        network.make_overlay(vni, "198.51.100.10")  # type: ignore[arg-type]
    assert "VXLAN id" in str(ei.value) and "16777215" in ei.value.hint


def test_overlay_vni_bounds_accepted() -> None:
    assert network.make_overlay(1, "198.51.100.10").vni == 1
    assert network.make_overlay(2**24 - 1, "198.51.100.10").vni == 2**24 - 1


@pytest.mark.parametrize("peer", ["host-b", "198.51.100.11/24", "2001:db8::1", "224.0.0.1",
                                  "127.0.0.1", "0.0.0.0", "255.255.255.255", "169.254.1.1",
                                  "198.51.100.256", "", "198.51.100.11; rm -rf /", "-dst"])
def test_overlay_peer_not_an_ipv4_unicast_address_refused(peer: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        network.make_overlay(16, "198.51.100.10", ["198.51.100.11", peer])
    assert "VXLAN peer" in str(ei.value) and "IPv4" in ei.value.hint


@pytest.mark.parametrize("local", ["localhost", "2001:db8::1", "239.1.1.1"])
def test_overlay_local_refused(local: str) -> None:
    with pytest.raises(InvalidInput):
        network.make_overlay(16, local)


@pytest.mark.parametrize("port", [0, 65536, "x"])
def test_overlay_port_refused(port: object) -> None:
    with pytest.raises(InvalidInput):
        network.make_overlay(16, "198.51.100.10", port=port)  # type: ignore[arg-type]


def test_fdb_argv() -> None:
    peer = ipaddress.IPv4Address("198.51.100.11")
    assert network.fdb_argv(["-n", "mh-a"], "append", "vx-migbr0", peer) == [
        "bridge", "-n", "mh-a", "fdb", "append", "00:00:00:00:00:00", "dev", "vx-migbr0",
        "dst", "198.51.100.11"]
    assert network.fdb_argv([], "del", "vx-migbr0", peer) == [
        "bridge", "fdb", "del", "00:00:00:00:00:00", "dev", "vx-migbr0", "dst", "198.51.100.11"]
    with pytest.raises(ValueError):
        network.fdb_argv([], "flush", "vx-migbr0", peer)


def test_vxlan_add_argv_unicast_no_learning() -> None:
    ov = network.make_overlay(16, "198.51.100.10", ["198.51.100.11"], 4790)
    argv = network.vxlan_add_argv(["-n", "mh-a"], "vx-migbr0", ov, 1500)
    assert argv == ["ip", "-n", "mh-a", "link", "add", "vx-migbr0", "mtu", "1500", "type",
                    "vxlan", "id", "16", "dstport", "4790", "local", "198.51.100.10",
                    "nolearning"]
    assert "group" not in argv  # no multicast


def test_parse_fdb_peers_and_vxlan_matches() -> None:
    shown = ("16:68:72:e6:d9:7f master migbr0 permanent\n"
             "00:00:00:00:00:00 dst 198.51.100.11 self permanent\n"
             "00:00:00:00:00:00 dst 198.51.100.12 self permanent\n"
             "aa:bb:cc:dd:ee:ff dst 198.51.100.13 self\n")
    assert network.parse_fdb_peers(shown) == {"198.51.100.11", "198.51.100.12"}
    details = ("4: vx-migbr0: <BROADCAST,MULTICAST,UP> mtu 1500 master migbr0\\    "
               "vxlan id 16 local 198.51.100.10 srcport 0 0 dstport 4789 nolearning ttl auto")
    ov = network.make_overlay(16, "198.51.100.10")
    assert network.vxlan_matches(details, ov)
    assert not network.vxlan_matches(details, network.make_overlay(17, "198.51.100.10"))
    assert not network.vxlan_matches(details, network.make_overlay(16, "198.51.100.11"))
    assert not network.vxlan_matches(details, network.make_overlay(16, "198.51.100.10",
                                                                   port=4790))


def test_overlay_mtu_and_device_name() -> None:
    assert network.overlay_mtu(1550) == 1500
    assert network.overlay_mtu(9000) == 1500
    assert network.overlay_mtu(1500) == 1450
    assert network.vxlan_device("migbr0") == "vx-migbr0"
    assert len(network.vxlan_device("x" * 15)) == 15


def test_arp_request_and_reply() -> None:
    mac = bytes.fromhex("02aabbccddee")
    me, them = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("192.0.2.10")
    req = network.arp_request(mac, me, them)
    assert len(req) == 42 and req[:6] == b"\xff" * 6 and req[6:12] == mac
    assert req[12:14] == b"\x08\x06" and req[-4:] == them.packed
    assert not network.arp_reply_from(req, them)  # a request is no answer
    reply = bytearray(req)
    reply[20:22] = b"\x00\x02"  # op: reply
    reply[28:32] = them.packed  # sender: the one asked for
    assert network.arp_reply_from(bytes(reply), them)
    assert not network.arp_reply_from(bytes(reply), me)
    assert not network.arp_reply_from(bytes(reply[:30]), them)


# the host's record: checked before anything is written -------------------------------------------
def test_host_init_refuses_a_bad_range_and_records_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from migrator.runtime.host import Host

    h = Host(tmp_path)
    try:
        with pytest.raises(InvalidInput):
            h.init("mx-a", "192.0.2.2/24", None, addr_range="192.0.2.10-198.51.100.1")
        ov = network.make_overlay(16, "198.51.100.10")
        with pytest.raises(InvalidInput):
            h.init("mx-a", None, None, overlay=ov, no_overlay=True)
        assert h.state.settings_with_prefix("network.") == {}
    finally:
        h.close()


def test_host_reserves_addresses_only_on_a_shared_network(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from migrator.runtime.host import Host

    h = Host(tmp_path)
    try:
        h.reserve_ipv4("203.0.113.10")  # isolated: nothing to keep out
        assert h.network_config().reserved == frozenset()
        ov = network.make_overlay(16, "198.51.100.10", ["198.51.100.11"])
        with h.state.transaction():  # as `migrate init --vxlan-*` records it
            h.state.set_setting("network.overlay", ov.to_json())
            h.state.set_setting("network.range", "203.0.113.10-203.0.113.12")
        h.reserve_ipv4("203.0.113.10")
        h.reserve_ipv4("203.0.113.11")
        net = h.network_config()
        assert net.overlay == ov and net.reserved == {"203.0.113.10", "203.0.113.11"}
        assert allocate_ipv4(net, set(), in_use=lambda _n, _a: False) == "203.0.113.12"
        h.reserve_ipv4("203.0.113.10", reserved=False)
        assert allocate_ipv4(h.network_config(), set(), in_use=lambda _n, _a: False) == \
            "203.0.113.10"
    finally:
        h.close()
