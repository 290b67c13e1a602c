"""migrator.runtime.lxc.render_config: the LXC config text (pure; no lxc-* command runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migrator.core.errors import InvalidInput
from migrator.runtime.idmap import IdMap
from migrator.runtime.lxc import (
    PRIVILEGED_DEVICES,
    ContainerSpec,
    LxcDriver,
    UnsafeConfigValue,
    cpuset,
    hwaddr,
    render_config,
)
from migrator.runtime.network import NetworkConfig, parse_subnet

NET = NetworkConfig(netns="h1", bridge="migbr0", address=parse_subnet("192.0.2.1/24"))


def spec(**kw: object) -> ContainerSpec:
    base: dict[str, object] = dict(
        name="web-1",
        rootfs=Path("/var/lib/migrator/storage-pools/default/containers/web-1/rootfs"),
        log_file=Path("/var/lib/migrator/lxc/web-1/lxc.log"),
        init="busybox",
        ipv4="192.0.2.10",
        network=NET,
        idmap=IdMap(100000),
    )
    base.update(kw)
    return ContainerSpec(**base)  # type: ignore[arg-type]


def lines(text: str) -> list[str]:
    return text.splitlines()


def values(text: str, key: str) -> list[str]:
    out = []
    for line in lines(text):
        k, sep, v = line.partition(" = ")
        if sep and k == key:
            out.append(v)
    return out


@pytest.mark.parametrize("privileged", [True, False])
@pytest.mark.parametrize("init", ["busybox", "systemd"])
def test_always_present(privileged: bool, init: str) -> None:
    text = render_config(spec(idmap=None if privileged else IdMap(100000), init=init))
    ls = lines(text)
    assert "lxc.tty.max = 0" in ls
    assert "lxc.console.path = none" in ls
    assert "lxc.uts.name = web-1" in ls
    assert f"lxc.rootfs.path = dir:{spec().rootfs}" in ls
    assert f"lxc.log.file = {spec().log_file}" in ls
    assert "apparmor" not in text.lower()
    assert text.endswith("\n")
    # every non-comment line is a key = value pair
    for line in ls:
        assert line.startswith("#") or re.match(r"^lxc\.[a-z0-9_.]+ = \S", line), line


def test_unprivileged_has_idmap_and_no_devices() -> None:
    text = render_config(spec(idmap=IdMap(100000, 65536)))
    assert values(text, "lxc.idmap") == ["u 0 100000 65536", "g 0 100000 65536"]
    assert "lxc.cgroup.devices" not in text
    assert "lxc.cap.drop" not in text


def test_privileged_has_devices_and_no_idmap() -> None:
    text = render_config(spec(idmap=None))
    assert "lxc.idmap" not in text
    assert values(text, "lxc.cgroup.devices.deny") == ["a"]
    allowed = values(text, "lxc.cgroup.devices.allow")
    for dev in PRIVILEGED_DEVICES:
        assert dev in allowed
    assert "c 10:229 rwm" in allowed  # /dev/fuse
    assert values(text, "lxc.cap.drop")


def test_mount_auto_differs() -> None:
    assert values(render_config(spec(idmap=None)), "lxc.mount.auto") == [
        "cgroup:mixed proc:mixed sys:mixed"
    ]
    assert values(render_config(spec()), "lxc.mount.auto") == ["cgroup:mixed proc:mixed sys:rw"]


def test_systemd_init_line_only_for_systemd() -> None:
    sd = render_config(spec(init="systemd"))
    assert values(sd, "lxc.init.cmd") == ["/sbin/init systemd.legacy_systemd_cgroup_controller=1"]
    assert values(sd, "lxc.signal.halt") == ["SIGRTMIN+4"]
    bb = render_config(spec(init="busybox"))
    assert "lxc.init.cmd" not in bb
    assert "systemd" not in bb
    assert values(bb, "lxc.signal.halt") == ["SIGUSR1"]
    assert values(render_config(spec(init="other")), "lxc.signal.halt") == ["SIGPWR"]


def test_network_lines() -> None:
    text = render_config(spec(ipv4="192.0.2.10"))
    assert values(text, "lxc.net.0.type") == ["veth"]
    assert values(text, "lxc.net.0.link") == ["migbr0"]
    assert values(text, "lxc.net.0.name") == ["eth0"]
    assert values(text, "lxc.net.0.ipv4.address") == ["192.0.2.10/24"]
    assert values(text, "lxc.net.0.ipv4.gateway") == ["192.0.2.1"]
    assert values(text, "lxc.net.0.hwaddr") == [hwaddr("web-1", "192.0.2.10")]


def test_network_prefix_follows_subnet() -> None:
    n = NetworkConfig(netns=None, bridge="br-x", address=parse_subnet("10.1.2.3/20"))
    text = render_config(spec(network=n, ipv4="10.1.0.10"))
    assert values(text, "lxc.net.0.ipv4.address") == ["10.1.0.10/20"]
    assert values(text, "lxc.net.0.ipv4.gateway") == ["10.1.2.3"]
    assert values(text, "lxc.net.0.link") == ["br-x"]


def test_no_address_means_empty_network() -> None:
    text = render_config(spec(ipv4=None))
    assert values(text, "lxc.net.0.type") == ["empty"]
    assert "ipv4" not in text
    assert "hwaddr" not in text


def test_memory_and_cpuset_lines() -> None:
    text = render_config(spec(memory=256 * 2**20, cpus=2))
    assert values(text, "lxc.cgroup.memory.limit_in_bytes") == [str(256 * 2**20)]
    assert values(text, "lxc.cgroup.cpuset.cpus") == ["0-1"]
    one = render_config(spec(cpus=1))
    assert values(one, "lxc.cgroup.cpuset.cpus") == ["0"]


def test_no_limits_no_limit_lines() -> None:
    text = render_config(spec())
    assert "memory" not in text
    assert "cpuset" not in text


def test_cpuset() -> None:
    assert cpuset(1) == "0"
    assert cpuset(4) == "0-3"


def test_hwaddr_stable_and_well_formed() -> None:
    a = hwaddr("web-1", "192.0.2.10")
    assert a == hwaddr("web-1", "192.0.2.10")
    assert re.fullmatch(r"00:16:3e(:[0-9a-f]{2}){3}", a)
    first = int(a.split(":")[0], 16)
    assert first & 1 == 0  # unicast
    assert hwaddr("web-2", "192.0.2.10") != a
    assert hwaddr("web-1", "192.0.2.11") != a


def test_hwaddr_distinct_across_many_names() -> None:
    macs = {hwaddr(f"c{i}", f"192.0.2.{i % 250}") for i in range(500)}
    assert len(macs) == 500


def test_render_is_deterministic() -> None:
    assert render_config(spec(memory=2**30, cpus=1)) == render_config(spec(memory=2**30, cpus=1))


# the second wall: nothing that would break a line reaches the file ----------------------------
HOOK = "\nlxc.hook.pre-start = /bin/touch /tmp/PWNED"


def test_hostile_hwaddr_is_refused_by_the_renderer_itself() -> None:
    with pytest.raises(UnsafeConfigValue) as ei:
        render_config(spec(hwaddr="aa:bb:cc:dd:ee:ff" + HOOK))
    assert "web-1" in str(ei.value) and "hwaddr" in str(ei.value)
    assert isinstance(ei.value, InvalidInput) and ei.value.hint


@pytest.mark.parametrize("mac", ["AA:BB:CC:DD:EE:FF", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff "])
def test_hwaddr_that_is_no_mac_is_refused(mac: str) -> None:
    with pytest.raises(UnsafeConfigValue, match="not a MAC address"):
        render_config(spec(hwaddr=mac))


@pytest.mark.parametrize(("field", "value", "key"), [
    ("name", "web-1" + HOOK, "lxc.uts.name"),
    ("rootfs", Path("/var/lib/x" + HOOK), "lxc.rootfs.path"),
    ("log_file", Path("/var/log/x\r"), "lxc.log.file"),
    ("ipv4", "192.0.2.10\x00", "lxc.net.0.ipv4.address"),
    ("network", NetworkConfig(netns="h1", bridge="br0" + HOOK,
                              address=parse_subnet("192.0.2.1/24")), "lxc.net.0.link"),
    ("mounts", ((Path("/srv/vol"), "/data\x1b"),), "lxc.mount.entry"),
    ("mounts", ((Path("/srv/vol\x7f"), "/data"),), "lxc.mount.entry"),
    ("idmap", IdMap(100000, size="65536\u2028lxc.hook.start = x"), "lxc.idmap"),  # type: ignore[arg-type]
])
def test_every_interpolated_field_is_checked(field: str, value: object, key: str) -> None:
    with pytest.raises(UnsafeConfigValue) as ei:
        render_config(spec(**{field: value}))
    assert key in str(ei.value) and "control character" in str(ei.value)


def test_a_blank_in_a_mount_would_shift_its_fields() -> None:
    with pytest.raises(UnsafeConfigValue, match="blank"):
        render_config(spec(mounts=((Path("/srv/vol"), "/data none rbind,dev 0 0 #"),)))


def test_write_config_leaves_nothing_when_refused(tmp_path: Path) -> None:
    driver = LxcDriver(tmp_path, None)
    with pytest.raises(UnsafeConfigValue):
        driver.write_config(spec(hwaddr="aa:bb:cc:dd:ee:ff" + HOOK))
    assert list(tmp_path.iterdir()) == []
    driver.write_config(spec(hwaddr="aa:bb:cc:dd:ee:ff"))
    text = (tmp_path / "web-1" / "config").read_text()
    assert values(text, "lxc.net.0.hwaddr") == ["aa:bb:cc:dd:ee:ff"]
    assert "hook" not in text
