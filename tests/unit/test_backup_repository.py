"""The repository on a plain directory: atomic backups, modes, lock, parts in and out."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from migrator.backup.model import BackupIndex, PartInfo
from migrator.backup.parts import PartStream, read_small, store, store_bytes
from migrator.backup.repository import Repository, new_backup_id
from migrator.backup.verify import check_backup
from migrator.core.errors import BackupError, CorruptBackup, NotFound


def make_backup(repo: Repository, data: bytes = b"x" * 100_000,
                level: int | None = 3) -> BackupIndex:
    bid = new_backup_id("web-1")
    w = repo.writer(bid)
    src = repo.path / "source"
    src.write_bytes(data)
    suffix = ".zst" if level is not None else ""
    with open(src, "rb") as f:
        stored = store(w, f"container.tar{suffix}", f, level)
    src.unlink()
    man = store_bytes(w, f"manifest.json{suffix}", b"{}", level)
    idx = BackupIndex(bid, "web-1", time.time(), "generic", "dir", None,
                      "none" if level is None else f"zstd:{level}", None, False, "final",
                      parts=[PartInfo(f"container.tar{suffix}", "tar", "final", None, *stored),
                             PartInfo(f"manifest.json{suffix}", "manifest", "final", None,
                                      *man)])
    w.commit(idx)
    return idx


def read_stream(repo: Repository, idx: BackupIndex) -> tuple[bytes, PartStream]:
    s = PartStream(repo, idx.id, idx.parts[0], idx.compression, "tar", "final", None)
    with os.fdopen(os.dup(s.fileno()), "rb") as f:
        data = f.read()
    return data, s


def test_backup_appears_whole_with_private_modes(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo").init()
    idx = make_backup(repo)
    assert [b.id for b in repo.list()] == [idx.id]
    assert stat.S_IMODE((tmp_path / "repo").stat().st_mode) == 0o700
    for p in (tmp_path / "repo").rglob("*"):
        if p.name != "lock":
            assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    assert idx.parts[0].raw_size == 100_000 and idx.parts[0].size < 1000  # compressed
    data, s = read_stream(repo, idx)
    s.close()
    assert data == b"x" * 100_000
    assert check_backup(repo, idx.id, deep=True).ok is False  # 'x'*N is no tar ...
    assert check_backup(repo, idx.id).ok  # ... but its bytes are as indexed


def test_uncompressed_parts_and_small_reads(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    idx = make_backup(repo, b"plain", level=None)
    assert read_small(repo, idx.id, idx.parts[1], "none") == b"{}"
    data, s = read_stream(repo, idx)
    s.close()
    assert data == b"plain"


def test_a_flipped_byte_fails_the_stream_at_its_end(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    idx = make_backup(repo, os.urandom(50_000), level=None)
    path = repo.backups_dir / idx.id / idx.parts[0].path
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    _, s = read_stream(repo, idx)
    with pytest.raises(CorruptBackup, match="checksum mismatch"):
        s.close()


def test_partial_backups_are_invisible_and_cleared_by_the_next_writer(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    w = repo.writer(new_backup_id("web-1"))
    w.part("container.tar").write(b"half")
    assert repo.list() == [] and repo.ids() == []
    with repo.lock():
        pass
    assert os.listdir(repo.backups_dir) == []


def test_index_missing_or_unknown_backup(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    idx = make_backup(repo)
    (repo.backups_dir / idx.id / "index.json").unlink()
    with pytest.raises(CorruptBackup, match="index.json is missing"):
        repo.get(idx.id)
    assert repo.list() == [] and repo.ids() == [idx.id]
    repo.delete(idx.id)  # a damaged backup can still be deleted
    with pytest.raises(NotFound):
        repo.get(idx.id)
    with pytest.raises(NotFound):
        repo.get("../../etc")


def test_protect_and_delete(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    idx = make_backup(repo)
    assert repo.set_protected(idx.id, True).protected
    assert repo.get(idx.id).protected
    repo.delete(idx.id)
    assert repo.ids() == []


def test_lock_waits_then_names_the_holder(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    with repo.lock():
        t0 = time.monotonic()
        with pytest.raises(BackupError, match=f"pid {os.getpid()}"), repo.lock(wait=0.3):
            pass
        assert time.monotonic() - t0 >= 0.3
    with repo.lock(wait=0):
        pass


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no backup repository"):
        Repository(tmp_path / "nothing").check()
    (tmp_path / "repo.json").write_text('{"format": "other"}')
    with pytest.raises(BackupError, match="not a migrator backup repository"):
        Repository(tmp_path).check()


def test_stream_store_counts_raw_bytes(tmp_path: Path) -> None:
    repo = Repository(tmp_path).init()
    w = repo.writer(new_backup_id("web-1"))
    r, wfd = os.pipe()
    os.write(wfd, b"abc" * 1000)
    os.close(wfd)
    size, digest, raw = store(w, "p.zst", r, 1)
    os.close(r)
    assert raw == 3000 and size < raw and len(digest) == 64
    w.abort()
