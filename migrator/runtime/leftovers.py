"""What an interrupted transfer leaves on a target, and how it is undone.

A receive that was cut off can leave a partial volume, or snapshots without their volume,
or (into an existing container, a refresh) snapshots no record knows. The records are the
truth: whatever on disk no record owns is debris and goes; what a record owns stays.
"""

from __future__ import annotations

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.names import SnapshotName
from migrator.runtime.containers import Containers


def remove_leftover(backend: StorageBackend, vol: VolumeRef) -> bool:
    """Delete whatever of ``vol`` is on disk, volume and/or snapshots (an interrupted
    receive can leave snapshots without the volume); True if there was anything."""
    if backend.volume_exists(vol) or backend.list_snapshots(vol):
        backend.delete_volume(vol)
        return True
    return False


def drop_unrecorded_snapshots(backend: StorageBackend, vol: VolumeRef,
                              known: set[str]) -> list[str]:
    """Delete the snapshots of ``vol`` on disk whose names are not in ``known`` (the
    recorded ones), temporary ones included; returns their names."""
    dropped = [s.name for s in backend.list_snapshots(vol) if s.name not in known]
    for snap in dropped:
        backend.delete_snapshot(vol, SnapshotName(snap))
    return dropped


def undo_partial_target(cts: Containers, name: str, pool: str) -> list[str] | None:
    """Undo an unfinished transfer into container ``name`` on ``pool`` of this host.

    No record owns it there: the partial volume goes (returns None). A recorded container
    (a refresh target) keeps its recorded snapshots and loses the others, temporary ones
    included (returned).
    """
    backend = cts.host.backend(pool)
    vol = VolumeRef("container", name)
    if not (cts.state.has_container(name) and cts.state.get_container(name).pool == pool):
        remove_leftover(backend, vol)
        return None
    return drop_unrecorded_snapshots(backend, vol,
                                     {s.name for s in cts.state.list_snapshots(name)})


def undo_partial_volume(cts: Containers, pool: str, name: str) -> list[str] | None:
    """Undo an unfinished copy into custom volume ``name`` on ``pool`` of this host, as
    ``undo_partial_target`` does for a container: no record, the partial volume goes
    (None); a recorded volume (a refresh target) loses its unrecorded snapshots (returned)."""
    backend = cts.host.backend(pool)
    vol = VolumeRef("custom", name)
    if not any(v.name == name for v in cts.state.list_volumes(pool)):
        remove_leftover(backend, vol)
        return None
    return drop_unrecorded_snapshots(backend, vol,
                                     {s.name for s in cts.state.list_volume_snapshots(pool, name)})
