"""The ``zfs`` driver: volumes are datasets, snapshots are zfs snapshots (zfs-fuse).

Layout under the pool's base dataset ``B`` (mounted at the pool path; every child inherits
its mountpoint, so a volume's directory is ``<path>/<type>s/<name>`` as on the other drivers)::

    B/containers/NAME  B/customs/NAME  B/images/FP   volumes
    B/<type>s/NAME@SNAP                              snapshots (no path: zfs-fuse has no .zfs)
    B/<type>s/NAME@clone:HEX                         hidden origin of a clone of the volume
    B/deleted/HEX                                    a deleted volume that clones still use
    B/tmp-HEX                                        short-lived clone a snapshot is read through

A pool without a source is a whole zpool on a sparse file under the state root (base = the
zpool's root dataset); a pool given ``--source`` lives in a child dataset we create under the
given pool or dataset, and only that child is ever destroyed.

Clones (``create_volume_from``) are native, O(1): the source gets a hidden ``clone:HEX``
snapshot, already marked for deferred destroy, so it disappears by itself with its last
clone. Deleting a source that still has clones moves it to ``B/deleted`` (unmounted, its own
snapshots dropped) until its last clone goes; then it is collected. Either volume can be
deleted first and nothing is left behind.

zfs-fuse particulars this driver works around (all verified on pool version 23):
- ``zfs destroy``/``mount``/``zpool export`` right after a dataset was used often fail with
  "dataset is busy" while FUSE lets go: retried for a few seconds (destroy after an
  unmount); ``zfs rename`` of a mounted, used dataset stays busy, so it is unmounted first;
- ``zfs rollback`` and incremental ``zfs receive`` into an *unmounted* dataset sometimes fail
  with "I/O error": both run mounted;
- an incremental receive does not invalidate the kernel's cache of the mounted dataset
  (zfs-fuse mounts with hour-long attribute/entry timeouts): old content stays visible
  until the dataset is mounted again, so it is remounted after every receive;
- the daemon, not the ``zfs`` command, reads and writes the streams: killing ``zfs send``
  does not stop the stream, and a receive whose command died may still finish, so a failed
  receive is cleaned up once the daemon has let go of the target;
- no xattrs, no POSIX ACLs (``supports_xattrs = False``), timestamps in whole seconds, no
  ``.zfs/snapshot`` directory (snapshots are read through a temporary clone), no
  ``zfs send -n/-P``;
- ``zfs receive`` has ``-u`` (undocumented in its usage text) but neither ``-x`` nor ``-o``:
  received properties are reset by hand before the first mount (``receive``);
- atime updates count as changes since the last snapshot (they would make every incremental
  receive need a rollback), so pools are created with ``atime=off``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from migrator.backends import generic
from migrator.backends.base import PoolUsage, Snapshot, VolumeRef
from migrator.core import proc
from migrator.core.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidState,
    MigratorError,
    NoSpace,
    NotFound,
    StorageError,
    UnsafeArchive,
)
from migrator.core.names import SnapshotName
from migrator.streams import ProgressMeter, SendStream, Stream, receive_with

log = logging.getLogger(__name__)

PIDFILE = Path("/run/zfs-fuse.pid")
DAEMON_HINT = (
    "run `make setup` (starts zfs-fuse), or start it: "
    "rm -f /run/zfs-fuse.pid; zfs-fuse -p /run/zfs-fuse.pid"
)
MIN_POOL_SIZE = 64 * 2**20  # zfs refuses smaller vdevs
NO_SPACE = ("out of space", "No space left")
CLONE_PREFIX = "clone:"  # ':' is never in a SnapshotName, so these never show as snapshots
TMP_PREFIX = "tmp-"
DELETED = "deleted"
BUSY_WAIT = 15.0  # seconds a busy dataset is retried before giving up
RECEIVE_SETTLE = 60.0  # seconds to wait for the daemon to let go of a failed receive
#: properties a stream may set that ``zfs inherit`` refuses, with the value that undoes them
NOT_INHERITABLE = {"canmount": "on", "quota": "none", "refquota": "none",
                   "reservation": "none", "refreservation": "none"}


def zpool_name(root: Path, pool: str) -> str:
    """Zpool names are machine-wide: derive one from the host's state root and the pool."""
    return f"mig{hashlib.sha256(str(root).encode()).hexdigest()[:8]}-{pool}"


def daemon_running() -> bool:
    """Whether a zfs-fuse daemon is alive (its pidfile, else any process of that name)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(PIDFILE.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "zfs-fuse":
            return True
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == "zfs-fuse":
                    return True
    return False


def require_daemon() -> None:
    if not daemon_running():
        raise StorageError("the zfs-fuse daemon is not running", DAEMON_HINT)


def _error(argv: Sequence[str], r: proc.Completed) -> MigratorError:
    err = (r.stderr or r.stdout).strip()
    what = f"{' '.join(argv[:2])} failed: {err}"
    if any(m in err for m in NO_SPACE):
        return NoSpace(what, "free space on the zfs pool or grow it, then retry")
    if "zfs-fuse daemon" in err or "connect:" in err:
        return StorageError(f"cannot reach the zfs-fuse daemon ({err})", DAEMON_HINT)
    if "does not exist" in err or "no such pool" in err:
        return NotFound(what)
    if "already exists" in err:
        return AlreadyExists(what)
    return StorageError(what)


def run_zfs(argv: Sequence[str], *, check: bool = True, timeout: float | None = 300,
            busy_wait: float = BUSY_WAIT) -> proc.Completed:
    """Run a zfs/zpool command; "busy" failures are retried for ``busy_wait`` seconds."""
    deadline = time.monotonic() + busy_wait
    delay = 0.05
    while True:
        r = proc.run(argv, check=False, timeout=timeout)
        if r.returncode == 0 or not check:
            return r
        if "busy" not in r.stderr or time.monotonic() >= deadline:
            raise _error(argv, r)
        log.debug("busy, retrying: %s", argv)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def create_loop_pool(zpool: str, image: Path, size: int, mountpoint: Path) -> None:
    """A new zpool on a sparse file, its root dataset mounted at ``mountpoint``.

    ``cachefile=none``: the machine-wide cache never remembers it (activation imports it
    from the file), so a deleted state root cannot leave a pool the daemon tries to load.
    """
    if size < MIN_POOL_SIZE:
        raise InvalidInput(f"a zfs pool needs at least 64MiB (got {size} bytes)")
    require_daemon()
    if run_zfs(["zpool", "list", "-H", "-o", "name", zpool], check=False).returncode == 0:
        raise InvalidInput(f"zpool {zpool} is already imported",
                           "a pool of that name was not cleaned up: zpool destroy it")
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "xb") as f:
        f.truncate(size)
    os.chmod(image, 0o600)
    try:
        run_zfs(["zpool", "create", "-o", "cachefile=none", "-O", "atime=off",
                 "-m", str(mountpoint), zpool, str(image)])
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    os.chmod(mountpoint, 0o711)


def create_base_dataset(source: str, dataset: str, mountpoint: Path) -> None:
    """The base dataset of a pool that lives inside an existing zfs pool or dataset."""
    require_daemon()
    r = run_zfs(["zfs", "list", "-H", "-o", "name", "-t", "filesystem", source], check=False)
    if r.returncode != 0:
        raise InvalidInput(f"{source!r} is not an existing zfs pool or filesystem dataset",
                           "give the name of an imported zpool or of a dataset in one")
    if run_zfs(["zfs", "list", "-H", "-o", "name", dataset], check=False).returncode == 0:
        raise InvalidInput(f"dataset {dataset} already exists",
                           "a pool of that name was not cleaned up: zfs destroy -r it")
    run_zfs(["zfs", "create", "-o", f"mountpoint={mountpoint}", "-o", "atime=off", dataset])
    os.chmod(mountpoint, 0o711)


def _rmdirs(path: Path) -> None:
    """Remove ``path`` and empty directories below it (mountpoints zfs-fuse leaves behind)."""
    if not path.is_dir() or os.path.ismount(path):
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _rmdirs(child)
    with contextlib.suppress(OSError):
        path.rmdir()


class ZfsBackend:
    name: ClassVar[str] = "zfs"
    supports_xattrs: ClassVar[bool] = False
    cheap_snapshots: ClassVar[bool] = True
    subsecond_mtimes: ClassVar[bool] = False

    def __init__(
        self, path: Path, dataset: str, zpool: str, loop_file: Path | None = None
    ) -> None:
        self.path = path
        self.dataset = dataset
        self.zpool = zpool
        self.loop_file = loop_file

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ZfsBackend:
        loop = config.get("loop_file")
        return cls(Path(config["path"]), config["dataset"], config["zpool"],
                   Path(loop) if loop else None)

    # pool lifecycle ----------------------------------------------------------------------
    def _imported(self) -> bool:
        r = run_zfs(["zpool", "list", "-H", "-o", "name", self.zpool], check=False)
        if r.returncode != 0 and ("daemon" in r.stderr or "connect:" in r.stderr):
            raise _error(["zpool", "list"], r)
        return r.returncode == 0

    def activate(self) -> None:
        require_daemon()
        if not self._imported():
            if self.loop_file is None:
                raise StorageError(f"zpool {self.zpool} is not imported",
                                   f"import it (zpool import {self.zpool}) and retry")
            if not self.loop_file.exists():
                raise StorageError(f"zfs pool disk {self.loop_file} is missing")
            run_zfs(["zpool", "import", "-o", "cachefile=none", "-d",
                     str(self.loop_file.parent), self.zpool], timeout=300)
        if not self._exists(self.dataset):
            raise StorageError(f"the pool's base dataset {self.dataset} is missing",
                               "was it destroyed by hand? delete the pool")
        self._mount_all()
        if not self.path.is_dir():
            raise StorageError(f"zfs pool directory {self.path} is missing")

    def _mount_all(self) -> None:
        """Mount every dataset of the pool that should be and is not (parents first)."""
        r = run_zfs(["zfs", "list", "-H", "-o", "name,mounted,canmount,mountpoint",
                     "-t", "filesystem", "-r", self.dataset])
        for line in r.stdout.splitlines():
            name, mounted, canmount, mountpoint = line.split("\t")
            if mounted != "yes" and canmount == "on" and mountpoint.startswith("/"):
                self._mount(name)

    def _zpool(self, action: str) -> None:
        """``zpool export|destroy``; still busy after the retries: forced (-f).

        Callers have stopped what used the pool (teardown, pool deletion), so what still
        holds it is FUSE letting go slowly, not a user.
        """
        try:
            run_zfs(["zpool", action, self.zpool], timeout=300)
        except StorageError as e:
            if "busy" not in e.message:
                raise
            log.warning("zpool %s %s: still busy, forcing it", action, self.zpool)
            run_zfs(["zpool", action, "-f", self.zpool], timeout=300)

    def deactivate(self) -> None:
        if self.loop_file is None or not daemon_running() or not self._imported():
            return
        self._zpool("export")

    def destroy(self) -> None:
        require_daemon()
        if self.loop_file is not None:
            if self._imported():
                self._zpool("destroy")
            self.loop_file.unlink(missing_ok=True)
        elif run_zfs(["zfs", "list", "-H", "-o", "name", self.dataset], check=False
                     ).returncode == 0:
            self._destroy(self.dataset, "-r")
        _rmdirs(self.path)

    # names -------------------------------------------------------------------------------
    def _ds(self, vol: VolumeRef) -> str:
        return f"{self.dataset}/{vol.type}s/{vol.name}"

    def _exists(self, ds: str) -> bool:
        return run_zfs(["zfs", "list", "-H", "-o", "name", ds], check=False).returncode == 0

    def _ensure_parent(self, vol: VolumeRef) -> None:
        parent = f"{self.dataset}/{vol.type}s"
        if not self._exists(parent):
            r = run_zfs(["zfs", "create", parent], check=False)
            if r.returncode != 0 and not self._exists(parent):  # a concurrent create is fine
                raise _error(["zfs", "create"], r)

    def _destroy(self, ds: str, *flags: str) -> None:
        """Unmount, then destroy (a missing dataset is fine); busy is retried."""
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            if "@" not in ds:
                proc.run(["zfs", "unmount", ds], check=False)
            r = proc.run(["zfs", "destroy", *flags, ds], check=False)
            if r.returncode == 0 or "does not exist" in r.stderr or (
                "could not find any snapshots" in r.stderr
            ):
                return
            if "busy" not in r.stderr or time.monotonic() >= deadline:
                if "@" not in ds:  # leave it as it was: mounted
                    with contextlib.suppress(MigratorError):
                        self._mount(ds)
                raise _error(["zfs", "destroy"], r)
            time.sleep(0.1)

    def _snapshots(self, ds: str) -> list[str]:
        """All snapshot names of ``ds`` (hidden ones too), oldest first."""
        r = run_zfs(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1",
                     "-s", "createtxg", ds], check=False)
        if r.returncode != 0:
            if "does not exist" in r.stderr:
                return []
            raise _error(["zfs", "list"], r)
        prefix = f"{ds}@"
        return [n[len(prefix):] for n in r.stdout.split() if n.startswith(prefix)]

    # volumes -----------------------------------------------------------------------------
    def volume_path(self, vol: VolumeRef) -> Path:
        return self.path / f"{vol.type}s" / vol.name

    def volume_exists(self, vol: VolumeRef) -> bool:
        return self._exists(self._ds(vol))

    def create_volume(self, vol: VolumeRef) -> Path:
        ds = self._ds(vol)
        if self._exists(ds):
            raise AlreadyExists(f"volume {vol} already exists")
        self._ensure_parent(vol)
        run_zfs(["zfs", "create", ds])
        p = self.volume_path(vol)
        os.chmod(p, 0o711)
        return p

    def create_volume_from(self, vol: VolumeRef, source: VolumeRef) -> Path:
        """A native clone of ``source`` through a hidden, deferred-destroy snapshot of it."""
        ds, src = self._ds(vol), self._ds(source)
        if self._exists(ds):
            raise AlreadyExists(f"volume {vol} already exists")
        if not self._exists(src):
            raise NotFound(f"volume {source} does not exist")
        self._ensure_parent(vol)
        origin = f"{src}@{CLONE_PREFIX}{uuid.uuid4().hex[:12]}"
        run_zfs(["zfs", "snapshot", origin])
        try:
            run_zfs(["zfs", "clone", origin, ds])
        finally:
            # with a clone: destroyed when the clone is; without one: destroyed right now
            self._destroy(origin, "-d")
        return self.volume_path(vol)

    def _drop_readers(self, ds: str, snap: str | None = None) -> None:
        """Destroy ``tmp-`` clones reading ``ds@snap`` (any snapshot of ``ds`` if None).

        Normally they live only as long as a ``mount_snapshot`` block or a tar stream; one
        left by a killed process would block deleting the snapshot or volume.
        """
        r = run_zfs(["zfs", "list", "-H", "-o", "name,origin", "-t", "filesystem", "-d", "1",
                     self.dataset])
        for line in r.stdout.splitlines():
            name, origin = line.split("\t")
            tag = name[len(self.dataset) + 1:]
            if not tag.startswith(TMP_PREFIX):
                continue
            if origin == f"{ds}@{snap}" or (snap is None and origin.startswith(f"{ds}@")):
                self._drop_clone(name, self.path / tag)

    def delete_volume(self, vol: VolumeRef) -> None:
        ds = self._ds(vol)
        if not self._exists(ds):
            return
        self._drop_readers(ds)
        snaps = self._snapshots(ds)
        if any(s.startswith(CLONE_PREFIX) for s in snaps):
            # clones still use it: park it, without its own snapshots, until they are gone
            for s in snaps:
                if not s.startswith(CLONE_PREFIX):
                    self._destroy(f"{ds}@{s}")
            graveyard = f"{self.dataset}/{DELETED}"
            if not self._exists(graveyard):
                run_zfs(["zfs", "create", "-o", "mountpoint=none", graveyard])
            self._unmount(ds)
            run_zfs(["zfs", "rename", ds, f"{graveyard}/{uuid.uuid4().hex[:12]}"])
        else:
            self._destroy(ds, "-r")
        _rmdirs(self.volume_path(vol))
        self._collect_deleted()

    def _collect_deleted(self) -> None:
        """Destroy parked volumes whose last clone is gone."""
        graveyard = f"{self.dataset}/{DELETED}"
        r = run_zfs(["zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-d", "1",
                     graveyard], check=False)
        if r.returncode != 0:
            return
        left = [ds for ds in r.stdout.split() if ds != graveyard]
        progress = True
        while left and progress:  # a parked clone going may free its parked origin
            progress = False
            for ds in list(left):
                if not self._snapshots(ds):
                    self._destroy(ds, "-r")
                    left.remove(ds)
                    progress = True

    def rename_volume(self, vol: VolumeRef, new: VolumeRef) -> None:
        ds, dst = self._ds(vol), self._ds(new)
        if not self._exists(ds):
            raise NotFound(f"volume {vol} does not exist")
        if self._exists(dst):
            raise AlreadyExists(f"volume {new} already exists")
        self._ensure_parent(new)
        # unmounted first: a mounted dataset FUSE still holds stays "busy" for a long time
        self._unmount(ds)
        try:
            run_zfs(["zfs", "rename", ds, dst])  # snapshots and clone origins follow
        except BaseException:
            self._mount(ds)
            raise
        _rmdirs(self.volume_path(vol))
        self._mount(dst)

    # snapshots ---------------------------------------------------------------------------
    def snapshot(self, vol: VolumeRef, snap: SnapshotName) -> Snapshot:
        ds = self._ds(vol)
        if snap in self._snapshots(ds):
            raise AlreadyExists(f"snapshot {vol}/{snap} already exists")
        run_zfs(["zfs", "snapshot", f"{ds}@{snap}"])
        return Snapshot(vol, snap, None)

    def list_snapshots(self, vol: VolumeRef) -> list[Snapshot]:
        """User snapshots, oldest first (hidden clone origins are left out)."""
        return [Snapshot(vol, s, None) for s in self._snapshots(self._ds(vol))
                if not s.startswith(CLONE_PREFIX)]

    def delete_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        ds = self._ds(vol)
        if snap not in self._snapshots(ds):
            return
        self._drop_readers(ds, snap)
        self._destroy(f"{ds}@{snap}")

    def restore_snapshot(self, vol: VolumeRef, snap: SnapshotName) -> None:
        """Content back to ``snap``, every snapshot kept.

        ``zfs rollback`` when ``snap`` is the newest snapshot (exact, instant); otherwise
        rollback would destroy the newer ones, so the snapshot is read through a temporary
        clone and synced over the volume with rsync (``--checksum``: a file rewritten in
        the same second with the same size is still noticed).
        """
        ds = self._ds(vol)
        snaps = self._snapshots(ds)
        if snap not in snaps:
            raise NotFound(f"snapshot {vol}/{snap} not found on disk")
        if snaps[-1] == snap:
            # mounted: zfs remounts it (fresh kernel cache); an unmounted rollback sometimes
            # fails with "I/O error" on zfs-fuse
            run_zfs(["zfs", "rollback", f"{ds}@{snap}"])
            return
        with self.mount_snapshot(Snapshot(vol, snap, None)) as src:
            generic.rsync_tree(src, self.volume_path(vol), checksum=True, exact_times=False)

    def usage(self) -> PoolUsage:
        r = run_zfs(["zfs", "get", "-Hp", "-o", "value", "used,available", self.dataset])
        used, avail = (int(v) for v in r.stdout.split())
        return PoolUsage(used=used, total=used + avail)

    # streams -----------------------------------------------------------------------------
    def migration_types(self) -> list[str]:
        return ["zfs", *generic.GENERIC_TYPES]

    def snapshot_identity(self, snap: Snapshot) -> str | None:
        """The snapshot's guid: ``zfs send`` carries it, so both ends agree after a copy."""
        r = run_zfs(["zfs", "get", "-Hp", "-o", "value", "guid",
                     f"{self._ds(snap.volume)}@{snap.name}"], check=False)
        value = r.stdout.strip()
        return value if r.returncode == 0 and value.isdigit() else None

    def _clone_snapshot(self, snap: Snapshot) -> tuple[str, Path]:
        """A read-only clone of ``snap`` mounted under the pool path: (dataset, path)."""
        tag = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        ds = f"{self.dataset}/{tag}"
        origin = f"{self._ds(snap.volume)}@{snap.name}"
        if snap.name not in self._snapshots(self._ds(snap.volume)):
            raise NotFound(f"snapshot {snap.volume}/{snap.name} not found on disk")
        run_zfs(["zfs", "clone", "-o", "readonly=on", origin, ds])
        return ds, self.path / tag

    def _drop_clone(self, ds: str, path: Path) -> None:
        self._destroy(ds)
        _rmdirs(path)

    @contextlib.contextmanager
    def mount_snapshot(self, snap: Snapshot) -> Iterator[Path]:
        ds, path = self._clone_snapshot(snap)
        try:
            yield path
        finally:
            self._drop_clone(ds, path)

    def send(self, snap: Snapshot, parent: Snapshot | None, how: str) -> SendStream:
        ds = self._ds(snap.volume)
        if how == "tar":
            clone, path = self._clone_snapshot(snap)
            try:
                stream = generic.tar_send(path, snap.name, xattrs=False)
            except BaseException:
                self._drop_clone(clone, path)
                raise
            stream.cleanups.append(lambda: self._drop_clone(clone, path))
            return stream
        if how != "zfs":
            raise generic.unhandled_stream("zfs", how)
        snaps = self._snapshots(ds)
        for s in (snap, parent):
            if s is not None and s.name not in snaps:
                raise NotFound(f"snapshot {s.volume}/{s.name} not found on disk")
        argv = ["zfs", "send"]
        if parent is not None:
            argv += ["-i", f"@{parent.name}"]
        size = None
        if parent is None:
            r = run_zfs(["zfs", "get", "-Hp", "-o", "value", "referenced",
                         f"{ds}@{snap.name}"])
            size = int(r.stdout.strip())
        return SendStream([*argv, f"{ds}@{snap.name}"], "zfs", snap.name,
                          parent.name if parent else None, size_hint=size)

    def receive(
        self, vol: VolumeRef, name: str, stream: Stream, meter: ProgressMeter | None
    ) -> Snapshot:
        if stream.how == "tar":
            return generic.tar_receive(self, vol, name, stream, meter)
        if stream.how != "zfs":
            raise generic.unhandled_stream("zfs", stream.how, stream)
        ds = self._ds(vol)
        try:
            SnapshotName(name)
            exists = self._exists(ds)
            if stream.parent is None:
                if exists:
                    raise AlreadyExists(
                        f"volume {vol} already exists; a full zfs stream creates it",
                        "delete it first, or send incrementally from a shared snapshot",
                    )
                self._ensure_parent(vol)
            else:
                if not exists:
                    raise NotFound(f"volume {vol} does not exist for an incremental stream")
                snaps = self._snapshots(ds)
                if name in snaps:
                    raise AlreadyExists(f"snapshot {vol}/{name} already exists")
                newest = snaps[-1] if snaps else None
                if newest != stream.parent:
                    why = (
                        f"its newest snapshot is {newest}"
                        if newest and not newest.startswith(CLONE_PREFIX)
                        else "it has no snapshots" if newest is None
                        else "a clone of it was made after the last snapshot"
                    )
                    raise InvalidState(
                        f"cannot receive {stream.parent}..{name} into {vol}: {why}, not "
                        f"{stream.parent}",
                        "zfs can only add to the newest snapshot; nothing was changed",
                    )
        except BaseException:
            stream.kill()
            raise
        # -F only rolls back changes made since the newest snapshot (a refresh overwrites
        # them anyway); the check above guarantees no snapshot is ever destroyed by it.
        # -u: nothing is mounted by the receive itself, so a property the stream carries
        # (``zfs send -p``: a mountpoint over a host directory, canmount...) is dropped
        # (``_drop_received_properties``) before the dataset is first mounted. Naming the
        # snapshot makes zfs refuse a replication (-R) stream, which could add datasets.
        argv = ["zfs", "receive", "-u", *(["-F"] if stream.parent else []), f"{ds}@{name}"]
        if stream.parent is None:
            try:
                receive_with(argv, stream, meter, no_space_markers=NO_SPACE)
                self._check_received(vol, ds)
                self._drop_received_properties(ds)
                self._mount(ds)
            except BaseException:
                self._settle_failed_receive(ds)
                raise
            return Snapshot(vol, name, None)
        # Received while mounted (into an unmounted dataset, zfs-fuse sometimes fails with
        # "I/O error"), then mounted again: zfs-fuse does not invalidate the kernel's cache,
        # which would show the old content for up to an hour.
        try:
            receive_with(argv, stream, meter, no_space_markers=NO_SPACE)
        except BaseException:
            stream.kill()
            if self._settle_failed_receive(f"{ds}@{name}"):
                # the daemon completed it after all: back to the parent's content
                run_zfs(["zfs", "rollback", f"{ds}@{stream.parent}"])
            with contextlib.suppress(MigratorError):  # it may have set properties anyway
                self._drop_received_properties(ds)
            raise
        self._drop_received_properties(ds)
        self._unmount(ds)
        self._mount(ds)
        return Snapshot(vol, name, None)

    def _check_received(self, vol: VolumeRef, ds: str) -> None:
        """A full stream must have made one filesystem (not a zvol, nothing below it)."""
        r = run_zfs(["zfs", "list", "-H", "-r", "-o", "name,type", ds])
        rows = [line.split("\t") for line in r.stdout.splitlines()]
        if rows != [[ds, "filesystem"]]:
            made = ", ".join(f"{n} ({t})" for n, t in rows)
            raise UnsafeArchive(f"the zfs stream received as volume {vol} made {made}, not "
                                "one filesystem", "nothing was kept; do not trust its source")

    def _drop_received_properties(self, ds: str) -> None:
        """Reset every property a stream set on ``ds`` (``zfs send -p`` carries them): a
        received value takes precedence over the inherited one, so a ``mountpoint`` would
        mount the volume over a host directory, ``canmount=off`` hide it, a quota or
        reservation take the pool's space. Inherited again where zfs allows, else set to
        its default (these properties cannot be inherited)."""
        r = run_zfs(["zfs", "get", "-H", "-s", "received", "-o", "property", "all", ds])
        for prop in r.stdout.split():
            if prop in NOT_INHERITABLE:
                run_zfs(["zfs", "set", f"{prop}={NOT_INHERITABLE[prop]}", ds])
            else:
                run_zfs(["zfs", "inherit", prop, ds])

    def _unmount(self, ds: str) -> None:
        """Unmount (busy is retried); a dataset that is not mounted is fine."""
        try:
            run_zfs(["zfs", "unmount", ds])
        except StorageError as e:
            if "not currently mounted" not in e.message:
                e.hint = "is a process using the volume? stop it and retry"
                raise

    def _mount(self, ds: str) -> None:
        """Mount (busy is retried: FUSE may still be letting go of the last mount)."""
        try:
            run_zfs(["zfs", "mount", ds])
        except StorageError as e:
            if "already mounted" not in e.message:
                raise

    def _settle_failed_receive(self, target: str) -> bool:
        """Remove what a failed receive left, once the daemon has let go of it.

        The daemon reads the stream itself: after the receiving command died it may still
        be finishing (and then hold the dataset busy), or even complete the receive, so the
        target is destroyed whenever it exists, until it is gone and stays gone.
        """
        deadline = time.monotonic() + RECEIVE_SETTLE
        quiet_since: float | None = None
        found = False
        while time.monotonic() < deadline:
            if self._exists(target):
                log.debug("failed receive left %s: destroying it", target)
                found = True
                quiet_since = None
                if "@" not in target:
                    proc.run(["zfs", "unmount", target], check=False)
                proc.run(["zfs", "destroy", *(["-r"] if "@" not in target else []), target],
                         check=False)
            else:
                now = time.monotonic()
                if quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= 0.5:
                    break
            time.sleep(0.1)
        if "@" not in target:
            _rmdirs(self.path / target[len(self.dataset) + 1:])
        if self._exists(target):
            raise StorageError(f"a failed receive left {target} behind and it cannot be "
                               "destroyed", f"destroy it by hand: zfs destroy -r {target}")
        return found
