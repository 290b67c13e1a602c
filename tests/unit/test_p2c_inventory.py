"""p2c inventory parsing on samples (pure): os-release, mountinfo classification, ip -j,
enabled units, init detection, rsync exclusion rules, the source spec."""

from __future__ import annotations

import json

import pytest

from migrator.core.errors import InvalidInput
from migrator.p2c.inventory import (
    check_excludes,
    exclude_rules,
    init_name,
    parse_enabled_units,
    parse_ip_addr,
    parse_ip_route,
    parse_mountinfo,
    parse_os_release,
    parse_wants_links,
    rsync_pattern,
)
from migrator.p2c.source import SourceSpec

OS_RELEASE = '''PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
ID=debian
# a comment
HOME_URL='https://www.debian.org/'
'''

# a server: root on ext4, /home on an xfs disk, /var/lib/docker with overlays, an NFS share,
# a bind mount of /home/shared, a FUSE mount, a btrfs subvolume, /boot/efi, the usual kernel
# filesystems, and a path with a space
MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid shared:5 - proc proc rw
24 23 0:35 / /proc/sys/fs/binfmt_misc rw shared:28 - autofs systemd-1 rw,fd=30
25 22 0:22 / /sys rw,nosuid shared:6 - sysfs sysfs rw
26 25 0:26 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw
27 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=4000k
28 27 0:23 / /dev/pts rw shared:3 - devpts devpts rw,gid=5,mode=620
29 22 0:24 / /run rw,nosuid shared:4 - tmpfs tmpfs rw,size=800k
30 22 8:17 / /home rw,relatime shared:30 - xfs /dev/sdb1 rw
31 22 8:2 / /boot/efi rw shared:31 - vfat /dev/sda2 rw
32 22 8:33 / /var/lib/docker rw shared:32 - ext4 /dev/sdc1 rw
33 32 0:50 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=/x
34 22 0:51 / /mnt/share rw - nfs4 nas:/export rw
35 22 8:17 /shared /srv/shared rw shared:30 - xfs /dev/sdb1 rw
36 22 0:52 / /mnt/fuse rw - fuse.sshfs host:/ rw
37 22 8:49 /@data /data rw - btrfs /dev/sdd1 rw,subvol=/@data
38 22 8:49 /@logs /var/log rw - btrfs /dev/sdd1 rw,subvol=/@logs
39 22 0:53 / /tmp rw - tmpfs tmpfs rw
40 22 8:65 / /srv/my\\040disk rw - ext4 /dev/sde1 rw
41 22 7:0 / /snap/core/1 ro - squashfs /dev/loop0 ro
"""


def test_os_release_is_unquoted() -> None:
    osr = parse_os_release(OS_RELEASE)
    assert osr["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert osr["ID"] == "debian" and osr["VERSION_ID"] == "12"
    assert osr["HOME_URL"] == "https://www.debian.org/"


def test_mounts_are_classified_with_reasons() -> None:
    mounts = {m.path: m for m in parse_mountinfo(MOUNTINFO)}
    included = {p for p, m in mounts.items() if m.included}
    assert included == {"/", "/home", "/data", "/var/log", "/srv/my disk"}
    assert "root" in mounts["/"].reason
    why = {p: m.reason for p, m in mounts.items() if not m.included}
    assert "kernel" in why["/proc"] and "under /proc" in why["/proc/sys/fs/binfmt_misc"]
    assert "under /dev" in why["/dev/pts"] and "kernel" in why["/sys"]
    assert "network" in why["/mnt/share"] and "FUSE" in why["/mnt/fuse"]
    assert "container or VM manager" in why["/var/lib/docker"]
    assert "under /var/lib/docker" in why["/var/lib/docker/overlay2/abc/merged"]
    assert "bind mount" in why["/srv/shared"]
    assert "EFI" in why["/boot/efi"]
    assert "squashfs" in why["/snap/core/1"]
    assert "tmpfs" in why["/tmp"] and "tmpfs" in why["/run"]


def test_an_over_mounted_path_keeps_the_visible_mount() -> None:
    text = ("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
            "2 1 8:2 / /srv rw - ext4 /dev/sda2 rw\n"
            "3 1 0:40 / /srv rw - tmpfs tmpfs rw\n")
    mounts = parse_mountinfo(text)
    srv = [m for m in mounts if m.path == "/srv"]
    assert len(srv) == 1 and not srv[0].included


def test_exclude_rules_keep_skipped_mount_points_as_empty_dirs() -> None:
    rules = exclude_rules(parse_mountinfo(MOUNTINFO), ["/var/cache/big"])
    assert "- /proc/*" in rules and "- /var/lib/docker/*" in rules
    assert "- /srv/my disk/*" not in rules  # included
    assert rules[-1] == "- /var/cache/big"
    assert "- /" not in rules
    assert rsync_pattern("/odd[1]*?") == "/odd\\[1]\\*\\?"


@pytest.mark.parametrize("bad", ["relative", "/", "/a/../etc", "/x\ny"])
def test_bad_excludes_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_excludes([bad])


def test_excludes_are_normalised() -> None:
    assert check_excludes(["/var/cache/", "/srv"]) == ["/var/cache", "/srv"]


def test_ip_json() -> None:
    addr = json.dumps([
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1",
                                         "prefixlen": 8, "scope": "host"}]},
        {"ifname": "eth0", "address": "52:54:00:12:34:56", "operstate": "UP",
         "addr_info": [{"family": "inet", "local": "198.51.100.50", "prefixlen": 24,
                        "scope": "global"},
                       {"family": "inet6", "local": "fe80::1", "prefixlen": 64,
                        "scope": "link"}]}])
    assert parse_ip_addr(addr) == [{"name": "eth0", "mac": "52:54:00:12:34:56",
                                    "state": "UP", "addresses": ["198.51.100.50/24"]}]
    route = json.dumps([{"dst": "default", "gateway": "198.51.100.1", "dev": "eth0"},
                        {"dst": "198.51.100.0/24", "dev": "eth0"}])
    assert parse_ip_route(route) == ["default via 198.51.100.1 dev eth0",
                                     "198.51.100.0/24 dev eth0"]
    assert parse_ip_addr("not json") == [] and parse_ip_route("") == []


def test_enabled_units_from_systemctl_and_from_wants_links() -> None:
    listing = ("ssh.service                  enabled enabled\n"
               "cron.service                 enabled enabled\n"
               "getty@.service               enabled enabled\n")
    assert parse_enabled_units(listing) == ["cron.service", "getty@.service", "ssh.service"]
    found = ("/etc/systemd/system/multi-user.target.wants/ssh.service\n"
             "/etc/systemd/system/multi-user.target.wants/p2c-web.service\n"
             "/etc/systemd/system/timers.target.wants/apt-daily.timer\n"
             "/etc/systemd/system/getty.target.wants/getty@tty1.service\n"
             "/etc/systemd/system/p2c-web.service.d/override.conf\n")
    assert parse_wants_links(found) == ["apt-daily.timer", "getty@tty1.service",
                                        "p2c-web.service", "ssh.service"]


@pytest.mark.parametrize(("comm", "target", "want"), [
    ("systemd\n", "/lib/systemd/systemd\n", "systemd"),
    ("python3\n", "/usr/lib/systemd/systemd\n", "systemd"),  # booted otherwise, systemd installed
    ("init\n", "/sbin/init\n", "sysvinit"),
    ("openrc-init\n", "/sbin/openrc-init\n", "openrc-init"),
    ("busybox\n", "/bin/busybox\n", "busybox"),
])
def test_init_detection(comm: str, target: str, want: str) -> None:
    assert init_name(comm, target) == want


def test_source_spec() -> None:
    assert SourceSpec.parse("root@198.51.100.50") == SourceSpec("root", "198.51.100.50", 22)
    assert SourceSpec.parse("admin@web-1.example.org:2222") == \
        SourceSpec("admin", "web-1.example.org", 2222)
    assert SourceSpec.parse("web1") == SourceSpec("root", "web1", 22)
    assert str(SourceSpec("u", "h", 2222)) == "u@h:2222"
    for bad in ("root@", "ro ot@h", "root@h:0", "root@h:99999", "root@h;rm", "root@-h",
                "$(x)@h"):
        with pytest.raises(InvalidInput):
            SourceSpec.parse(bad)
