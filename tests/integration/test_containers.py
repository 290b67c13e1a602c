"""Real containers on real pools: lifecycle, exec, list, network, protection, bad input."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration

MATRIX = [
    pytest.param("dir", False, id="dir-unprivileged"),
    pytest.param("dir", True, id="dir-privileged"),
    pytest.param("btrfs", False, id="btrfs-unprivileged"),
    pytest.param("btrfs", True, id="btrfs-privileged"),
]


@pytest.mark.parametrize(("pool", "privileged"), MATRIX)
def test_busybox_lifecycle(host, pool: str, privileged: bool) -> None:
    conf = ["-c", "security.privileged=true"] if privileged else []
    host.cli("launch", "busybox", "c1", "-p", pool, *conf, check=True)

    r = host.cli("exec", "c1", "--", "sh", "-c", "echo out-$((6*7)); echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout.strip() == "out-42"
    assert "err" in r.stderr

    rows = json.loads(host.cli("list", "--format", "json", check=True).stdout)
    assert [(x["name"], x["state"], x["ipv4"], x["pool"]) for x in rows] == [
        ("c1", "RUNNING", "192.0.2.10", pool)
    ]
    # the container sees its address on eth0
    rc, out, _ = host.exec("c1", "ip", "-4", "-o", "addr", "show", "eth0")
    assert rc == 0 and "192.0.2.10/24" in out

    # unprivileged: root inside is a high uid outside, and the files on disk are shifted
    rootfs = host.cts.rootfs(host.cts.get("c1"))
    owner = os.stat(rootfs / "etc/passwd").st_uid
    assert owner == (0 if privileged else 100000)
    rc, out, _ = host.exec("c1", "cat", "/proc/self/uid_map")
    assert rc == 0
    assert out.split()[:2] == (["0", "0"] if privileged else ["0", "100000"])

    host.cli("freeze", "c1", check=True)
    assert host.cts.status("c1") == "FROZEN"
    host.cli("unfreeze", "c1", check=True)
    host.cli("stop", "c1", check=True)
    assert host.cts.status("c1") == "STOPPED"
    csv_out = host.cli("list", "--format", "csv", check=True).stdout.splitlines()
    assert csv_out == ["name,state,ipv4,pool,snapshots", f"c1,STOPPED,,{pool},0"]
    host.cli("start", "c1", check=True)
    host.cli("delete", "c1", "--force", check=True)
    assert json.loads(host.cli("list", "--format", "json", check=True).stdout) == []
    assert not rootfs.exists()
    assert not (host.root / "lxc" / "c1").exists()


@pytest.mark.parametrize("pool", ["dir", "btrfs"])
def test_snapshot_restore_puts_back_exact_bytes(host, pool: str) -> None:
    host.cli("launch", "busybox", "s1", "-p", pool, check=True)
    payload = os.urandom(200_000)
    rootfs = host.cts.rootfs(host.cts.get("s1"))
    (rootfs / "root/data.bin").write_bytes(payload)
    assert host.exec("s1", "sh", "-c", "echo v1 > /root/f")[0] == 0

    host.cli("snapshot", "create", "s1", "before", check=True)
    snap = host.host.backend(pool).list_snapshots(host.cts.volume(host.cts.get("s1")))
    assert [s.name for s in snap] == ["before"]
    assert (snap[0].path / "rootfs/root/f").read_text() == "v1\n"

    assert (
        host.exec("s1", "sh", "-c", "echo v2 > /root/f; rm /root/data.bin; touch /root/new")[0] == 0
    )
    r = host.cli("snapshot", "restore", "s1/before", check=True)
    assert "restarted" in r.stderr
    assert host.cts.status("s1") == "RUNNING"
    assert host.exec("s1", "cat", "/root/f")[1] == "v1\n"
    assert host.exec("s1", "ls", "/root")[1].split() == ["data.bin", "f"]
    assert (host.cts.rootfs(host.cts.get("s1")) / "root/data.bin").read_bytes() == payload

    listing = json.loads(host.cli("snapshot", "list", "s1", "-f", "json", check=True).stdout)
    assert [s["name"] for s in listing] == ["before"]
    host.cli("snapshot", "delete", "s1/before", check=True)
    assert host.host.backend(pool).list_snapshots(host.cts.volume(host.cts.get("s1"))) == []


def test_containers_reach_each_other_over_the_bridge(host) -> None:
    host.cli("launch", "busybox", "a1", "-p", "dir", check=True)
    host.cli("launch", "busybox", "a2", "-p", "btrfs", check=True)
    rc, out, _ = host.exec("a1", "ping", "-c", "2", "-W", "2", "192.0.2.11")
    assert rc == 0 and "2 packets received" in out
    rc, out, _ = host.exec("a2", "ping", "-c", "1", "-W", "2", "192.0.2.10")
    assert rc == 0


def test_hosts_are_isolated_by_network_namespace(make_host) -> None:
    a = make_host(pools=("dir",))
    b = make_host(pools=("dir",), subnet="198.51.100.1/24")
    a.cli("launch", "busybox", "only-a", check=True)
    assert [i.name for i in a.cts.list_all()] == ["only-a"]
    assert b.cts.lxc.states() == {}
    # the bridge exists only in a's namespace; b's container cannot see a's address
    b.cli("launch", "busybox", "only-b", check=True)
    assert b.cts.get("only-b").ipv4 == "198.51.100.10"
    assert b.exec("only-b", "ping", "-c", "1", "-W", "1", "198.51.100.1")[0] == 0
    # a's container is on another host's private segment: unreachable from b
    assert b.exec("only-b", "ping", "-c", "1", "-W", "1", "192.0.2.10")[0] != 0


def test_protection_refuses_delete(host) -> None:
    host.cli("launch", "busybox", "keep", "-c", "security.protection.delete=true", check=True)
    r = host.cli("delete", "keep", "--force")
    assert r.returncode == 7
    assert "protected" in r.stderr and "Hint:" in r.stderr
    assert host.cts.status("keep") == "RUNNING"
    host.cli("config", "unset", "keep", "security.protection.delete", check=True)
    host.cli("delete", "keep", "--force", check=True)


def test_bad_input_is_refused_and_changes_nothing(host) -> None:
    host.cli("launch", "busybox", "ok", "-p", "dir", check=True)
    before = host.cli("list", "-f", "json", check=True).stdout
    lxc_before = sorted(p.name for p in (host.root / "lxc").iterdir())
    vols_before = sorted(p.name for p in (host.root / "storage-pools/dir/containers").iterdir())
    cases = [
        (["launch", "busybox", "../x"], 3, "invalid container name"),
        (["launch", "busybox", "a b"], 3, "invalid container name"),
        (["launch", "busybox", "x" * 70], 3, "invalid container name"),
        (["launch", "no-such-image", "c2"], 4, "image 'no-such-image' not found"),
        (["launch", "busybox", "c2", "-p", "no-such-pool"], 4, "pool 'no-such-pool' not found"),
        (["launch", "busybox", "ok"], 5, "already exists"),
        (["launch", "busybox", "c3", "-c", "limits.cpu=lots"], 3, "limits.cpu"),
        (["launch", "busybox", "c3", "-c", "bogus.key=1"], 3, "unknown configuration key"),
        (["start", "ghost"], 4, "not found"),
        (["delete", "ok"], 6, "running"),
        (["snapshot", "restore", "ok/nope"], 4, "not found"),
        (["pool", "create", "p2", "--driver", "lvm"], 3, "unknown storage driver"),
        (["pool", "delete", "dir"], 6, "in use"),
    ]
    for args, code, text in cases:
        r = host.cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert "Hint:" in r.stderr or code in (5, 6), (args, r.stderr)
    assert host.cli("list", "-f", "json", check=True).stdout == before
    assert sorted(p.name for p in (host.root / "lxc").iterdir()) == lxc_before
    assert (
        sorted(p.name for p in (host.root / "storage-pools/dir/containers").iterdir())
        == vols_before
    )


def test_limits_are_applied(host) -> None:
    host.cli(
        "launch", "busybox", "lim", "-c", "limits.memory=96MiB", "-c", "limits.cpu=1", check=True
    )
    # read the enforced values from the container's cgroup on the host side
    assert int(host.cts.lxc.get_cgroup("lim", "memory.limit_in_bytes")) == 96 * 2**20
    assert host.cts.lxc.get_cgroup("lim", "cpuset.cpus") == "0"
    host.cli("config", "set", "lim", "limits.memory=128MiB", check=True)  # applied live
    assert int(host.cts.lxc.get_cgroup("lim", "memory.limit_in_bytes")) == 128 * 2**20
    # and it really limits: allocating 200 MiB in the container fails
    rc, _, _ = host.exec("lim", "sh", "-c", "head -c 200m /dev/zero | tail > /dev/null")
    assert rc != 0
    assert host.cli("config", "get", "lim", "limits.memory", check=True).stdout.strip() == str(
        128 * 2**20
    )


def test_privileged_toggle_reshifts_rootfs(host) -> None:
    host.cli("create", "busybox", "t1", "-p", "btrfs", check=True)
    rootfs = host.cts.rootfs(host.cts.get("t1"))
    assert os.stat(rootfs / "etc/passwd").st_uid == 100000
    host.cli("config", "set", "t1", "security.privileged=true", check=True)
    assert os.stat(rootfs / "etc/passwd").st_uid == 0
    host.cli("start", "t1", check=True)
    assert host.exec("t1", "cat", "/proc/self/uid_map")[1].split()[:2] == ["0", "0"]
    r = host.cli("config", "set", "t1", "security.privileged=false")
    assert r.returncode == 6  # only while stopped


def test_image_export_import_roundtrip(make_host, tmp_path) -> None:
    a = make_host(pools=("dir",))
    b = make_host(images=(), pools=("dir",))
    fp = a.cts.images.find("busybox").fingerprint
    out = tmp_path / "busybox.tar.zst"
    a.cli("image", "export", "busybox", str(out), check=True)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    b.cli("image", "import", str(out), "--alias", "bb", check=True)
    rows = json.loads(b.cli("image", "list", "-f", "json", check=True).stdout)
    assert [(r["alias"], r["fingerprint"]) for r in rows] == [("bb", fp[:12])]
    b.cli("launch", "bb", "from-import", check=True)
    assert b.exec("from-import", "true")[0] == 0


def test_pool_lifecycle_leaves_no_mount(host) -> None:
    host.cli("pool", "create", "extra", "--driver", "btrfs", "--size", "1GiB", check=True)
    mnt = host.root / "storage-pools/extra"
    assert os.path.ismount(mnt)
    info = json.loads(host.cli("pool", "info", "extra", "-f", "json", check=True).stdout)
    assert info["driver"] == "btrfs" and info["migration_types"][0] == "btrfs"
    host.cli("launch", "busybox", "p1", "-p", "extra", check=True)
    assert host.cli("pool", "delete", "extra").returncode == 6
    host.cli("delete", "p1", "--force", check=True)
    host.cli("pool", "delete", "extra", check=True)
    assert not os.path.ismount(mnt)
    assert not (host.root / "disks/extra.img").exists()
    with open("/proc/mounts") as f:
        assert str(mnt) not in f.read()
