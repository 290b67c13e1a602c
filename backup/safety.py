"""Validation of tar archives before (and while) they are extracted into a container's rootfs.

A backup or an imported LXD/Incus tarball comes from somewhere we do not control, and GNU tar
runs as root when it unpacks one. So every member header is checked first, here, and an
archive is refused at its first bad member:

- no absolute member names and no ``..`` component, anywhere;
- no member whose path goes through a symlink that an earlier member created (extracting
  ``etc -> /`` then ``etc/passwd`` would write the host's file), and no member that replaces
  such a symlink;
- hard links must name an earlier member of the same rootfs, by a relative path without ``..``;
- symlinks are free to point at absolute paths: inside a rootfs, ``/bin/sh`` is resolved in
  the container's own mount namespace, where ``/`` is the rootfs, so absolute targets are what
  a normal distribution tree holds. A *relative* target must not climb above the rootfs
  (checked lexically from the link's directory), since host-side tools that walk the tree
  would then leave it. Links of either kind are only allowed inside a rootfs;
- device nodes only when ``allow_devices`` (a privileged container); fifos are fine;
- only the member types GNU tar and LXD write (files, dirs, links, devices, fifos; GNU long
  names, pax headers and GNU sparse files are understood);
- members confined to the archive's rootfs trees (``root`` and ``more_roots``), their parent
  directories, and plain files or directories under ``data_prefix`` (LXD's index.yaml,
  backup.yaml, templates/);
- file data adds up to no more than ``declared_bytes`` while reading (an index that lies is
  refused before a disk fills) and exactly to it at the end;
- the archive ends with its end-of-archive block: a stream cut short, even exactly between
  two members (which Python's tarfile and GNU tar both accept), is :class:`CorruptBackup`.

The one design decision: validation is a *push* parser over 512-byte blocks, so
:class:`TarGuard` can sit in the pipe in front of GNU tar and pass bytes through unchanged,
checking each header before its last byte is handed on, i.e. before tar can act on it. Only
headers are parsed (with ``tarfile.TarInfo.frombuf``); file data is counted, never copied
aside, so the guard costs little more than the copy the pump makes anyway.

Header interpretation follows GNU tar where Python's tarfile differs: the ustar ``prefix``
field is used only for POSIX ``ustar\\0`` headers, never for old-GNU ones (where those bytes
hold times), so the name checked here is the name GNU tar extracts.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from migrator.errors import CorruptBackup, UnsafeArchive

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

BLOCK = 512
# GNU long names and pax records are held in memory; real ones are a few KiB at most.
MAX_META_BYTES = 1 << 20
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"

_FILE_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE}
_META_TYPES = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
               tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
_TYPE_NAMES = {
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
    **{t: "file" for t in _FILE_TYPES},
}
_POSIX_MAGIC = b"ustar\x00"


@dataclass(frozen=True)
class TarRules:
    """What an archive may hold.

    ``root`` is the directory inside the archive that becomes the container's ``/`` (``""``:
    the whole archive is one rootfs). Extensions beyond the basic rules, for archives that
    hold several trees (LXD's layout):

    ``more_roots``: further rootfs trees, each confining its own links; ``*`` in a root
    matches exactly one path component (``backup/snapshots/*/rootfs``).
    ``data_prefix``: outside every root, plain files and directories under this prefix are
    allowed (metadata); anything else outside the roots is refused.
    """

    allow_devices: bool = False
    root: str = ""
    declared_bytes: int | None = None
    more_roots: tuple[str, ...] = ()
    data_prefix: str | None = None


@dataclass
class TarSummary:
    """``members``: entries (not counting pax/long-name headers); ``bytes``: the logical size
    of all regular files (a sparse file counts its full size; hard links count nothing)."""

    members: int = 0
    bytes: int = 0
    #: the first device node seen (allowed or not): an importer that relaxes or tightens
    #: ``allow_devices`` after reading an index checks the members already past
    first_device: str | None = None


def check_tar(fileobj: BinaryIO, rules: TarRules, chunk: int = 1 << 20) -> TarSummary:
    """Read ``fileobj`` to its end and validate every member; raise at the first bad one."""
    guard = TarGuard(fileobj, rules)
    buf = bytearray(chunk)
    while guard.readinto(buf):
        pass
    return guard.summary


class TarGuard(io.RawIOBase):
    """A readable stream that yields ``fileobj``'s bytes unchanged while validating them.

    Raises :class:`UnsafeArchive` at the first bad member (before returning the bytes that
    complete its header) and :class:`CorruptBackup` when the stream ends early. ``summary``
    is complete once ``read`` has returned ``b""``.
    """

    def __init__(self, fileobj: BinaryIO, rules: TarRules) -> None:
        super().__init__()
        self._src = fileobj
        self._checker = TarChecker(rules)

    @property
    def summary(self) -> TarSummary:
        return self._checker.summary

    @property
    def rules(self) -> TarRules:
        return self._checker.rules

    @rules.setter
    def rules(self, rules: TarRules) -> None:
        """Rules may change between members: an importer learns from the archive's first
        member (LXD's ``index.yaml``) whether the container is privileged, i.e. whether the
        device nodes that follow are allowed. The new rules apply from the next header."""
        self._checker.set_rules(rules)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            n = readinto(view) or 0
        else:
            data = self._src.read(len(view))
            n = len(data)
            view[:n] = data
        if n == 0:
            self._checker.finish()
            return 0
        self._checker.feed(view[:n])
        return n


def device_refused(name: str, what: str = "device node") -> UnsafeArchive:
    return UnsafeArchive(
        f"member {name!r} is a {what}; device nodes are refused unless the container is "
        "privileged"
    )


class GnuTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that reads member names as GNU tar does (and as ``TarChecker`` does).

    Python's tarfile prepends the ustar ``prefix`` field whatever the header's magic; GNU
    tar uses it only in POSIX ``ustar\\0`` headers. Parse with ``tarfile.open(...,
    tarinfo=GnuTarInfo)`` wherever names that were checked here are acted upon, so a crafted
    old-GNU header cannot show one name to the checker and another to the extractor.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> GnuTarInfo:
        return cls._gnu_name(super().frombuf(buf, encoding, errors), buf, encoding, errors)

    @classmethod
    def _frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str,
                 **kw: Any) -> GnuTarInfo:
        # Python 3.13 reads headers through this private twin of frombuf (3.11 does not)
        info = super()._frombuf(buf, encoding, errors, **kw)  # type: ignore[misc]
        return cls._gnu_name(info, buf, encoding, errors)

    @staticmethod
    def _gnu_name(info: Any, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
        if bytes(buf[257:263]) != _POSIX_MAGIC and _nts(bytes(buf[345:500])):
            name = bytes(buf[0:100]).split(b"\0", 1)[0].decode(encoding, errors)
            info.name = name.rstrip("/") if info.isdir() else name
        return info


def _nts(raw: bytes) -> str:
    """A NUL-terminated header string, as GNU tar reads it."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode(_ENCODING, _ERRORS)


def _nti(raw: bytes) -> int:
    """A header number: octal text, or GNU base-256 when the first byte has bit 7 set."""
    if raw and raw[0] & 0x80:
        value = int.from_bytes(raw[1:], "big")
        return value - (1 << (8 * len(raw) - 8)) if raw[0] == 0xFF else value
    text = raw.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptBackup(f"archive has a malformed number {raw!r} in a header") from None


def _split(name: str) -> tuple[bool, list[str]]:
    """(absolute?, components without '.', '' and a leading './')."""
    return name.startswith("/"), [p for p in name.split("/") if p not in ("", ".")]


def _pattern(root: str) -> tuple[str, ...]:
    return tuple(p for p in root.split("/") if p not in ("", "."))


@dataclass
class _Pending:
    """Long names and pax records waiting for the header they apply to."""

    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = field(default_factory=dict)


class TarChecker:
    """The push parser behind :class:`TarGuard`: ``feed`` bytes in order, then ``finish``."""

    def __init__(self, rules: TarRules) -> None:
        self.set_rules(rules)
        self.summary = TarSummary()
        self._offset = 0  # archive offset of the first byte not yet consumed
        self._block = bytearray()  # partial header block
        self._skip = 0  # data bytes (with padding) of the current member still to pass
        self._meta_type: bytes | None = None  # collecting a long name / pax record
        self._meta_need = 0
        self._meta = bytearray()
        self._sparse_ext = False  # old GNU sparse extension blocks follow
        self._pending_data = 0  # data to skip once they have
        self._ended = False
        self._pending = _Pending()
        self._current = ""  # name of the member being read, for truncation messages
        self._symlinks: set[tuple[str, ...]] = set()
        self._members: set[tuple[str, ...]] = set()  # non-directories, for hard links

    def set_rules(self, rules: TarRules) -> None:
        self.rules = rules
        self._roots = [_pattern(rules.root), *(_pattern(r) for r in rules.more_roots)]
        self._data = _pattern(rules.data_prefix) if rules.data_prefix is not None else None

    # ----- stream handling

    def feed(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                self._offset += n
                continue
            if self._ended:
                tail = data[pos:]
                if bytes(tail).count(0) != len(tail):
                    raise CorruptBackup(
                        f"archive has data after its end-of-archive block (offset "
                        f"{self._offset})"
                    )
                self._offset += len(tail)
                return
            want = BLOCK - len(self._block)
            take = data[pos:pos + want]
            self._block += take
            pos += len(take)
            if len(self._block) == BLOCK:
                block = bytes(self._block)
                self._block.clear()
                self._on_block(block)
                self._offset += BLOCK

    def finish(self) -> None:
        if self._ended:
            if self.rules.declared_bytes is not None and \
                    self.summary.bytes != self.rules.declared_bytes:
                raise CorruptBackup(
                    f"archive holds {self.summary.bytes} bytes of file data but its index "
                    f"declares {self.rules.declared_bytes}"
                )
            return
        if self._offset == 0 and not self._block:
            raise CorruptBackup("archive is empty (no tar header at all)")
        if not self._current:
            where = "before its first member"
        elif self._skip or self._sparse_ext:
            where = f"in the data of member {self._current!r}"
        else:
            where = f"after member {self._current!r}"
        raise CorruptBackup(
            f"archive is truncated {where}: the stream ended at offset "
            f"{self._offset + len(self._block)} without the end-of-archive block"
        )

    def _on_block(self, block: bytes) -> None:
        if self._meta_type is not None:
            self._meta += block[:min(BLOCK, self._meta_need - len(self._meta))]
            if len(self._meta) == self._meta_need:
                self._end_meta()
            return
        if self._sparse_ext:
            self._sparse_ext = bool(block[504])
            if not self._sparse_ext:
                self._skip = self._pending_data
            return
        if block.count(0) == BLOCK:
            if self._pending != _Pending():
                raise CorruptBackup(
                    f"archive ends after a long-name or pax header (offset {self._offset})"
                )
            self._ended = True
            self._current = ""
            return
        try:
            info = tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
        except tarfile.HeaderError as e:
            after = f" after member {self._current!r}" if self._current else ""
            raise CorruptBackup(
                f"archive has a damaged header at offset {self._offset}{after} ({e})"
            ) from None
        if info.size < 0:
            raise CorruptBackup(f"member {info.name!r} has a negative size")
        if info.type in _META_TYPES:
            if info.size > MAX_META_BYTES:
                raise UnsafeArchive(
                    f"archive has a {info.size}-byte long-name or pax header at offset "
                    f"{self._offset}; at most {MAX_META_BYTES} are accepted"
                )
            self._meta_type = info.type
            self._meta_need = info.size
            self._meta.clear()
            if info.size == 0:
                self._end_meta()
            return
        self._member(info, block)

    def _end_meta(self) -> None:
        kind, raw = self._meta_type, bytes(self._meta)
        self._meta_type = None
        self._meta.clear()
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._pending.long_name = _nts(raw)
        elif kind == tarfile.GNUTYPE_LONGLINK:
            self._pending.long_link = _nts(raw)
        else:
            records = self._pax_records(raw)
            if kind == tarfile.XGLTYPE:
                if {"path", "linkpath"} & records.keys():
                    raise UnsafeArchive(
                        "archive has a pax global header that renames every later member"
                    )
            else:
                self._pending.pax.update(records)

    def _pax_records(self, raw: bytes) -> dict[str, str]:
        records: dict[str, str] = {}
        pos = 0
        while pos < len(raw) and raw[pos] != 0:
            space = raw.find(b" ", pos)
            try:
                length = int(raw[pos:space])
            except ValueError:
                length = 0
            record = raw[space + 1:pos + length]
            if space < 0 or length <= 0 or not record.endswith(b"\n") or b"=" not in record:
                raise CorruptBackup(f"archive has a malformed pax record at offset {self._offset}")
            key, _, value = record[:-1].partition(b"=")
            records[key.decode(_ENCODING, _ERRORS)] = value.decode(_ENCODING, _ERRORS)
            pos += length
        return records

    # ----- one member

    def _member(self, info: tarfile.TarInfo, block: bytes) -> None:
        pending, self._pending = self._pending, _Pending()
        raw_name = _nts(block[0:100])
        prefix = _nts(block[345:500])
        if block[257:263] == _POSIX_MAGIC and prefix:
            raw_name = f"{prefix}/{raw_name}"
        name = pending.pax.get("GNU.sparse.name") or pending.pax.get("path") \
            or pending.long_name or raw_name
        if pending.long_name and "path" in pending.pax and pending.long_name != \
                pending.pax["path"]:
            raise UnsafeArchive(
                f"member {name!r} has two different names (GNU long name "
                f"{pending.long_name!r})"
            )
        linkname = pending.pax.get("linkpath") or pending.long_link \
            or _nts(block[157:257])
        if info.type == tarfile.DIRTYPE:
            name = name.rstrip("/") or name
        self._current = name
        stored = int(pending.pax["size"]) if "size" in pending.pax else info.size
        kind = info.type

        self._check(name, kind, linkname)

        self.summary.members += 1
        if kind in _FILE_TYPES:
            if kind == tarfile.GNUTYPE_SPARSE:
                logical = _nti(block[483:495])
            else:
                logical = int(pending.pax.get("GNU.sparse.realsize")
                              or pending.pax.get("GNU.sparse.size") or stored)
            self._count(name, logical)
            data = stored
        elif stored:
            # Tar implementations disagree on whether such data is skipped; a header hidden
            # in it would be seen by one parser and not the other. No honest archive has it.
            raise UnsafeArchive(
                f"member {name!r} is a {_TYPE_NAMES[kind]} but claims {stored} bytes of data"
            )
        else:
            data = 0
        padded = data + (-data) % BLOCK
        if kind == tarfile.GNUTYPE_SPARSE and block[482]:
            self._sparse_ext = True
            self._pending_data = padded
        else:
            self._skip = padded

    def _count(self, name: str, size: int) -> None:
        self.summary.bytes += size
        declared = self.rules.declared_bytes
        if declared is not None and self.summary.bytes > declared:
            raise UnsafeArchive(
                f"member {name!r} takes the archive past the {declared} bytes of file data "
                f"its index declares ({self.summary.bytes} so far)"
            )

    def _where(self, parts: list[str]) -> tuple[str, tuple[str, ...] | None]:
        """Classify a path: ("root", concrete root) | ("parent" or "wild-parent", None) |
        ("data", None) | ("outside", None)."""
        for pattern in self._roots:
            if len(parts) >= len(pattern) and all(
                p == "*" or p == c for p, c in zip(pattern, parts, strict=False)
            ):
                return "root", tuple(parts[: len(pattern)])
        for pattern in self._roots:
            if len(parts) < len(pattern) and all(
                p == "*" or p == c for p, c in zip(pattern, parts, strict=False)
            ):
                # "backup/snapshots/NAME.bin" matches "backup/snapshots/*" only through the
                # wildcard: it may be a plain file in the data area, not a rootfs's parent
                return ("wild-parent" if pattern[len(parts) - 1] == "*" else "parent"), None
        if self._in_data(parts):
            return "data", None
        return "outside", None

    def _in_data(self, parts: list[str]) -> bool:
        data = self._data
        return data is not None and len(parts) > len(data) and tuple(parts[: len(data)]) == data

    def _check(self, name: str, kind: bytes, linkname: str) -> None:
        what = _TYPE_NAMES.get(kind)
        if what is None:
            raise UnsafeArchive(
                f"member {name!r} has an unknown type {kind.decode('latin-1')!r}; only files, "
                "directories, links, device nodes and fifos are accepted"
            )
        absolute, parts = _split(name)
        if absolute:
            raise UnsafeArchive(f"member {name!r} has an absolute path")
        if ".." in parts:
            raise UnsafeArchive(f"member {name!r} climbs out of the rootfs (..)")
        path = tuple(parts)
        for depth in range(1, len(path)):
            if path[:depth] in self._symlinks:
                raise UnsafeArchive(
                    f"member {name!r} goes through the symlink {'/'.join(path[:depth])!r} "
                    "(an earlier member)"
                )
        if path in self._symlinks:
            raise UnsafeArchive(f"member {name!r} replaces the symlink an earlier member made")

        area, root = self._where(parts)
        if area == "wild-parent":
            area = "parent" if kind == tarfile.DIRTYPE or not self._in_data(parts) else "data"
        if area == "outside":
            allowed = [r or "." for r in (self.rules.root, *self.rules.more_roots)]
            if self.rules.data_prefix is not None:
                allowed.append(self.rules.data_prefix)
            raise UnsafeArchive(
                f"member {name!r} is outside the allowed parts of the archive "
                f"({', '.join(allowed)})"
            )
        if area == "parent" or (root is not None and len(path) == len(root)):
            if kind != tarfile.DIRTYPE:
                raise UnsafeArchive(f"member {name!r} is a {what}; it must be a directory")
            return
        if area == "data":
            if kind not in _FILE_TYPES and kind != tarfile.DIRTYPE:
                raise UnsafeArchive(
                    f"member {name!r} is a {what} outside a rootfs; only plain files and "
                    "directories may be there"
                )
            if kind != tarfile.DIRTYPE:
                self._members.add(path)
            return
        assert root is not None
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            if not self.rules.allow_devices:
                raise device_refused(name, what)
            if self.summary.first_device is None:
                self.summary.first_device = name
        if kind == tarfile.LNKTYPE:
            self._check_hard_link(name, linkname, root)
        elif kind == tarfile.SYMTYPE:
            self._check_symlink(name, linkname, path, root)
            self._symlinks.add(path)
        if kind != tarfile.DIRTYPE:
            self._members.add(path)

    def _check_hard_link(self, name: str, target: str, root: tuple[str, ...]) -> None:
        absolute, parts = _split(target)
        if absolute:
            raise UnsafeArchive(f"hard link {name!r} points to the absolute path {target!r}")
        if ".." in parts:
            raise UnsafeArchive(
                f"hard link {name!r} points to {target!r}, which climbs out of the rootfs (..)"
            )
        if tuple(parts[: len(root)]) != root or len(parts) == len(root):
            raise UnsafeArchive(
                f"hard link {name!r} points to {target!r}, outside its rootfs "
                f"{'/'.join(root) or '.'!r}"
            )
        if tuple(parts) not in self._members:
            raise UnsafeArchive(
                f"hard link {name!r} points to {target!r}, which is not an earlier member"
            )

    def _check_symlink(
        self, name: str, target: str, path: tuple[str, ...], root: tuple[str, ...]
    ) -> None:
        if target.startswith("/"):
            return  # resolved inside the container, where / is the rootfs
        depth = len(path) - len(root) - 1  # the link's directory, relative to the root
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise UnsafeArchive(
                        f"symlink {name!r} points to {target!r}, which climbs out of the "
                        "rootfs"
                    )
            elif part not in ("", "."):
                depth += 1
