"""Custom storage volumes: directories in a pool, bind-mounted into containers at a path.

A volume lives on one pool with its own snapshots, and is copied, refreshed and moved by
the same transfer machinery as container volumes (``migrator.pipelines.transfer``). Attachments are
rows in the state store; a container's LXC config gets one ``lxc.mount.entry`` per
attachment when it starts, so attach and detach take effect at the next start.

Ownership: a new volume's top directory belongs to the containers' root (uid 100000 for
unprivileged containers, 0 for privileged), set when it is first attached; files inside are
never re-owned.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from migrator.backends import VolumeRef
from migrator.core.errors import AlreadyExists, InvalidInput, InvalidState, MigratorError, NotFound
from migrator.core.names import PoolName, SnapshotName, VolumeName, next_snapshot_name
from migrator.pipelines.copy import CopyResult, clean_stale_temp_snapshots, native_base_ok
from migrator.pipelines.target_check import verify_volume
from migrator.pipelines.transfer import (
    SnapInfo,
    execute,
    negotiate,
    plan_transfer,
    temp_snapshot_name,
)
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.state import AttachmentRecord, VolumeRecord, VolumeSnapshotRecord
from migrator.streams import Progress, no_progress

_MOUNT_PATH = re.compile(r"^(/[A-Za-z0-9._+-]+)+/?$")


def validate_mount_path(path: str) -> str:
    """An absolute path without '..', spaces or odd characters (it goes into LXC config)."""
    if not _MOUNT_PATH.fullmatch(path) or any(p in ("..", ".") for p in path.split("/")):
        raise InvalidInput(f"invalid mount path {path!r}",
                           "give an absolute path inside the container, e.g. /srv/data")
    return path.rstrip("/") or "/"


@dataclass
class VolumeInfo:
    pool: str
    name: str
    path: str
    used_by: list[str]
    snapshots: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Volumes:
    """Custom volumes of one host."""

    def __init__(self, cts: Containers) -> None:
        self.cts = cts
        self.host = cts.host
        self.state = cts.state

    def _ref(self, name: str) -> VolumeRef:
        return VolumeRef("custom", VolumeName(name))

    def _pool_of(self, name: str, pool: str | None) -> str:
        """The pool a volume is on: given, or the only pool that has a volume of that name."""
        if pool:
            return self.state.get_volume(PoolName(pool), VolumeName(name)).pool
        found = [v for v in self.state.list_volumes() if v.name == name]
        if not found:
            raise NotFound(f"volume {name!r} not found", "see `migrate volume list`")
        if len(found) > 1:
            raise InvalidInput(f"volume {name!r} exists on several pools",
                               "say which with --pool")
        return found[0].pool

    def create(self, name: str, pool: str | None = None) -> VolumeRecord:
        vname = VolumeName(name)
        pool_name = PoolName(pool) if pool else self.host.default_pool()
        backend = self.host.backend(pool_name)
        ref = self._ref(vname)
        if backend.volume_exists(ref):
            raise AlreadyExists(f"volume {vname!r} already exists on pool {pool_name!r}")
        with Stages() as st:
            backend.create_volume(ref)
            st.add_undo("delete volume", lambda: backend.delete_volume(ref))
            with self.state.transaction():
                self.state.add_volume(VolumeRecord(pool_name, "custom", vname))
        return self.state.get_volume(pool_name, vname)

    def list_all(self, pool: str | None = None) -> list[VolumeInfo]:
        out = []
        for v in self.state.list_volumes(pool):
            users = [a.container for a in self.state.list_attachments(pool=v.pool, volume=v.name)]
            out.append(VolumeInfo(
                v.pool, v.name, str(self.host.backend(v.pool).volume_path(self._ref(v.name))),
                users, len(self.state.list_volume_snapshots(v.pool, v.name)),
            ))
        return out

    def delete(self, name: str, pool: str | None = None) -> None:
        pool_name = self._pool_of(name, pool)
        users = self.state.list_attachments(pool=pool_name, volume=name)
        if users:
            raise InvalidState(
                f"volume {name!r} is attached to {', '.join(a.container for a in users)}",
                "detach it first: `migrate volume detach VOLUME CONTAINER`",
            )
        self.host.backend(pool_name).delete_volume(self._ref(name))
        with self.state.transaction():
            self.state.delete_volume(pool_name, name)

    # attachments --------------------------------------------------------------------------
    def attach(self, name: str, container: str, path: str, pool: str | None = None) -> bool:
        """Attach; returns True when the container is running (effective at next start)."""
        pool_name = self._pool_of(name, pool)
        rec = self.cts.get(container)
        mount_path = validate_mount_path(path)
        vol_dir = self.host.backend(pool_name).volume_path(self._ref(name))
        root_uid = 0 if cfg.is_true(rec.config, "security.privileged") else \
            idmap.default_idmap().base
        st = os.stat(vol_dir)
        if st.st_uid in (0, idmap.default_idmap().base) and st.st_uid != root_uid \
                and not any(vol_dir.iterdir()):
            os.chown(vol_dir, root_uid, root_uid)
        with self.state.transaction():
            self.state.add_attachment(AttachmentRecord(rec.name, pool_name, name, mount_path))
        running = self.cts.lxc.state(rec.name) != "STOPPED"
        if not running:
            self.cts.lxc.write_config(self.cts.spec(rec))
        return running

    def detach(self, name: str, container: str, pool: str | None = None) -> bool:
        pool_name = self._pool_of(name, pool)
        rec = self.cts.get(container)
        if not self.state.list_attachments(rec.name, pool_name, name):
            raise InvalidInput(f"volume {name!r} is not attached to {rec.name!r}")
        with self.state.transaction():
            self.state.delete_attachment(rec.name, pool_name, name)
        running = self.cts.lxc.state(rec.name) != "STOPPED"
        if not running:
            self.cts.lxc.write_config(self.cts.spec(rec))
        return running

    # snapshots ----------------------------------------------------------------------------
    def snapshot_create(self, name: str, snap: str | None, pool: str | None = None) -> str:
        pool_name = self._pool_of(name, pool)
        existing = {s.name for s in self.state.list_volume_snapshots(pool_name, name)}
        if snap is None:
            snap = next_snapshot_name(existing)
        sname = SnapshotName(snap)
        if sname in existing:
            raise AlreadyExists(f"snapshot {name}/{sname} already exists")
        backend = self.host.backend(pool_name)
        with Stages() as st:
            backend.snapshot(self._ref(name), sname)
            st.add_undo("delete snapshot", lambda: backend.delete_snapshot(self._ref(name), sname))
            with self.state.transaction():
                self.state.add_volume_snapshot(
                    VolumeSnapshotRecord(pool_name, "custom", name, sname, time.time()))
        return sname

    def snapshot_list(self, name: str, pool: str | None = None) -> list[VolumeSnapshotRecord]:
        return self.state.list_volume_snapshots(self._pool_of(name, pool), name)

    def snapshot_delete(self, name: str, snap: str, pool: str | None = None) -> None:
        pool_name = self._pool_of(name, pool)
        if snap not in {s.name for s in self.state.list_volume_snapshots(pool_name, name)}:
            raise InvalidInput(f"volume {name!r} has no snapshot {snap!r}")
        self.host.backend(pool_name).delete_snapshot(self._ref(name), SnapshotName(snap))
        with self.state.transaction():
            self.state.delete_volume_snapshot(pool_name, name, snap)

    # copy / move --------------------------------------------------------------------------
    def copy(
        self, name: str, target: str, pool: str | None = None, target_pool: str | None = None,
        refresh: bool = False, volume_only: bool = False, progress: Progress = no_progress,
    ) -> CopyResult:
        """Copy a volume (with snapshots) to another name and/or pool; ``refresh`` updates."""
        t0 = time.monotonic()
        src_pool = self._pool_of(name, pool)
        dst_pool = PoolName(target_pool) if target_pool else src_pool
        tname = VolumeName(target)
        if (src_pool, name) == (dst_pool, tname):
            raise InvalidInput("source and target are the same volume")
        src_b, dst_b = self.host.backend(src_pool), self.host.backend(dst_pool)
        src_ref, dst_ref = self._ref(name), self._ref(tname)
        exists = any(v.name == tname for v in self.state.list_volumes(dst_pool))
        if exists and not refresh:
            raise AlreadyExists(f"volume {tname!r} already exists on pool {dst_pool!r}",
                                "add --refresh to update it")
        result = CopyResult(name, tname, dst_pool, "")
        clean_stale_temp_snapshots(src_b, src_ref)
        if not exists and dst_b.volume_exists(dst_ref):
            dst_b.delete_volume(dst_ref)
            result.notes.append("removed an unfinished copy left by an interrupted run")
        if exists and any(a for a in self.state.list_attachments(pool=dst_pool, volume=tname)
                          if self.cts.lxc.state(a.container) != "STOPPED"):
            raise InvalidState(f"target volume {tname!r} is in use by a running container")
        src_snaps = self.state.list_volume_snapshots(src_pool, name)
        dst_snaps = self.state.list_volume_snapshots(dst_pool, tname) if exists else None
        how = negotiate(src_b.migration_types(), dst_b.migration_types())
        plan = plan_transfer([SnapInfo(s.name, s.uuid) for s in src_snaps],
                             [SnapInfo(s.name, s.uuid) for s in dst_snaps]
                             if dst_snaps is not None else None,
                             how, native_base_ok(src_b, src_ref, dst_b, dst_ref))
        if volume_only:
            plan.send, plan.skipped = [], []
        result.method = plan.how
        added: list[str] = []
        by_name = {s.name: s for s in src_snaps}
        with Stages() as st:
            if not exists:
                st.add_undo("delete target", lambda: dst_b.delete_volume(dst_ref))
            else:
                def drop_added() -> None:
                    for n in added:
                        dst_b.delete_snapshot(dst_ref, SnapshotName(n))
                st.add_undo("delete added snapshots", drop_added)
            tmp = temp_snapshot_name()
            src_b.snapshot(src_ref, tmp)
            try:
                stats = execute(plan, src_b, src_ref, dst_b, dst_ref, tmp, progress,
                                done=added.append)
            finally:
                src_b.delete_snapshot(src_ref, tmp)
            with self.state.transaction():
                if not exists:
                    self.state.add_volume(VolumeRecord(dst_pool, "custom", tname))
                for n in added:
                    s = by_name[n]
                    self.state.add_volume_snapshot(
                        VolumeSnapshotRecord(dst_pool, "custom", tname, n, s.created, s.uuid))
        result.bytes = stats.bytes
        result.snapshots_added = stats.snapshots
        result.snapshots_skipped = stats.skipped
        result.notes += stats.notes
        result.seconds = time.monotonic() - t0
        return result

    def move(
        self, name: str, target_pool: str | None = None, new_name: str | None = None,
        pool: str | None = None, verify: bool = False, progress: Progress = no_progress,
    ) -> CopyResult:
        """Move a volume to another pool and/or rename it; the source goes only once the
        target is verified. Volumes attached to a running container are refused."""
        t0 = time.monotonic()
        src_pool = self._pool_of(name, pool)
        dst_pool = PoolName(target_pool) if target_pool else src_pool
        tname = VolumeName(new_name) if new_name else VolumeName(name)
        users = self.state.list_attachments(pool=src_pool, volume=name)
        running = [a.container for a in users if self.cts.lxc.state(a.container) != "STOPPED"]
        if running:
            raise InvalidState(f"volume {name!r} is in use by running {', '.join(running)}",
                               "stop those containers first")
        if dst_pool == src_pool:
            if tname == name:
                raise InvalidInput("nothing to do: same pool and name")
            backend = self.host.backend(src_pool)
            with Stages() as st:
                backend.rename_volume(self._ref(name), self._ref(tname))
                st.add_undo("rename back",
                            lambda: backend.rename_volume(self._ref(tname), self._ref(name)))
                with self.state.transaction():
                    self.state.move_volume(src_pool, name, dst_pool, tname)
            return CopyResult(name, tname, dst_pool, "rename",
                              seconds=time.monotonic() - t0)
        if any(v.name == tname for v in self.state.list_volumes(dst_pool)):
            raise AlreadyExists(f"volume {tname!r} already exists on pool {dst_pool!r}")
        result = self.copy(name, tname, src_pool, dst_pool, progress=progress)
        src_b, dst_b = self.host.backend(src_pool), self.host.backend(dst_pool)
        try:
            result.verified = verify_volume(src_b, dst_b, self._ref(name), full=verify,
                                            dst_vol=self._ref(tname))
            with self.state.transaction():
                # the copy's record goes; the original record (with its attachments) moves
                self.state.delete_volume(dst_pool, tname)
                self.state.move_volume(src_pool, name, dst_pool, tname)
        except MigratorError:
            dst_b.delete_volume(self._ref(tname))
            with self.state.transaction():
                self.state.delete_volume(dst_pool, tname)
            raise
        try:
            src_b.delete_volume(self._ref(name))
        except MigratorError as e:
            result.notes.append(f"could not remove the old copy: {e}")
        for a in users:
            self.cts.lxc.write_config(self.cts.spec(self.cts.get(a.container)))
        result.seconds = time.monotonic() - t0
        return result
