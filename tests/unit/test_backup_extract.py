"""``backup extract``: single files out of a generic backup, hostile by default.

Backups are made here from tar streams built with tarfile (members under ``rootfs/``, as the
generic format stores them), in a directory repository and a chunked one; real zstd, real
TarGuard, real files written under a temporary directory."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from migrator.backup.delta import encode_paths
from migrator.backup.extract import ExtractResult, _Tree, extract_files, plan, selects, wanted_path
from migrator.backup.model import BackupIndex, PartInfo, SnapshotInfo
from migrator.backup.parts import store_bytes
from migrator.backup.repository import BackupRepository, Repository
from migrator.core.errors import BackupError, CorruptBackup, InvalidInput, UnsafeArchive
from tests.unit.test_chunkrepo import make_repo

MTIME = 1_700_000_000


def tar_of(*members: tuple[str, str, bytes | str]) -> bytes:
    """(name, kind, data-or-link-target) -> a pax tar; kinds: dir file exe link hard fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = MTIME
            ti.uid = ti.gid = 101000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o750
                tf.addfile(ti)
            elif kind in ("file", "exe"):
                data = payload if isinstance(payload, bytes) else payload.encode()
                ti.size, ti.mode = len(data), 0o4755 if kind == "exe" else 0o640
                tf.addfile(ti, io.BytesIO(data))
            elif kind == "link":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, str(payload), 0o777
                tf.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, str(payload), 0o640
                tf.addfile(ti)
            elif kind == "fifo":
                ti.type, ti.mode = tarfile.FIFOTYPE, 0o644
                tf.addfile(ti)
    return buf.getvalue()


TREE = [("rootfs", "dir", ""), ("rootfs/etc", "dir", ""),
        ("rootfs/etc/hostname", "file", "web-1\n"), ("rootfs/etc/shadow", "file", "secret"),
        ("rootfs/srv", "dir", ""), ("rootfs/srv/app", "exe", b"\x7fELF" + bytes(200_000)),
        ("rootfs/srv/zeros", "file", bytes(1 << 20) + b"end"),
        ("rootfs/srv/shadow", "link", "/etc/shadow"), ("rootfs/srv/up", "link", "../etc"),
        ("rootfs/srv/app2", "hard", "rootfs/srv/app"), ("rootfs/srv/pipe", "fifo", "")]


def commit(repo: BackupRepository, bid: str, parts: list[tuple[str, str, str, bytes]],
           parent: str | None = None, kind: str = "generic",
           snapshots: list[SnapshotInfo] | None = None) -> BackupIndex:
    """A backup of ``parts`` (path, kind, point, raw bytes), zstd'd, committed."""
    w = repo.writer(bid)
    infos = []
    for rel, pk, point, raw in parts:
        base = "final" if parent is not None else None
        infos.append(PartInfo(rel, pk, point, base, *store_bytes(w, rel, raw, 3)))
    idx = BackupIndex(bid, "web", time.time(), kind, "dir", parent, "zstd:3", None, False,
                      "final", snapshots=snapshots or [], parts=infos)
    w.commit(idx)
    return idx


def dir_repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo").init()


BID = "web-20261201T000000Z-aaaaaa"
BID2 = "web-20261202T000000Z-bbbbbb"


@pytest.mark.parametrize("kind", ["dir", "chunked"])
def test_single_files_out_of_a_backup(tmp_path: Path, kind: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIGRATOR_PASSPHRASE", raising=False)
    repo: BackupRepository = dir_repo(tmp_path) if kind == "dir" else make_repo(tmp_path)
    commit(repo, BID, [("container.tar.zst", "tar", "final", tar_of(*TREE))])
    out = tmp_path / "out"
    r = extract_files(repo, BID, ["/etc/hostname", "/srv/", "/nowhere"], out)
    assert (out / "etc" / "hostname").read_text() == "web-1\n"
    assert not (out / "etc" / "shadow").exists()  # not asked for
    app = (out / "srv" / "app").stat()
    assert stat.S_IMODE(app.st_mode) == 0o755 and app.st_mtime == MTIME  # no setuid
    assert app.st_uid == os.getuid()  # the operator's, not the container's 101000
    assert (out / "srv" / "app2").stat().st_ino == app.st_ino  # the hard link, kept
    zeros = out / "srv" / "zeros"
    assert zeros.read_bytes() == bytes(1 << 20) + b"end"
    assert zeros.stat().st_blocks * 512 < 256 << 10  # the zeros left as a hole
    # links are made as links, their targets stored, never followed out of DIR
    assert os.readlink(out / "srv" / "shadow") == "/etc/shadow"
    assert os.readlink(out / "srv" / "up") == "../etc"
    assert not (out / "srv" / "pipe").exists() and r.skipped == ["/srv/pipe (fifo)"]
    assert stat.S_IMODE((out / "srv").stat().st_mode) == 0o750
    assert (r.files, r.links, r.missing) == (3, 3, ["/nowhere"]), r
    # DIR must be new or empty
    with pytest.raises(InvalidInput, match="not empty"):
        extract_files(repo, BID, ["/"], out)


def test_an_incremental_chain_is_replayed_for_the_asked_paths(tmp_path: Path) -> None:
    repo = dir_repo(tmp_path)
    commit(repo, BID, [("container.tar.zst", "tar", "final", tar_of(*TREE))])
    delta = tar_of(("rootfs/srv", "dir", ""), ("rootfs/srv/new", "file", "added"),
                   ("rootfs/srv/app", "file", "changed"),
                   ("rootfs/srv/up", "dir", ""), ("rootfs/srv/up/in", "file", "a dir now"))
    commit(repo, BID2, [("deleted.zst", "deleted", "final",
                         encode_paths(["rootfs/srv/zeros", "rootfs/srv/shadow"])),
                        ("delta.tar.zst", "delta", "final", delta)], parent=BID)
    out = tmp_path / "out"
    r = extract_files(repo, BID2, ["/srv"], out)
    assert r.chain == [BID, BID2]
    assert (out / "srv" / "app").read_text() == "changed"
    assert (out / "srv" / "new").read_text() == "added"
    assert (out / "srv" / "app2").read_bytes().startswith(b"\x7fELF")  # the old link kept
    assert not (out / "srv" / "zeros").exists() and not os.path.lexists(out / "srv/shadow")
    # a link of the full backup replaced by a directory: the link itself went, unfollowed
    assert (out / "srv" / "up").is_dir() and not (out / "srv" / "up").is_symlink()
    assert (out / "srv" / "up" / "in").read_text() == "a dir now"


def test_a_hostile_tar_or_a_damaged_part_leaves_nothing(tmp_path: Path) -> None:
    repo = dir_repo(tmp_path)
    evil = tar_of(("rootfs", "dir", ""), ("rootfs/srv", "dir", ""),
                  ("rootfs/srv/ok", "file", "fine"), ("rootfs/srv/x", "link", "/"),
                  ("rootfs/srv/x/etc/cron.d/evil", "file", "* * * * * root sh"))
    commit(repo, BID, [("container.tar.zst", "tar", "final", evil)])
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchive):
        extract_files(repo, BID, ["/"], out)
    assert not out.exists()  # made by extract, removed with what it held

    commit(repo, BID2, [("container.tar.zst", "tar", "final", tar_of(*TREE))])
    part = repo.path / "backups" / BID2 / "container.tar.zst"
    blob = bytearray(part.read_bytes())
    blob[-40] ^= 0x01
    part.write_bytes(bytes(blob))
    out.mkdir()
    with pytest.raises(CorruptBackup):
        extract_files(repo, BID2, ["/etc"], out)
    assert out.is_dir() and os.listdir(out) == []  # the operator's empty directory stays


def test_a_symlink_in_the_target_is_never_followed(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "srv")  # planted while an extract runs
    tree = _Tree(out, ExtractResult("x", "final", str(out)))
    buf = io.BytesIO(tar_of(("rootfs/srv/f", "file", "data")))
    with tarfile.open(fileobj=buf, mode="r|") as tf:
        for m in tf:
            with pytest.raises(UnsafeArchive, match="never followed"):
                tree.member(tf, m, "srv/f")
    tree.close()
    assert os.listdir(outside) == []


def test_native_backups_are_refused_with_why(tmp_path: Path) -> None:
    repo = dir_repo(tmp_path)
    idx = commit(repo, BID, [("container.btrfs.zst", "btrfs", "final", b"stream")],
                 kind="optimized")
    with pytest.raises(BackupError, match="send streams: single files cannot") as e:
        extract_files(repo, BID, ["/etc"], tmp_path / "out")
    assert "restore it under another name" in (e.value.hint or "")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BackupError):
        plan([idx], idx, None)


def test_paths_and_points() -> None:
    assert wanted_path("/etc/hosts") == "etc/hosts" and wanted_path("/") == ""
    assert wanted_path("srv//a/./b/") == "srv/a/b"
    for bad in ("/srv/../etc", "", "a\0b"):
        with pytest.raises(InvalidInput):
            wanted_path(bad)
    assert selects(["srv"], "srv/a") and selects(["srv"], "srv") and selects([""], "x")
    assert not selects(["srv"], "srvx") and not selects(["srv/a"], "srv")
    full = BackupIndex(BID, "web", 1.0, "generic", "dir", None, "none", None, False, "final",
                       parts=[PartInfo("s0.tar", "tar", "s0", None, 1, "0", 1),
                              PartInfo("final.tar", "tar", "final", None, 1, "0", 1)])
    inc = BackupIndex(BID2, "web", 2.0, "generic", "dir", BID, "none", None, False, "final",
                      snapshots=[SnapshotInfo("s0", "u0", 1.0, {}, BID)],
                      parts=[PartInfo("d.lst", "deleted", "final", "final", 1, "0", 1),
                             PartInfo("d.tar", "delta", "final", "final", 1, "0", 1)])
    assert plan([full, inc], inc, None) == ("final", [(full, "final"), (inc, "final")])
    assert plan([full, inc], inc, "s0") == ("s0", [(full, "s0")])
