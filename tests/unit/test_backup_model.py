"""The backup index: JSON round trip and the validation that refuses an index that lies."""

from __future__ import annotations

import json

import pytest

from migrator.backup.model import BackupIndex, PartInfo, SnapshotInfo, parse_compression, valid_id
from migrator.backup.repository import new_backup_id
from migrator.core.errors import CorruptBackup, InvalidInput

BID = "web-1-20260101T120000Z-abc123"
PARENT = "web-1-20251231T120000Z-0a0b0c"
SHA = "ab" * 32


def index(**over) -> BackupIndex:  # type: ignore[no-untyped-def]
    idx = BackupIndex(
        id=BID, container="web-1", created=1767268800.0, kind="generic", driver="dir",
        parent=None, compression="zstd:3", image="f" * 64, privileged=False,
        final="migrate.backup-x", config={"limits.cpu": "1"},
        snapshots=[SnapshotInfo("s0", "u0", 1.0, {}, BID)],
        parts=[PartInfo("snapshots/s0.tar.zst", "tar", "s0", None, 10, SHA, 20),
               PartInfo("container.tar.zst", "tar", "migrate.backup-x", None, 10, SHA, 20),
               PartInfo("manifest.json.zst", "manifest", "migrate.backup-x", None, 5, SHA, 9)],
    )
    for k, v in over.items():
        setattr(idx, k, v)
    return idx


def doc(**over) -> str:  # type: ignore[no-untyped-def]
    d = json.loads(index().to_json())
    d.update(over)
    return json.dumps(d)


def test_round_trip_and_points() -> None:
    idx = index()
    back = BackupIndex.from_json(idx.to_json(), BID)
    assert back == idx
    assert back.points() == ["s0", "migrate.backup-x"]
    assert back.stored_size() == 25 and back.raw_size() == 40
    assert back.manifest() is not None and back.manifest().path == "manifest.json.zst"


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "tarball"}, "format"),
    ({"version": 2}, "version"),
    ({"id": "../x"}, "not a backup id"),
    ({"kind": "weird"}, "kind"),
    ({"compression": "gzip"}, "compression"),
    ({"privileged": "yes"}, "privileged"),
    ({"created": -1}, "non-negative"),
    ({"container": "../etc"}, "invalid container name"),
    ({"parent": BID}, "parent"),
])
def test_malformed_fields_are_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptBackup, match=f"index malformed.*{message}"):
        BackupIndex.from_json(doc(**change), BID)


def test_part_paths_stay_inside_the_backup() -> None:
    for bad in ("../../etc/passwd", "/etc/passwd", "a/b/c", ".hidden", "index.json"):
        d = json.loads(index().to_json())
        d["parts"][0]["path"] = bad
        with pytest.raises(CorruptBackup, match="index malformed"):
            BackupIndex.from_json(json.dumps(d), BID)


def test_inconsistent_indexes_are_refused() -> None:
    with pytest.raises(CorruptBackup, match="does not match its directory"):
        BackupIndex.from_json(index().to_json(), PARENT)
    with pytest.raises(CorruptBackup, match="no part carries the final state"):
        BackupIndex.from_json(index(final="other").to_json(), BID)
    # a delta without a parent backup to apply on
    parts = [PartInfo("container.delta.tar.zst", "delta", "f1", "f0", 1, SHA, 1),
             PartInfo("container.deleted.zst", "deleted", "f1", "f0", 1, SHA, 1)]
    with pytest.raises(CorruptBackup, match="has no parent"):
        BackupIndex.from_json(index(parts=parts, final="f1", snapshots=[]).to_json(), BID)
    ok = index(parts=parts, final="f1", snapshots=[], parent=PARENT)
    assert BackupIndex.from_json(ok.to_json(), BID).parent == PARENT
    # a snapshot said to be stored here without data here
    with pytest.raises(CorruptBackup, match="no data in this backup"):
        BackupIndex.from_json(index(snapshots=[SnapshotInfo("s9", "u", 1.0, {}, BID)])
                              .to_json(), BID)
    # an optimized backup whose streams are not a chain
    native = [PartInfo("snapshots/s0.btrfs.zst", "btrfs", "s0", None, 1, SHA, 1),
              PartInfo("container.btrfs.zst", "btrfs", "f", "zz", 1, SHA, 1)]
    with pytest.raises(CorruptBackup, match="is not the point before it"):
        BackupIndex.from_json(index(kind="optimized", driver="btrfs", parts=native, final="f")
                              .to_json(), BID)


def test_not_json_is_corrupt() -> None:
    with pytest.raises(CorruptBackup, match="not JSON"):
        BackupIndex.from_json(b"\xff{", BID)


def test_compression_and_ids() -> None:
    assert parse_compression("zstd") == 3
    assert parse_compression("zstd:19") == 19
    assert parse_compression("none") is None
    for bad in ("gzip", "zstd:0", "zstd:20", "zstd:x"):
        with pytest.raises(InvalidInput):
            parse_compression(bad)
    a, b = new_backup_id("web-1", 1767268800.0), new_backup_id("web-1", 1767268801.0)
    assert valid_id(a) and valid_id(b) and a.startswith("web-1-20260101T120000Z-")
    assert sorted([b, a]) == [a, b]
    assert new_backup_id("web-1", 0.0) != new_backup_id("web-1", 0.0)
