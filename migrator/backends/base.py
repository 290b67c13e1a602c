"""The storage pool contract every driver implements.

A pool holds volumes (``container/web-1``, later ``custom/data``) and their snapshots. Each
volume is a directory the runtime can use as a container's storage (the rootfs lives in
``<volume>/rootfs``, as in LXD). Drivers use the filesystem's native snapshots where it has
them; ``migration_types`` lists, in preference order, the stream formats it can send and
receive (negotiated between two pools by the copy pipelines).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from migrator.core.errors import AlreadyExists
from migrator.core.names import ContainerName, SnapshotName
from migrator.streams import ProgressMeter, SendStream, Stream

VOLUME_TYPES = ("container", "custom", "image")


@dataclass(frozen=True)
class VolumeRef:
    """A volume inside a pool: its type (container, custom, image) and name."""

    type: str
    name: str

    def __post_init__(self) -> None:
        if self.type not in VOLUME_TYPES:
            raise ValueError(f"unknown volume type {self.type!r}")
        if self.type != "image":  # image volumes are named by fingerprint (hex)
            ContainerName(self.name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}"


@dataclass(frozen=True)
class Snapshot:
    """A read-only point-in-time copy of a volume.

    ``path`` is where its files can be read directly, or ``None`` where the driver has no
    such path (zfs-fuse has no ``.zfs/snapshot``): read it through ``mount_snapshot``.
    """

    volume: VolumeRef
    name: str
    path: Path | None


@dataclass(frozen=True)
class PoolUsage:
    used: int
    total: int


class StorageBackend(Protocol):
    """A storage pool driver bound to one pool (its record's config names its paths)."""

    name: ClassVar[str]
    #: whether files on this pool can carry xattrs and POSIX ACLs (zfs-fuse cannot)
    supports_xattrs: ClassVar[bool]
    #: whether a snapshot costs O(1) (CoW) rather than a full copy of the volume
    cheap_snapshots: ClassVar[bool]
    #: whether file mtimes keep sub-second precision (zfs-fuse truncates to seconds)
    subsecond_mtimes: ClassVar[bool]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StorageBackend:
        """The driver of one pool, from the config its record keeps (paths, dataset)."""

    def activate(self) -> None:
        """Make the pool usable (mount its loop file...). Idempotent."""

    def deactivate(self) -> None:
        """Release what activate took (unmount), leaving the data in place."""

    def destroy(self) -> None:
        """Delete the pool and everything it holds (the caller checked it is unused)."""

    def volume_path(self, vol: VolumeRef) -> Path: ...

    def volume_exists(self, vol: VolumeRef) -> bool: ...

    def create_volume(self, vol: VolumeRef) -> Path: ...

    def create_volume_from(self, vol: VolumeRef, source: VolumeRef) -> Path:
        """New volume with the content of ``source`` (same pool); cheap where CoW exists."""

    def delete_volume(self, vol: VolumeRef) -> None: ...

    def snapshot(self, vol: VolumeRef, snap: SnapshotName) -> Snapshot: ...

    def list_snapshots(self, vol: VolumeRef) -> list[Snapshot]: ...

    def delete_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None: ...

    def restore_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        """Make the volume's content exactly the snapshot's again."""

    def usage(self) -> PoolUsage: ...

    def rename_volume(self, vol: VolumeRef, new: VolumeRef) -> None:
        """Rename a volume and its snapshots (the volume is not in use)."""

    def migration_types(self) -> list[str]:
        """Stream formats this pool sends and receives, best first (ends with the generic)."""

    def snapshot_identity(self, snap: Snapshot) -> str | None:
        """A token equal on both ends when a snapshot was copied with the native stream.

        btrfs: the received UUID, else the subvolume UUID; zfs: the snapshot guid. Native
        incremental sends are only attempted from a base whose identities match.
        """

    def mount_snapshot(self, snap: Snapshot) -> AbstractContextManager[Path]:
        """A readable directory with the snapshot's files for the duration of the block."""

    def send(self, snap: Snapshot, parent: Snapshot | None, how: str) -> SendStream:
        """Start a stream of ``snap`` (incremental from ``parent`` when given)."""

    def receive(
        self, vol: VolumeRef, name: str, stream: Stream, meter: ProgressMeter | None
    ) -> Snapshot:
        """Consume ``stream``: the volume's content becomes the stream's, kept as snapshot
        ``name``. The volume is created by a full stream. On failure nothing partial is
        left: no new snapshot, and the volume as it was (or absent, if the stream created it).
        """


def statvfs_usage(path: Path) -> PoolUsage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return PoolUsage(used=total - st.f_bavail * st.f_frsize, total=total)


class TreeLayout:
    """The on-disk layout dir and btrfs share: ``<path>/<type>s/<name>`` volumes and
    ``<path>/<type>s-snapshots/<name>/<snap>`` snapshots, readable in place."""

    path: Path

    def volume_exists(self, vol: VolumeRef) -> bool:
        raise NotImplementedError

    def volume_path(self, vol: VolumeRef) -> Path:
        return self.path / f"{vol.type}s" / vol.name

    def _snap_dir(self, vol: VolumeRef) -> Path:
        return self.path / f"{vol.type}s-snapshots" / vol.name

    @staticmethod
    def _claim(dst: Path, what: str, where: str = "") -> Path:
        """``dst`` for a new volume or snapshot (``what``): refused when anything is there
        already (``where`` adds to the message), its parent directory made."""
        if dst.exists():
            raise AlreadyExists(f"{what} already exists{where}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    def list_snapshots(self, vol: VolumeRef) -> list[Snapshot]:
        d = self._snap_dir(vol)
        if not d.is_dir():
            return []
        return [Snapshot(vol, p.name, p) for p in sorted(d.iterdir()) if not p.name.startswith(".")]

    def rename_volume(self, vol: VolumeRef, new: VolumeRef) -> None:
        if self.volume_exists(new) or self._snap_dir(new).exists():
            raise AlreadyExists(f"volume {new} already exists")
        self.volume_path(vol).rename(self.volume_path(new))
        if self._snap_dir(vol).exists():
            self._snap_dir(vol).rename(self._snap_dir(new))

    @contextlib.contextmanager
    def mount_snapshot(self, snap: Snapshot) -> Iterator[Path]:
        assert snap.path is not None
        yield snap.path
