"""``backup verify``: is a backup restorable, byte for byte, as its index says?

Structure first (the index parses and validates, every backup of its incremental chain is
there, belongs to the same container and ends where the next one starts), then every part:
present, of the recorded size, and of the recorded sha256. ``deep`` also decompresses every
part and walks each tar through ``migrator.targuard`` (the same checks restore applies), which
finds what a checksum cannot: a backup written from bad data, or a tar a restore would refuse.

Every kind of damage has its own message (``missing part X``, ``part X truncated: N of M
bytes``, ``part X checksum mismatch``, ``index malformed: ...``, ``parent P is missing``),
all collected, so one run reports everything that is wrong with a backup.

In a chunked repository (``migrator.backup.chunkrepo``) the index is authenticated and the
chunks sum to each part's size when it is read, so the quick check is that every chunk it
lists is in the store (one listing of the store, or over ssh:// a question about those
chunks only; not a read of the data). ``deep`` reads the parts (each chunk authenticated
as it arrives, the part's sha256, the tar walk); when a chunk fails, every chunk of that
part is read once more to name each bad one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import zstandard

from migrator.backup.model import BackupIndex, PartInfo
from migrator.backup.parts import CHUNK, check_digest, open_decompressed, read_small
from migrator.backup.repository import BackupRepository
from migrator.core.errors import CorruptBackup, MigratorError
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.targuard import TarRules, check_tar


class ChunkedParts(Protocol):
    """What verify uses of a chunked repository (``backup.chunkrepo.ChunkedRepository``,
    not imported here: its crypto stays out of the agent's start-up)."""

    def chunk_ids(self) -> set[str]: ...

    def present(self, ids: Iterable[str]) -> set[str]: ...

    def chunks_of(self, backup_id: str, rel: str) -> list[tuple[str, int]]: ...

    def missing_chunks(self, backup_id: str, rel: str, have: set[str]) -> list[str]: ...

    def check_chunks(self, backup_id: str, rel: str) -> list[str]: ...


def as_chunked(repo: BackupRepository) -> ChunkedParts | None:
    """``repo`` when it is a chunked repository, else None."""
    return repo if hasattr(repo, "check_chunks") else None  # type: ignore[return-value]


def present_chunks(chunked: ChunkedParts, backups: list[BackupIndex]) -> set[str]:
    """Which chunks of ``backups``' parts the store holds (asked about, or one listing); a
    part without a chunk list is reported by ``missing_chunks`` itself."""
    wanted: set[str] = set()
    for b in backups:
        for part in b.parts:
            with contextlib.suppress(CorruptBackup):
                wanted.update(c for c, _ in chunked.chunks_of(b.id, part.path))
    return chunked.present(wanted)


def missing_problem(backup_id: str, part: PartInfo, missing: list[str]) -> str | None:
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                      else "")
    return f"backup {backup_id}: part {part.path}: {len(missing)} chunk(s) missing: {shown}"


@dataclass
class VerifyReport:
    id: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    parts: int = 0
    bytes: int = 0
    deep: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tar_rules(idx: BackupIndex) -> TarRules:
    """What a tar part of ``idx`` may hold: one rootfs (``rootfs/`` in the volume), device
    nodes only for a privileged container."""
    return TarRules(allow_devices=idx.privileged, root="rootfs")


def chain_of(repo: BackupRepository, idx: BackupIndex) -> list[BackupIndex]:
    """``idx`` and the backups it is incremental from, oldest first; CorruptBackup when a
    link is missing or does not fit."""
    chain = [idx]
    while chain[0].parent is not None:
        child = chain[0]
        assert child.parent is not None
        if any(b.id == child.parent for b in chain):
            raise CorruptBackup(f"backup {child.id}: its chain of parents loops")
        try:
            parent = repo.get(child.parent)
        except CorruptBackup as e:
            raise CorruptBackup(f"backup {child.id}: parent {child.parent} is unreadable "
                                f"({e.message})") from e
        except MigratorError as e:
            raise CorruptBackup(f"backup {child.id}: parent {child.parent} is missing") from e
        if parent.container != child.container or parent.kind != child.kind:
            raise CorruptBackup(f"backup {child.id}: parent {parent.id} is a backup of "
                                "another container or kind")
        first = child.parts_of(child.points()[0])[0]
        if first.base is not None and first.base != parent.final:
            raise CorruptBackup(f"backup {child.id}: starts from {first.base}, but parent "
                                f"{parent.id} ends at {parent.final}")
        chain.insert(0, parent)
    by_id = {b.id: b for b in chain}
    for s in idx.snapshots:
        holder = by_id.get(s.backup)
        if holder is None or s.name not in holder.points():
            raise CorruptBackup(f"backup {idx.id}: snapshot {s.name} is said to be in "
                                f"{s.backup}, which is not in its chain or lacks it")
    return chain


def check_part(repo: BackupRepository, backup_id: str, part: PartInfo,
               meter: ProgressMeter | None = None, read: bool = True) -> str | None:
    """The first thing wrong with one part's bytes, or None (``read=False``: its presence
    and size only)."""
    size = repo.part_size(backup_id, part.path)
    if size is None:
        return f"backup {backup_id}: missing part {part.path}"
    if size < part.size:
        return f"backup {backup_id}: part {part.path} truncated: {size} of {part.size} bytes"
    if size > part.size:
        return f"backup {backup_id}: part {part.path} has {size} bytes, its index says " \
               f"{part.size}"
    if not read:
        return None
    digest = hashlib.sha256()
    try:
        with repo.open_part(backup_id, part.path) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                if meter is not None:
                    meter.advance(len(chunk))
    except CorruptBackup as e:  # a chunked repository's chunk that fails authentication
        return e.message
    if digest.hexdigest() != part.sha256:
        return f"backup {backup_id}: part {part.path} checksum mismatch"
    return None


def _deep(repo: BackupRepository, idx: BackupIndex, part: PartInfo) -> str | None:
    """Decompress ``part`` and check what it holds."""
    try:
        if part.kind in ("manifest", "deleted"):
            read_small(repo, idx.id, part, idx.compression)
            return None
        reader, hashing = open_decompressed(repo, idx.id, part, idx.compression)
        try:
            if part.kind in ("tar", "delta"):
                raw = check_tar(reader, tar_rules(idx))  # type: ignore[arg-type]
                del raw
            else:
                while reader.read(CHUNK):
                    pass
            hashing.drain()
        finally:
            hashing.f.close()
        check_digest(hashing, idx.id, part)
    except zstandard.ZstdError as e:
        return f"backup {idx.id}: part {part.path} does not decompress: {e}"
    except MigratorError as e:
        return f"backup {idx.id}: part {part.path}: {e.message}"
    return None


def check_backup(repo: BackupRepository, backup_id: str, deep: bool = False,
                 progress: Progress = no_progress) -> VerifyReport:
    """Every problem of one backup (its chain's structure, its own parts)."""
    report = VerifyReport(backup_id, deep=deep)
    try:
        idx = repo.get(backup_id)
    except CorruptBackup as e:
        report.problems.append(e.message)
        report.ok = False
        return report
    try:
        chain_of(repo, idx)
    except CorruptBackup as e:
        report.problems.append(e.message)
    meter = ProgressMeter(progress, f"verify {backup_id}", idx.stored_size())
    chunked = as_chunked(repo)
    have = present_chunks(chunked, [idx]) if chunked is not None else set()
    for part in idx.parts:
        report.parts += 1
        report.bytes += part.size
        if chunked is not None:
            problem = missing_problem(idx.id, part, chunked.missing_chunks(idx.id, part.path,
                                                                           have))
            if deep:
                if problem is None:
                    problem = _deep(repo, idx, part)
                if problem is not None:  # name every bad chunk (each rehashed), if any
                    report.problems.extend(chunked.check_chunks(idx.id, part.path)
                                           or [problem])
                    continue
        else:
            problem = check_part(repo, idx.id, part, meter)
            if problem is None and deep:
                problem = _deep(repo, idx, part)
        if problem is not None:
            report.problems.append(problem)
    meter.finish()
    report.ok = not report.problems
    return report


def unreadable_reports(repo: BackupRepository) -> list[VerifyReport]:
    """``verify --all``'s reports of index objects that do not open with the key (an
    encrypted repository with keyed names learns ids by opening its indexes, so such an
    object has no id: it is reported by its key, and would otherwise be in no listing)."""
    find = getattr(repo, "unreadable_indexes", None)
    if find is None:
        return []
    return [VerifyReport(key, ok=False, problems=[why]) for key, why in sorted(find().items())]


def raise_if_damaged(reports: list[VerifyReport]) -> None:
    """``CorruptBackup`` naming every problem of every damaged backup among ``reports``:
    ``backup verify`` fails with it once each report was shown."""
    bad = [x for x in reports if not x.ok]
    if bad:
        raise CorruptBackup(f"{len(bad)} of {len(reports)} backup(s) damaged: "
                            + "; ".join(p for x in bad for p in x.problems))


def verify_chain(repo: BackupRepository, idx: BackupIndex, progress: Progress = no_progress,
                 read: bool = True) -> list[BackupIndex]:
    """The chain of ``idx`` with every part of every backup in it checked (restore's
    precondition); CorruptBackup naming every damaged part. ``read=False`` checks the
    structure, presence and sizes only (the checksums are then checked as parts stream)."""
    chain = chain_of(repo, idx)
    problems = []
    total = sum(b.stored_size() for b in chain) if read else None
    meter = ProgressMeter(progress, f"check {idx.id}", total)
    chunked = as_chunked(repo)
    have = present_chunks(chunked, chain) if chunked is not None else set()
    for b in chain:
        for part in b.parts:
            problem = None
            if chunked is not None:  # every chunk there (then, if read, each authenticated)
                problem = missing_problem(b.id, part, chunked.missing_chunks(b.id, part.path,
                                                                             have))
            if problem is None:
                problem = check_part(repo, b.id, part, meter, read)
            if problem is not None:
                problems.append(problem)
    meter.finish()
    if problems:
        raise CorruptBackup("; ".join(problems),
                            "nothing was restored; `migrate backup verify --all` lists every "
                            "damaged backup, restore an older one")
    return chain
