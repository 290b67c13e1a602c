"""Copying backups between repositories (``migrate backup copy``, ``restore --host``).

A backup is copied part by part, streamed: each part is read from the source repository,
its sha256 and size checked against the source index while it passes, and written into the
destination, which reports what it stored; the index is committed last, so the copy is
complete or absent like any backup. An incremental backup needs its parents: ``copy_chain``
copies the chain oldest first and skips backups the destination already holds (same id and
same index), so sending the next incremental to an off-site repository moves only it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from migrator.backup.repository import CHUNK, BackupRepository
from migrator.backup.verify import chain_of
from migrator.core.errors import BackupError, CorruptBackup
from migrator.streams import Progress, ProgressMeter, no_progress


@dataclass
class CopyResult:
    copied: list[str] = field(default_factory=list)  # ids written into the destination
    present: list[str] = field(default_factory=list)  # ids it already held
    bytes: int = 0


def copy_backup(src: BackupRepository, dst: BackupRepository, backup_id: str,
                progress: Progress = no_progress) -> int:
    """Copy one backup (its parents must be in ``dst`` already); the bytes copied. Call it
    under ``dst.lock()``. ``src``/``dst``: a ``Repository`` or a ``RemoteRepository``."""
    idx = src.get(backup_id)
    writer = dst.writer(backup_id)
    total = 0
    try:
        meter = ProgressMeter(progress, f"copy {backup_id}", sum(p.size for p in idx.parts))
        for part in idx.parts:
            digest, size = hashlib.sha256(), 0
            out = writer.part(part.path)
            try:
                with src.open_part(backup_id, part.path) as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                        meter.advance(len(chunk))
                if size != part.size or digest.hexdigest() != part.sha256:
                    raise CorruptBackup(f"backup {backup_id}: part {part.path} does not match "
                                        "its index in the source repository",
                                        "`migrate backup verify` it there; nothing was copied")
                out.finish()
            except BaseException:
                out.abort()
                raise
            total += size
        writer.commit(idx)
        meter.finish()
    except BaseException:
        writer.abort()
        raise
    return total


def copy_chain(src: BackupRepository, dst: BackupRepository, backup_id: str,
               progress: Progress = no_progress) -> CopyResult:
    """Copy ``backup_id`` and the parents it needs into ``dst`` (created if missing)."""
    chain = chain_of(src, src.get(backup_id))
    dst.init()
    result = CopyResult()
    with dst.lock():
        have = set(dst.ids())
        for idx in chain:
            if idx.id in have:
                theirs = dst.get(idx.id)
                if [(p.path, p.sha256) for p in theirs.parts] != \
                        [(p.path, p.sha256) for p in idx.parts]:
                    raise BackupError(f"backup {idx.id} in {dst} differs from the one in {src}",
                                      "remove one of them; nothing was copied")
                result.present.append(idx.id)
                continue
            result.bytes += copy_backup(src, dst, idx.id, progress)
            result.copied.append(idx.id)
    return result
