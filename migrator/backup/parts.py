"""Moving bytes into and out of backup parts: zstd on the way in, checks on the way out.

Writing: a producer's stdout (``tar``, ``btrfs send``, ``zfs send``) is read in 1 MiB pieces
and fed to a multi-threaded zstd compressor (``threads=-1``: one worker per CPU) whose output
goes to a ``PartWriter`` that hashes (sha256) and counts what lands on disk. Compression is
the expensive step, so it runs in zstd's own threads; Python only shuttles buffers.

Reading: ``PartStream`` is a ``migrator.streams.Stream`` a backend's ``receive`` (or
``tar_extract``) consumes like a send stream. A thread reads the part, hashes it, decompresses
it (never past the raw size its index declares: a lying index or a zstd bomb stops there,
before the disk fills) and, for tar parts, passes it through ``migrator.targuard.TarGuard``
(which stops at the first member that would escape the target and rewrites every header it
approves) before writing to a pipe. The digest is compared when
the part ends: ``close()`` raises ``CorruptBackup`` for a mismatch, or the guard's
``UnsafeArchive``, so the receiver's cleanup runs and the real cause is reported (see
``PartStream.error``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable
from typing import IO

import zstandard

from migrator.backup.model import PartInfo
from migrator.backup.repository import BackupRepository, BackupSink, PartSource, ReadsInto
from migrator.core.errors import CorruptBackup
from migrator.streams import FedStream, ProgressMeter

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # a bigger pipe means fewer, larger reads from the producer


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (the default 64 KiB makes reads small); best effort."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def store(writer: BackupSink, rel: str, src: int | IO[bytes], level: int | None,
          meter: ProgressMeter | None = None) -> tuple[int, str, int]:
    """Write everything readable from ``src`` (a fd or file) into part ``rel``, compressed
    at zstd ``level`` (None: stored as is). Returns (stored size, sha256, raw size)."""
    part = writer.part(rel)
    fd = src if isinstance(src, int) else src.fileno()
    raw = 0
    try:
        if level is None:
            while chunk := os.read(fd, CHUNK):
                part.write(chunk)
                raw += len(chunk)
                if meter is not None:
                    meter.advance(len(chunk))
        else:
            cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
            with cctx.stream_writer(part, closefd=False) as zw:  # type: ignore[arg-type]
                while chunk := os.read(fd, CHUNK):
                    zw.write(chunk)
                    raw += len(chunk)
                    if meter is not None:
                        meter.advance(len(chunk))
        size, digest = part.finish()
    except BaseException:
        part.abort()
        raise
    if meter is not None:
        meter.finish()
    return size, digest, raw


def store_bytes(writer: BackupSink, rel: str, data: bytes,
                level: int | None) -> tuple[int, str, int]:
    """A small part held in memory (a manifest, a list of deleted paths)."""
    part = writer.part(rel)
    try:
        part.write(data if level is None else zstandard.ZstdCompressor(
            level=level, write_checksum=True).compress(data))
        size, digest = part.finish()
    except BaseException:
        part.abort()
        raise
    return size, digest, len(data)


class _HashingReader(ReadsInto):
    """A file reader that hashes and counts what passes through it."""

    def __init__(self, f: PartSource) -> None:
        self.f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def check_digest(reader: _HashingReader, backup_id: str, part: PartInfo) -> None:
    if reader.size != part.size:
        raise CorruptBackup(f"backup {backup_id}: part {part.path} truncated: {reader.size} of "
                            f"{part.size} bytes" if reader.size < part.size else
                            f"backup {backup_id}: part {part.path} has {reader.size} bytes, "
                            f"its index says {part.size}")
    if reader.hash.hexdigest() != part.sha256:
        raise CorruptBackup(f"backup {backup_id}: part {part.path} checksum mismatch")


class _Capped(ReadsInto):
    """A part's raw content, never more than the ``raw_size`` its index declares: a part
    that decompresses further (a lying index, a zstd bomb) is refused at that byte, before
    the disk it is written to fills."""

    def __init__(self, src: _HashingReader | zstandard.ZstdDecompressionReader, backup_id: str,
                 part: PartInfo) -> None:
        self.src = src
        self.count = 0
        self._id, self._part = backup_id, part

    def read(self, n: int = -1) -> bytes:
        left = self._part.raw_size - self.count
        data: bytes = self.src.read(CHUNK if n is None or n < 0 else n)
        if len(data) > left:
            raise CorruptBackup(
                f"backup {self._id}: part {self._part.path} decompresses beyond the "
                f"{self._part.raw_size} bytes its index declares",
                "the index lies about this part; nothing of it was kept")
        self.count += len(data)
        return data

    def check_complete(self) -> None:
        if self.count != self._part.raw_size:
            raise CorruptBackup(f"backup {self._id}: part {self._part.path} holds "
                                f"{self.count} bytes, its index says {self._part.raw_size}")


def open_decompressed(repo: BackupRepository, backup_id: str, part: PartInfo,
                      compression: str) -> tuple[IO[bytes], _HashingReader]:
    """The part's raw content as a reader (capped at its declared raw size), and the
    hashing layer under it."""
    hashing = _HashingReader(repo.open_part(backup_id, part.path))
    if compression == "none":
        return _Capped(hashing, backup_id, part), hashing  # type: ignore[return-value]
    dctx = zstandard.ZstdDecompressor()
    reader = dctx.stream_reader(hashing, read_size=CHUNK,  # type: ignore[arg-type]
                                read_across_frames=True)
    return _Capped(reader, backup_id, part), hashing  # type: ignore[return-value]


def read_small(repo: BackupRepository, backup_id: str, part: PartInfo, compression: str,
               limit: int = 1 << 30) -> bytes:
    """A whole small part (manifest, deleted list), checked against its index entry."""
    reader, hashing = open_decompressed(repo, backup_id, part, compression)
    try:
        data = reader.read(limit + 1) if part.raw_size <= limit else b""
        if len(data) > limit or part.raw_size > limit:
            raise CorruptBackup(f"backup {backup_id}: part {part.path} is implausibly large")
        hashing.drain()
    except zstandard.ZstdError as e:
        raise CorruptBackup(f"backup {backup_id}: part {part.path} does not decompress: "
                            f"{e}") from e
    finally:
        hashing.f.close()
    check_digest(hashing, backup_id, part)
    if len(data) != part.raw_size:
        raise CorruptBackup(f"backup {backup_id}: part {part.path} holds {len(data)} bytes, "
                            f"its index says {part.raw_size}")
    return data


class PartStream(FedStream):
    """A backup part as a volume stream: checked, decompressed and (tar) guarded."""

    def __init__(self, repo: BackupRepository, backup_id: str, part: PartInfo, compression: str,
                 how: str, name: str, parent: str | None,
                 guard: Callable[[IO[bytes]], IO[bytes]] | None = None) -> None:
        self.how, self.name, self.parent = how, name, parent
        self.size_hint = part.raw_size
        self._part, self._id = part, backup_id
        reader, self._hashing = open_decompressed(repo, backup_id, part, compression)
        self._capped: _Capped = reader  # type: ignore[assignment]
        self._reader = guard(reader) if guard is not None else reader
        self.start_feeding(f"part-{part.path}", PIPE_SIZE)

    def produce(self, write: Callable[[bytes | memoryview], None]) -> None:
        while data := self._reader.read(CHUNK):
            write(data)
        self._hashing.drain()
        check_digest(self._hashing, self._id, self._part)
        self._capped.check_complete()

    def translate(self, e: BaseException) -> BaseException:
        if isinstance(e, zstandard.ZstdError):
            return CorruptBackup(f"backup {self._id}: part {self._part.path} does not "
                                 f"decompress: {e}")
        return e

    def after_feed(self) -> None:
        with contextlib.suppress(OSError):
            self._hashing.f.close()


def real_error(stream: PartStream, e: BaseException) -> BaseException:
    """The error to report when a receive of ``stream`` failed with ``e``: the stream's own
    (checksum, unsafe member) when it has one, since the receiver only saw its effect."""
    stream.kill()
    return stream.error if stream.error is not None else e
