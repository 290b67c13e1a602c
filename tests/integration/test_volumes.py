"""Custom volumes: create, attach into a real container, snapshot, copy, refresh, move."""

from __future__ import annotations

import json

import pytest

from migrator.core.errors import InvalidInput, InvalidState
from migrator.pipelines.volume_copy import copy_volume, move_volume
from migrator.runtime.volumes import Volumes
from tests.integration.treecmp import signature


def test_volume_lifecycle_in_a_container(host) -> None:  # type: ignore[no-untyped-def]
    vols = Volumes(host.cts)
    host.cts.create("busybox", "app", "dir")
    vols.create("data", "btrfs")
    assert vols.attach("data", "app", "/srv/data") is False
    host.cts.start("app")
    rc, _o, err = host.exec("app", "sh", "-c", "echo hello > /srv/data/f && id -u")
    assert rc == 0, err
    path = host.host.backend("btrfs").volume_path(vols._ref("data"))
    assert (path / "f").read_text() == "hello\n"
    assert (path / "f").stat().st_uid == 100000  # written by the unprivileged root
    assert vols.snapshot_create("data", None) == "snap0"
    host.exec("app", "sh", "-c", "echo changed > /srv/data/f")
    # copy (with the snapshot) to a dir pool, then refresh it
    r = copy_volume(host.cts, "data", "data-copy", target_pool="dir")
    assert r.snapshots_added == ["snap0"]
    assert (host.host.backend("dir").volume_path(vols._ref("data-copy")) / "f").read_text() \
        == "changed\n"
    host.exec("app", "sh", "-c", "echo third > /srv/data/f")
    vols.snapshot_create("data", "s1")
    r = copy_volume(host.cts, "data", "data-copy", target_pool="dir", refresh=True)
    assert r.snapshots_added == ["s1"]
    assert [s.name for s in vols.snapshot_list("data-copy", "dir")] == ["snap0", "s1"]
    # a volume in use by a running container is neither deleted nor moved
    with pytest.raises(InvalidState):
        vols.delete("data")
    with pytest.raises(InvalidState):
        move_volume(host.cts, "data", "dir", "data-moved")
    host.cts.stop("app")
    before = signature(path)
    r = move_volume(host.cts, "data", "dir", "data-moved", verify=True)
    moved = host.host.backend("dir").volume_path(vols._ref("data-moved"))
    assert signature(moved) == before and not path.exists()
    assert [s.name for s in vols.snapshot_list("data-moved")] == ["snap0", "s1"]
    # the attachment followed the volume: the container mounts it from the new pool
    host.cts.start("app")
    rc, out, _e = host.exec("app", "cat", "/srv/data/f")
    assert rc == 0 and out == "third\n"
    host.cts.stop("app")
    vols.detach("data-moved", "app")
    vols.delete("data-moved")
    assert [v.name for v in vols.list_all()] == ["data-copy"]


def test_volume_cli_and_bad_input(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "c1", "dir")
    host.cli("volume", "create", "v1", "--pool", "dir", check=True)
    for bad in ("relative/path", "/a/../etc", "/with space", "/x\nlxc.hook.pre-start=/bin/sh"):
        r = host.cli("volume", "attach", "v1", "c1", bad)
        assert r.returncode == InvalidInput.exit_code, (bad, r.stderr)
    host.cli("volume", "attach", "v1", "c1", "/mnt/v", check=True)
    cfg = (host.root / "lxc" / "c1" / "config").read_text()
    assert "mnt/v none bind,create=dir" in cfg
    host.cli("volume", "snapshot", "create", "v1", "first", check=True)
    out = json.loads(host.cli("volume", "list", "--format", "json", check=True).stdout)
    assert out[0]["name"] == "v1" and out[0]["used_by"] == "c1" and out[0]["snapshots"] == 1
    r = host.cli("volume", "copy", "v1", "v2", "--target-pool", "btrfs", "--format", "json",
                 check=True)
    assert json.loads(r.stdout)["snapshots_added"] == ["first"]
    r = host.cli("volume", "delete", "v1")
    assert r.returncode == InvalidState.exit_code and "detach" in r.stderr
    host.cli("volume", "detach", "v1", "c1", check=True)
    assert "mnt/v" not in (host.root / "lxc" / "c1" / "config").read_text()
    host.cli("volume", "delete", "v1", check=True)
    # deleting a container drops its attachments
    host.cli("volume", "attach", "v2", "c1", "/data", check=True)
    host.cts.delete("c1")
    host.cli("volume", "delete", "v2", check=True)
