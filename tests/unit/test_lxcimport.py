"""migrator.adopt: the pure parts (LXC config parsing, legacy keys, includes,
conversion)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migrator.adopt.lxc_config import (
    DIST_CONFIG_DIR,
    convert_config,
    parse_config_text,
    parse_cpuset,
    read_config,
)
from migrator.adopt.plan import detect_image, ids_outside
from migrator.core.errors import InvalidInput

BUSYBOX = """\
# Template used to create this container: /usr/share/lxc/templates/lxc-busybox
lxc.net.0.type = veth
lxc.net.0.link = lxcbr0
lxc.net.0.flags = up
lxc.net.0.hwaddr = 00:16:3E:AA:BB:CC
lxc.rootfs.path = dir:/var/lib/lxc/web/rootfs
lxc.signal.halt = SIGUSR1
lxc.uts.name = "web"
lxc.tty.max = 5
lxc.cap.drop = sys_module mac_admin mac_override sys_time
lxc.mount.auto = cgroup:mixed proc:mixed sys:ro
lxc.mount.entry = /lib lib none ro,bind 0 0
lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0
"""


def convert(text: str, name: str = "web"):  # type: ignore[no-untyped-def]
    return convert_config(parse_config_text(text), name, machine="x86_64")


def test_busybox_template_config_is_sorted_into_the_three_lists() -> None:
    c = convert(BUSYBOX)
    assert c.problems == []
    assert c.privileged and c.config["security.privileged"] == "true"
    assert c.rootfs == "/var/lib/lxc/web/rootfs" and c.rootfs_backend == "dir"
    assert c.hwaddr == "00:16:3e:aa:bb:cc"  # kept, lower-cased
    assert c.config["volatile.eth0.hwaddr"] == "00:16:3e:aa:bb:cc"
    # quoted values are unquoted: the hostname equals the name, so the runtime covers it
    assert any(r.startswith("lxc.uts.name = web ") for r in c.replaced)
    unconv = "\n".join(c.unconvertible)
    assert "lxc.mount.entry = /lib lib none ro,bind 0 0 (host directory /lib" in unconv
    assert "tmpfs mount at /dev/shm" in unconv
    # every line of the config is accounted for exactly once
    accounted = c.converted + c.replaced + c.unconvertible
    assert len(accounted) == 12


def test_legacy_2x_names_are_read_as_their_lxc3_names() -> None:
    c = convert("""\
lxc.rootfs = /srv/old/rootfs
lxc.utsname = old
lxc.network.type = veth
lxc.network.link = br0
lxc.network.hwaddr = 00:16:3e:01:02:03
lxc.network.ipv4 = 10.0.3.50/24
lxc.network.ipv4.gateway = 10.0.3.1
lxc.network.type = macvlan
lxc.network.link = eth1
lxc.id_map = u 0 100000 65536
lxc.id_map = g 0 100000 65536
lxc.aa_profile = unconfined
lxc.tty = 4
lxc.pivotdir = lxc_putold
lxc.limit.nofile = 1024
""", "old")
    assert c.problems == []
    assert c.rootfs == "/srv/old/rootfs" and c.rootfs_backend == "dir"
    assert c.ipv4 == "10.0.3.50" and c.hwaddr == "00:16:3e:01:02:03"
    assert c.idmap is not None and (c.idmap.base, c.idmap.size) == (100000, 65536)
    assert "legacy key lxc.network.ipv4 -> lxc.net.0.ipv4.address" in c.notes
    assert "legacy key lxc.id_map -> lxc.idmap" in c.notes
    unconv = "\n".join(c.unconvertible)
    # the second 2.x interface became lxc.net.1, which the runtime cannot give
    assert "lxc.net.1.type = macvlan (the runtime gives one interface" in unconv
    assert "lxc.prlimit.nofile = 1024" in unconv
    assert any("lxc.pivotdir" in r and "removed in LXC 3.0" in r for r in c.replaced)
    assert any(r.startswith("lxc.apparmor.profile = unconfined") for r in c.replaced)


def test_limits_autostart_environment_and_hooks() -> None:
    c = convert("""\
lxc.rootfs.path = dir:/r
lxc.cgroup.memory.limit_in_bytes = 512M
lxc.cgroup2.cpuset.cpus = 1
lxc.cgroup.cpu.shares = 512
lxc.start.auto = 1
lxc.start.delay = 0
lxc.environment = http_proxy=http://proxy:3128
lxc.hook.pre-start = /usr/local/bin/prepare
""")
    assert c.config["limits.memory"] == str(512 << 20)
    assert c.config["limits.cpu"] == "1"
    assert any("pinned to CPUs 1" in n for n in c.notes)  # the runtime pins CPU 0
    unconv = "\n".join(c.unconvertible)
    assert "lxc.cgroup.cpu.shares = 512 (the runtime has limits.memory and limits.cpu" in unconv
    assert "lxc.start.auto = 1 (the runtime has no autostart" in unconv
    assert "lxc.environment = http_proxy=http://proxy:3128" in unconv
    assert "lxc.hook.pre-start" in unconv
    assert any(r.startswith("lxc.start.delay = 0") for r in c.replaced)


def test_a_limit_the_runtime_refuses_is_reported_not_dropped() -> None:
    c = convert("lxc.rootfs.path = /r\nlxc.cgroup.memory.limit_in_bytes = 1M\n")
    assert "limits.memory" not in c.config
    assert any("below 16MiB" in u for u in c.unconvertible)
    c = convert("lxc.rootfs.path = /r\nlxc.cgroup2.memory.max = max\n")
    assert "limits.memory" not in c.config and not c.unconvertible


@pytest.mark.parametrize(("rootfs", "message"), [
    ("lvm:/dev/vg/web", "'lvm' backing store"),
    ("overlay:/a:/b", "'overlay' backing store"),
    ("zfs:tank/web", "'zfs' backing store"),
])
def test_rootfs_backends_other_than_a_directory_block(rootfs: str, message: str) -> None:
    c = convert(f"lxc.rootfs.path = {rootfs}\n")
    assert any(message in p for p in c.problems)


def test_btrfs_rootfs_is_a_readable_tree_and_no_rootfs_blocks() -> None:
    assert convert("lxc.rootfs.path = btrfs:/var/lib/lxc/web/rootfs\n").problems == []
    assert any("no lxc.rootfs.path" in p for p in convert("lxc.tty.max = 0\n").problems)


@pytest.mark.parametrize("maps", [
    ["u 0 100000 65536", "g 0 200000 65536"],  # different bases
    ["u 0 100000 1000", "u 1000 1000 1", "u 1001 101001 64535", "g 0 100000 65536"],
    ["u 1 100000 65536", "g 1 100000 65536"],  # not from container id 0
    ["u 0 100000"],
])
def test_idmaps_the_runtime_cannot_express_block(maps: list[str]) -> None:
    text = "lxc.rootfs.path = /r\n" + "".join(f"lxc.idmap = {m}\n" for m in maps)
    assert convert(text).problems


def test_b_idmap_and_an_empty_value_clearing_earlier_lines() -> None:
    c = convert("lxc.rootfs.path = /r\nlxc.idmap = b 0 300000 65536\n"
                "lxc.cap.drop = sys_admin\nlxc.cap.drop =\n")
    assert c.idmap is not None and c.idmap.base == 300000
    assert not c.privileged and c.config["security.privileged"] == "false"
    assert not any("cap.drop" in x for x in c.unconvertible + c.replaced)


def test_network_kinds() -> None:
    c = convert("lxc.rootfs.path = /r\nlxc.net.0.type = empty\n")
    assert any("had no network" in n for n in c.notes) and c.ipv4 is None
    c = convert("lxc.rootfs.path = /r\nlxc.net.0.type = none\n")
    assert any("shared the host's network" in u for u in c.unconvertible)
    c = convert("lxc.rootfs.path = /r\nlxc.net.0.type = veth\n"
                "lxc.net.0.hwaddr = 00:16:3e:xx:xx:xx\n"
                "lxc.net.0.ipv4.address = 10.1.1.5/24 10.1.1.6/24\n"
                "lxc.net.0.ipv6.address = fd00::5/64\nlxc.net.0.veth.pair = vethweb\n")
    assert c.hwaddr is None and "volatile.eth0.hwaddr" not in c.config  # a template MAC
    assert c.ipv4 == "10.1.1.5"
    unconv = "\n".join(c.unconvertible)
    assert "10.1.1.5 is kept" in unconv and "ipv6.address" in unconv and "veth.pair" in unconv


def test_other_keys_are_never_silently_dropped() -> None:
    c = convert("lxc.rootfs.path = /r\nlxc.apparmor.profile = generated\n"
                "lxc.sysctl.net.ipv4.ip_forward = 1\n"
                "lxc.uts.name = other\nlxc.arch = amd64\nlxc.seccomp.profile = /etc/my.seccomp\n"
                "lxc.init.cmd = /usr/bin/myinit\nlxc.cap.keep = sys_admin\nnot a line\n"
                "foo.bar = 1\n")
    unconv = "\n".join(c.unconvertible)
    for needle in ("lxc.sysctl.net.ipv4.ip_forward", "hostname to 'web'", "/etc/my.seccomp",
                   "/usr/bin/myinit", "lxc.cap.keep", "'not a line' is not KEY = VALUE",
                   "foo.bar = 1 (not an LXC key)"):
        assert needle in unconv, needle
    assert any(r.startswith("lxc.arch = amd64") for r in c.replaced)
    assert any("not this host's architecture" in p
               for p in convert("lxc.rootfs.path = /r\nlxc.arch = armhf\n").problems)


def test_extra_devices_and_caps_are_reported() -> None:
    c = convert("lxc.rootfs.path = /r\nlxc.cgroup.devices.deny = a\n"
                "lxc.cgroup.devices.allow = c 1:3 rwm\nlxc.cgroup.devices.allow = c 10:200 rwm\n"
                "lxc.cap.drop = sys_module mac_admin mac_override sys_time sys_rawio sys_admin\n")
    unconv = "\n".join(c.unconvertible)
    assert "c 10:200 rwm" in unconv and "c 1:3 rwm" not in unconv
    assert "does not drop sys_admin" in unconv


def test_includes_are_followed_except_the_distribution_ones(tmp_path: Path) -> None:
    extra = tmp_path / "extra.d"
    extra.mkdir()
    (extra / "10-net.conf").write_text("lxc.net.0.type = veth\n"
                                       "lxc.net.0.hwaddr = 00:16:3e:00:00:01\n")
    (extra / "ignored.txt").write_text("lxc.environment = NOT=read\n")
    (tmp_path / "limits").write_text("lxc.cgroup.memory.limit_in_bytes = 64M\n")
    conf = tmp_path / "config"
    conf.write_text(f"lxc.include = {DIST_CONFIG_DIR}/common.conf\n"
                    f"lxc.include = {extra}\nlxc.include = {tmp_path / 'limits'}\n"
                    f"lxc.include = {tmp_path / 'missing.conf'}\nlxc.rootfs.path = dir:/r\n")
    parsed = read_config(conf)
    assert parsed.includes == [f"{DIST_CONFIG_DIR}/common.conf"]
    c = convert_config(parsed, "web", machine="x86_64")
    assert c.hwaddr == "00:16:3e:00:00:01" and c.config["limits.memory"] == str(64 << 20)
    assert any("common.conf" in r for r in c.replaced)
    assert any("missing.conf does not exist" in u for u in c.unconvertible)
    assert not any("NOT=read" in u for u in c.unconvertible)


def test_an_include_loop_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    conf.write_text(f"lxc.include = {conf}\n")
    with pytest.raises(InvalidInput, match="nest deeper"):
        read_config(conf)


def test_parse_cpuset() -> None:
    assert parse_cpuset("0-2,5") == [0, 1, 2, 5]
    assert parse_cpuset("3") == [3]
    for bad in ("", "2-1", "a", "-1"):
        with pytest.raises(InvalidInput):
            parse_cpuset(bad)


def test_detect_image_never_follows_a_symlink_out_of_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "sbin").mkdir()
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "busybox").write_bytes(b"\x7fELF")
    os.link(rootfs / "bin" / "busybox", rootfs / "sbin" / "init")
    secret = tmp_path / "host-os-release"
    secret.write_text("ID=hostsecret\n")
    (rootfs / "etc" / "os-release").symlink_to(secret)
    init, image = detect_image(rootfs)
    assert init == "busybox" and image == {"image.os": "busybox"}
    (rootfs / "etc" / "os-release").unlink()
    (rootfs / "etc" / "os-release").write_text('ID=debian\nVERSION_CODENAME="bookworm"\n')
    (rootfs / "sbin" / "init").unlink()
    (rootfs / "sbin" / "init").symlink_to("/lib/systemd/systemd")
    assert detect_image(rootfs) == ("systemd", {"image.os": "debian",
                                                "image.release": "bookworm"})


def test_ids_outside_the_map(tmp_path: Path) -> None:
    base = os.lstat(tmp_path).st_uid
    (tmp_path / "a").write_text("x")
    assert ids_outside(tmp_path, base, 1) == []
    outside = ids_outside(tmp_path, base + 1, 10)
    assert outside == [f". ({base}:{os.lstat(tmp_path).st_gid})", f"a ({base}:"
                       f"{os.lstat(tmp_path / 'a').st_gid})"]
