"""The backup index: what one backup holds, as a dataclass and as ``index.json``.

An index is the only description of a backup the restore side trusts, so it is validated
field by field when it is read (``BackupIndex.from_json``): an index that is malformed, names
a part outside its backup directory, or contradicts itself raises ``CorruptBackup`` before
anything uses it. Sizes and checksums are then checked against the parts by
``migrator.backup.verify``.

A backup is a sequence of *points*: the container's snapshots it carries data for, oldest
first, then the container's state at backup time (``final``, the name of the snapshot it was
read from). Each part belongs to one point (``part.point``) and, when it is a delta or an
incremental native stream, to the point it applies on (``part.base``). A point whose data
lives in an older backup of the chain is listed in ``snapshots`` with ``backup`` naming that
backup: restoring replays the chain from its first full backup up to the one asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from migrator.core.errors import CorruptBackup, InvalidInput
from migrator.core.names import ContainerName, SnapshotName

FORMAT = "migrator-backup"
VERSION = 1
KINDS = ("generic", "optimized")
#: part kinds: ``tar`` a full tar of a point, ``delta`` a tar of what changed since ``base``,
#: ``deleted`` the NUL-separated paths removed since ``base``, ``manifest`` the file list the
#: next generic incremental diffs against, ``btrfs``/``zfs`` a native send stream.
PART_KINDS = ("tar", "delta", "deleted", "manifest", "btrfs", "zfs")
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}-\d{8}T\d{6}Z-[0-9a-f]{6}$")
_PART_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMPRESSION = re.compile(r"^(none|zstd:(-?\d{1,2}))$")
#: an index is read into memory whole; a real one is a few KiB (hundreds of snapshots and
#: parts stay far below this), so a larger one is refused before it is parsed
MAX_INDEX_BYTES = 16 << 20


def valid_id(value: str) -> bool:
    """Whether ``value`` has the shape of a backup id (``NAME-YYYYmmddTHHMMSSZ-hex6``)."""
    return bool(_ID.fullmatch(value))


def parse_compression(value: str) -> int | None:
    """``zstd:3`` -> 3, ``zstd`` -> 3, ``none`` -> None; anything else is refused."""
    text = "zstd:3" if value == "zstd" else value
    m = _COMPRESSION.fullmatch(text)
    if not m:
        raise InvalidInput(f"unknown compression {value!r}", "use zstd, zstd:LEVEL (1-19) or none")
    if m.group(2) is None:
        return None
    level = int(m.group(2))
    if not 1 <= level <= 19:
        raise InvalidInput(f"zstd level {level} is out of range", "use a level from 1 to 19")
    return level


@dataclass
class PartInfo:
    """One file of a backup: where, what, and how to check it."""

    path: str  # relative to the backup directory
    kind: str
    point: str  # the snapshot (or final state) it carries
    base: str | None  # the point a delta/incremental stream applies on, None when full
    size: int  # bytes stored (compressed)
    sha256: str  # of the stored bytes
    raw_size: int  # bytes before compression


@dataclass
class SnapshotInfo:
    """A container snapshot as recorded at backup time; ``backup`` holds its data."""

    name: str
    uuid: str
    created: float
    config: dict[str, str] = field(default_factory=dict)
    backup: str = ""


@dataclass
class BackupIndex:
    id: str
    container: str
    created: float
    kind: str  # generic | optimized
    driver: str  # driver of the pool the container was on
    parent: str | None  # the backup this one is incremental from
    compression: str  # zstd:LEVEL | none
    image: str | None
    privileged: bool
    final: str  # the point that is the container's state at backup time
    config: dict[str, str] = field(default_factory=dict)
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    parts: list[PartInfo] = field(default_factory=list)
    protected: bool = False
    #: optimized: the pool snapshot kept for the next incremental, and its native identity
    base_snapshot: str | None = None
    base_identity: str | None = None
    notes: list[str] = field(default_factory=list)

    # queries -------------------------------------------------------------------------
    def points(self) -> list[str]:
        """Points this backup holds data for, in the order they must be applied."""
        seen: list[str] = []
        for p in self.parts:
            if p.kind != "manifest" and p.point not in seen:
                seen.append(p.point)
        return seen

    def parts_of(self, point: str) -> list[PartInfo]:
        return [p for p in self.parts if p.point == point and p.kind != "manifest"]

    def manifest(self) -> PartInfo | None:
        return next((p for p in self.parts if p.kind == "manifest"), None)

    def stored_size(self) -> int:
        return sum(p.size for p in self.parts)

    def raw_size(self) -> int:
        return sum(p.raw_size for p in self.parts if p.kind != "manifest")

    # JSON ----------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, expect_id: str | None = None) -> BackupIndex:
        """Parse and validate; any defect is ``CorruptBackup`` naming the field."""
        where = f"backup {expect_id}" if expect_id else "backup"
        if len(text) > MAX_INDEX_BYTES:
            raise _bad(where, f"index.json is larger than {MAX_INDEX_BYTES} bytes")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(where, f"not JSON ({e})") from e
        try:
            return _parse(doc, where, expect_id)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _bad(where, f"{type(e).__name__}: {e}") from e
        except InvalidInput as e:  # a name that is not one
            raise _bad(where, e.message) from e


def _bad(where: str, what: str) -> CorruptBackup:
    return CorruptBackup(f"{where}: index malformed: {what}")


def _str(doc: dict[str, Any], key: str) -> str:
    v = doc[key]
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string")
    return v


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    v = doc.get(key)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{key} must be a string or null")
    return v


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError(f"{key} must be a non-negative number")
    return float(v)


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return v


def _strmap(v: Any, key: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str)
                                          for k, x in v.items()):
        raise ValueError(f"{key} must map strings to strings")
    return dict(v)


def _parse(doc: Any, where: str, expect_id: str | None) -> BackupIndex:
    if not isinstance(doc, dict):
        raise ValueError("the index is not an object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise ValueError(f"version {doc.get('version')!r} is not {VERSION}")
    bid = _str(doc, "id")
    if not valid_id(bid):
        raise ValueError(f"id {bid!r} is not a backup id")
    if expect_id is not None and bid != expect_id:
        raise ValueError(f"id {bid!r} does not match its directory {expect_id!r}")
    container = str(ContainerName(_str(doc, "container")))
    kind = _str(doc, "kind")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    compression = _str(doc, "compression")
    if not _COMPRESSION.fullmatch(compression):
        raise ValueError(f"compression {compression!r} is unknown")
    parent = _opt_str(doc, "parent")
    if parent is not None and (not valid_id(parent) or parent == bid):
        raise ValueError(f"parent {parent!r} is not another backup's id")
    privileged = doc["privileged"]
    if not isinstance(privileged, bool):
        raise ValueError("privileged must be true or false")
    protected = doc.get("protected", False)
    if not isinstance(protected, bool):
        raise ValueError("protected must be true or false")
    final = str(SnapshotName(_str(doc, "final")))
    snaps = []
    for s in doc.get("snapshots", []):
        backup = _str(s, "backup")
        if not valid_id(backup):
            raise ValueError(f"snapshot {s.get('name')!r} names no backup")
        snaps.append(SnapshotInfo(str(SnapshotName(_str(s, "name"))), _str(s, "uuid"),
                                  _num(s["created"], "created"),
                                  _strmap(s.get("config", {}), "config"), backup))
    parts = []
    paths: set[str] = set()
    for p in doc.get("parts", []):
        path = _str(p, "path")
        if not _PART_PATH.fullmatch(path) or ".." in path:
            raise ValueError(f"part path {path!r} is not a plain relative name")
        if path in paths or path == "index.json":
            raise ValueError(f"part path {path!r} is listed twice or reserved")
        paths.add(path)
        pkind = _str(p, "kind")
        if pkind not in PART_KINDS:
            raise ValueError(f"part {path}: kind {pkind!r} is unknown")
        sha = _str(p, "sha256")
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"part {path}: sha256 {sha!r} is not a hex digest")
        base = _opt_str(p, "base")
        parts.append(PartInfo(path, pkind, str(SnapshotName(_str(p, "point"))),
                              str(SnapshotName(base)) if base else None,
                              _int(p["size"], "size"), sha, _int(p["raw_size"], "raw_size")))
    idx = BackupIndex(
        id=bid, container=container, created=_num(doc["created"], "created"), kind=kind,
        driver=_str(doc, "driver"), parent=parent, compression=compression,
        image=_opt_str(doc, "image"), privileged=privileged, final=final,
        config=_strmap(doc.get("config", {}), "config"), snapshots=snaps, parts=parts,
        protected=protected, base_snapshot=_opt_str(doc, "base_snapshot"),
        base_identity=_opt_str(doc, "base_identity"),
        notes=[str(n) for n in doc.get("notes", [])],
    )
    _check_consistent(idx)
    return idx


def _check_consistent(idx: BackupIndex) -> None:
    """The cross-field rules: every point has data of one kind, chains are in order."""
    if not idx.parts_of(idx.final):
        raise ValueError(f"no part carries the final state {idx.final!r}")
    native = ("btrfs", "zfs")
    order = idx.points()
    for point in order:
        kinds = {p.kind for p in idx.parts_of(point)}
        if idx.kind == "optimized":
            if len(kinds) != 1 or not kinds <= set(native) or \
                    len(idx.parts_of(point)) != 1:
                raise ValueError(f"point {point!r}: an optimized backup has one native stream")
        elif kinds not in ({"tar"}, {"delta", "deleted"}):
            raise ValueError(f"point {point!r}: needs one tar, or a delta and a deleted list")
        bases = {p.base for p in idx.parts_of(point)}
        if len(bases) != 1:
            raise ValueError(f"point {point!r}: its parts disagree on their base")
        base = bases.pop()
        full = kinds == {"tar"} or (idx.kind == "optimized" and base is None)
        if full and base is not None:
            raise ValueError(f"point {point!r}: a full tar has no base")
        if not full and base is None:
            raise ValueError(f"point {point!r}: a delta needs a base")
        pos = order.index(point)
        if base is not None and pos > 0 and base != order[pos - 1]:
            raise ValueError(f"point {point!r}: base {base!r} is not the point before it")
        if base is not None and pos == 0 and idx.parent is None:
            raise ValueError(f"point {point!r}: incremental but the backup has no parent")
    if order[-1] != idx.final:
        raise ValueError("the final state is not the last point")
    # the restore decides the tar rules (device nodes) from ``privileged`` and the container
    # from its config: the two must say the same (the full check is migrator.runtime.config's gate)
    said = idx.config.get("security.privileged", "false").strip().lower()
    if (said in ("true", "1", "yes", "on")) != idx.privileged:
        raise ValueError(f"privileged is {str(idx.privileged).lower()} but the config has "
                         f"security.privileged={said!r}")
    for s in idx.snapshots:
        if s.backup == idx.id and s.name not in order:
            raise ValueError(f"snapshot {s.name!r} has no data in this backup")
