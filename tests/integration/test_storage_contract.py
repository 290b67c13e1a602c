"""The storage contract, run unchanged over every driver (dir, btrfs, zfs through zfs-fuse).

Each test builds a tree with every awkward property (owners, modes, setuid, hard links,
symlinks, a sparse file, a device node, a fifo, xattrs and an ACL where the pool keeps
them), moves it, and compares everything after the move.
"""

from __future__ import annotations

import itertools

import pytest

from migrator.backends import VolumeRef
from migrator.core.errors import StorageError
from migrator.core.names import SnapshotName
from migrator.pipelines.transfer import SnapInfo, execute, negotiate, plan_transfer
from migrator.streams import ProgressMeter
from tests.integration.treecmp import allocated, populate, signature

DRIVERS = ["dir", "btrfs", "zfs"]
VOL = VolumeRef("custom", "data")


@pytest.fixture
def pools(make_host):  # type: ignore[no-untyped-def]
    th = make_host(images=(), pools=tuple(DRIVERS))
    return th


def _fill(backend, vol=VOL):  # type: ignore[no-untyped-def]
    path = backend.create_volume(vol)
    populate(path, xattrs=backend.supports_xattrs)
    return path


def _sig(backend, path, other=None):  # type: ignore[no-untyped-def]
    keep = backend.supports_xattrs and (other is None or other.supports_xattrs)
    return signature(path, with_xattrs=keep)


@pytest.mark.parametrize("driver", DRIVERS)
def test_volume_snapshot_restore_rename_delete(pools, driver) -> None:  # type: ignore[no-untyped-def]
    b = pools.host.backend(driver)
    path = _fill(b)
    before = _sig(b, path)
    b.snapshot(VOL, SnapshotName("s0"))
    (path / "etc" / "hostname").write_text("changed\n")
    (path / "new").write_text("new")
    b.snapshot(VOL, SnapshotName("s1"))
    assert [s.name for s in b.list_snapshots(VOL)] == ["s0", "s1"]
    with b.mount_snapshot(b.list_snapshots(VOL)[0]) as snap_path:
        assert _sig(b, snap_path) == before
    b.restore_snapshot(VOL, SnapshotName("s0"))
    assert _sig(b, b.volume_path(VOL)) == before
    assert [s.name for s in b.list_snapshots(VOL)] == ["s0", "s1"]  # newer one kept
    renamed = VolumeRef("custom", "data2")
    b.rename_volume(VOL, renamed)
    assert not b.volume_exists(VOL) and b.volume_exists(renamed)
    assert [s.name for s in b.list_snapshots(renamed)] == ["s0", "s1"]
    b.delete_snapshot(renamed, SnapshotName("s0"))
    b.delete_volume(renamed)
    assert not b.volume_exists(renamed) and b.list_snapshots(renamed) == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_full_and_incremental_native_send_receive(pools, driver) -> None:  # type: ignore[no-untyped-def]
    b = pools.host.backend(driver)
    how = next(t for t in b.migration_types() if t != "rsync")  # the best stream format
    dst_vol = VolumeRef("custom", "copy")
    path = _fill(b)
    s0 = b.snapshot(VOL, SnapshotName("s0"))
    stream = b.send(s0, None, how)
    meter = ProgressMeter(lambda e: None, "s0", stream.size_hint)
    b.receive(dst_vol, "s0", stream, meter)
    assert meter.done > 60_000  # the data went through the pump
    assert _sig(b, b.volume_path(dst_vol)) == _sig(b, path)
    # the sparse file stays sparse on the target
    assert allocated(b.volume_path(dst_vol) / "sparse.img") < 8 << 20
    (path / "etc" / "hostname").write_text("second\n")
    (path / "bin" / "tool-hardlink").unlink()
    s1 = b.snapshot(VOL, SnapshotName("s1"))
    if how in ("btrfs", "zfs"):
        assert b.snapshot_identity(s0) == b.snapshot_identity(b.list_snapshots(dst_vol)[0])
        inc = b.send(s1, s0, how)
        meter = ProgressMeter(lambda e: None, "s1")
        b.receive(dst_vol, "s1", inc, meter)
        assert meter.done < 100_000, meter.done  # only the change travelled
    else:
        b.receive(dst_vol, "s1", b.send(s1, None, how), None)
    assert _sig(b, b.volume_path(dst_vol)) == _sig(b, path)
    assert [s.name for s in b.list_snapshots(dst_vol)] == ["s0", "s1"]


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(DRIVERS, DRIVERS)))
def test_every_pair_copies_with_snapshots(pools, src, dst) -> None:  # type: ignore[no-untyped-def]
    sb, db = pools.host.backend(src), pools.host.backend(dst)
    src_vol = VolumeRef("custom", f"from-{src}")
    dst_vol = VolumeRef("custom", f"to-{dst}")
    path = sb.create_volume(src_vol)
    populate(path, xattrs=sb.supports_xattrs and db.supports_xattrs)
    sb.snapshot(src_vol, SnapshotName("s0"))
    (path / "etc" / "hostname").write_text("after s0\n")
    sb.snapshot(src_vol, SnapshotName("s1"))
    (path / "live").write_text("live")
    how = negotiate(sb.migration_types(), db.migration_types())
    assert how == (src if src == dst and src != "dir" else "rsync")
    plan = plan_transfer([SnapInfo("s0"), SnapInfo("s1")], None, how)
    sb.snapshot(src_vol, SnapshotName("final"))
    stats = execute(plan, sb, src_vol, db, dst_vol, "final")
    assert stats.snapshots == ["s0", "s1"]
    assert _sig(sb, path, db) == _sig(db, db.volume_path(dst_vol), sb)
    assert [s.name for s in db.list_snapshots(dst_vol)] == ["s0", "s1"]
    with db.mount_snapshot(db.list_snapshots(dst_vol)[0]) as p0:
        assert (p0 / "etc" / "hostname").read_text() == "box\n"
    # and the tar stream, which any transport can carry, between the same pair
    tar_vol = VolumeRef("custom", f"tar-{dst}")
    db.receive(tar_vol, "s1", sb.send(sb.list_snapshots(src_vol)[1], None, "tar"), None)
    with sb.mount_snapshot(sb.list_snapshots(src_vol)[1]) as p1:
        assert _sig(sb, p1, db) == _sig(db, db.volume_path(tar_vol), sb)


@pytest.mark.parametrize("how", ["rsync", "tar"])
def test_xattrs_never_dropped_silently_on_zfs_fuse(pools, how) -> None:  # type: ignore[no-untyped-def]
    sb, db = pools.host.backend("btrfs"), pools.host.backend("zfs")
    path = _fill(sb)
    assert (path / "bin" / "tool").exists()
    s = sb.snapshot(VOL, SnapshotName("s0"))
    with pytest.raises(StorageError, match="xattrs"):
        if how == "tar":
            db.receive(VOL, "s0", sb.send(s, None, "tar"), None)
        else:
            execute(plan_transfer([], None, "rsync"), sb, VOL, db, VOL, "s0")
    if how == "tar":
        assert not db.volume_exists(VOL)  # nothing partial left
