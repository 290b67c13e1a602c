"""Backups to and from another host over real SSH: ``--repo ssh://HOST/PATH`` and
``backup restore --host``.

Two test hosts (``mt6-a``, ``mt6-b``), each with its own sshd and state root; host a's CLI
reaches host b's repository through b's agent. Containers are named ``br-*``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import MIGRATE, b_in_inventory, host_pair, m, rootfs
from tests.integration.treecmp import signature

BASE = Path("/var/tmp/migrator-tests/backup-remote")
PREFIX = "mt6"


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir", "btrfs"), ("busybox",)) as hosts:
        yield hosts


@pytest.fixture
def hosts(pair):  # type: ignore[no-untyped-def]
    """Host a with b in its inventory; containers and repositories emptied after."""
    a, b = pair
    with b_in_inventory(a, b):
        yield a, b
    for spec in (a, b):
        for repo in (spec.root / "backups", spec.root / "offsite"):
            subprocess.run(["rm", "-rf", "--one-file-system", str(repo)], check=True)


def offsite(b: TestHostSpec) -> tuple[str, Path]:
    """A repository on host b: its ssh:// address and where it is on disk."""
    path = b.root / "offsite"
    return f"ssh://b{path}", path


def make_container(a: TestHostSpec, name: str, mib: int = 4) -> None:
    m(a, "create", "busybox", name, "-p", "dir")
    root = rootfs(a, name)
    (root / "srv").mkdir(exist_ok=True)
    (root / "srv" / "big").write_bytes(os.urandom(mib << 20))
    os.link(root / "srv" / "big", root / "srv" / "big-link")
    (root / "srv" / "sparse").write_bytes(b"")
    with open(root / "srv" / "sparse", "r+b") as f:
        f.truncate(32 << 20)
        f.seek(16 << 20)
        f.write(b"middle")
    os.setxattr(root / "srv" / "big", "user.tag", b"kept")
    os.chown(root / "srv" / "sparse", 101000, 101000)


def backup_create(a: TestHostSpec, *args: str) -> dict:  # type: ignore[type-arg]
    _rc, out, _e = m(a, "backup", "create", *args, "--format", "json")
    return json.loads(out)  # type: ignore[no-any-return]


def test_round_trip_through_a_repository_on_another_host(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    url, path = offsite(b)
    make_container(a, "br-1")
    m(a, "snapshot", "create", "br-1", "s0")
    full = backup_create(a, "br-1", "--repo", url)
    assert full["parent"] is None and full["snapshots_stored"] == ["s0"], full
    # on b: a repository like a local one, files 0600, directories 0700
    files = [p for p in (path / "backups" / full["id"]).rglob("*")]
    assert files and all((p.stat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600)
                         for p in files), [(p, oct(p.stat().st_mode)) for p in files]
    (rootfs(a, "br-1") / "srv" / "small").write_text("after the full backup\n")
    inc = backup_create(a, "br-1", "--incremental", "--repo", url)
    assert inc["parent"] == full["id"] and inc["stored_bytes"] < 256 << 10, inc
    _rc, out, _e = m(a, "backup", "list", "--repo", url, "--format", "json")
    assert [x["id"] for x in json.loads(out)] == [full["id"], inc["id"]]
    m(a, "backup", "verify", "--all", "--deep", "--repo", url)
    # restore here, from there, through the chain
    _rc, out, _e = m(a, "backup", "restore", inc["id"], "--name", "br-1r", "--repo", url,
                     "--format", "json")
    r = json.loads(out)
    assert r["chain"] == [full["id"], inc["id"]] and r["snapshots"] == ["s0"], r
    assert signature(rootfs(a, "br-1r")) == signature(rootfs(a, "br-1"))
    # protect / unprotect / prune through the agent too
    m(a, "backup", "protect", full["id"], "--repo", url)
    _rc, out, _e = m(a, "backup", "info", full["id"], "--repo", url, "--format", "json")
    assert json.loads(out)["protected"] is True


def test_restore_on_another_host_from_here_and_from_there(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    url, _path = offsite(b)
    make_container(a, "br-2")
    m(a, "snapshot", "create", "br-2", "s0")
    here = backup_create(a, "br-2")  # a's own repository
    # from a's repository: copied to b's default repository, restored, copies removed
    _rc, out, _e = m(a, "backup", "restore", here["id"], "--host", "b", "-p", "btrfs",
                     "--format", "json")
    r = json.loads(out)
    assert r["host"] == "b" and r["staged"] == [here["id"]] and r["pool"] == "btrfs", r
    assert signature(rootfs(b, "br-2")) == signature(rootfs(a, "br-2"))
    _rc, out, _e = m(b, "backup", "list", "--format", "json")
    assert json.loads(out) == []  # the staged copy is gone
    _rc, out, _e = m(b, "snapshot", "list", "br-2", "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["s0"]
    m(b, "start", "br-2")
    _rc, out, _e = m(b, "exec", "br-2", "--", "cat", "/srv/sparse")
    assert "middle" in out
    # from a repository on b: restored there directly, nothing staged
    there = backup_create(a, "br-2", "--repo", url)
    _rc, out, _e = m(a, "backup", "restore", there["id"], "--host", "b", "--name", "br-2b",
                     "--repo", url, "--format", "json")
    r = json.loads(out)
    assert r["staged"] == [] and r["container"] == "br-2b", r
    assert signature(rootfs(b, "br-2b")) == signature(rootfs(a, "br-2"))
    # refusing to overwrite is reported from b, with b's exit code
    rc, _o, err = m(a, "backup", "restore", there["id"], "--host", "b", "--name", "br-2b",
                    "--repo", url, check=False)
    assert rc == 5 and "already exists" in err, (rc, err)
    # `backup copy` replicates a chain; a second copy finds it there
    _rc, out, _e = m(a, "backup", "copy", here["id"], "--to", url, "--format", "json")
    assert json.loads(out)["copied"] == [here["id"]]
    _rc, out, _e = m(a, "backup", "copy", here["id"], "--to", url, "--format", "json")
    assert json.loads(out) == {"copied": [], "present": [here["id"]], "bytes": 0}


def test_damage_and_locks_on_a_remote_repository(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    url, path = offsite(b)
    make_container(a, "br-3", mib=1)
    bk = backup_create(a, "br-3", "--repo", url)
    # a writer on b holds the lock: a second one is refused with the holder named
    path.joinpath("lock").touch()
    fd = os.open(path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242\n", 0)
        rc, _o, err = m(a, "backup", "create", "br-3", "--repo", url, check=False)
        assert rc == 20 and "locked" in err and "4242" in err, (rc, err)
    finally:
        os.close(fd)
    # one flipped byte in a part on b: verify names it, restore refuses and changes nothing
    part = next(p for p in (path / "backups" / bk["id"]).rglob("*.zst") if p.stat().st_size)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rc, _o, err = m(a, "backup", "verify", bk["id"], "--repo", url, check=False)
    assert rc == 21 and "checksum mismatch" in err and part.name in err, (rc, err)
    rc, _o, err = m(a, "backup", "restore", bk["id"], "--name", "br-3r", "--repo", url,
                    check=False)
    assert rc == 21 and "checksum mismatch" in err, (rc, err)
    _rc, out, _e = m(a, "list", "--format", "json")
    assert "br-3r" not in [c["name"] for c in json.loads(out)]
    rc, _o, err = m(a, "backup", "list", "--repo", "ssh://b/../etc", check=False)
    assert rc != 0 and "absolute and normalised" in err, err


def test_client_killed_mid_upload_leaves_no_backup_and_no_lock(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    url, path = offsite(b)
    make_container(a, "br-4", mib=192)
    proc = subprocess.Popen([*MIGRATE, "--root", str(a.root), "backup", "create", "br-4",
                             "--repo", url, "--compression", "zstd:19"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > (1 << 20) for p in
                      (path / "backups").glob(".partial-*/**/.*.tmp")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # nothing listed; the lock went with the dead client's channel; a retry succeeds
    _rc, out, _e = m(a, "backup", "list", "--repo", url, "--format", "json")
    assert json.loads(out) == []
    bk = backup_create(a, "br-4", "--repo", url, "--compression", "zstd:1")
    assert not list((path / "backups").glob(".partial-*"))
    m(a, "backup", "verify", bk["id"], "--repo", url)


def test_scheduled_backups_go_to_a_remote_repository(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    url, _path = offsite(b)
    make_container(a, "br-5", mib=1)
    m(a, "config", "set", "br-5", "backups.schedule=@daily", f"backups.repo={url}",
      "backups.incremental=true", "backups.retention=keep-last=2")
    m(a, "schedule", "tick", "--now", "2026-02-28T12:00:00")  # the schedule is first seen
    for day in (1, 2, 3):
        (rootfs(a, "br-5") / "srv" / f"day{day}").write_text(f"{day}\n")
        _rc, out, _e = m(a, "schedule", "tick", "--now", f"2026-03-0{day}T00:05:00",
                         "--format", "json")
        jobs = json.loads(out)["jobs"]
        assert [j["result"] for j in jobs if j["container"] == "br-5"] == ["ok"], jobs
    _rc, out, _e = m(a, "backup", "list", "--repo", url, "--format", "json")
    kept = json.loads(out)
    # keep-last=2, but the oldest kept incremental still needs its full parent
    assert len(kept) == 3 and kept[0]["parent"] is None, kept
    _rc, out, _e = m(a, "backup", "restore", kept[-1]["id"], "--name", "br-5r", "--repo", url)
    assert (rootfs(a, "br-5r") / "srv" / "day3").read_text() == "3\n"
