"""``migrate import``: create a container from an LXD/Incus export (a file or stdin).

The archive is read once (``exchange.archive_reader``); each rootfs section is unpacked by
GNU tar, each optimized ``.bin`` member received by the pool's btrfs driver. Both kinds
carry the ids as they were on the exporting host's disk, and LXD records that map in
``volatile.last_state.idmap`` (``exchange.lxd_idmap``): LXD 5.0's generic tarball of an
unprivileged container holds 100000+N (its on-disk ids), ``migrate export``'s and an
unshifted disk's hold the container's view 0+N and say ``[]`` (or nothing). The recorded map
must be one sane range and every owner must lie in its 65536 ids from that base: a generic
member's ids are checked and shifted to this host's map as they pass
(``archive_reader``); the received optimized trees are walked, then shifted by the
difference. Nothing checks a send stream's content on its way in, so the streams are
received confined and the received trees are walked before the shift
(``migrator.runtime.treecheck``): that map must be one sane range, every rootfs owner inside
it, and an unprivileged container's device nodes and foreign setuid/setgid files are refused.
Devices other than the root disk and NICs are dropped and reported.

The one design decision: the container is built in a scratch volume that only becomes the
container once everything has arrived: any failure, including an unsafe member, removes it
and changes nothing else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.btrfs import BtrfsBackend
from migrator.backends.generic import tar_extract
from migrator.core import proc
from migrator.core.errors import AlreadyExists, CorruptBackup
from migrator.core.names import ContainerName, PoolName, SnapshotName
from migrator.exchange.archive_reader import ArchiveReader
from migrator.exchange.compression import open_archive
from migrator.exchange.layout import (
    INDEX,
    TAR_RULES,
    ArchiveIndex,
    BackupFormatError,
    parse_index,
    read_small,
)
from migrator.exchange.lxd_config import convert_config
from migrator.exchange.lxd_idmap import disk_shift
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.leftovers import remove_leftover
from migrator.runtime.state import SnapshotRecord
from migrator.runtime.treecheck import (
    TreePolicy,
    TreeReport,
    container_policy,
    inspect_tree,
    inspect_volume,
)
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.targuard import GnuTarInfo, TarGuard, device_refused


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
    guard = TarGuard(stream, replace(TAR_RULES, allow_devices=True))
    tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - read by a thread
        fileobj=guard, mode="r|", encoding="utf-8", errors="surrogateescape",
        tarinfo=GnuTarInfo)
    index_member = next((m for m in tar if not m.isdir()), None)
    if index_member is None or index_member.name.lstrip("./") != INDEX:
        raise BackupFormatError(
            f"the archive does not start with {INDEX}"
            + (f" (first file: {index_member.name!r})" if index_member else ""),
            "it must be an `lxc export` / `incus export` / `migrate export` tarball")
    index = parse_index(read_small(tar, index_member))
    # the one privilege decision, before anything is extracted
    cfg.privilege_of(index.config, f"the archive's {INDEX}",
                     allow_privileged=allow_privileged, claimed=index.privileged)
    guard.rules = replace(TAR_RULES, allow_devices=index.privileged)
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
    # what the archive's ids are on the exporting disk, checked before anything is received
    stored = 0 if index.privileged else disk_shift(index.config)
    bases = {"container": stored} | {
        snap: 0 if index.privileged else _snapshot_base(index, snap, stored)
        for snap in index.snapshots}
    scratch = VolumeRef("container", f"{target[:40]}-import-{secrets.token_hex(3)}")
    final = VolumeRef("container", target)
    reader = ArchiveReader(tar, guard, index, shift, index.optimized, bases)
    with Stages() as st:
        st.add_undo("delete the imported volume", lambda: remove_leftover(backend, scratch))
        reader.start()
        try:
            if index.optimized:
                assert isinstance(backend, BtrfsBackend)  # the driver was checked above
                _receive_native(backend, scratch, reader, progress)
            else:
                _receive_generic(backend, scratch, reader, progress)
        finally:
            reader.drain()
        reader.raise_error()
        missing = [s for s in [*index.snapshots, "container"] if s not in reader.seen]
        if missing:
            raise CorruptBackup(f"the archive lacks the data of {', '.join(missing)} "
                                f"(listed in {INDEX})")
        # Send streams passed no member check: the received trees are walked before they
        # are shifted or recorded (migrator.runtime.treecheck), an unprivileged one held to
        # the ids its archive claims. Generic sections are walked too (setuid owners,
        # cheaply).
        if index.optimized and not index.privileged:
            assert isinstance(backend, BtrfsBackend)
            _inspect_native(backend, scratch, bases)
            _settle_native(backend, scratch, {k: shift - b for k, b in bases.items()},
                           result.notes)
        else:
            inspect_volume(backend, scratch, container_policy(index.privileged),
                           "the archive")
            if index.optimized:
                assert isinstance(backend, BtrfsBackend)
                _settle_native(backend, scratch, {}, result.notes)
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
    if not index.privileged and not index.optimized:
        result.notes.append(
            f"rootfs ids shifted by {shift - stored} (from the archive's base {stored})"
            + (", snapshots' each from its own" if set(bases.values()) != {stored} else "")
            + " for this host's unprivileged map")
    return result


def _snapshot_base(index: ArchiveIndex, snap: str, default: int) -> int:
    """The base a snapshot's rootfs is stored from: its own ``volatile.last_state.idmap``.

    LXD shifts only the container's rootfs at a start: a snapshot taken before the first
    start stays at the container's view (0+N) and says ``[]``, while the container says
    100000. A snapshot document without the key takes the container's."""
    doc = index.snapshot_docs.get(snap) or {}
    conf = doc.get("expanded_config") or doc.get("config")
    if not isinstance(conf, dict) or "volatile.last_state.idmap" not in conf:
        return default
    return disk_shift({"volatile.last_state.idmap": str(conf["volatile.last_state.idmap"])})


def _inspect_native(backend: BtrfsBackend, vol: VolumeRef, bases: dict[str, int]) -> None:
    """The received trees walked before they are shifted or recorded (send streams passed
    no member check), each held to the ids its own recorded map claims."""
    report = TreeReport()
    what = "the archive's btrfs streams"
    inspect_tree(backend.volume_path(vol),
                 TreePolicy(False, bases["container"], all_owners=True), what, report)
    for snap in backend.list_snapshots(vol):
        with backend.mount_snapshot(snap) as path:
            policy = TreePolicy(False, bases.get(snap.name, bases["container"]),
                                all_owners=True)
            inspect_tree(path, policy, f"{what} (snapshot {snap.name})", report)


def _settle_native(backend: BtrfsBackend, vol: VolumeRef, deltas: dict[str, int],
                   notes: list[str]) -> None:
    """Received subvolumes made like this host's volumes.

    Send streams carry the ids as they were on the exporting host's disk (LXD records that
    map in ``volatile.last_state.idmap``, per snapshot): each tree is shifted by its delta
    (``deltas``, by section: "container" or the snapshot's name) to this host's map. And
    they carry their top directory's mode: LXD keeps it 0100 (root only), which stops LXC,
    once it is the container's root in its user namespace, from opening the rootfs
    ("Permission denied"): the tops become 0711, as ``create_volume`` makes them."""
    os.chmod(backend.volume_path(vol), 0o711)
    delta = deltas.get("container", 0)
    if delta:
        idmap.shift_tree(backend.volume_path(vol) / "rootfs", delta)
    for snap in backend.list_snapshots(vol):
        # these snapshots take no more streams: made writable for this only
        with backend.writable_snapshot(snap) as path:
            os.chmod(path, 0o711)
            if deltas.get(snap.name, delta):
                idmap.shift_tree(path / "rootfs", deltas.get(snap.name, delta))
    if any(deltas.values()):
        notes.append("native streams' ids shifted by "
                     + ", ".join(f"{d} ({k})" for k, d in deltas.items())
                     + " to this host's map")


def _created(doc: dict[str, Any] | None, default: float) -> float:
    value = (doc or {}).get("created_at")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return default


def _receive_generic(backend: StorageBackend, vol: VolumeRef, reader: ArchiveReader,
                     progress: Progress) -> None:
    """Each rootfs is unpacked into a fresh directory of the scratch volume and swapped in;
    each snapshot is then taken, so the volume ends holding the container's own state."""
    path = backend.create_volume(vol)
    acls = bool(backend.supports_xattrs)
    for key, stream in reader.sections():
        incoming = path / ".incoming"
        incoming.mkdir(mode=0o700)
        meter = ProgressMeter(progress, f"import {key}")
        with stream.receiving():
            tar_extract(stream, incoming, meter, acls)
        if (path / "rootfs").exists():
            proc.run(["rm", "-rf", "--one-file-system", str(path / "rootfs")], timeout=None)
        (incoming / "rootfs").rename(path / "rootfs")
        incoming.rmdir()
        if key != "container":
            backend.snapshot(vol, SnapshotName(key))


def _receive_native(backend: BtrfsBackend, vol: VolumeRef, reader: ArchiveReader,
                    progress: Progress) -> None:
    """Each .bin is a btrfs send stream, incremental from the one before, whose subvolume
    the sender named as it liked: the driver receives it and keeps it under our name."""
    for key, stream in reader.sections():
        meter = ProgressMeter(progress, f"import {key}")
        with stream.receiving():
            backend.receive_renamed(vol, stream, meter,
                                    None if key == "container" else SnapshotName(key))


def _detect_init(rootfs: Path) -> str:
    init = rootfs / "sbin" / "init"
    with contextlib.suppress(OSError):
        if init.is_symlink() and "busybox" in os.readlink(init):
            return "busybox"
    return "systemd"
