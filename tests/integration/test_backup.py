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

from backup.create import create_backup
from backup.repository import Repository
from backup.restore import restore_backup
from backup.verify import verify_backup
from migrator.backends import VolumeRef
from migrator.errors import AlreadyExists, BackupError, CorruptBackup
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
    verify_backup(repo, r.id, deep=True)
    # files 0600, directories 0700: a backup holds whole root filesystems
    for p in (repo.path / "backups" / r.id).rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE(repo.path.stat().st_mode) == 0o700

    res = restore_backup(host.cts, repo, r.id, name="bk1-dst", pool="btrfs",
                         config={"limits.cpu": "1"})
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
        restore_backup(host.cts, repo, r.id, name="bk1-dst")
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
