"""import-lxc: adopting containers made with real ``lxc-create`` (busybox and Debian).

The originals live in a private LXC path of each test (never /var/lib/lxc), under the
integration base directory rather than pytest's tmp dir: an unprivileged template runs as a
high uid and must traverse to its rootfs, which pytest's 0700 directories forbid. Every
original is stopped and destroyed after its test, pass or fail; the test hosts' teardown
removes the runtime containers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.backends import VolumeRef
from migrator.pipelines.copy import move_container
from migrator.runtime.images import recipe_key
from tests.integration.conftest import TEST_BASE
from tests.integration.treecmp import signature

UNPRIV = ["lxc.idmap = u 0 200000 65536", "lxc.idmap = g 0 200000 65536"]
NO_NET = ["lxc.net.0.type = empty"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{argv} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def lxcpath() -> Iterator[Path]:
    path = TEST_BASE / f"il-lxc-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, mode=0o711)
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        for d in path.iterdir():
            if (d / "config").exists():
                subprocess.run(["lxc-stop", "-P", str(path), "-n", d.name, "-k"],
                               capture_output=True, timeout=60)
                subprocess.run(["lxc-destroy", "-P", str(path), "-n", d.name, "-f", "-s"],
                               capture_output=True, timeout=120)
        shutil.rmtree(path, ignore_errors=True)


def lxc_create(lxcpath: Path, name: str, conf: list[str], template: str = "busybox",
               args: tuple[str, ...] = ()) -> Path:
    """``lxc-create`` with our own initial config (not /etc/lxc/default.conf, which names a
    bridge and an AppArmor profile this machine does not have)."""
    conf_file = lxcpath / f".{name}.conf"
    conf_file.write_text("\n".join(conf) + "\n")
    run("lxc-create", "-P", str(lxcpath), "-n", name, "-f", str(conf_file), "-t", template,
        *(["--", *args] if args else []))
    return lxcpath / name / "rootfs"


def lxc_state(lxcpath: Path, name: str) -> str:
    return run("lxc-info", "-P", str(lxcpath), "-n", name, "-sH").stdout.strip()


def nothing_changed(th, name: str) -> None:  # type: ignore[no-untyped-def]
    """No record, no volume on any pool, no LXC dir of the runtime's, no operation."""
    assert not th.host.state.has_container(name)
    assert not (th.host.lxcpath / name).exists()
    for pool in th.host.state.list_pools():
        backend = th.host.backend(pool.name)
        assert not backend.volume_exists(VolumeRef("container", name))
    assert [op for op in th.host.state.list_operations() if op.kind == "import-lxc"] == []


def test_busybox_dry_run_then_import_starts_snapshots_and_moves(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    rootfs = lxc_create(lxcpath, "il-bb", [
        "lxc.net.0.type = veth", "lxc.net.0.link = lxcbr0", "lxc.net.0.flags = up",
        "lxc.net.0.hwaddr = 00:16:3e:12:34:56", "lxc.net.0.ipv4.address = 192.0.2.77/24",
        "lxc.net.0.ipv4.gateway = 192.0.2.254",
        "lxc.cgroup.memory.limit_in_bytes = 256M", "lxc.cgroup.cpuset.cpus = 0",
        "lxc.start.auto = 1", "lxc.environment = GREETING=hello",
    ])
    (rootfs / "root" / "marker").write_text("from lxc-create\n")
    os.link(rootfs / "root" / "marker", rootfs / "root" / "marker-link")
    os.setxattr(rootfs / "root" / "marker", "user.origin", b"lxc")
    with open(rootfs / "root" / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.write(b"tail")
    before = signature(rootfs)

    dry = host.cli("import-lxc", "il-bb", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                   "--dry-run", "--format", "json", check=True)
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["privileged"] and plan["ipv4"] == "192.0.2.77"
    assert plan["config"]["limits.memory"] == str(256 << 20)
    assert plan["config"]["limits.cpu"] == "1"
    assert plan["config"]["image.init"] == "busybox"
    unconv = "\n".join(plan["unconvertible"])
    assert "lxc.environment = GREETING=hello" in unconv and "lxc.start.auto = 1" in unconv
    assert "/lib lib none ro,bind" in unconv  # the template's host bind mounts are reported
    nothing_changed(host, "il-bb")
    assert signature(rootfs) == before

    r = host.cli("import-lxc", "il-bb", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                 "--allow-privileged", "--format", "json", check=True)
    done = json.loads(r.stdout)
    assert not done["dry_run"] and done["ipv4"] == "192.0.2.77" and not done["deleted"]
    assert "files match" in done["verified"]
    rec = host.cts.get("il-bb")
    assert rec.pool == "btrfs" and rec.ipv4 == "192.0.2.77"
    assert rec.config["security.privileged"] == "true"
    assert rec.config["volatile.eth0.hwaddr"] == "00:16:3e:12:34:56"
    assert signature(host.cts.rootfs(rec)) == before  # bytes, owners, xattrs, links, holes
    assert (lxcpath / "il-bb" / "config").exists()  # no --delete: the original stays
    assert lxc_state(lxcpath, "il-bb") == "STOPPED"

    host.cts.start("il-bb")
    rc, out, err = host.exec("il-bb", "cat", "/root/marker")
    assert rc == 0 and out == "from lxc-create\n", err
    rc, out, _ = host.exec("il-bb", "cat", "/sys/class/net/eth0/address")
    assert out.strip() == "00:16:3e:12:34:56"
    host.cts.snapshot_create("il-bb", "s0")
    host.exec("il-bb", "sh", "-c", "echo after > /root/marker")
    res = move_container(host.cts, "il-bb", "dir")
    assert res.verified and host.cts.get("il-bb").pool == "dir"
    assert host.cts.status("il-bb") == "RUNNING"
    rc, out, _ = host.exec("il-bb", "cat", "/root/marker")
    assert out == "after\n"
    host.cts.stop("il-bb", force=True)
    host.cts.snapshot_restore("il-bb", "s0")
    assert (host.cts.rootfs(host.cts.get("il-bb")) / "root/marker").read_text() == \
        "from lxc-create\n"


def test_unprivileged_busybox_is_shifted_and_delete_removes_the_original(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    rootfs = lxc_create(lxcpath, "il-un", NO_NET + UNPRIV)
    os.chmod(rootfs / "bin" / "busybox", 0o4755)  # a setuid file must stay setuid
    assert os.lstat(rootfs / "bin" / "busybox").st_uid == 200000
    r = host.cli("import-lxc", "il-un", "--lxcpath", str(lxcpath), "--pool", "dir", "--delete",
                 "--format", "json", check=True)
    done = json.loads(r.stdout)
    assert done["deleted"] and not done["privileged"] and done["shift"] == -100000
    assert not (lxcpath / "il-un").exists()
    new = host.cts.rootfs(host.cts.get("il-un"))
    st = os.lstat(new / "bin" / "busybox")
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    assert st.st_mode & 0o7777 == 0o4755  # setuid survives the shift (chown clears it)
    host.cts.start("il-un")
    rc, out, err = host.exec("il-un", "sh", "-c", "id -u; touch /root/new && stat -c %u /root/new")
    assert rc == 0 and out.split() == ["0", "0"], err
    assert os.lstat(new / "root" / "new").st_uid == 100000


def test_failed_import_keeps_the_original_even_with_delete(make_host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs", "btrfs"))
    rootfs = lxc_create(lxcpath, "il-z", NO_NET)
    os.setxattr(rootfs / "etc" / "passwd", "user.tag", b"x")  # zfs-fuse cannot store it
    before = signature(rootfs)
    r = th.cli("import-lxc", "il-z", "--lxcpath", str(lxcpath), "--pool", "zfs", "--delete",
               "--allow-privileged")
    assert r.returncode == 11, r.stderr  # StorageError
    assert "xattrs" in r.stderr
    assert signature(rootfs) == before and lxc_state(lxcpath, "il-z") == "STOPPED"
    assert not th.host.state.has_container("il-z")
    assert not th.host.backend("zfs").volume_exists(VolumeRef("container", "il-z"))
    ops = [op for op in th.host.state.list_operations() if op.kind == "import-lxc"]
    assert [op.status for op in ops] == ["rolled-back"]
    # without the xattr it goes onto zfs, the original is destroyed, and it moves on
    os.removexattr(rootfs / "etc" / "passwd", "user.tag")
    th.cli("import-lxc", "il-z", "--lxcpath", str(lxcpath), "--pool", "zfs", "--delete",
           "--allow-privileged", check=True)
    assert not (lxcpath / "il-z").exists()
    th.cts.start("il-z")
    assert th.exec("il-z", "true")[0] == 0
    move_container(th.cts, "il-z", "btrfs")
    assert th.exec("il-z", "cat", "/etc/passwd")[1].startswith("root:")


def test_running_original_and_name_clash_are_refused(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    lxc_create(lxcpath, "il-run", NO_NET)
    run("lxc-start", "-P", str(lxcpath), "-n", "il-run")
    try:
        r = host.cli("import-lxc", "il-run", "--lxcpath", str(lxcpath), "--allow-privileged")
        assert r.returncode == 6, r.stderr  # InvalidState
        assert "is running" in r.stderr and f"lxc-stop -P {lxcpath} -n il-run" in r.stderr
        nothing_changed(host, "il-run")
        assert lxc_state(lxcpath, "il-run") == "RUNNING"
    finally:
        run("lxc-stop", "-P", str(lxcpath), "-n", "il-run", "-k")
    host.cts.create("busybox", "il-run", "dir")
    marker = host.cts.rootfs(host.cts.get("il-run")) / "root" / "mine"
    marker.write_text("runtime's own\n")
    r = host.cli("import-lxc", "il-run", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                 "--allow-privileged")
    assert r.returncode == 5, r.stderr  # AlreadyExists
    assert host.cts.get("il-run").pool == "dir" and marker.read_text() == "runtime's own\n"
    assert not host.host.backend("btrfs").volume_exists(VolumeRef("container", "il-run"))
    assert (lxcpath / "il-run" / "config").exists()


def test_all_imports_the_others_when_one_is_broken(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    lxc_create(lxcpath, "il-a", NO_NET)
    lxc_create(lxcpath, "il-b", NO_NET + UNPRIV)
    lxc_create(lxcpath, "il-c", NO_NET)
    conf = lxcpath / "il-c" / "config"
    conf.write_text(conf.read_text().replace("lxc.rootfs.path = dir:", "lxc.rootfs.path = lvm:"))

    dry = host.cli("import-lxc", "--all", "--lxcpath", str(lxcpath), "--dry-run",
                   "--format", "json")
    assert dry.returncode == 25, dry.stderr  # ImportsFailed
    status = {e["name"]: e["status"] for e in json.loads(dry.stdout)}
    assert status == {"il-a": "planned", "il-b": "planned", "il-c": "failed"}
    for name in ("il-a", "il-b", "il-c"):
        nothing_changed(host, name)

    r = host.cli("import-lxc", "--all", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                 "--allow-privileged", "--format", "json")
    assert r.returncode == 25, r.stderr
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["il-a"]["status"] == entries["il-b"]["status"] == "imported"
    assert entries["il-c"]["status"] == "failed" and entries["il-c"]["exit_code"] == 3
    assert "'lvm' backing store" in entries["il-c"]["error"]
    assert "1 of 3 LXC containers were not imported: il-c" in r.stderr
    assert {c.name for c in host.host.state.list_containers()} == {"il-a", "il-b"}
    for name in ("il-a", "il-b"):
        host.cts.start(name)
        assert host.exec(name, "true")[0] == 0


@pytest.fixture(scope="session")
def debian_fstree(image_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's cached Debian image as lxc-local wants it: a tar.xz of the rootfs and a
    tar.xz of metadata holding the LXC config (as the download template's images do)."""
    work = tmp_path_factory.mktemp("il-debian")
    tarball = image_cache / f"{recipe_key('debian/bookworm')}.tar.zst"
    run("tar", "--zstd", "-xf", str(tarball), "-C", str(work), "--numeric-owner", "--xattrs",
        "--xattrs-include=*", "rootfs")
    fstree = work / "fstree.tar.xz"
    env = {**os.environ, "XZ_OPT": "-0 -T2"}  # fast: this is a test fixture, not a release
    subprocess.run(["tar", "-C", str(work / "rootfs"), "--numeric-owner", "--xattrs",
                    "--xattrs-include=*", "-cJf", str(fstree), "."],
                   check=True, env=env, timeout=600)
    shutil.rmtree(work / "rootfs")
    meta = work / "meta"
    meta.mkdir()
    (meta / "config").write_text("lxc.include = LXC_TEMPLATE_CONFIG/common.conf\n"
                                 "lxc.arch = linux64\n")
    (meta / "config-user").write_text("lxc.include = LXC_TEMPLATE_CONFIG/common.conf\n"
                                      "lxc.include = LXC_TEMPLATE_CONFIG/userns.conf\n"
                                      "lxc.arch = linux64\n")
    run("tar", "-C", str(meta), "-cJf", str(work / "meta.tar.xz"), ".")
    return work


@pytest.mark.slow
def test_debian_from_lxc_local_unprivileged_boots_snapshots_and_moves(host, lxcpath,
                                                                       debian_fstree) -> None:  # type: ignore[no-untyped-def]
    rootfs = lxc_create(lxcpath, "il-deb", [
        "lxc.net.0.type = veth", "lxc.net.0.link = lxcbr0", "lxc.net.0.flags = up",
        "lxc.net.0.hwaddr = 00:16:3e:ab:cd:ef", *UNPRIV,
    ], template="local", args=("--metadata", str(debian_fstree / "meta.tar.xz"),
                               "--fstree", str(debian_fstree / "fstree.tar.xz"), "--no-dev"))
    assert os.lstat(rootfs / "etc" / "os-release").st_uid == 200000
    r = host.cli("import-lxc", "il-deb", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                 "--format", "json", check=True)
    done = json.loads(r.stdout)
    assert done["config"]["image.os"] == "debian" and done["config"]["image.init"] == "systemd"
    assert any("common.conf" in x for x in done["replaced"])
    rec = host.cts.get("il-deb")
    assert os.lstat(host.cts.rootfs(rec) / "etc" / "os-release").st_uid == 100000
    host.cts.start("il-deb")
    state = host.cts.wait_booted("il-deb", timeout=120)
    assert state in ("running", "degraded"), state
    rc, out, err = host.exec("il-deb", "sh", "-c", ". /etc/os-release; echo $VERSION_CODENAME")
    assert rc == 0 and out.strip() == "bookworm", err
    host.cts.snapshot_create("il-deb", "s0")
    res = move_container(host.cts, "il-deb", "dir")
    assert res.downtime is not None and host.cts.get("il-deb").pool == "dir"
    assert host.cts.status("il-deb") == "RUNNING"
    assert [s.name for s in host.cts.snapshot_list("il-deb")] == ["s0"]


KILLED_IN_VERIFY = """
import os, sys
import migrator.adopt.adoption as li
li.verify_trees = lambda *a, **k: os._exit(9)  # the process dies between copy and record
sys.argv = ["migrate", *sys.argv[1:]]
from migrator.cli.main import main
main()
"""


def test_recover_rolls_back_an_import_killed_before_its_record(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    lxc_create(lxcpath, "il-k", NO_NET)
    r = subprocess.run([sys.executable, "-c", KILLED_IN_VERIFY, "--root", str(host.root),
                        "import-lxc", "il-k", "--lxcpath", str(lxcpath), "--pool", "btrfs",
                        "--allow-privileged"],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 9, r.stderr
    assert host.host.backend("btrfs").volume_exists(VolumeRef("container", "il-k"))
    rec = host.cli("recover", check=True)
    assert "rolled back: the partial import of il-k on btrfs was removed" in rec.stdout + \
        rec.stderr
    assert not host.host.backend("btrfs").volume_exists(VolumeRef("container", "il-k"))
    assert not host.host.state.has_container("il-k")
    assert (lxcpath / "il-k" / "config").exists()
    host.cli("import-lxc", "il-k", "--lxcpath", str(lxcpath), "--pool", "btrfs",
             "--allow-privileged", check=True)
    host.cts.start("il-k")
    assert host.exec("il-k", "true")[0] == 0


def test_delete_keeps_an_original_with_lxc_snapshots(host, lxcpath) -> None:  # type: ignore[no-untyped-def]
    lxc_create(lxcpath, "il-s", NO_NET)
    run("lxc-snapshot", "-P", str(lxcpath), "-n", "il-s")
    r = host.cli("import-lxc", "il-s", "--lxcpath", str(lxcpath), "--pool", "dir", "--delete",
                 "--allow-privileged", "--format", "json", check=True)
    done = json.loads(r.stdout)
    assert not done["deleted"]
    assert any("LXC snapshots snap0" in u for u in done["unconvertible"])
    assert any(f"lxc-destroy -P {lxcpath} -s -n il-s" in n for n in done["notes"])
    assert (lxcpath / "il-s" / "config").exists() and host.host.state.has_container("il-s")
