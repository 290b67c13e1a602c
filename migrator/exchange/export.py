"""``migrate export``: write a container (and its snapshots) as one LXD/Incus tarball.

The one design decision: the export streams. The tar goes straight into the compressor and
the output (a file or stdout), section by section: GNU tar for each volume, with ``-b1`` so
its end blocks can be cut off, or the pool's native send streams, whose size is found by a
first counting pass, since a tar header needs it up front. No temporary copy of the
container is ever made.

Rootfs ownership in the archive is the container's view (0..65535), unshifted with GNU tar's
``--owner-map``/``--group-map`` (the volume is read once, never copied), and the index
records no map (``[]``): LXD 5.0.2 itself stores its on-disk ids (100000+N) and records its
map, but it imports either (``[]`` means "remap at the first start"; checked against a real
LXD, ``bench/lxd_fixtures.py``), and the container's view is what any host can read. POSIX ACL
entries and file capabilities inside an unprivileged rootfs are not unshifted (GNU tar stores
them as text), and a file whose owner lies outside the container's range (made from the host)
keeps its host id, where LXD leaves it out: both are known gaps. Optimized (btrfs) streams
carry the ids as they are on disk; the index records that map (``exchange.lxd_idmap``).
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.base import Snapshot
from migrator.backends.generic import tar_create_argv, tree_size
from migrator.core.errors import CorruptBackup, InvalidInput
from migrator.exchange import layout
from migrator.exchange.compression import check_compression, compressing
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers
from migrator.runtime.state import ContainerRecord
from migrator.runtime.temp_snapshots import consistent_snapshot
from migrator.streams import CHUNK, Progress, ProgressMeter, SendStream, no_progress


@dataclass
class ExportResult:
    """What ``export_container`` wrote (the CLI prints it; ``--format json`` dumps it)."""

    container: str
    optimized: bool
    compression: str
    snapshots: list[str] = field(default_factory=list)
    bytes: int = 0  # tar bytes before compression
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TarOut:
    """The archive being written: headers we make, GNU tar output, raw member data."""

    def __init__(self, out: BinaryIO, compression: str) -> None:
        self.sink, self._closers = compressing(out, compression)
        self._out = out
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.bytes += len(data)

    def _header(self, info: tarfile.TarInfo) -> None:
        info.mtime = info.mtime or int(time.time())
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        self._header(info)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        self._header(info)
        self.write(data)
        self._pad(len(data))

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self.write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_tar_stream(self, stream: SendStream, meter: ProgressMeter) -> None:
        """Copy a GNU tar archive made with ``-b1`` minus its two end blocks."""
        held = b""
        fd = stream.fileno()
        try:
            while chunk := os.read(fd, CHUNK):
                data = held + chunk
                held = data[-1024:]
                self.write(memoryview(data)[:-1024])
                meter.advance(len(chunk))
        except BaseException:
            stream.kill()
            raise
        stream.close()
        if len(held) != 1024 or held.count(0) != 1024:
            raise CorruptBackup(f"{stream.argv[0]} did not end its archive with two zero "
                                "blocks (was -b1 ignored?)")

    def add_stream_file(self, name: str, size: int, stream: SendStream,
                        meter: ProgressMeter) -> None:
        """A member of exactly ``size`` bytes read from ``stream``."""
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o600
        self._header(info)
        fd = stream.fileno()
        moved = 0
        try:
            while chunk := os.read(fd, CHUNK):
                moved += len(chunk)
                if moved > size:
                    break
                self.write(chunk)
                meter.advance(len(chunk))
        except BaseException:
            stream.kill()
            raise
        if moved != size:
            stream.kill()
            raise CorruptBackup(f"{' '.join(stream.argv[:2])} gave {moved} bytes the second "
                                f"time and {size} the first: the stream is not repeatable")
        stream.close()
        self._pad(size)

    def close(self) -> None:
        self.write(b"\0" * 1024)
        self._pad_record()
        for fn in self._closers:
            fn()
        self._out.flush()

    def _pad_record(self) -> None:
        record = tarfile.RECORDSIZE
        if self.bytes % record:
            self.write(b"\0" * (record - self.bytes % record))


@contextlib.contextmanager
def _owner_maps(shift: int) -> Iterator[list[str]]:
    """GNU tar options that unshift an unprivileged rootfs (host base+N -> N)."""
    if shift == 0:
        yield []
        return
    with tempfile.NamedTemporaryFile("w", prefix="migrate-idmap-", suffix=".map") as f:
        f.writelines(f"+{shift + n} +{n}\n" for n in range(idmap.MAP_SIZE))
        f.flush()
        yield [f"--owner-map={f.name}", f"--group-map={f.name}"]


def _gnu_tar_section(path: Path, prefix: str, owner_opts: list[str],
                     xattrs: bool) -> SendStream:
    """GNU tar of ``path/rootfs`` with members named ``prefix/rootfs/...``; ``-b1`` so the
    archive ends right after its two zero blocks (cut off when sections are joined). The
    transform's ``S`` flag leaves symlink targets alone; hard link targets are rebased too.

    An unprivileged rootfs is written without what is under ``/dev``: LXC mounts a tmpfs
    there and fills it, so those entries are never seen by the container, and the device
    nodes debootstrap leaves there would (rightly) be refused by any import of an
    unprivileged container, ours included."""
    skip_dev = ["--anchored", "--exclude=rootfs/dev/*"] if owner_opts else []
    argv = tar_create_argv(path, ["rootfs"], xattrs,
                           ["-b1", *owner_opts, *skip_dev, f"--transform=s,^,{prefix}/,S"])
    return SendStream(argv, "tar", prefix)


def export_container(
    cts: Containers, name: str, out: BinaryIO, optimized: bool = False,
    instance_only: bool = False, compression: str = "zstd", progress: Progress = no_progress,
) -> ExportResult:
    """Write container ``name`` (and its snapshots) to ``out`` as an LXD/Incus tarball."""
    t0 = time.monotonic()
    check_compression(compression)
    rec = cts.get(name)
    backend = cts.host.backend(rec.pool)
    driver = cts.state.get_pool(rec.pool).driver
    if optimized and driver != "btrfs":
        raise InvalidInput(
            f"--optimized writes btrfs send streams; {rec.name} is on a {driver} pool",
            "export without --optimized (the generic layout imports anywhere)")
    vol = VolumeRef("container", rec.name)
    on_disk = {s.name: s for s in backend.list_snapshots(vol)}
    snaps = [] if instance_only else [s for s in cts.snapshot_list(rec.name)
                                      if s.name in on_disk]
    result = ExportResult(rec.name, optimized, compression, [s.name for s in snaps])
    privileged = cfg.is_true(rec.config, "security.privileged")
    shift = 0 if privileged else idmap.default_idmap().base
    index = layout.index_document(rec, driver, snaps, optimized, shift if optimized else 0)
    tar = _TarOut(out, compression)
    # LXD's import of send streams rewrites the root disk's pool in the received volume's
    # backup.yaml and fails without one: the container's stream carries it, written at the
    # volume's top (beside rootfs/, out of the container's sight) for the snapshot only.
    staged = backend.volume_path(vol) / "backup.yaml" if optimized else None
    if staged is not None:
        _write_new(staged, layout.backup_yaml(rec, driver, snaps, shift))
    with contextlib.ExitStack() as cleanup:
        if staged is not None:
            cleanup.callback(staged.unlink, missing_ok=True)
        tmp_name = cleanup.enter_context(
            consistent_snapshot(cts, rec, backend, vol, result.notes))
        if staged is not None:
            staged.unlink(missing_ok=True)
        current = next(s for s in backend.list_snapshots(vol) if s.name == tmp_name)
        tar.add_dir("backup")
        tar.add_bytes(layout.INDEX, index)
        if optimized:
            _export_native(tar, backend, [on_disk[s.name] for s in snaps], current, progress)
        else:
            _export_generic(tar, backend, rec, [on_disk[s.name] for s in snaps], current,
                            shift, progress, layout.backup_yaml(rec, driver, snaps))
        tar.close()
    result.bytes = tar.bytes
    result.seconds = time.monotonic() - t0
    if not privileged and not optimized:
        result.notes.append("rootfs ids unshifted to the container's view (0..65535), as "
                            "LXD stores them; /dev contents left out (LXC mounts a tmpfs "
                            "there)")
    return result


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (no symlink followed, an existing file replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _export_generic(tar: _TarOut, backend: StorageBackend, rec: ContainerRecord,
                    snaps: list[Snapshot], current: Snapshot, shift: int,
                    progress: Progress, backup_yaml: bytes) -> None:
    xattrs = bool(backend.supports_xattrs)
    if snaps:
        tar.add_dir("backup/snapshots")
    with _owner_maps(shift) as owner_opts:
        for snap, prefix in [*((s, f"backup/snapshots/{s.name}") for s in snaps),
                             (current, "backup/container")]:
            with backend.mount_snapshot(snap) as path:
                tar.add_dir(prefix, 0o711)
                tar.add_bytes(f"{prefix}/metadata.yaml", layout.metadata_yaml(rec))
                tar.add_bytes(f"{prefix}/backup.yaml", backup_yaml)
                tar.add_dir(f"{prefix}/templates")
                meter = ProgressMeter(progress, f"export {prefix.removeprefix('backup/')}",
                                      tree_size(path / "rootfs"))
                tar.add_tar_stream(_gnu_tar_section(path, prefix, owner_opts, xattrs), meter)
                meter.finish()


def _stream_length(stream: SendStream) -> int:
    n = 0
    try:
        while chunk := os.read(stream.fileno(), CHUNK):
            n += len(chunk)
    except BaseException:
        stream.kill()
        raise
    stream.close()
    return n


def _export_native(tar: _TarOut, backend: StorageBackend, snaps: list[Snapshot],
                   current: Snapshot, progress: Progress) -> None:
    """The pool's btrfs send streams, each incremental from the one before (as LXD writes
    them). A tar header needs the member's size before its data, so each stream is sent
    twice: once counted, once written. That costs a second read, never a temporary copy."""
    tar.add_bytes(layout.OPTIMIZED_HEADER, layout.optimized_header(
        [(s.name, backend.snapshot_identity(s) or "") for s in snaps]))
    if snaps:
        tar.add_dir("backup/snapshots")
    parent: Snapshot | None = None
    for snap, member in [*((s, f"backup/snapshots/{s.name}.bin") for s in snaps),
                         (current, "backup/container.bin")]:
        size = _stream_length(backend.send(snap, parent, "btrfs"))
        meter = ProgressMeter(progress, f"export {member.removeprefix('backup/')}", size)
        tar.add_stream_file(member, size, backend.send(snap, parent, "btrfs"), meter)
        meter.finish()
        parent = snap
