"""Reading an archive once, in a thread, and handing each rootfs (or send stream) to its
receiver as a stream of its own.

The one design decision: the archive is read through ``migrator.targuard.TarGuard`` (every
header checked before anything acts on it, and written anew: tarfile here reads only the
guard's headers), and each rootfs section goes to GNU tar as its own tar stream with names
rebased to ``rootfs/`` (a ``.bin`` member's bytes go as they are, to the pool's native
receive). Ids are shifted as members pass, for an unprivileged container, from the base the
archive records (``exchange.lxd_idmap``: LXD 5.0 stores the ids it has on disk, 100000+N, and
says so; ``[]`` or nothing means the container's view, 0+N) to this host's map: an id outside
the 65536 from that recorded base is refused, since it would land in another container's
range or on the host's own ids.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import tarfile
import threading
from collections.abc import Iterator
from typing import Any

from migrator.core.errors import CorruptBackup, MigratorError, UnsafeArchive
from migrator.exchange.layout import (
    INDEX,
    OPTIMIZED_HEADER,
    ArchiveIndex,
    BackupFormatError,
    parse_yaml,
    read_small,
)
from migrator.runtime import idmap
from migrator.streams import CHUNK, Stream
from migrator.targuard import TarGuard


class _Section:
    """One rootfs of the archive (a snapshot's or the container's) on its way to GNU tar:
    a pipe the reading thread writes a rebased tar stream into, and the tar consuming it."""

    def __init__(self, key: str, raw: bool) -> None:
        self.key = key
        r, w = os.pipe()
        self.read_fd = r
        self.writer = os.fdopen(w, "wb", buffering=CHUNK)
        self.tar: tarfile.TarFile | None = None
        if not raw:  # raw: a .bin member's bytes as they are (a btrfs send stream)
            self.tar = tarfile.open(  # noqa: SIM115 - closed by finish(), from another call
                fileobj=self.writer, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                errors="surrogateescape")
        self.done = False

    def finish(self) -> None:
        if self.tar is not None:
            self.tar.close()  # the end blocks; the pipe stays open (tarfile does not own it)
        self.done = True  # before the reader can see EOF
        self.writer.close()

    def abandon(self) -> None:
        """Stop mid-stream: the consumer sees a cut archive (and the reader's error)."""
        if self.tar is not None:
            self.tar.closed = True  # type: ignore[attr-defined]  # no end blocks, even at __del__
            with contextlib.suppress(AttributeError):
                self.tar.fileobj.closed = True  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError):
            self.writer.close()


class SectionStream(Stream):
    """The consuming side of a section, as the ``Stream`` receivers take. ``close`` reports
    the reader's error (an unsafe member, a truncated archive) before anything else."""

    how = "tar"
    parent = None
    size_hint = None

    def __init__(self, section: _Section, reader: ArchiveReader) -> None:
        self.section = section
        self.name = section.key
        self._reader = reader
        self._closed = False

    def fileno(self) -> int:
        return self.section.read_fd

    def close(self, check: bool = True) -> None:
        self.kill()
        if check:
            self._reader.raise_error()
            if not self.section.done:
                raise CorruptBackup(f"the archive ended inside the rootfs of {self.name}")

    def kill(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.section.read_fd)

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Around a receiver's consumption: a receiver's error is reported after the
        reader's (the real cause: an unsafe member, a truncated archive), and the stream is
        let go either way."""
        try:
            yield
        except MigratorError as e:
            self._reader.raise_error()
            raise e
        finally:
            self.kill()


class ArchiveReader:
    """Reads the whole archive in a thread and feeds each rootfs section (or .bin stream)
    into its own pipe, in archive order; the main thread consumes them one by one
    (``sections``) and stops the thread at the end, whatever happened (``drain``)."""

    def __init__(self, tar: tarfile.TarFile, guard: TarGuard, index: ArchiveIndex,
                 shift: int, optimized: bool, bases: dict[str, int] | None = None):
        """``shift``: this host's base for the container's root (0: privileged, ids kept);
        ``bases``: the base each generic section ("container" or a snapshot's name) is
        owned from, as its recorded map says (absent: 0)."""
        self.tar = tar
        self.guard = guard
        self.index = index
        self.shift = shift
        self.bases = bases or {}
        self.optimized = optimized
        self._queue: queue.Queue[_Section | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.header: dict[str, Any] | None = None
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, name="import-reader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def sections(self) -> Iterator[tuple[str, SectionStream]]:
        """Each section in order, checked against the index's order: snapshots, then
        container."""
        expected = [*self.index.snapshots, "container"]
        position = 0
        while True:
            section = self._queue.get()
            if section is None:
                self.raise_error()
                return
            key = section.key
            if key not in expected[position:]:
                os.close(section.read_fd)
                self.raise_error()
                where = ("is not listed in " + INDEX) if key not in expected \
                    else "is out of order"
                raise BackupFormatError(f"the archive's data for {key!r} {where}",
                                        "snapshots come first, oldest first, then the "
                                        "container")
            position = expected.index(key, position) + 1
            yield key, SectionStream(section, self)

    def drain(self) -> None:
        """Unblock and stop the reading thread (after success or failure)."""
        while self.thread.is_alive():
            try:
                section = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if section is not None:
                os.close(section.read_fd)  # its writes now fail: the thread stops
        self.thread.join()

    def _run(self) -> None:
        current: _Section | None = None
        try:
            for member in self.tar:
                key, rel = self._classify(member)
                if key is None:
                    continue
                if current is None or current.key != key:
                    if current is not None:
                        current.finish()
                    if key in self.seen:
                        raise BackupFormatError(
                            f"the archive holds {key} in two places (rootfs members out of "
                            "order)", "the archive must list each volume's files together, "
                            "as lxc export does")
                    self.seen.append(key)
                    current = _Section(key, self.optimized)
                    self._queue.put(current)
                self._copy(current, member, rel)
            if current is not None:
                current.finish()
            while self.guard.read(CHUNK):  # to the end: the guard checks what follows the
                pass  # end block, and a writer piping into us is not cut off
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self.error = e
            if current is not None:
                current.abandon()
        finally:
            self._queue.put(None)

    def _classify(self, m: tarfile.TarInfo) -> tuple[str | None, str]:
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if ".." in parts or m.name.startswith("/"):  # TarGuard refused these already
            raise UnsafeArchive(f"member {m.name!r} climbs out of the archive")
        if self.optimized:
            if m.isreg() and len(parts) == 2 and parts[1] == "container.bin":
                return "container", ""
            if m.isreg() and len(parts) == 3 and parts[1] == "snapshots" and \
                    parts[2].endswith(".bin"):
                return parts[2].removesuffix(".bin"), ""
            if "/".join(parts) == OPTIMIZED_HEADER:
                self.header = parse_yaml(read_small(self.tar, m), OPTIMIZED_HEADER)
            return None, ""
        if len(parts) >= 3 and parts[1] == "container" and parts[2] == "rootfs":
            return "container", "/".join(parts[2:])
        if len(parts) >= 4 and parts[1] == "snapshots" and parts[3] == "rootfs":
            return parts[2], "/".join(parts[3:])
        return None, ""  # metadata.yaml, templates/, backup.yaml: not used here

    def _copy(self, section: _Section, m: tarfile.TarInfo, rel: str) -> None:
        f = self.tar.extractfile(m) if m.isreg() else None
        if self.optimized:
            assert f is not None
            while chunk := f.read(CHUNK):
                section.writer.write(chunk)
            return
        info = copy.copy(m)
        info.name = rel
        if m.type in (tarfile.GNUTYPE_SPARSE, tarfile.CONTTYPE):
            info.type = tarfile.REGTYPE  # data arrives expanded; rewritten as a plain file
        if m.islnk():
            lparts = [p for p in m.linkname.split("/") if p not in ("", ".")]
            cut = 3 if lparts[1:2] == ["container"] else 4
            info.linkname = "/".join(lparts[cut - 1:])
        if self.shift:
            low = self.bases.get(section.key, 0)
            for what, ident in (("uid", m.uid), ("gid", m.gid)):
                if not low <= ident < low + idmap.MAP_SIZE:
                    raise UnsafeArchive(
                        f"member {m.name!r} is owned by {what} {ident}, outside the "
                        f"{idmap.MAP_SIZE} ids an unprivileged container maps (from "
                        f"{low}, as the archive's recorded idmap for {section.key} says)")
            info.uid = m.uid - low + self.shift
            info.gid = m.gid - low + self.shift
        # keep xattrs and ACLs; tarfile writes path, size, times and sparse data itself
        info.pax_headers = {k: v for k, v in m.pax_headers.items()
                            if k.startswith("SCHILY.") or k in ("mtime", "atime")}
        info.uname = info.gname = ""
        assert section.tar is not None
        section.tar.addfile(info, f)
