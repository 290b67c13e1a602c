"""copy, copy --refresh, move and rename of real LXC containers between real pools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from migrator.core.errors import InvalidState, MigratorError, NoSpace
from migrator.pipelines.copy import copy_container, move_container, rename_container
from tests.integration.treecmp import signature


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def write(th, name: str, path: str, text: str) -> None:  # type: ignore[no-untyped-def]
    rc, _out, err = th.exec(name, "sh", "-c", f"echo {text} > {path}")
    assert rc == 0, err


def read(th, name: str, path: str) -> str:  # type: ignore[no-untyped-def]
    rc, out, err = th.exec(name, "cat", path)
    assert rc == 0, err
    return out.strip()


def test_copy_stopped_with_snapshots_across_drivers(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "src", "dir")
    write(host, "src", "/root/v", "one")
    host.cts.snapshot_create("src", "s0")
    write(host, "src", "/root/v", "two")
    host.cts.snapshot_create("src", "s1")
    host.cts.stop("src")
    r = copy_container(host.cts, "src", "dst", pool="btrfs")
    assert r.method == "rsync" and r.snapshots_added == ["s0", "s1"]
    assert signature(rootfs(host, "dst")) == signature(rootfs(host, "src"))
    src_snaps = {s.name: s.uuid for s in host.cts.snapshot_list("src")}
    assert {s.name: s.uuid for s in host.cts.snapshot_list("dst")} == src_snaps
    assert host.cts.get("dst").ipv4 != host.cts.get("src").ipv4
    # the copy is a real container; its snapshots hold the old content
    host.cts.snapshot_restore("dst", "s0")
    host.cts.start("dst")
    assert read(host, "dst", "/root/v") == "one"
    # btrfs -> btrfs goes native
    host.cts.stop("dst")
    r2 = copy_container(host.cts, "dst", "dst2")
    assert r2.method == "btrfs" and r2.snapshots_added == ["s0", "s1"]


def test_copy_running_is_consistent_and_source_keeps_running(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "web", "btrfs")
    write(host, "web", "/root/state", "live")
    r = copy_container(host.cts, "web", "web-copy", pool="dir", instance_only=True)
    assert host.cts.status("web") == "RUNNING"
    assert r.snapshots_added == []
    assert (rootfs(host, "web-copy") / "root" / "state").read_text().strip() == "live"
    # no temporary snapshot is left on either side
    b = host.host.backend("btrfs")
    assert b.list_snapshots(host.cts.volume(host.cts.get("web"))) == []
    res = host.cli("copy", "web", "web-inc", "--allow-inconsistent", "--format", "json",
                   check=True)
    assert json.loads(res.stdout)["method"] == "btrfs"  # native needs a snapshot anyway


@pytest.mark.parametrize("pools", [("btrfs", "btrfs"), ("dir", "btrfs"), ("dir", "zfs"),
                                   ("zfs", "zfs"), ("zfs", "btrfs")])
def test_refresh_sends_changes_adds_snapshots_keeps_target_only(make_host, pools) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=tuple(sorted(set(pools))))
    src_pool, dst_pool = pools
    th.cts.create("busybox", "a", src_pool)
    (rootfs(th, "a") / "data").write_bytes(os.urandom(20 << 20))
    th.cts.snapshot_create("a", "s0")
    copy_container(th.cts, "a", "b", pool=dst_pool)
    # target-only snapshot, then more changes and snapshots on the source
    th.cts.snapshot_create("b", "mine")
    (rootfs(th, "a") / "small").write_text("x" * 1000)
    th.cts.snapshot_create("a", "s1")
    (rootfs(th, "a") / "later").write_text("y")
    r = copy_container(th.cts, "a", "b", refresh=True)
    assert r.snapshots_added == ["s1"]
    assert r.bytes < 1 << 20, r  # not the 20 MiB file again
    assert any("mine" in n for n in r.notes)
    assert signature(rootfs(th, "b")) == signature(rootfs(th, "a"))
    assert [s.name for s in th.cts.snapshot_list("b")] == ["s0", "mine", "s1"]
    # a refresh with nothing changed sends (almost) nothing, and the move verifies
    assert copy_container(th.cts, "a", "b", refresh=True).bytes < 64 << 10
    other = next(p for p in ("dir", "btrfs", "zfs") if p != dst_pool and p in pools) \
        if src_pool != dst_pool else None
    if other:
        r = move_container(th.cts, "b", other, verify=True)
        assert "full checksum" in (r.verified or "")


def test_refresh_gap_is_skipped_and_conflict_refused(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "a", "btrfs")
    for s in ("s0", "s1", "s2"):
        host.cts.snapshot_create("a", s)
    copy_container(host.cts, "a", "b")
    host.cts.snapshot_delete("b", "s1")  # a gap older than the newest shared snapshot
    host.cts.snapshot_create("a", "s3")
    r = copy_container(host.cts, "a", "b", refresh=True)
    assert r.snapshots_added == ["s3"] and r.snapshots_skipped == ["s1"]
    assert r.method == "btrfs"
    # same name, different content on each side: refused, nothing changed
    host.cts.snapshot_create("a", "s4")
    host.cts.snapshot_create("b", "s4")
    (rootfs(host, "a") / "new").write_text("n")
    before = signature(rootfs(host, "b"))
    with pytest.raises(InvalidState, match="different content"):
        copy_container(host.cts, "a", "b", refresh=True)
    assert signature(rootfs(host, "b")) == before
    r = host.cli("copy", "a", "b", "--refresh")
    assert r.returncode == InvalidState.exit_code and "Hint:" in r.stderr


def test_refresh_of_one_percent_moves_about_one_percent(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir",))
    th.host.create_pool("big", "btrfs", None, "5GiB")
    for pool in ("big", "dir"):
        name = f"c-{pool}"
        th.cts.create("busybox", name, pool)
        data = rootfs(th, name) / "data"
        data.mkdir()
        for i in range(100):
            (data / f"f{i:03d}").write_bytes(os.urandom(10 << 20))  # 100 x 10 MiB = 1 GiB
        th.cts.snapshot_create(name, "base")
        full = copy_container(th.cts, name, f"{name}-copy")
        assert full.bytes >= 1000 << 20  # 1000 MiB of data plus the image
        (data / "f042").write_bytes(os.urandom(10 << 20))  # 1% changed
        r = copy_container(th.cts, name, f"{name}-copy", refresh=True)
        ratio = r.bytes / full.bytes
        assert 0.005 < ratio < 0.03, (pool, r.method, r.bytes, full.bytes)
        assert signature(rootfs(th, f"{name}-copy")) == signature(rootfs(th, name))
        th.cts.delete(f"{name}-copy")
        th.cts.delete(name)


def test_move_running_between_drivers_keeps_snapshots(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "m", "dir")
    write(host, "m", "/root/v", "before")
    host.cts.snapshot_create("m", "s0")
    write(host, "m", "/root/v", "after")
    old_path = rootfs(host, "m")
    r = move_container(host.cts, "m", "btrfs")
    assert host.cts.get("m").pool == "btrfs"
    assert host.cts.status("m") == "RUNNING" and r.downtime is not None and r.downtime < 30
    assert read(host, "m", "/root/v") == "after"
    assert not old_path.exists()
    assert r.verified and "match" in r.verified
    host.cts.stop("m")
    host.cts.snapshot_restore("m", "s0")
    assert (rootfs(host, "m") / "root" / "v").read_text().strip() == "before"
    res = host.cli("move", "m", "--pool", "dir", "--verify", "--format", "json", check=True)
    out = json.loads(res.stdout)
    assert out["pool"] == "dir" and "full checksum" in out["verified"]
    rename_container(host.cts, "m", "renamed")
    assert [s.name for s in host.cts.snapshot_list("renamed")] == ["s0"]
    host.cts.start("renamed")
    assert host.cts.status("renamed") == "RUNNING"


def _assert_intact(th, name: str, pool: str, sig: dict) -> None:  # type: ignore[no-untyped-def]
    assert th.cts.get(name).pool == pool
    assert signature(rootfs(th, name)) == sig
    assert [s.name for s in th.cts.snapshot_list(name)] == ["s0"]
    th.cts.start(name)
    assert th.cts.status(name) == "RUNNING"
    th.cts.stop(name, force=True)


def test_move_into_full_pool_leaves_container_whole(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir",))
    th.host.create_pool("tiny", "btrfs", None, "200MiB")
    th.cts.create("busybox", "fat", "dir")
    (rootfs(th, "fat") / "blob").write_bytes(os.urandom(300 << 20))
    th.cts.snapshot_create("fat", "s0")
    sig = signature(rootfs(th, "fat"))
    with pytest.raises(NoSpace):
        move_container(th.cts, "fat", "tiny")
    _assert_intact(th, "fat", "dir", sig)
    tiny = th.host.backend("tiny")
    assert not tiny.volume_exists(th.cts.volume(th.cts.get("fat")))
    assert not any((Path(tiny.path) / "containers-snapshots").glob("fat/*"))


@pytest.mark.parametrize("victim", ["btrfs receive", "cp -a --preserve=all"])
def test_move_with_receiver_killed_mid_stream(make_host, victim) -> None:  # type: ignore[no-untyped-def]
    th = make_host()
    th.host.create_pool("btrfs2", "btrfs", None, "3GiB")
    src_pool, dst_pool = ("btrfs", "btrfs2") if victim == "btrfs receive" else ("dir", "btrfs")
    th.cts.create("busybox", "k", src_pool)
    blob = rootfs(th, "k") / "blob"
    with open(blob, "wb") as f:
        for _ in range(6):
            f.write(os.urandom(100 << 20))
    th.cts.snapshot_create("k", "s0")
    sig = signature(rootfs(th, "k"))
    p = subprocess.Popen([*_migrate(th), "move", "k", "--pool", dst_pool],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_when_running(victim, p)
    _out, err = p.communicate(timeout=300)
    assert killed, f"{victim} never seen; move output: {err}"
    assert p.returncode != 0 and "Error:" in err, err
    _assert_intact(th, "k", src_pool, sig)
    assert not th.host.backend(dst_pool).volume_exists(th.cts.volume(th.cts.get("k")))
    # and the move then succeeds
    move_container(th.cts, "k", dst_pool)
    assert signature(rootfs(th, "k")) == sig


def test_interrupted_move_is_recovered(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host()
    th.cts.create("busybox", "i", "dir")
    with open(rootfs(th, "i") / "blob", "wb") as f:
        for _ in range(5):
            f.write(os.urandom(100 << 20))
    th.cts.snapshot_create("i", "s0")
    sig = signature(rootfs(th, "i"))
    p = subprocess.Popen([*_migrate(th), "move", "i", "--pool", "btrfs"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _kill_when_running("cp -a --preserve=all", p, kill_parent=True)
    p.communicate(timeout=60)
    subprocess.run(["pkill", "-KILL", "-f", f"cp -a --preserve=all.*{th.root}"], check=False)
    _assert_intact(th, "i", "dir", sig)
    ops = json.loads(th.cli("operations", "--format", "json", check=True).stdout)
    assert [(o["kind"], o["status"], o["stage"]) for o in ops] == [
        ("move", "interrupted", "copy")]
    r = th.cli("recover", check=True)
    assert "rolled back" in r.stderr, r.stderr
    assert not th.host.backend("btrfs").volume_exists(th.cts.volume(th.cts.get("i")))
    assert json.loads(th.cli("operations", "--format", "json", check=True).stdout) == []
    r2 = move_container(th.cts, "i", "btrfs")
    assert not any("unfinished" in n for n in r2.notes), r2.notes
    assert signature(rootfs(th, "i")) == sig
    assert [s.name for s in th.cts.snapshot_list("i")] == ["s0"]
    done = json.loads(th.cli("operations", "--all", "--format", "json", check=True).stdout)
    assert [o["status"] for o in done] == ["recovered", "done"]


def _migrate(th) -> list[str]:  # type: ignore[no-untyped-def]
    from tests.integration.conftest import MIGRATE

    return [*MIGRATE, "--root", str(th.root)]


def _kill_when_running(pattern: str, p: subprocess.Popen, kill_parent: bool = False) -> bool:  # type: ignore[type-arg]
    """Wait for a process matching ``pattern`` (child of ``p``) to start moving data, then
    SIGKILL it (or ``p`` itself)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        r = subprocess.run(["pgrep", "-f", "-P", str(p.pid), pattern], capture_output=True,
                           text=True)
        pids = [int(x) for x in r.stdout.split()]
        if not pids:
            # rsync runs as a grandchild pair; look one level deeper
            r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
            pids = [int(x) for x in r.stdout.split() if _descends(int(x), p.pid)]
        if pids:
            time.sleep(0.3)  # let some data flow
            os.kill(p.pid if kill_parent else pids[0], signal.SIGKILL)
            return True
        time.sleep(0.02)
    return False


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_errors_are_clear(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "e", "dir")
    host.cts.create("busybox", "f", "dir")
    r = host.cli("copy", "e", "f")
    assert r.returncode == 5 and "--refresh" in r.stderr
    r = host.cli("move", "e", "--pool", "nope")
    assert r.returncode == 4
    r = host.cli("move", "e", "Bad_Name")
    assert r.returncode == 3
    r = host.cli("move", "e")
    assert r.returncode == 3 and "Hint:" in r.stderr
    host.cts.start("f")
    with pytest.raises(MigratorError, match="running"):
        copy_container(host.cts, "e", "f", refresh=True)
