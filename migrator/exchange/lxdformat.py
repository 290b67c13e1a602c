"""``migrate export`` / ``migrate import``: single-file archives in LXD's and Incus's layout.

The layout, as ``lxc export`` / ``incus export`` write it (read from LXD's and Incus's sources:
``backup/backup_info.go``, ``backup/config``, ``storage/drivers/generic_vfs.go``,
``driver_btrfs_volumes.go``, ``instancewriter``):

```
backup/index.yaml                 first member. name, backend, pool, snapshots: [names],
                                  optimized, optimized_header, type: container, and config:
                                  {container: <api.Instance>, snapshots: [<api.InstanceSnapshot>],
                                  pool: <api.StoragePool>, volume: <api.StorageVolume>}
backup/snapshots/NAME/            generic: each snapshot's volume (rootfs/, metadata.yaml,
                                  templates/, backup.yaml), oldest first
backup/container/                 generic: the container's volume, last
backup/optimized_header.yaml      optimized btrfs: {subvolumes: [{path, snapshot, readonly,
                                  uuid}]}
backup/snapshots/NAME.bin         optimized: ``btrfs send`` of each snapshot, each incremental
                                  from the one before
backup/container.bin              optimized: the container, incremental from the last snapshot
```

The tarball is gzip (LXD's default), zstd, xz or plain: import detects which by its magic.
Rootfs ownership in the archive is the container's view: LXD's tar writer *unshifts* the
uids of an unprivileged container (0..65535, ``ShiftFromNs``), and its importer shifts them
again for the container's new map. We do the same: export unshifts with GNU tar's
``--owner-map``/``--group-map`` (so the volume is read once, never copied), import shifts each
member's uid/gid as it passes (an id outside 0..65535 is refused: it would land in another
container's range). POSIX ACL entries and file capabilities inside an unprivileged rootfs are
not unshifted on export (GNU tar stores them as text), and a file whose owner lies outside
the container's range (made from the host) keeps its host id, where LXD leaves it out: both
are known gaps. Optimized (btrfs)
streams carry the ids as they are on disk, so the index records that map in LXD's key,
``volatile.last_state.idmap``, and import shifts the received trees by the difference to
this host's map (``[]``, LXD's value for an unshifted disk, means a shift by the whole base).
Nothing checks a send stream's content on its way in, so the streams are received confined
(``btrfs.receive_confined``) and the received trees are walked before the shift
(``migrator.runtime.treecheck``): that map must be one sane range, every rootfs owner inside it, and
an unprivileged container's device nodes and foreign setuid/setgid files are refused.

The one design decision: both directions stream. Export writes the tar straight into the
compressor and the output (a file or stdout), section by section (GNU tar for each volume,
with ``-b1`` so its end blocks can be cut off, and btrfs send streams whose size is found by
a first counting pass, since a tar header needs it up front): no temporary copy of the
container. Import reads the archive once, through ``migrator.targuard.TarGuard`` (every header
checked before anything acts on it, and written anew: tarfile here reads only the guard's
headers), and hands each rootfs section to GNU tar as its own
stream with names rebased to ``rootfs/`` (and .bin members to ``btrfs receive``). The
container is built in a scratch volume that only becomes the container once everything has
arrived: any failure, including an unsafe member, removes it and changes nothing else.

Only what we can run is converted: ``security.privileged``, ``security.protection.delete``,
``limits.memory``, ``limits.cpu``, ``user.*`` and ``image.*``; other keys (``volatile.*``,
``raw.lxc``, ``limits.processes``...) and devices other than the root disk and NICs are
dropped and reported. Only an index with the embedded ``config`` (LXD 4.0 and later, every
Incus) is read; older archives carry their config only in ``backup.yaml``, too late in the
stream to decide the uid shift and device rule.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import lzma
import os
import platform
import queue
import secrets
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

import yaml
import zstandard

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.base import Snapshot
from migrator.backends.generic import tar_extract, tree_size
from migrator.core import proc, safeyaml
from migrator.core.errors import (
    AlreadyExists,
    CorruptBackup,
    InvalidInput,
    MigratorError,
    UnsafeArchive,
)
from migrator.core.names import ContainerName, PoolName, SnapshotName
from migrator.pipelines.copy import consistent_snapshot, remove_leftover
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.state import ContainerRecord, SnapshotRecord
from migrator.runtime.treecheck import TreePolicy, container_policy, inspect_volume
from migrator.streams import (
    CHUNK,
    Progress,
    ProgressMeter,
    SendStream,
    Stream,
    no_progress,
)
from migrator.targuard import GnuTarInfo, TarGuard, TarRules, device_refused

INDEX = "backup/index.yaml"
OPTIMIZED_HEADER = "backup/optimized_header.yaml"
COMPRESSIONS = ("zstd", "gzip", "none")
MAX_YAML = 16 << 20  # index.yaml and optimized_header.yaml are read into memory
_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz"}
_RULES = TarRules(root="backup/container/rootfs", more_roots=("backup/snapshots/*/rootfs",),
                  data_prefix="backup")
_KEEP_PREFIXES = ("user.", "image.")
_STOPPED = 102  # LXD's status code for a stopped instance


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


@dataclass
class ImportResult:
    """What ``import_container`` made of an archive."""

    container: str
    source_name: str
    pool: str
    compression: str
    optimized: bool
    privileged: bool
    snapshots: list[str] = field(default_factory=list)
    config: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    bytes: int = 0  # file data bytes in the archive
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# export


class _TarOut:
    """The archive being written: headers we make, GNU tar output, raw member data."""

    def __init__(self, out: BinaryIO, compression: str) -> None:
        self._closers: list[Callable[[], object]] = []
        self.sink: Any
        if compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=3, threads=-1)
            writer = cctx.stream_writer(out, closefd=False)  # type: ignore[arg-type]
            self.sink = writer
            self._closers.append(writer.close)
        elif compression == "gzip":
            gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
            self.sink = gz
            self._closers.append(gz.close)
        elif compression == "none":
            self.sink = out
        else:
            raise InvalidInput(f"unknown compression {compression!r}",
                               "use zstd, gzip or none")
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


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a dict used twice (``config`` and ``expanded_config``) out twice, as LXD
    does: an import bounds what YAML aliases expand to (``migrator.core.safeyaml``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lxd_config(config: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in config.items() if not k.startswith("volatile.")}


def lxd_idmap(base: int) -> str:
    """``volatile.last_state.idmap`` as LXD writes it: how the files on disk are shifted."""
    entries = [{"Isuid": uid, "Isgid": not uid, "Hostid": base, "Nsid": 0,
                "Maprange": idmap.MAP_SIZE} for uid in (True, False)]
    return json.dumps(entries, separators=(",", ":")) if base else "[]"


def disk_shift(config: dict[str, str]) -> int:
    """The uid an archive's native streams store for the container's root: LXD's
    ``volatile.last_state.idmap`` (absent or ``[]``: not shifted on disk).

    The archive decides this itself, and every file of its streams is shifted by it, so
    only one plain range is accepted: one uid and one gid entry (or one entry for both),
    from container id 0, at the same host id, covering the 65536 ids a container maps.
    Anything else is ``UnsafeArchive``; the tree is then held to the range it claims
    (``migrator.runtime.treecheck``, ``all_owners``)."""
    raw = config.get("volatile.last_state.idmap") or "[]"

    def refuse(why: str) -> UnsafeArchive:
        return UnsafeArchive(f"the archive's volatile.last_state.idmap {raw[:200]!r} {why}",
                             "only a single id range starting at container id 0 is "
                             "accepted; nothing was imported")
    try:
        entries = json.loads(raw)
    except ValueError:
        raise refuse("is not JSON") from None
    if entries == []:
        return 0
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise refuse("is not a list of id ranges")
    uids = [e for e in entries if e.get("Isuid") is True]
    gids = [e for e in entries if e.get("Isgid") is True]
    if len(uids) != 1 or len(gids) != 1 or len(entries) > 2:
        raise refuse("is not one range for uids and one for gids")
    for e in (uids[0], gids[0]):
        host, ns, size = e.get("Hostid"), e.get("Nsid"), e.get("Maprange")
        if not (type(host) is int and type(ns) is int and type(size) is int):
            raise refuse("has a range that is not three integers")
        if ns != 0 or size < idmap.MAP_SIZE or not 0 <= host <= 2**32 - 1 - idmap.MAP_SIZE:
            raise refuse(f"maps {size} ids from container id {ns} to host id {host}, not "
                         f"{idmap.MAP_SIZE} or more from 0 to a valid host id")
    if uids[0]["Hostid"] != gids[0]["Hostid"]:
        raise refuse("maps uids and gids to different host ids")
    return int(uids[0]["Hostid"])


def _instance_doc(rec: ContainerRecord, pool: str, snaps: list[SnapshotRecord],
                  disk_base: int = 0) -> dict[str, Any]:
    conf = _lxd_config(rec.config)
    if disk_base:  # optimized, unprivileged: the streams carry this host's shifted ids
        conf["volatile.last_state.idmap"] = lxd_idmap(disk_base)
    devices = {"root": {"path": "/", "pool": pool, "type": "disk"}}
    common = {"architecture": platform.machine(), "config": conf, "devices": devices,
              "ephemeral": False, "profiles": ["default"], "stateful": False,
              "expanded_config": conf, "expanded_devices": devices}
    return {
        "container": {**common, "name": rec.name, "description": "", "type": "container",
                      "created_at": _iso(rec.created), "last_used_at": _iso(0),
                      "status": "Stopped", "status_code": _STOPPED, "location": "none",
                      "project": "default"},
        "snapshots": [{**common, "config": _lxd_config(s.config) or conf, "name": s.name,
                       "created_at": _iso(s.created), "expires_at": _iso(s.expires or 0),
                       "last_used_at": _iso(0), "size": -1} for s in snaps],
        "pool": {"name": pool, "description": "", "driver": "", "status": "Created",
                 "config": {}, "locations": ["none"]},
        "volume": {"name": rec.name, "description": "", "type": "container",
                   "content_type": "filesystem", "config": {}, "location": "none",
                   "project": "default", "used_by": []},
    }


def _metadata_yaml(rec: ContainerRecord) -> bytes:
    props = {k.removeprefix("image."): v for k, v in rec.config.items()
             if k.startswith("image.")}
    doc = {"architecture": platform.machine(), "creation_date": int(rec.created or 0),
           "properties": props, "templates": {}}
    return yaml.safe_dump(doc, sort_keys=True).encode()


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
    meta = (["--xattrs", "--xattrs-include=*", "--acls"] if xattrs
            else ["--no-xattrs", "--no-acls"])
    skip_dev = ["--anchored", "--exclude=rootfs/dev/*"] if owner_opts else []
    argv = ["tar", "--create", "--file=-", "-b1", "--numeric-owner", *owner_opts, *meta,
            *skip_dev, "--sparse", "--format=posix", f"--transform=s,^,{prefix}/,S",
            "-C", str(path), "rootfs"]
    return SendStream(argv, "tar", prefix)


def export_container(
    cts: Containers, name: str, out: BinaryIO, optimized: bool = False,
    instance_only: bool = False, compression: str = "zstd", progress: Progress = no_progress,
) -> ExportResult:
    """Write container ``name`` (and its snapshots) to ``out`` as an LXD/Incus tarball."""
    t0 = time.monotonic()
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r}", "use zstd, gzip or none")
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
    config_doc = _instance_doc(rec, rec.pool, snaps, shift if optimized else 0)
    config_doc["pool"]["driver"] = driver
    index = {
        "name": rec.name, "backend": driver, "pool": rec.pool, "optimized": optimized,
        "optimized_header": optimized, "type": "container",
        "snapshots": [s.name for s in snaps], "config": config_doc,
    }
    tar = _TarOut(out, compression)
    with consistent_snapshot(cts, rec, backend, vol, result.notes) as tmp_name:
        current = next(s for s in backend.list_snapshots(vol) if s.name == tmp_name)
        tar.add_dir("backup")
        tar.add_bytes(INDEX, yaml.dump(index, Dumper=_NoAliasDumper, sort_keys=False).encode())
        if optimized:
            _export_btrfs(tar, backend, [on_disk[s.name] for s in snaps], current, progress)
        else:
            _export_generic(tar, backend, rec, [on_disk[s.name] for s in snaps], current,
                            shift, progress)
        tar.close()
    result.bytes = tar.bytes
    result.seconds = time.monotonic() - t0
    if not privileged and not optimized:
        result.notes.append("rootfs ids unshifted to the container's view (0..65535), as "
                            "LXD stores them; /dev contents left out (LXC mounts a tmpfs "
                            "there)")
    return result


def _export_generic(tar: _TarOut, backend: StorageBackend, rec: ContainerRecord,
                    snaps: list[Snapshot], current: Snapshot, shift: int,
                    progress: Progress) -> None:
    backup_yaml = yaml.safe_dump({"container": {"name": rec.name}}, sort_keys=False).encode()
    xattrs = bool(backend.supports_xattrs)
    if snaps:
        tar.add_dir("backup/snapshots")
    with _owner_maps(shift) as owner_opts:
        for snap, prefix in [*((s, f"backup/snapshots/{s.name}") for s in snaps),
                             (current, "backup/container")]:
            with backend.mount_snapshot(snap) as path:
                tar.add_dir(prefix, 0o711)
                tar.add_bytes(f"{prefix}/metadata.yaml", _metadata_yaml(rec))
                tar.add_bytes(f"{prefix}/backup.yaml", backup_yaml)
                tar.add_dir(f"{prefix}/templates")
                meter = ProgressMeter(progress, f"export {prefix.removeprefix('backup/')}",
                                      tree_size(path / "rootfs"))
                tar.add_tar_stream(_gnu_tar_section(path, prefix, owner_opts, xattrs), meter)
                meter.finish()


def _btrfs_send(snap: Snapshot, parent: Snapshot | None) -> SendStream:
    assert snap.path is not None
    argv = ["btrfs", "send", "-q"]
    if parent is not None:
        assert parent.path is not None
        argv += ["-p", str(parent.path)]
    return SendStream([*argv, str(snap.path)], "btrfs", snap.name,
                      parent.name if parent else None)


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


def _export_btrfs(tar: _TarOut, backend: StorageBackend, snaps: list[Snapshot],
                  current: Snapshot, progress: Progress) -> None:
    """btrfs send streams, each incremental from the one before (as LXD writes them). A tar
    header needs the member's size before its data, so each stream is sent twice: once
    counted, once written. That costs a second read, never a temporary copy."""
    header = {"subvolumes": [
        {"path": "/", "snapshot": s.name, "readonly": True,
         "uuid": backend.snapshot_identity(s) or ""} for s in snaps]
        + [{"path": "/", "snapshot": "", "readonly": False, "uuid": ""}]}
    tar.add_bytes(OPTIMIZED_HEADER, yaml.safe_dump(header, sort_keys=False).encode())
    if snaps:
        tar.add_dir("backup/snapshots")
    parent: Snapshot | None = None
    for snap, member in [*((s, f"backup/snapshots/{s.name}.bin") for s in snaps),
                         (current, "backup/container.bin")]:
        size = _stream_length(_btrfs_send(snap, parent))
        meter = ProgressMeter(progress, f"export {member.removeprefix('backup/')}", size)
        tar.add_stream_file(member, size, _btrfs_send(snap, parent), meter)
        meter.finish()
        parent = snap


# ----------------------------------------------------------------------------------------
# import


class _Counting(io.RawIOBase):
    """Counts the (compressed) bytes read from the input, for progress."""

    def __init__(self, src: IO[bytes], meter: ProgressMeter) -> None:
        super().__init__()
        self._src = src
        self._meter = meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._src.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._meter.advance(n)
        return n


class _Decompressed(io.RawIOBase):
    """A decompressor's output, with its errors (cut or damaged input) as CorruptBackup."""

    def __init__(self, src: Any, kind: str) -> None:
        super().__init__()
        self._src = src
        self._kind = kind

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._src.read(len(buffer))
        except (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError) as e:
            raise CorruptBackup(f"the {self._kind} stream is damaged or cut short ({e})",
                                "nothing was imported; fetch the archive again") from None
        n = len(data)
        buffer[:n] = data
        return n


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after the other, like ``zstd -dc``; a frame cut short is an error
    (zstandard's stream_reader just ends early there, which would pass for a short tar)."""

    def __init__(self, src: IO[bytes]) -> None:
        super().__init__()
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: Any = None  # the frame being decoded
        self._out = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            # small reads bound the output a highly compressed piece can expand to
            data = self._src.read(256 << 10)
            if not data:
                if self._obj is not None and not self._obj.eof:
                    raise zstandard.ZstdError("the last frame is incomplete")
                return 0
            out = bytearray()
            while data:
                if self._obj is None or self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                out += self._obj.decompress(data)
                data = self._obj.unused_data if self._obj.eof else b""
            self._out, self._pos = memoryview(out), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


def open_archive(src: BinaryIO, meter: ProgressMeter) -> tuple[BinaryIO, str]:
    """The decompressed archive and its compression, detected by magic bytes."""
    raw = io.BufferedReader(_Counting(src, meter), CHUNK)
    head = raw.peek(6)[:6]
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), "none")
    if kind == "zstd":
        inner: Any = _ZstdFrames(raw)
    elif kind == "gzip":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")
    elif kind == "xz":
        inner = lzma.LZMAFile(raw)  # noqa: SIM115 - lives as long as the import
    else:
        return raw, kind
    return io.BufferedReader(_Decompressed(inner, kind), CHUNK), kind  # type: ignore[return-value]


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_YAML:
        raise UnsafeArchive(f"member {member.name!r} is {member.size} bytes; at most "
                            f"{MAX_YAML} are read")
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def _yaml(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = safeyaml.load(data)  # aliases bounded: a 1 kB alias bomb would expand to GBs
    except yaml.YAMLError as e:
        raise CorruptBackup(f"{what} is not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptBackup(f"{what} is not a YAML mapping")
    return doc


@dataclass
class _Index:
    name: str
    optimized: bool
    backend: str
    snapshots: list[str]
    container: dict[str, Any]
    snapshot_docs: dict[str, dict[str, Any]]

    @property
    def config(self) -> dict[str, str]:
        """The effective config (LXD's ``expanded_config``: profiles applied)."""
        conf = self.container.get("expanded_config") or self.container.get("config") or {}
        return {str(k): str(v) for k, v in conf.items()} if isinstance(conf, dict) else {}

    @property
    def privileged(self) -> bool:
        return self.config.get("security.privileged", "false").lower() in ("true", "1", "yes")


def parse_index(data: bytes) -> _Index:
    """Validate ``backup/index.yaml`` (only what we rely on)."""
    doc = _yaml(data, INDEX)
    kind = doc.get("type") or "container"
    if kind != "container":
        raise InvalidInput(f"the archive holds a {kind}, not a container",
                           "only system containers can be imported")
    name = doc.get("name")
    if not isinstance(name, str):
        raise CorruptBackup(f"{INDEX} has no name")
    snaps = doc.get("snapshots") or []
    if not isinstance(snaps, list) or not all(isinstance(s, str) for s in snaps):
        raise CorruptBackup(f"{INDEX}: snapshots must be a list of names")
    for s in snaps:
        SnapshotName(s)
    if len(set(snaps)) != len(snaps):
        raise CorruptBackup(f"{INDEX} lists a snapshot twice")
    conf = doc.get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("container"), dict):
        raise BackupFormatError(
            f"{INDEX} has no embedded config (an archive from LXD before 4.0?)",
            "export it again from a newer LXD or Incus")
    snap_docs = {}
    for s in conf.get("snapshots") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            snap_docs[s["name"].rpartition("/")[2]] = s
    return _Index(name, bool(doc.get("optimized")), str(doc.get("backend") or ""), snaps,
                  conf["container"], snap_docs)


class BackupFormatError(InvalidInput):
    """An archive in a layout this importer does not read (not a damaged one)."""


def convert_config(lxd: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """LXD config -> ours: (config, dropped keys with the reason).

    Each kept key passes the configuration gate's check of its own (``user.*`` without
    control characters, ``image.*`` only the keys the runtime records, in their formats);
    a value that fails is dropped and reported, never stored. ``record_received`` runs the
    whole gate again on the result."""
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in sorted(lxd.items()):
        shown = repr(value) if cfg.control_char(value) else value
        if key.startswith("volatile."):
            continue  # LXD's own bookkeeping (MACs, idmaps, last state)
        if key.startswith("image.") and key not in cfg.IMAGE_KEYS:
            dropped.append(f"{key}={shown} (not kept here)")
            continue
        if key.startswith(_KEEP_PREFIXES) or key in cfg.KEYS:
            try:
                out[key] = cfg.admit_config({key: value}, "the archive's config",
                                            allow_privileged=True)[key]
            except InvalidInput as e:
                dropped.append(f"{key}={shown} ({e.message.rpartition(': ')[2]})")
            continue
        dropped.append(f"{key}={shown} (not supported here)")
    return out, dropped


def _detect_init(rootfs: Path) -> str:
    init = rootfs / "sbin" / "init"
    with contextlib.suppress(OSError):
        if init.is_symlink() and "busybox" in os.readlink(init):
            return "busybox"
    return "systemd"


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


class _SectionStream(Stream):
    """The consuming side of a section, as the ``Stream`` receivers take. ``close`` reports
    the reader's error (an unsafe member, a truncated archive) before anything else."""

    how = "tar"
    parent = None
    size_hint = None

    def __init__(self, section: _Section, reader: _ArchiveReader) -> None:
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


class _ArchiveReader:
    """Reads the whole archive in a thread and feeds each rootfs section (or .bin stream)
    into its own pipe, in archive order; the main thread consumes them one by one."""

    def __init__(self, tar: tarfile.TarFile, guard: TarGuard, index: _Index, shift: int,
                 optimized: bool):
        self.tar = tar
        self.guard = guard
        self.index = index
        self.shift = shift
        self.optimized = optimized
        self.sections: queue.Queue[_Section | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.header: dict[str, Any] | None = None
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, name="import-reader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

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
                    self.sections.put(current)
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
            self.sections.put(None)

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
                self.header = _yaml(_read_small(self.tar, m), OPTIMIZED_HEADER)
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
            for what, ident in (("uid", m.uid), ("gid", m.gid)):
                if not 0 <= ident < idmap.MAP_SIZE:
                    raise UnsafeArchive(
                        f"member {m.name!r} is owned by {what} {ident}, outside the "
                        f"{idmap.MAP_SIZE} ids an unprivileged container maps")
            info.uid, info.gid = m.uid + self.shift, m.gid + self.shift
        # keep xattrs and ACLs; tarfile writes path, size, times and sparse data itself
        info.pax_headers = {k: v for k, v in m.pax_headers.items()
                            if k.startswith("SCHILY.") or k in ("mtime", "atime")}
        info.uname = info.gname = ""
        assert section.tar is not None
        section.tar.addfile(info, f)


def import_container(
    cts: Containers, src: BinaryIO, name: str | None = None, pool: str | None = None,
    total: int | None = None, progress: Progress = no_progress, allow_privileged: bool = False,
) -> ImportResult:
    """Create a container from an LXD/Incus export read from ``src`` (a file or stdin).
    A privileged one only with ``allow_privileged`` (the operator's flag)."""
    t0 = time.monotonic()
    host, state = cts.host, cts.state
    meter = ProgressMeter(progress, "import", total)
    stream, compression = open_archive(src, meter)
    # Devices are let past the guard until the index (the first member) says whether the
    # container is privileged; tarfile reads ahead, so the decision is checked against what
    # the guard has already seen (summary.first_device) before anything is extracted.
    guard = TarGuard(stream, replace(_RULES, allow_devices=True))
    tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - read by a thread
        fileobj=guard, mode="r|", encoding="utf-8", errors="surrogateescape",
        tarinfo=GnuTarInfo)
    index_member = next((m for m in tar if not m.isdir()), None)
    if index_member is None or index_member.name.lstrip("./") != INDEX:
        raise BackupFormatError(
            f"the archive does not start with {INDEX}"
            + (f" (first file: {index_member.name!r})" if index_member else ""),
            "it must be an `lxc export` / `incus export` / `migrate export` tarball")
    index = parse_index(_read_small(tar, index_member))
    # the one privilege decision, before anything is extracted
    cfg.privilege_of(index.config, f"the archive's {INDEX}",
                     allow_privileged=allow_privileged, claimed=index.privileged)
    guard.rules = replace(_RULES, allow_devices=index.privileged)
    if not index.privileged and guard.summary.first_device is not None:
        raise device_refused(guard.summary.first_device)
    target = ContainerName(name or index.name)
    if state.has_container(target) or (host.lxcpath / target).exists():
        raise AlreadyExists(f"container {target!r} already exists",
                            "import under another name: migrate import FILE NEW-NAME")
    pool_name = PoolName(pool) if pool else PoolName(host.default_pool())
    backend = host.backend(pool_name)
    driver = state.get_pool(pool_name).driver
    if index.optimized and (index.backend != "btrfs" or driver != "btrfs"):
        raise BackupFormatError(
            f"the archive holds {index.backend or 'native'} send streams (optimized); they "
            f"import onto a btrfs pool only, and pool {pool_name} is {driver}"
            if index.backend == "btrfs" else
            f"the archive holds {index.backend} send streams, which this host cannot read",
            "pick a btrfs pool with --pool, or export again without --optimized")
    config, dropped = convert_config(index.config)
    devices = index.container.get("expanded_devices") or index.container.get("devices") or {}
    extra_devices = sorted(k for k, d in devices.items() if isinstance(d, dict)
                           and d.get("type") not in ("disk", "nic")
                           or (isinstance(d, dict) and d.get("type") == "disk"
                               and d.get("path") != "/"))
    result = ImportResult(target, index.name, pool_name, compression, index.optimized,
                          index.privileged, list(index.snapshots), config, dropped)
    if extra_devices:
        result.dropped += [f"device {d} (devices are not converted)" for d in extra_devices]
    shift = 0 if index.privileged else idmap.default_idmap().base
    # what the native streams' ids are, checked before anything is received
    stored = disk_shift(index.config) if index.optimized and not index.privileged else 0
    scratch = VolumeRef("container", f"{target[:40]}-import-{secrets.token_hex(3)}")
    final = VolumeRef("container", target)
    reader = _ArchiveReader(tar, guard, index, shift, index.optimized)
    with Stages() as st:
        st.add_undo("delete the imported volume", lambda: remove_leftover(backend, scratch))
        reader.start()
        try:
            if index.optimized:
                _receive_btrfs(backend, scratch, reader, index, progress)
            else:
                _receive_generic(backend, scratch, reader, index, progress)
        finally:
            _drain(reader)
        reader.raise_error()
        missing = [s for s in [*index.snapshots, "container"] if s not in reader.seen]
        if missing:
            raise CorruptBackup(f"the archive lacks the data of {', '.join(missing)} "
                                f"(listed in {INDEX})")
        # Send streams passed no member check: the received trees are walked before they
        # are shifted or recorded (migrator.runtime.treecheck), an unprivileged one held to the ids
        # its archive claims. Generic sections are walked too (setuid owners, cheaply).
        if index.optimized and not index.privileged:
            inspect_volume(backend, scratch, TreePolicy(False, stored, all_owners=True),
                           "the archive's btrfs streams")
            _reshift_native(backend, scratch, stored, shift, result.notes)
        else:
            inspect_volume(backend, scratch, container_policy(index.privileged),
                           "the archive")
        rootfs = backend.volume_path(scratch) / "rootfs"
        if "image.init" not in config:
            config["image.init"] = _detect_init(rootfs)
        backend.rename_volume(scratch, final)
        st.add_undo("rename the volume back", lambda: backend.rename_volume(final, scratch))
        now = time.time()
        snaps = [SnapshotRecord(target, s, _created(index.snapshot_docs.get(s), now), {},
                                None, secrets.token_hex(16)) for s in index.snapshots]
        cts.record_received(target, pool_name, None, config, snaps,
                            origin=f"the archive's {INDEX}", allow_privileged=allow_privileged)
    result.bytes = guard.summary.bytes
    result.seconds = time.monotonic() - t0
    if not index.privileged:
        result.notes.append(f"rootfs ids shifted by {shift} for this host's unprivileged map")
    return result


def _reshift_native(backend: StorageBackend, vol: VolumeRef, stored: int, shift: int,
                    notes: list[str]) -> None:
    """Send streams carry the ids as they were on the exporting host's disk (LXD records
    that map in ``volatile.last_state.idmap``); shift the received trees to this host's."""
    import btrfsutil  # type: ignore[import-not-found]

    delta = shift - stored
    if delta == 0:
        return
    idmap.shift_tree(backend.volume_path(vol) / "rootfs", delta)
    for snap in backend.list_snapshots(vol):
        assert snap.path is not None
        # the flags ioctl keeps the received UUID; these snapshots take no more streams
        btrfsutil.set_subvolume_read_only(str(snap.path), False)
        try:
            idmap.shift_tree(snap.path / "rootfs", delta)
        finally:
            btrfsutil.set_subvolume_read_only(str(snap.path), True)
    notes.append(f"native streams' ids shifted by {delta} to this host's map")


def _created(doc: dict[str, Any] | None, default: float) -> float:
    value = (doc or {}).get("created_at")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return default


def _drain(reader: _ArchiveReader) -> None:
    """Unblock and stop the reading thread (after success or failure)."""
    while reader.thread.is_alive():
        try:
            section = reader.sections.get(timeout=0.1)
        except queue.Empty:
            continue
        if section is not None:
            os.close(section.read_fd)  # its writes now fail: the thread stops
    reader.thread.join()


def _sections(reader: _ArchiveReader, index: _Index) -> Iterator[tuple[str, _SectionStream]]:
    """Each section in order, checked against the index's order: snapshots, then container."""
    expected = [*index.snapshots, "container"]
    position = 0
    while True:
        section = reader.sections.get()
        if section is None:
            reader.raise_error()
            return
        key = section.key
        if key not in expected[position:]:
            os.close(section.read_fd)
            reader.raise_error()
            where = ("is not listed in " + INDEX) if key not in expected else "is out of order"
            raise BackupFormatError(f"the archive's data for {key!r} {where}",
                                    "snapshots come first, oldest first, then the container")
        position = expected.index(key, position) + 1
        yield key, _SectionStream(section, reader)


def _receive_generic(backend: StorageBackend, vol: VolumeRef, reader: _ArchiveReader,
                     index: _Index, progress: Progress) -> None:
    """Each rootfs is unpacked into a fresh directory of the scratch volume and swapped in;
    each snapshot is then taken, so the volume ends holding the container's own state."""
    path = backend.create_volume(vol)
    acls = bool(backend.supports_xattrs)
    for key, stream in _sections(reader, index):
        incoming = path / ".incoming"
        incoming.mkdir(mode=0o700)
        meter = ProgressMeter(progress, f"import {key}")
        try:
            tar_extract(stream, incoming, meter, acls)
        except MigratorError as e:
            reader.raise_error()  # the real cause (unsafe member, truncated archive) first
            raise e
        finally:
            stream.kill()
        if (path / "rootfs").exists():
            proc.run(["rm", "-rf", "--one-file-system", str(path / "rootfs")], timeout=None)
        (incoming / "rootfs").rename(path / "rootfs")
        incoming.rmdir()
        if key != "container":
            backend.snapshot(vol, SnapshotName(key))


def _receive_btrfs(backend: StorageBackend, vol: VolumeRef, reader: _ArchiveReader,
                   index: _Index, progress: Progress) -> None:
    """Each .bin is a btrfs send stream (incremental from the one before): received into an
    empty directory, whatever the sender named its subvolume, then put in its place."""
    import btrfsutil  # type: ignore[import-not-found]

    snap_dir: Path = backend._snap_dir(vol)  # type: ignore[attr-defined]  # noqa: SLF001
    snap_dir.mkdir(parents=True, exist_ok=True)
    backend.volume_path(vol).parent.mkdir(parents=True, exist_ok=True)

    def drop(sub: Path) -> None:
        with contextlib.suppress(Exception):
            btrfsutil.set_subvolume_read_only(str(sub), False)
        btrfsutil.delete_subvolume(str(sub))

    try:
        _receive_btrfs_sections(backend, vol, reader, index, progress, snap_dir, drop)
    except BaseException:
        with contextlib.suppress(OSError):
            snap_dir.rmdir()  # when nothing was kept there (the undo removes the rest)
        raise


def _receive_btrfs_sections(backend: StorageBackend, vol: VolumeRef, reader: _ArchiveReader,
                            index: _Index, progress: Progress, snap_dir: Path,
                            drop: Callable[[Path], None]) -> None:
    import btrfsutil  # type: ignore[import-not-found]

    from migrator.backends.btrfs import receive_confined

    for key, stream in _sections(reader, index):
        recv = snap_dir / f".recv-{secrets.token_hex(3)}"
        recv.mkdir()
        meter = ProgressMeter(progress, f"import {key}")
        try:
            try:
                receive_confined(recv, stream, meter)
            except MigratorError as e:
                reader.raise_error()  # the real cause (unsafe member, truncation) first
                raise e
            finally:
                stream.kill()
            got = list(recv.iterdir())
            if len(got) != 1:
                raise CorruptBackup(f"the btrfs stream of {key} made {len(got)} subvolumes, "
                                    "not 1")
            if key == "container":
                btrfsutil.create_snapshot(str(got[0]), str(backend.volume_path(vol)))
                drop(got[0])
            else:
                # a read-only subvolume cannot be renamed; the flags ioctl keeps its received
                # UUID (which the next incremental stream names as its parent)
                btrfsutil.set_subvolume_read_only(str(got[0]), False)
                got[0].rename(snap_dir / key)
                btrfsutil.set_subvolume_read_only(str(snap_dir / key), True)
        finally:
            for left in recv.iterdir():
                drop(left)
            recv.rmdir()
