"""Backups of real containers on real pools: round trips, incremental chains, damage, locks.

Containers are named ``bk1-*``. Each test runs on its own test host (torn down after it,
pass or fail), with its repository inside the host's state root.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrator.backends import VolumeRef
from migrator.backup.create import create_backup
from migrator.backup.repository import Repository
from migrator.backup.restore import restore_backup
from migrator.backup.verify import check_backup, raise_if_damaged
from migrator.core.errors import AlreadyExists, BackupError, CorruptBackup, UnsafeArchive
from tests.integration.treecmp import populate, signature


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def repo_of(th) -> Repository:  # type: ignore[no-untyped-def]
    return Repository(th.root / "backups")


def snap_sig(th, name: str, snap: str, xattrs: bool = True) -> dict:  # type: ignore[no-untyped-def]
    """Signature of a container snapshot's rootfs (read through the driver)."""
    rec = th.cts.get(name)
    b = th.host.backend(rec.pool)
    s = next(x for x in b.list_snapshots(VolumeRef("container", rec.name)) if x.name == snap)
    with b.mount_snapshot(s) as path:
        return signature(path / "rootfs", xattrs)


def privileged(th, name: str, pool: str) -> None:  # type: ignore[no-untyped-def]
    """A stopped privileged busybox container whose rootfs holds every awkward file kind."""
    th.cts.create("busybox", name, pool, {"security.privileged": "true"})
    populate(rootfs(th, name) / "srv", xattrs=th.host.backend(pool).supports_xattrs)


def test_generic_round_trip_onto_other_driver_keeps_everything(host) -> None:  # type: ignore[no-untyped-def]
    privileged(host, "bk1-src", "dir")
    host.cts.snapshot_create("bk1-src", "s0")
    (rootfs(host, "bk1-src") / "srv" / "later").write_text("after s0\n")
    host.cts.config_set("bk1-src", {"limits.memory": "256MiB"})
    repo = repo_of(host)
    r = create_backup(host.cts, "bk1-src", repo)
    assert r.kind == "generic" and r.parent is None and r.snapshots_stored == ["s0"]
    raise_if_damaged([check_backup(repo, r.id, deep=True)])
    # files 0600, directories 0700: a backup holds whole root filesystems
    for p in (repo.path / "backups" / r.id).rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE(repo.path.stat().st_mode) == 0o700

    res = restore_backup(host.cts, repo, r.id, name="bk1-dst", pool="btrfs",
                         config={"limits.cpu": "1"}, allow_privileged=True)
    assert res.snapshots == ["s0"]
    assert signature(rootfs(host, "bk1-dst")) == signature(rootfs(host, "bk1-src"))
    assert snap_sig(host, "bk1-dst", "s0") == snap_sig(host, "bk1-src", "s0")
    src_uuid = {s.name: s.uuid for s in host.cts.snapshot_list("bk1-src")}
    assert {s.name: s.uuid for s in host.cts.snapshot_list("bk1-dst")} == src_uuid
    conf = host.cts.get("bk1-dst").config
    assert conf["limits.memory"] == str(256 << 20) and conf["limits.cpu"] == "1"
    assert conf["security.privileged"] == "true"
    # only s0 on disk: no temporary or base snapshot left on either container
    b = host.host.backend("btrfs")
    assert [s.name for s in b.list_snapshots(VolumeRef("container", "bk1-dst"))] == ["s0"]
    d = host.host.backend("dir")
    assert [s.name for s in d.list_snapshots(VolumeRef("container", "bk1-src"))] == ["s0"]
    # the restored container runs
    host.cts.start("bk1-dst")
    rc, out, _ = host.exec("bk1-dst", "cat", "/srv/later")
    assert rc == 0 and out.strip() == "after s0"
    # a second restore under the same name is refused, with the way out in the hint
    with pytest.raises(AlreadyExists) as e:
        restore_backup(host.cts, repo, r.id, name="bk1-dst", allow_privileged=True)
    assert "--force" in e.value.hint


def test_running_container_keeps_running_and_cli_round_trip(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "bk1-run", "btrfs")
    rc, _, err = host.exec("bk1-run", "sh", "-c", "echo live > /root/state")
    assert rc == 0, err
    res = host.cli("backup", "create", "bk1-run", "--format", "json", check=True)
    out = json.loads(res.stdout)
    assert host.cts.status("bk1-run") == "RUNNING"
    listed = json.loads(host.cli("backup", "list", "--format", "json", check=True).stdout)
    assert [b["id"] for b in listed] == [out["id"]]
    info = json.loads(host.cli("backup", "info", out["id"], "--format", "json",
                               check=True).stdout)
    assert info["container"] == "bk1-run" and info["parts"]
    assert host.cli("backup", "verify", out["id"], "--deep", check=True).returncode == 0
    # restore over the running original needs --force; then it is replaced, stopped
    res = host.cli("backup", "restore", out["id"])
    assert res.returncode == AlreadyExists.exit_code and "--force" in res.stderr
    host.cli("backup", "restore", out["id"], "--force", "--pool", "dir", check=True)
    assert host.cts.get("bk1-run").pool == "dir"
    assert (rootfs(host, "bk1-run") / "root" / "state").read_text() == "live\n"
    host.cts.start("bk1-run")
    assert host.cts.status("bk1-run") == "RUNNING"


def _step1(srv: Path) -> None:
    (srv / "new.txt").write_text("new in step 1\n")
    host_file = srv / "etc" / "hostname"
    host_file.write_text("xyz\n")  # same length, new content and mtime
    os.utime(host_file, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    (srv / "big").write_bytes(os.urandom(8 << 20))


def _step2(srv: Path) -> None:
    (srv / "bin" / "tool-hardlink").unlink()  # the inode's link count changes
    os.rmdir(srv / "empty")
    os.chmod(srv / "etc" / "shadow", 0o600)
    os.chown(srv / "new.txt", 100007, 100008)


def _step3(srv: Path) -> None:
    (srv / "sparse.img").unlink()  # a file becomes a directory
    (srv / "sparse.img").mkdir()
    (srv / "sparse.img" / "inside").write_text("i\n")
    (srv / "bin" / "dangling").unlink()  # a symlink becomes a file
    (srv / "bin" / "dangling").write_text("now a file\n")
    os.link(srv / "bin" / "tool", srv / "bin" / "tool-again")  # a new name of an old inode
    with open(srv / "big", "r+b") as f:  # 1 MiB changed in the middle of 8
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))


def _step4(srv: Path) -> None:
    (srv / "etc").rename(srv / "etc2")  # a directory moves: all of it is new
    (srv / "etc2" / "deep" / "er").mkdir(parents=True)
    (srv / "etc2" / "deep" / "er" / "f").write_text("deep\n")


@pytest.mark.parametrize(("pool", "optimized"), [("dir", False), ("btrfs", True)])
def test_incremental_chain_of_five_restores_every_point(host, pool, optimized) -> None:  # type: ignore[no-untyped-def]
    name = "bk1-inc"
    privileged(host, name, pool)
    host.cts.snapshot_create(name, "s0")
    repo = repo_of(host)
    expected = []
    results = []
    for i, step in enumerate([None, _step1, _step2, _step3, _step4]):
        if step is not None:
            step(rootfs(host, name) / "srv")
        if i == 2:
            host.cts.snapshot_create(name, "s2")
        if i == 3:
            host.cts.snapshot_delete(name, "s0")
        r = create_backup(host.cts, name, repo, optimized=optimized, incremental=True,
                          compression="zstd:1")
        assert (r.parent is None) == (i == 0), r
        if i == 0:
            assert any("full backup" in n for n in r.notes)
        results.append(r)
        snaps = {s.name: snap_sig(host, name, s.name) for s in host.cts.snapshot_list(name)}
        expected.append((signature(rootfs(host, name)), snaps))
    # increments store what changed, not the whole container again
    assert results[2].stored_bytes < results[1].stored_bytes / 4
    if optimized:  # block level: 1 MiB of 8 changed
        assert results[3].stored_bytes < (3 << 20), results[3]
    else:  # file level: the changed 8 MiB file again, but nothing unchanged
        assert results[3].stored_bytes < (9 << 20), results[3]
    if optimized:  # one base snapshot kept on the pool, not listed as a user snapshot
        on_disk = {s.name for s in host.host.backend(pool).list_snapshots(
            VolumeRef("container", name))}
        assert on_disk == {"s2", repo.get(results[-1].id).base_snapshot}
        assert [s.name for s in host.cts.snapshot_list(name)] == ["s2"]
    for i, r in enumerate(results):
        raise_if_damaged([check_backup(repo, r.id, deep=True)])
        target = f"bk1-r{i}"
        res = restore_backup(host.cts, repo, r.id, name=target, pool=pool,
                             allow_privileged=True)
        assert res.chain == [x.id for x in results[: i + 1]]
        files, snaps = expected[i]
        assert signature(rootfs(host, target)) == files, f"point {i}"
        assert sorted(s.name for s in host.cts.snapshot_list(target)) == sorted(snaps)
        for s, sig in snaps.items():
            assert snap_sig(host, target, s) == sig, f"point {i} snapshot {s}"
        host.cts.delete(target)


def test_damage_is_reported_precisely_and_nothing_changes(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk1-dmg", "dir")
    host.cts.snapshot_create("bk1-dmg", "s0")
    repo = repo_of(host)
    r = create_backup(host.cts, "bk1-dmg", repo)
    second = create_backup(host.cts, "bk1-dmg", repo, compression="none")
    idx = repo.get(r.id)
    by_kind = {p.path: p for p in idx.parts}
    snap_part, main_part, manifest = (by_kind["snapshots/s0.tar.zst"],
                                      by_kind["container.tar.zst"], by_kind["manifest.json.zst"])
    bdir = repo.path / "backups" / r.id
    before = signature(rootfs(host, "bk1-dmg"))
    pool_dir = host.host.backend("dir").path / "containers"
    volumes_before = sorted(os.listdir(pool_dir))

    # flip one byte, truncate one part, delete another: three distinct messages
    with open(bdir / main_part.path, "r+b") as f:
        f.seek(main_part.size // 2)
        byte = f.read(1)
        f.seek(main_part.size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    with open(bdir / snap_part.path, "r+b") as f:
        f.truncate(snap_part.size - 100)
    (bdir / manifest.path).unlink()
    with pytest.raises(CorruptBackup) as e:
        raise_if_damaged([check_backup(repo, r.id)])
    msg = e.value.message
    assert f"part {main_part.path} checksum mismatch" in msg
    assert f"part {snap_part.path} truncated: {snap_part.size - 100} of {snap_part.size} " \
           "bytes" in msg
    assert f"missing part {manifest.path}" in msg
    # an index that lies about itself
    index = repo.path / "backups" / second.id / "index.json"
    doc = json.loads(index.read_text())
    doc["parts"][0]["path"] = "../../etc/passwd"
    index.write_text(json.dumps(doc))
    res = host.cli("backup", "verify", "--all", "--format", "json")
    assert res.returncode == CorruptBackup.exit_code
    reports = {x["id"]: x for x in json.loads(res.stdout)}
    assert len(reports[r.id]["problems"]) == 3
    assert "index malformed" in reports[second.id]["problems"][0]
    assert "not a plain relative name" in reports[second.id]["problems"][0]

    # restore refuses, over the existing container too, and nothing changed
    for bid in (r.id, second.id):
        res = host.cli("backup", "restore", bid, "--force")
        assert res.returncode == CorruptBackup.exit_code, res.stderr
        assert "nothing was restored" in res.stderr or "index malformed" in res.stderr
    assert signature(rootfs(host, "bk1-dmg")) == before
    assert sorted(os.listdir(pool_dir)) == volumes_before
    assert [c.name for c in host.cts.state.list_containers()] == ["bk1-dmg"]


def test_checksums_checked_while_restoring_leave_nothing_behind(host) -> None:  # type: ignore[no-untyped-def]
    """--verify-while-restoring: a flipped byte is found as the part streams; the scratch
    volume is removed and the container being replaced is untouched."""
    host.cts.create("busybox", "bk1-vwr", "dir")
    (rootfs(host, "bk1-vwr") / "big").write_bytes(os.urandom(8 << 20))
    repo = repo_of(host)
    r = create_backup(host.cts, "bk1-vwr", repo, compression="none")
    good = restore_backup(host.cts, repo, r.id, "bk1-vwr2", verify_first=False)
    assert signature(rootfs(host, "bk1-vwr2")) == signature(rootfs(host, "bk1-vwr"))
    host.cts.delete("bk1-vwr2")
    del good
    part = next(p for p in repo.get(r.id).parts if p.kind == "tar")
    with open(repo.path / "backups" / r.id / part.path, "r+b") as f:
        f.seek(part.size - (1 << 20))  # late in the stream: most of it is written first
        byte = f.read(1)
        f.seek(part.size - (1 << 20))
        f.write(bytes([byte[0] ^ 0x01]))
    before = signature(rootfs(host, "bk1-vwr"))
    pool_dir = host.host.backend("dir").path / "containers"
    volumes_before = sorted(os.listdir(pool_dir))
    res = host.cli("backup", "restore", r.id, "--force", "--verify-while-restoring")
    assert res.returncode == CorruptBackup.exit_code, res.stderr
    assert f"part {part.path} checksum mismatch" in res.stderr, res.stderr
    assert signature(rootfs(host, "bk1-vwr")) == before
    assert sorted(os.listdir(pool_dir)) == volumes_before
    assert [c.name for c in host.cts.state.list_containers()] == ["bk1-vwr"]


def test_second_writer_waits_then_is_refused_naming_the_holder(host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk1-lock", "btrfs")
    repo = repo_of(host).init()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n",
         str(repo.path / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr("migrator.backup.repository.LOCK_WAIT", 1.0)
        t0 = time.monotonic()
        with pytest.raises(BackupError, match=f"locked by another writer \\(pid {holder.pid}\\)"):
            create_backup(host.cts, "bk1-lock", repo)
        assert time.monotonic() - t0 >= 1.0  # it waited before giving up
        assert repo.list() == [] and os.listdir(repo.path / "backups") == []
    finally:
        holder.kill()
        holder.wait()
    r = create_backup(host.cts, "bk1-lock", repo)  # the lock died with its holder
    assert [b.id for b in repo.list()] == [r.id]


def test_failed_backup_leaves_nothing_and_next_writer_clears_debris(host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "bk1-fail", "btrfs")
    repo = repo_of(host).init()
    (repo.path / "backups" / ".partial-bk1-x-20200101T000000Z-abcdef").mkdir()

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BackupError("disk went away")

    monkeypatch.setattr("migrator.backup.create._write_native", boom)
    with pytest.raises(BackupError, match="disk went away"):
        create_backup(host.cts, "bk1-fail", repo, optimized=True)
    assert os.listdir(repo.path / "backups") == []  # debris and the partial backup gone
    assert host.cts.status("bk1-fail") == "RUNNING"
    b = host.host.backend("btrfs")
    assert b.list_snapshots(VolumeRef("container", "bk1-fail")) == []
    op = host.cts.state.list_operations()[-1]
    assert (op.kind, op.status) == ("backup", "rolled-back")


def test_restore_on_another_host_and_optimized_needs_its_driver(make_host) -> None:  # type: ignore[no-untyped-def]
    a = make_host(pools=("btrfs",))
    b = make_host(pools=("dir",), subnet="198.51.100.1/24")
    a.cts.create("busybox", "bk1-far", "btrfs")
    (rootfs(a, "bk1-far") / "root" / "f").write_text("from a\n")
    repo = repo_of(a)
    generic = create_backup(a.cts, "bk1-far", repo)
    optimized = create_backup(a.cts, "bk1-far", repo, optimized=True)
    shared = Repository(repo.path)  # the same directory, seen from host b
    with pytest.raises(BackupError, match="needs a btrfs pool") as e:
        restore_backup(b.cts, shared, optimized.id)
    assert "migrate pool create" in e.value.hint
    assert b.cts.state.list_containers() == []
    restore_backup(b.cts, shared, generic.id)
    assert signature(rootfs(b, "bk1-far")) == signature(rootfs(a, "bk1-far"))
    assert b.cts.get("bk1-far").ipv4.startswith("198.51.100.")
    b.cts.start("bk1-far")
    rc, out, _ = b.exec("bk1-far", "cat", "/root/f")
    assert (rc, out) == (0, "from a\n")


def test_zfs_optimized_incremental_restores_onto_zfs_and_dir(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir", "zfs"))
    th.cts.create("busybox", "bk1-z", "zfs", {"security.privileged": "true"})
    populate(rootfs(th, "bk1-z") / "srv", xattrs=False)
    th.cts.snapshot_create("bk1-z", "s0")
    repo = repo_of(th)
    full = create_backup(th.cts, "bk1-z", repo, optimized=True)
    (rootfs(th, "bk1-z") / "srv" / "added").write_text("second\n")
    # s0 deleted and made again: same name, new content; the chain holds both
    th.cts.snapshot_delete("bk1-z", "s0")
    th.cts.snapshot_create("bk1-z", "s0")
    inc = create_backup(th.cts, "bk1-z", repo, optimized=True, incremental=True)
    assert inc.parent == full.id and inc.snapshots_stored == ["s0"]
    generic = create_backup(th.cts, "bk1-z", repo)  # tar through a zfs clone
    want = signature(rootfs(th, "bk1-z"), with_xattrs=False)
    for pool in ("zfs", "dir"):
        res = restore_backup(th.cts, repo, inc.id, name=f"bk1-z-{pool}", pool=pool,
                             allow_privileged=True)
        assert res.method.startswith("zfs")
        assert signature(rootfs(th, f"bk1-z-{pool}"), with_xattrs=False) == want
        assert [s.name for s in th.cts.snapshot_list(f"bk1-z-{pool}")] == ["s0"]
        assert snap_sig(th, f"bk1-z-{pool}", "s0", False) == snap_sig(th, "bk1-z", "s0", False)
    restore_backup(th.cts, repo, generic.id, name="bk1-z-tar", pool="dir",
                   allow_privileged=True)
    assert signature(rootfs(th, "bk1-z-tar"), with_xattrs=False) == want


def test_device_node_in_an_unprivileged_backup_is_refused_before_it_lands(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk1-dev", "dir")  # unprivileged
    os.mknod(rootfs(host, "bk1-dev") / "root" / "kmem", 0o600 | stat.S_IFCHR,
             os.makedev(1, 2))
    repo = repo_of(host)
    r = create_backup(host.cts, "bk1-dev", repo)
    assert any("root/kmem" in n and "restore will refuse" in n for n in r.notes), r.notes
    res = host.cli("backup", "verify", r.id, "--deep")
    assert res.returncode == CorruptBackup.exit_code
    assert "device nodes are refused unless the container is privileged" in res.stderr
    res = host.cli("backup", "restore", r.id, "--name", "bk1-dev2", "--pool", "btrfs")
    assert res.returncode == UnsafeArchive.exit_code, res.stderr
    assert "root/kmem" in res.stderr
    assert not host.cts.state.has_container("bk1-dev2")
    assert os.listdir(host.host.backend("btrfs").path / "containers") == []
    assert host.cts.state.list_operations()[-1].status == "rolled-back"


def test_cli_protect_and_prune_keep_what_the_policy_and_chains_need(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk1-pr", "dir")
    ids = []
    for i in range(4):
        (rootfs(host, "bk1-pr") / "root" / f"f{i}").write_text(str(i))
        args = ["backup", "create", "bk1-pr", "-c", "zstd:1"] + (["-i"] if i == 3 else [])
        ids.append(host.cli(*args, check=True).stdout.strip())
    host.cli("backup", "protect", ids[0], check=True)
    res = host.cli("backup", "prune", "--keep-last", "1", "--dry-run", "--format", "json",
                   check=True)
    plan = json.loads(res.stdout)
    # the newest (incremental) needs its parent; the oldest is protected; one goes
    assert plan["remove"] == [ids[1]] and plan["removed"] == []
    assert "protected" in plan["keep"][ids[0]]
    assert any("needed by" in why for why in plan["keep"][ids[2]])
    assert sorted(b.id for b in repo_of(host).list()) == sorted(ids)  # dry run: no change
    res = host.cli("backup", "prune", "--keep-last", "1", "--list", check=True)
    assert f"remove  {ids[1]}" in res.stderr
    assert [b.id for b in repo_of(host).list()] == [ids[0], ids[2], ids[3]]
    host.cli("backup", "unprotect", ids[0], check=True)
    host.cli("backup", "prune", "--keep-last", "1", check=True)
    assert [b.id for b in repo_of(host).list()] == [ids[2], ids[3]]
    host.cli("backup", "restore", ids[3], "--name", "bk1-pr2", check=True)
    assert (rootfs(host, "bk1-pr2") / "root" / "f3").read_text() == "3"


def test_killed_backup_is_rolled_back_by_recover(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk1-kill", "btrfs")
    (rootfs(host, "bk1-kill") / "root" / "big").write_bytes(os.urandom(96 << 20))
    repo = repo_of(host).init()
    from tests.integration.conftest import MIGRATE

    p = subprocess.Popen([*MIGRATE, "--root", str(host.root), "backup", "create", "bk1-kill",
                          "--optimized", "--compression", "zstd:19"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until data is being written
            parts = [f for f in (repo.path / "backups").rglob("*") if f.is_file()]
            if any(f.stat().st_size > 0 for f in parts):
                break
            assert p.poll() is None, "the backup ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no part was ever written")
    finally:
        p.kill()
        p.wait()
    vol = VolumeRef("container", "bk1-kill")
    b = host.host.backend("btrfs")
    assert [s.name for s in b.list_snapshots(vol)] != []  # the base it was sending from
    res = host.cli("recover", check=True)
    assert "(backup): rolled back" in res.stderr
    assert b.list_snapshots(vol) == []
    assert repo.list() == []
    r = create_backup(host.cts, "bk1-kill", repo, compression="zstd:1")  # clears the debris
    assert os.listdir(repo.path / "backups") == [r.id]


def _without_dev(sig: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in sig.items() if not k.startswith("dev/")}


def test_unprivileged_debian_round_trip_leaves_dev_to_lxc(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(images=("debian/bookworm",), pools=("dir", "btrfs"))
    th.cts.create("debian/bookworm", "bk1-deb", "dir")
    src = rootfs(th, "bk1-deb")
    assert any(stat.S_ISCHR(os.lstat(src / "dev" / n).st_mode) for n in os.listdir(src / "dev"))
    repo = repo_of(th)
    full = create_backup(th.cts, "bk1-deb", repo)
    (src / "etc" / "motd").write_text("changed\n")
    inc = create_backup(th.cts, "bk1-deb", repo, incremental=True)
    assert inc.parent == full.id
    res = th.cli("backup", "verify", "--all", "--deep")
    assert res.returncode == 0, res.stderr
    restore_backup(th.cts, repo, inc.id, name="bk1-deb2", pool="btrfs")
    dst = rootfs(th, "bk1-deb2")
    assert os.listdir(dst / "dev") == []  # LXC mounts a tmpfs there (lxc.autodev)
    assert _without_dev(signature(dst)) == _without_dev(signature(src))
    th.cts.start("bk1-deb2")
    rc, out, err = th.exec("bk1-deb2", "sh", "-c", "cat /etc/motd; test -c /dev/null")
    assert (rc, out) == (0, "changed\n"), err


_DIE_AT = """
import os, signal, sys
from migrator.runtime.containers import Containers
from migrator.runtime.lxc import LxcDriver

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "record":
    Containers.record_received = die      # the old container gone, the new one moved in
else:
    LxcDriver.remove_config = die         # inside the old container's deletion
sys.argv = ["migrate", *sys.argv[2:]]
from migrator.cli.main import main
main()
"""


@pytest.mark.parametrize("cut", ["record", "delete"])
def test_restore_force_cut_while_replacing_is_completed_by_recover(host, cut) -> None:  # type: ignore[no-untyped-def]
    """Once the replaced container is being deleted, the restored volume is the only copy:
    recover must move it in and record it, never remove it."""
    host.cts.create("busybox", "bk1-rep", "btrfs")
    host.cts.config_set("bk1-rep", {"limits.memory": "200MiB"})
    memory = host.cts.get("bk1-rep").config["limits.memory"]
    (rootfs(host, "bk1-rep") / "root" / "v").write_text("backed up")
    host.cts.snapshot_create("bk1-rep", "s0")
    r = create_backup(host.cts, "bk1-rep", repo_of(host))
    (rootfs(host, "bk1-rep") / "root" / "v").write_text("replaced")
    p = subprocess.run([sys.executable, "-c", _DIE_AT, cut, "--root", str(host.root), "backup",
                        "restore", r.id, "--force"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert p.returncode == -9, p.stderr
    ops = json.loads(host.cli("operations", "--format", "json", check=True).stdout)
    assert [(o["kind"], o["status"]) for o in ops] == [("restore", "interrupted")]
    res = host.cli("recover", check=True)
    assert "completed: bk1-rep was restored" in res.stderr, res.stderr
    rec = host.cts.get("bk1-rep")
    assert rec.config["limits.memory"] == memory
    assert [s.name for s in host.cts.snapshot_list("bk1-rep")] == ["s0"]
    assert (rootfs(host, "bk1-rep") / "root" / "v").read_text() == "backed up"
    vols = {v.name for v in (host.root / "storage-pools" / "btrfs" / "containers").iterdir()}
    assert vols == {"bk1-rep"}, vols  # no scratch volume left
    host.cts.start("bk1-rep")
    assert host.cts.status("bk1-rep") == "RUNNING"
    assert json.loads(host.cli("operations", "--format", "json", check=True).stdout) == []
