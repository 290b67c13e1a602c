"""Custom storage volumes: directories in a pool, bind-mounted into containers at a path.

A volume lives on one pool with its own snapshots, and is copied, refreshed and moved by
the same journaled pipelines as container volumes (``migrator.pipelines.volume_copy``,
which sits a floor above this module and uses ``Volumes.pool_of``). Attachments are
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
from migrator.core.errors import AlreadyExists, InvalidInput, InvalidState, NotFound
from migrator.core.names import PoolName, SnapshotName, VolumeName, next_snapshot_name
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.state import AttachmentRecord, VolumeRecord, VolumeSnapshotRecord

_MOUNT_PATH = re.compile(r"^(/[A-Za-z0-9._+-]+)+/?$")


def volume_ref(name: str) -> VolumeRef:
    """The storage reference of custom volume ``name`` (validated as a volume name)."""
    return VolumeRef("custom", VolumeName(name))


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
        return volume_ref(name)

    def pool_of(self, name: str, pool: str | None) -> str:
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
        pool_name = self.pool_of(name, pool)
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
        pool_name = self.pool_of(name, pool)
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
        running = self.cts.run_state(rec.name) != "STOPPED"
        if not running:
            self.cts.render_lxc_config(rec.name)
        return running

    def detach(self, name: str, container: str, pool: str | None = None) -> bool:
        pool_name = self.pool_of(name, pool)
        rec = self.cts.get(container)
        if not self.state.list_attachments(rec.name, pool_name, name):
            raise InvalidInput(f"volume {name!r} is not attached to {rec.name!r}")
        with self.state.transaction():
            self.state.delete_attachment(rec.name, pool_name, name)
        running = self.cts.run_state(rec.name) != "STOPPED"
        if not running:
            self.cts.render_lxc_config(rec.name)
        return running

    # snapshots ----------------------------------------------------------------------------
    def snapshot_create(self, name: str, snap: str | None, pool: str | None = None) -> str:
        pool_name = self.pool_of(name, pool)
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
        return self.state.list_volume_snapshots(self.pool_of(name, pool), name)

    def snapshot_delete(self, name: str, snap: str, pool: str | None = None) -> None:
        pool_name = self.pool_of(name, pool)
        if snap not in {s.name for s in self.state.list_volume_snapshots(pool_name, name)}:
            raise InvalidInput(f"volume {name!r} has no snapshot {snap!r}")
        self.host.backend(pool_name).delete_snapshot(self._ref(name), SnapshotName(snap))
        with self.state.transaction():
            self.state.delete_volume_snapshot(pool_name, name, snap)
