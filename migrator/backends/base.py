"""The storage pool contract every driver implements.

A pool holds volumes (``container/web-1``, later ``custom/data``) and their snapshots. Each
volume is a directory the runtime can use as a container's storage (the rootfs lives in
``<volume>/rootfs``, as in LXD). Drivers use the filesystem's native snapshots where it has
them; ``migration_types`` lists, in preference order, the stream formats it can send and
receive (negotiated between two pools by the copy pipelines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from migrator.names import ContainerName, SnapshotName

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
    volume: VolumeRef
    name: str
    path: Path


@dataclass(frozen=True)
class PoolUsage:
    used: int
    total: int


class StorageBackend(Protocol):
    """A storage pool driver bound to one pool (its record's config names its paths)."""

    name: ClassVar[str]

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

    def migration_types(self) -> list[str]: ...


def statvfs_usage(path: Path) -> PoolUsage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return PoolUsage(used=total - st.f_bavail * st.f_frsize, total=total)
