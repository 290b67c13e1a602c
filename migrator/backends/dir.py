"""The ``dir`` driver: volumes are plain directories, snapshots are full copies.

Works on any filesystem. Copies go through ``cp -a --reflink=auto`` (xattrs, ACLs, hard
links, devices, sparse files and numeric ids kept; CoW clones where the filesystem can).
Restores are staged: the snapshot is copied beside the volume, then swapped in by rename, so
a failure mid-copy leaves the volume as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from migrator.backends import generic
from migrator.backends.base import PoolUsage, Snapshot, TreeLayout, VolumeRef, statvfs_usage
from migrator.core import proc
from migrator.core.errors import NotFound, StorageError
from migrator.core.names import SnapshotName
from migrator.streams import ProgressMeter, SendStream, Stream


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree exactly (the one copy primitive of the dir driver)."""
    proc.run(["cp", "-a", "--reflink=auto", "--sparse=always", str(src), str(dst)], timeout=None)


def copy_into_place(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new ``dst`` through a hidden temporary beside it, renamed into
    place once complete: a failed copy leaves nothing at ``dst``."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    remove_tree(tmp)
    try:
        copy_tree(src, tmp)
        tmp.rename(dst)
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        # rm -rf --one-file-system: never follow a bind mount left inside a volume.
        proc.run(["rm", "-rf", "--one-file-system", str(path)], timeout=None)


class DirBackend(TreeLayout):
    name: ClassVar[str] = "dir"
    supports_xattrs: ClassVar[bool] = True
    cheap_snapshots: ClassVar[bool] = False
    subsecond_mtimes: ClassVar[bool] = True

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DirBackend:
        return cls(Path(config["path"]))

    def activate(self) -> None:
        if not self.path.is_dir():
            raise StorageError(
                f"dir pool directory {self.path} is missing",
                "was it deleted by hand? recreate the directory or delete the pool",
            )

    def deactivate(self) -> None:
        pass

    def destroy(self) -> None:
        remove_tree(self.path)

    def volume_exists(self, vol: VolumeRef) -> bool:
        return self.volume_path(vol).is_dir()

    def create_volume(self, vol: VolumeRef) -> Path:
        p = self._claim(self.volume_path(vol), f"volume {vol}", f" in pool {self.path}")
        p.mkdir(mode=0o711)
        return p

    def create_volume_from(self, vol: VolumeRef, source: VolumeRef) -> Path:
        dst = self._claim(self.volume_path(vol), f"volume {vol}")
        copy_into_place(self.volume_path(source), dst)
        return dst

    def delete_volume(self, vol: VolumeRef) -> None:
        remove_tree(self.volume_path(vol))
        remove_tree(self._snap_dir(vol))

    def snapshot(self, vol: VolumeRef, snap: SnapshotName) -> Snapshot:
        dst = self._claim(self._snap_dir(vol) / snap, f"snapshot {vol}/{snap}")
        copy_into_place(self.volume_path(vol), dst)
        return Snapshot(vol, snap, dst)

    def delete_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        remove_tree(self._snap_dir(vol) / snap)

    def restore_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        src = self._snap_dir(vol) / snap
        if not src.is_dir():
            raise NotFound(f"snapshot {vol}/{snap} not found on disk")
        cur = self.volume_path(vol)
        new = cur.with_name(f".{cur.name}.restore")
        old = cur.with_name(f".{cur.name}.old")
        remove_tree(new)
        copy_tree(src, new)  # may fail: the volume is untouched
        cur.rename(old)
        new.rename(cur)
        remove_tree(old)

    def usage(self) -> PoolUsage:
        return statvfs_usage(self.path)

    def migration_types(self) -> list[str]:
        return list(generic.GENERIC_TYPES)

    def snapshot_identity(self, snap: Snapshot) -> str | None:
        return None  # plain copies carry no identity; the state store's uuid is used

    def send(self, snap: Snapshot, parent: Snapshot | None, how: str) -> SendStream:
        assert snap.path is not None
        if how != "tar":
            raise generic.unhandled_stream("dir", how)
        return generic.tar_send(snap.path, snap.name)

    def receive(
        self, vol: VolumeRef, name: str, stream: Stream, meter: ProgressMeter | None
    ) -> Snapshot:
        if stream.how != "tar":
            raise generic.unhandled_stream("dir", stream.how, stream)
        return generic.tar_receive(self, vol, name, stream, meter)
