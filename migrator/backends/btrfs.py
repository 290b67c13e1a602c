"""The ``btrfs`` driver: volumes are subvolumes, snapshots are read-only snapshots.

Subvolume work goes through btrfsutil (python3-btrfsutil), not the ``btrfs`` command, so
errors arrive as exceptions with errno rather than text to parse. A pool without a source
lives on a sparse loop file under the state root, mounted at activation; a pool given an
existing directory on btrfs uses it in place and never mounts or formats anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import btrfsutil  # type: ignore[import-not-found]

from migrator.backends import generic
from migrator.backends.base import PoolUsage, Snapshot, TreeLayout, VolumeRef, statvfs_usage
from migrator.core import proc
from migrator.core.errors import (
    AlreadyExists,
    CorruptBackup,
    InvalidInput,
    NoSpace,
    NotFound,
    StorageError,
)
from migrator.core.names import SnapshotName
from migrator.streams import ProgressMeter, SendStream, Stream, receive_with


def _storage_error(what: str, e: Exception) -> StorageError:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return NoSpace(f"{what}: no space left on the btrfs pool")
    return StorageError(f"{what}: {e}")


def make_loop_filesystem(image: Path, size: int) -> None:
    """A sparse file formatted as btrfs (the pool's disk when no device is given)."""
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "xb") as f:
        f.truncate(size)
    os.chmod(image, 0o600)
    proc.run(["mkfs.btrfs", "-q", "-f", str(image)], timeout=60)


def _mount_root(path: Path) -> Path:
    """The mount point the filesystem of ``path`` is reached through."""
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def _nodev_bind(dest: Path) -> Iterator[None]:
    """``dest`` bound onto itself ``nodev,nosuid`` for as long as the block runs."""
    proc.run(["mount", "--bind", str(dest), str(dest)])
    try:
        proc.run(["mount", "-o", "remount,bind,nodev,nosuid", str(dest)])
        yield
    finally:
        if proc.run(["umount", str(dest)], check=False).returncode != 0:
            proc.run(["umount", "--lazy", str(dest)], check=False)


def receive_confined(dest: Path, stream: Stream, meter: ProgressMeter | None) -> None:
    """``btrfs receive`` into directory ``dest`` of a stream that may be hostile.

    ``btrfs receive`` replays the stream's operations by path as root: a stream can make a
    symlink to a host file and then write "into" it, or make a block device node with the
    numbers of the host's disk and write to that (both tried: the host file and the disk
    changed). So it runs chrooted into ``dest`` (``-C``; ``-m`` names the real mount for
    finding parent subvolumes), on a ``nodev,nosuid`` bind of ``dest`` onto itself, where
    no device node can be opened. What the streams leave is inspected afterwards
    (``migrator.runtime.treecheck``)."""
    with _nodev_bind(dest):
        receive_with(["btrfs", "receive", "-q", "-C", "-m", str(_mount_root(dest)),
                      str(dest)], stream, meter, no_space_markers=("No space left", "ENOSPC"))


class BtrfsBackend(TreeLayout):
    name: ClassVar[str] = "btrfs"
    supports_xattrs: ClassVar[bool] = True
    cheap_snapshots: ClassVar[bool] = True
    subsecond_mtimes: ClassVar[bool] = True

    def __init__(self, path: Path, loop_file: Path | None = None) -> None:
        self.path = path
        self.loop_file = loop_file

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BtrfsBackend:
        loop = config.get("loop_file")
        return cls(Path(config["path"]), Path(loop) if loop else None)

    # pool lifecycle ----------------------------------------------------------------------
    def activate(self) -> None:
        if self.loop_file is not None and not os.path.ismount(self.path):
            if not self.loop_file.exists():
                raise StorageError(f"btrfs pool disk {self.loop_file} is missing")
            self.path.mkdir(parents=True, exist_ok=True)
            proc.run(
                [
                    "mount",
                    "-o",
                    "loop,noatime,user_subvol_rm_allowed",
                    str(self.loop_file),
                    str(self.path),
                ],
                timeout=60,
            )
        if not self.path.is_dir():
            raise StorageError(f"btrfs pool directory {self.path} is missing")

    def deactivate(self) -> None:
        if self.loop_file is not None and os.path.ismount(self.path):
            # mount -o loop sets autoclear, so the loop device goes with the unmount
            proc.run(["umount", str(self.path)], timeout=60)

    def destroy(self) -> None:
        if self.loop_file is not None:
            self.deactivate()
            self.loop_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()
        else:
            for sub in (
                "containers",
                "containers-snapshots",
                "customs",
                "customs-snapshots",
                "images",
            ):
                p = self.path / sub
                if p.exists():
                    self._delete_tree(p)

    # volumes -----------------------------------------------------------------------------
    def volume_exists(self, vol: VolumeRef) -> bool:
        p = self.volume_path(vol)
        return p.is_dir() and btrfsutil.is_subvolume(str(p))

    def create_volume(self, vol: VolumeRef) -> Path:
        p = self._claim(self.volume_path(vol), f"volume {vol}")
        try:
            btrfsutil.create_subvolume(str(p))
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot create subvolume {p}", e) from e
        os.chmod(p, 0o711)
        return p

    def create_volume_from(self, vol: VolumeRef, source: VolumeRef) -> Path:
        dst = self._claim(self.volume_path(vol), f"volume {vol}")
        try:
            btrfsutil.create_snapshot(str(self.volume_path(source)), str(dst))
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot snapshot {source} into {vol}", e) from e
        return dst

    def _delete_tree(self, p: Path) -> None:
        try:
            if btrfsutil.is_subvolume(str(p)):
                btrfsutil.delete_subvolume(str(p), recursive=True)
                return
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot delete subvolume {p}", e) from e
        for child in p.iterdir():
            if child.is_dir() and not child.is_symlink():
                self._delete_tree(child)
            else:
                child.unlink()
        p.rmdir()

    def delete_volume(self, vol: VolumeRef) -> None:
        for s in self.list_snapshots(vol):
            self.delete_snapshot(vol, SnapshotName(s.name))
        sd = self._snap_dir(vol)
        if sd.exists():
            sd.rmdir()
        p = self.volume_path(vol)
        if p.exists():
            self._delete_tree(p)

    # snapshots ---------------------------------------------------------------------------
    def snapshot(self, vol: VolumeRef, snap: SnapshotName) -> Snapshot:
        dst = self._claim(self._snap_dir(vol) / snap, f"snapshot {vol}/{snap}")
        try:
            btrfsutil.create_snapshot(str(self.volume_path(vol)), str(dst), read_only=True)
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot snapshot {vol}", e) from e
        return Snapshot(vol, snap, dst)

    def delete_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        p = self._snap_dir(vol) / snap
        if not p.exists():
            return
        try:
            btrfsutil.set_subvolume_read_only(str(p), False)
            btrfsutil.delete_subvolume(str(p), recursive=True)
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot delete snapshot {vol}/{snap}", e) from e

    def restore_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        src = self._snap_dir(vol) / snap
        if not src.is_dir():
            raise NotFound(f"snapshot {vol}/{snap} not found on disk")
        self._replace_volume_with(vol, src)

    def _replace_volume_with(self, vol: VolumeRef, src: Path) -> None:
        """The volume becomes a writable snapshot of ``src`` (O(1)); swapped in by rename."""
        cur = self.volume_path(vol)
        new = cur.with_name(f".{cur.name}.restore")
        if new.exists():
            self._delete_tree(new)
        new.parent.mkdir(parents=True, exist_ok=True)
        try:
            btrfsutil.create_snapshot(str(src), str(new))  # writable copy, O(1)
        except btrfsutil.BtrfsUtilError as e:
            raise _storage_error(f"cannot make {vol} from {src.name}", e) from e
        if not cur.exists():
            new.rename(cur)
            return
        old = cur.with_name(f".{cur.name}.old")
        cur.rename(old)
        new.rename(cur)
        self._delete_tree(old)

    # streams -----------------------------------------------------------------------------
    def snapshot_identity(self, snap: Snapshot) -> str | None:
        try:
            info = btrfsutil.subvolume_info(str(snap.path))
        except btrfsutil.BtrfsUtilError:
            return None
        uuid = info.received_uuid if any(info.received_uuid) else info.uuid
        return bytes(uuid).hex()

    def send(self, snap: Snapshot, parent: Snapshot | None, how: str) -> SendStream:
        assert snap.path is not None
        if how == "tar":
            return generic.tar_send(snap.path, snap.name)
        if how != "btrfs":
            raise generic.unhandled_stream("btrfs", how)
        argv = ["btrfs", "send", "-q"]
        if parent is not None:
            assert parent.path is not None
            argv += ["-p", str(parent.path)]
        size = generic.tree_size(snap.path) if parent is None else None
        return SendStream([*argv, str(snap.path)], "btrfs", snap.name,
                          parent.name if parent else None, size_hint=size)

    def receive(
        self, vol: VolumeRef, name: str, stream: Stream, meter: ProgressMeter | None
    ) -> Snapshot:
        if stream.how == "tar":
            return generic.tar_receive(self, vol, name, stream, meter)
        if stream.how != "btrfs":
            raise generic.unhandled_stream("btrfs", stream.how, stream)
        if stream.name != name:
            stream.kill()
            raise InvalidInput(f"btrfs stream carries {stream.name!r}, not {name!r}")
        sd = self._snap_dir(vol)
        dst = sd / name
        if dst.exists():
            stream.kill()
            raise AlreadyExists(f"snapshot {vol}/{name} already exists")
        sd.mkdir(parents=True, exist_ok=True)
        try:
            receive_confined(sd, stream, meter)
            self._replace_volume_with(vol, dst)
        except BaseException:
            if dst.exists():
                with contextlib.suppress(Exception):
                    btrfsutil.set_subvolume_read_only(str(dst), False)
                    btrfsutil.delete_subvolume(str(dst), recursive=True)
            with contextlib.suppress(OSError):
                sd.rmdir()  # only when this receive left it empty
            raise
        return Snapshot(vol, name, dst)

    def receive_renamed(self, vol: VolumeRef, stream: Stream, meter: ProgressMeter | None,
                        snap: SnapshotName | None) -> None:
        """Receive a btrfs stream, possibly hostile, whose subvolume its sender named as it
        liked (an LXD export's ``.bin`` members): confined (``receive_confined``) into an
        empty directory, then kept as snapshot ``snap`` (read-only, its received UUID kept
        for the next incremental stream to name as its parent) or, with no ``snap``, as the
        volume itself. The caller inspects what the streams made before trusting it."""
        sd = self._snap_dir(vol)
        sd.mkdir(parents=True, exist_ok=True)
        self.volume_path(vol).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._receive_renamed(sd, vol, stream, meter, snap)
        except BaseException:
            with contextlib.suppress(OSError):
                sd.rmdir()  # when nothing was kept there (the caller removes the rest)
            raise

    def _receive_renamed(self, sd: Path, vol: VolumeRef, stream: Stream,
                         meter: ProgressMeter | None, snap: SnapshotName | None) -> None:
        def drop(sub: Path) -> None:
            with contextlib.suppress(Exception):
                btrfsutil.set_subvolume_read_only(str(sub), False)
            btrfsutil.delete_subvolume(str(sub))

        recv = sd / f".recv-{secrets.token_hex(3)}"
        recv.mkdir()
        try:
            receive_confined(recv, stream, meter)
            got = list(recv.iterdir())
            if len(got) != 1:
                raise CorruptBackup(f"the btrfs stream of {snap or 'container'} made "
                                    f"{len(got)} subvolumes, not 1")
            if snap is None:
                btrfsutil.create_snapshot(str(got[0]), str(self.volume_path(vol)))
                drop(got[0])
            else:
                # a read-only subvolume cannot be renamed; the flags ioctl keeps its received
                # UUID (which the next incremental stream names as its parent)
                btrfsutil.set_subvolume_read_only(str(got[0]), False)
                got[0].rename(sd / snap)
                btrfsutil.set_subvolume_read_only(str(sd / snap), True)
        finally:
            for left in recv.iterdir():
                drop(left)
            recv.rmdir()

    @contextlib.contextmanager
    def writable_snapshot(self, snap: Snapshot) -> Iterator[Path]:
        """Snapshot ``snap`` writable for the block, read-only again after; the flags ioctl
        keeps a received snapshot's UUID (an import shifts the ids of what it received)."""
        assert snap.path is not None
        btrfsutil.set_subvolume_read_only(str(snap.path), False)
        try:
            yield snap.path
        finally:
            btrfsutil.set_subvolume_read_only(str(snap.path), True)

    def usage(self) -> PoolUsage:
        return statvfs_usage(self.path)

    def migration_types(self) -> list[str]:
        return ["btrfs", *generic.GENERIC_TYPES]
