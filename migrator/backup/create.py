"""``backup create``: a consistent, compressed, checksummed backup of one container.

The container is read through a snapshot taken while it is frozen for an instant
(``migrator.runtime.temp_snapshots.consistent_snapshot``), so a running container keeps
running and the backup is one point in time. Its snapshots come first, oldest first,
then that final state:

- *generic* (any pool, restorable onto any pool): one GNU tar per point (the driver's
  ``tar`` send: numeric owners, xattrs, ACLs, hard links, sparse files), zstd-compressed,
  plus a manifest of the final state for the next incremental (``migrator.backup.delta``). An
  unprivileged container's ``/dev`` contents are left out (see ``hidden_dirs``);
- *optimized* (btrfs, zfs): the driver's native send stream per point, each incremental
  from the one before, so snapshots cost only their changes.

``incremental`` builds on the newest backup of the same container and kind in the
repository (``parent``): generic stores file-level deltas against the parent's manifest;
optimized sends natively from the parent's final snapshot, which was kept on the pool for
this (named ``migrate.backup-*``: not a ``migrate.xfer-*`` temporary, so transfers leave
it alone, and without a state record, so ``snapshot list`` does not show it). When the base
is gone (the container was moved, the snapshot deleted) a full backup is made and the
result's notes say so. Snapshots the parent chain already holds are referenced, not stored.

Staged and journaled: the backup is assembled in ``.partial-ID`` and exists only once its
index is committed; on any failure it is removed and the container is as it was.

Into a chunked repository (``migrator.backup.chunkrepo``: ``compresses_chunks``) the streams
go uncompressed: the repository compresses each chunk, and a stream compressed as a whole
would cut into different chunks every time, deduplicating nothing. Such a repository also
takes several writers at once (``concurrent_writers``), so no lock is held while writing;
the result then carries its chunk counts and the bytes dedup and compression left new.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrator.backends import Snapshot, StorageBackend, VolumeRef
from migrator.backends.generic import tar_send
from migrator.backup import delta
from migrator.backup.model import BackupIndex, PartInfo, SnapshotInfo, parse_compression
from migrator.backup.parts import read_small, store, store_bytes, widen_pipe
from migrator.backup.repository import BackupRepository, BackupSink, new_backup_id
from migrator.core.errors import InvalidInput, MigratorError
from migrator.core.names import SnapshotName
from migrator.pipelines.transfer import NATIVE_TYPES
from migrator.runtime import config as cfg
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.operations import journaled
from migrator.runtime.state import ContainerRecord, SnapshotRecord
from migrator.runtime.temp_snapshots import consistent_snapshot
from migrator.streams import Progress, ProgressMeter, SendStream, no_progress

BASE_PREFIX = "migrate.backup-"
#: tar options for a chunked repository: GNU tar's POSIX headers carry each file's atime
#: and ctime, which differ between two copies of the same tree and change whenever a file
#: is read or its inode touched; they would make every header, so every chunk holding one,
#: new in each backup. A restore sets neither, so they are left out.
STABLE_TAR = ("--pax-option=delete=atime,delete=ctime",)


@dataclass
class BackupResult:
    """What ``create_backup`` did (the CLI prints it; ``--format json`` dumps it)."""

    id: str
    container: str
    kind: str
    parent: str | None
    compression: str
    raw_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    snapshots_stored: list[str] = field(default_factory=list)
    snapshots_referenced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    operation: str | None = None
    #: a chunked repository's: chunks in this backup, and those it had to store
    chunks: int | None = None
    new_chunks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_snapshot_name(backup_id: str) -> SnapshotName:
    """The pool snapshot a backup reads its final state through (kept when optimized)."""
    return SnapshotName(BASE_PREFIX + backup_id.rsplit("-", 2)[-2].lower() + "-"
                        + backup_id.rsplit("-", 1)[-1])


def latest_backup(repo: BackupRepository, container: str, kind: str) -> BackupIndex | None:
    same = [b for b in repo.list() if b.container == container and b.kind == kind]
    return same[-1] if same else None


def _pick_parent(repo: BackupRepository, rec: ContainerRecord, kind: str, driver: str,
                 backend: StorageBackend, vol: VolumeRef, notes: list[str],
                 snaps: list[SnapshotRecord]) -> tuple[BackupIndex | None, Snapshot | None]:
    """The backup to build on and (optimized) its base snapshot on the pool, or a note
    saying why this one will be full."""
    parent = latest_backup(repo, rec.name, kind)
    if parent is None:
        notes.append(f"no earlier {kind} backup of {rec.name} in this repository: "
                     "made a full backup")
        return None, None
    held = {(s.name, s.uuid) for s in parent.snapshots}
    older = [s.name for s in snaps if (s.name, s.uuid) not in held
             and s.created < parent.created]
    if older:
        notes.append(f"snapshot(s) {', '.join(older)} are older than the parent backup "
                     f"{parent.id} but not in it: made a full backup")
        return None, None
    if kind == "generic":
        if parent.manifest() is None:
            notes.append(f"parent {parent.id} has no manifest: made a full backup")
            return None, None
        return parent, None
    if parent.driver != driver:
        notes.append(f"parent {parent.id} holds {parent.driver} streams, the container is "
                     f"now on {driver}: made a full backup")
        return None, None
    base = next((s for s in backend.list_snapshots(vol) if s.name == parent.base_snapshot),
                None)
    if base is None or backend.snapshot_identity(base) != parent.base_identity:
        notes.append(f"the base snapshot of {parent.id} is no longer on pool {rec.pool} "
                     "(moved or deleted): made a full backup")
        return None, None
    return parent, base


def create_backup(
    cts: Containers,
    name: str,
    repo: BackupRepository,
    optimized: bool = False,
    incremental: bool = False,
    compression: str = "zstd:3",
    instance_only: bool = False,
    progress: Progress = no_progress,
    created: float | None = None,
) -> BackupResult:
    """Back up container ``name`` into ``repo`` (see the module docstring); ``created`` is
    the scheduler's time when it runs a simulated calendar."""
    t0 = time.monotonic()
    level = parse_compression(compression)
    chunked = bool(getattr(repo, "compresses_chunks", False))
    if chunked:
        level = None  # the repository compresses chunk by chunk (see the module docstring)
    comp = "none" if level is None else f"zstd:{level}"
    rec = cts.get(name)
    backend = cts.host.backend(rec.pool)
    driver = cts.state.get_pool(rec.pool).driver
    kind = "optimized" if optimized else "generic"
    if optimized and driver not in NATIVE_TYPES:
        raise InvalidInput(f"{rec.name} is on a {driver} pool, which has no native stream",
                           "optimized backups need a btrfs or zfs pool; drop --optimized")
    vol = VolumeRef("container", rec.name)
    snaps = [] if instance_only else cts.state.list_snapshots(rec.name)
    repo.init()
    lock = contextlib.nullcontext() if getattr(repo, "concurrent_writers", False) \
        else repo.lock()
    with lock:
        bid = new_backup_id(rec.name, created)
        result = BackupResult(bid, rec.name, kind, None, comp)
        parent, base = (None, None)
        if incremental:
            parent, base = _pick_parent(repo, rec, kind, driver, backend, vol, result.notes,
                                        snaps)
        result.parent = parent.id if parent else None
        held = {(s.name, s.uuid): s.backup for s in parent.snapshots} if parent else {}
        final = base_snapshot_name(bid)
        idx = BackupIndex(
            id=bid, container=rec.name, kind=kind, driver=driver,
            created=time.time() if created is None else created,
            parent=result.parent, compression=comp, image=rec.image,
            privileged=cfg.is_true(rec.config, "security.privileged"), final=final,
            config=cfg.without_volatile(rec.config),
        )
        for s in snaps:
            stored_in = held.get((s.name, s.uuid), bid)
            idx.snapshots.append(SnapshotInfo(s.name, s.uuid, s.created, dict(s.config),
                                              stored_in))
            (result.snapshots_stored if stored_in == bid
             else result.snapshots_referenced).append(s.name)
        writer = repo.writer(bid)
        # index: where a chunked repository will hold the index (a keyed name when it is
        # encrypted), so that recover asks the store about it without the key
        with journaled(cts.state, "backup", container=rec.name, backup=bid, repo=str(repo),
                       index=getattr(writer, "index_key", None), backup_kind=kind,
                       pool=rec.pool, base_snapshot=final if optimized else None
                       ) as op, Stages() as st:
            result.operation = op.id
            st.add_undo("remove the partial backup", writer.abort)
            op.stage("write")
            with consistent_snapshot(cts, rec, backend, vol, result.notes, keep=optimized,
                                     name=final):
                on_disk = {s.name: s for s in backend.list_snapshots(vol)}
                points = [on_disk[n] for n in result.snapshots_stored if n in on_disk]
                missing = [n for n in result.snapshots_stored if n not in on_disk]
                if missing:
                    raise MigratorError(f"snapshot(s) {', '.join(missing)} of {rec.name} are "
                                        "recorded but missing on disk",
                                        "delete them: `migrate snapshot delete`")
                points.append(on_disk[final])
                if optimized:
                    _write_native(writer, idx, backend, driver, points, base, level, progress)
                    idx.base_snapshot = final
                    idx.base_identity = backend.snapshot_identity(on_disk[final])
                elif parent is not None:
                    _write_deltas(repo, writer, idx, parent, backend, points, level, progress)
                else:
                    _write_full(writer, idx, backend, points, level, progress,
                                STABLE_TAR if chunked else ())
            if optimized:
                st.add_undo("drop the base snapshot",
                            lambda: backend.delete_snapshot(vol, final))
            op.stage("commit")
            idx.notes = [*result.notes, *(n for n in idx.notes if n not in result.notes)]
            result.notes = list(idx.notes)
            writer.commit(idx)
        if optimized:  # one base per container: the previous one has served its purpose
            _drop_older_bases(repo, idx, backend, vol, result.notes)
    result.raw_bytes = idx.raw_size()
    result.stored_bytes = idx.stored_size()
    stats = getattr(writer, "stats", None)  # a chunked repository's WriteStats
    if stats is not None:
        result.stored_bytes = stats.stored_bytes
        result.chunks, result.new_chunks = stats.chunks, stats.new_chunks
    result.seconds = time.monotonic() - t0
    return result


def _drop_older_bases(repo: BackupRepository, idx: BackupIndex, backend: StorageBackend,
                      vol: VolumeRef, notes: list[str]) -> None:
    keep = idx.base_snapshot
    for b in repo.list():
        if b.container == idx.container and b.base_snapshot and b.base_snapshot != keep \
                and b.created < idx.created:
            try:
                backend.delete_snapshot(vol, SnapshotName(b.base_snapshot))
            except MigratorError as e:
                notes.append(f"could not remove the old base snapshot {b.base_snapshot}: {e}")


def _part(idx: BackupIndex, rel: str, kind: str, point: str, base: str | None,
          stored: tuple[int, str, int]) -> None:
    size, digest, raw = stored
    idx.parts.append(PartInfo(rel, kind, point, base, size, digest, raw))


def _suffix(level: int | None) -> str:
    return "" if level is None else ".zst"


def _rel(idx: BackupIndex, snap: Snapshot, ext: str, level: int | None) -> str:
    stem = "container" if snap.name == idx.final else f"snapshots/{snap.name}"
    return f"{stem}.{ext}{_suffix(level)}"


def _store_stream(writer: BackupSink, rel: str, stream: SendStream, level: int | None,
                  meter: ProgressMeter) -> tuple[int, str, int]:
    try:
        widen_pipe(stream.fileno())
        stored = store(writer, rel, stream.fileno(), level, meter)
        stream.close()  # raises when the producer failed
    finally:
        stream.kill()
    return stored


def hidden_dirs(idx: BackupIndex) -> tuple[str, ...]:
    """Directories whose contents a generic backup leaves out.

    Every container gets a fresh tmpfs on ``/dev`` from LXC (``lxc.autodev``), so what the
    rootfs holds there is never seen. For an unprivileged container those entries are
    device nodes a restore must refuse (``migrator.targuard``), so they are not stored at all;
    a privileged container's are kept, as the rootfs has them.
    """
    return () if idx.privileged else ("rootfs/dev",)


def _warn_devices(idx: BackupIndex, manifest: delta.Manifest) -> None:
    """Say so when an unprivileged container holds device nodes (put there from the host):
    the backup is made, but restoring it will refuse them (``migrator.targuard``)."""
    if idx.privileged:
        return
    devices = sorted(p for p, e in manifest.entries.items() if e[0] in "cb")
    if devices:
        note = (f"device node(s) {', '.join(devices[:3])}{' ...' if len(devices) > 3 else ''} "
                "in an unprivileged container: a restore will refuse them; remove them or "
                "make the container privileged, then back up again")
        if note not in idx.notes:
            idx.notes.append(note)


def _tar_stream(path: Path, name: str, xattrs: bool, hidden: tuple[str, ...],
                extra: tuple[str, ...] = ()) -> SendStream:
    """A full tar of a mounted snapshot: the drivers' ``tar`` send, leaving out the
    contents of ``hidden`` directories (``extra``: more tar options)."""
    skip = [a for d in hidden for a in ("--anchored", f"--exclude=./{d}/*")]
    return tar_send(path, name, xattrs, [*extra, *skip])


def _write_full(writer: BackupSink, idx: BackupIndex, backend: StorageBackend,
                points: list[Snapshot], level: int | None, progress: Progress,
                extra: tuple[str, ...] = ()) -> None:
    hidden = hidden_dirs(idx)
    for snap in points:
        with backend.mount_snapshot(snap) as path:
            stream = _tar_stream(path, snap.name, bool(backend.supports_xattrs), hidden,
                                 extra)
            meter = ProgressMeter(progress, f"{idx.container}@{snap.name}", stream.size_hint)
            rel = _rel(idx, snap, "tar", level)
            _part(idx, rel, "tar", snap.name, None,
                  _store_stream(writer, rel, stream, level, meter))
    with backend.mount_snapshot(points[-1]) as path:
        manifest = delta.scan(path, hidden)
    _warn_devices(idx, manifest)
    _part(idx, f"manifest.json{_suffix(level)}", "manifest", idx.final, None,
          store_bytes(writer, f"manifest.json{_suffix(level)}", manifest.to_bytes(), level))


def _write_deltas(repo: BackupRepository, writer: BackupSink, idx: BackupIndex,
                  parent: BackupIndex, backend: StorageBackend, points: list[Snapshot],
                  level: int | None, progress: Progress) -> None:
    mpart = parent.manifest()
    assert mpart is not None
    previous = delta.Manifest.from_bytes(
        read_small(repo, parent.id, mpart, parent.compression), f"backup {parent.id}")
    prev_point = parent.final
    xattrs = bool(backend.supports_xattrs)
    for snap in points:
        with backend.mount_snapshot(snap) as path, tempfile.TemporaryDirectory() as tmp:
            current = delta.scan(path, hidden_dirs(idx))
            _warn_devices(idx, current)
            change = delta.diff(previous, current)
            listing = Path(tmp) / "members"
            listing.write_bytes(delta.encode_paths(change.members))
            stream = SendStream(delta.tar_members_argv(path, listing, xattrs), "tar",
                                snap.name, prev_point, size_hint=change.bytes)
            meter = ProgressMeter(progress, f"{idx.container}@{snap.name} (changes)",
                                  change.bytes)
            rel = _rel(idx, snap, "delta.tar", level)
            _part(idx, rel, "delta", snap.name, prev_point,
                  _store_stream(writer, rel, stream, level, meter))
        rel = _rel(idx, snap, "deleted", level)
        _part(idx, rel, "deleted", snap.name, prev_point,
              store_bytes(writer, rel, delta.encode_paths(change.deleted), level))
        previous, prev_point = current, snap.name
    _part(idx, f"manifest.json{_suffix(level)}", "manifest", idx.final, None,
          store_bytes(writer, f"manifest.json{_suffix(level)}", previous.to_bytes(), level))


def _write_native(writer: BackupSink, idx: BackupIndex, backend: StorageBackend,
                  driver: str, points: list[Snapshot], base: Snapshot | None,
                  level: int | None, progress: Progress) -> None:
    parent = base
    for snap in points:
        stream = backend.send(snap, parent, driver)
        meter = ProgressMeter(progress, f"{idx.container}@{snap.name}", stream.size_hint)
        rel = _rel(idx, snap, driver, level)
        _part(idx, rel, driver, snap.name, parent.name if parent else None,
              _store_stream(writer, rel, stream, level, meter))
        parent = snap

