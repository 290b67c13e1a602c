"""Custom volume copy, refresh and move between pools (or names) on one host.

These are the container pipelines of ``migrator.pipelines.copy`` for a volume that belongs
to no container: the same plan, the same journaled ``copy`` stage with its undo
(``transfer_stage``), the same verify-then-switch order for a move. What differs is the
record (a volume and its snapshots instead of a container) and the reading of the source:
a plain temporary snapshot, since no container is frozen for a volume; a volume in use by
a running container is not refreshed over or moved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.errors import AlreadyExists, InvalidInput, InvalidState, MigratorError
from migrator.core.names import PoolName, VolumeName
from migrator.pipelines.copy import (
    CopyResult,
    StagedTransfer,
    native_base_ok,
    transfer_stage,
)
from migrator.pipelines.target_check import verify_volume
from migrator.pipelines.transfer import Plan, SnapInfo, negotiate, plan_transfer
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.leftovers import remove_leftover
from migrator.runtime.operations import Operation, journaled
from migrator.runtime.state import VolumeRecord, VolumeSnapshotRecord
from migrator.runtime.temp_snapshots import clean_stale_temp_snapshots, temporary_snapshot
from migrator.runtime.volumes import Volumes, volume_ref
from migrator.streams import Progress, no_progress


def _exists(cts: Containers, pool: str, name: str) -> bool:
    return any(v.name == name for v in cts.state.list_volumes(pool))


@contextlib.contextmanager
def _transfer(
    op: Operation, st: Stages, plan: Plan, result: CopyResult,
    src_b: StorageBackend, src_ref: VolumeRef, dst_b: StorageBackend, dst_ref: VolumeRef,
    *, target_existed: bool, progress: Progress,
) -> Iterator[StagedTransfer]:
    """``transfer_stage`` for a volume: the source is read through a plain temporary
    snapshot (no container to freeze), and ``result`` counts what moved before the block
    records it."""
    with transfer_stage(op, st, plan, src_b, src_ref, dst_b, dst_ref,
                        target_existed=target_existed,
                        read_source=lambda: temporary_snapshot(src_b, src_ref),
                        progress=progress) as staged:
        result.merge(staged.stats)
        yield staged


def copy_volume(
    cts: Containers, name: str, target: str, pool: str | None = None,
    target_pool: str | None = None, refresh: bool = False, volume_only: bool = False,
    progress: Progress = no_progress,
) -> CopyResult:
    """Copy a volume (with snapshots) to another name and/or pool; ``refresh`` updates."""
    t0 = time.monotonic()
    state = cts.state
    src_pool = Volumes(cts).pool_of(name, pool)
    dst_pool = PoolName(target_pool) if target_pool else src_pool
    tname = VolumeName(target)
    if (src_pool, name) == (dst_pool, tname):
        raise InvalidInput("source and target are the same volume")
    exists = _exists(cts, dst_pool, tname)
    if exists and not refresh:
        raise AlreadyExists(f"volume {tname!r} already exists on pool {dst_pool!r}",
                            "add --refresh to update it")
    result = CopyResult(name, tname, dst_pool, "")
    src_b, dst_b = cts.host.backend(src_pool), cts.host.backend(dst_pool)
    src_ref, dst_ref = volume_ref(name), volume_ref(tname)
    clean_stale_temp_snapshots(src_b, src_ref)
    if not exists and remove_leftover(dst_b, dst_ref):  # no record owns it: debris
        result.notes.append("removed an unfinished copy left by an interrupted run")
    if exists and any(a for a in state.list_attachments(pool=dst_pool, volume=tname)
                      if cts.run_state(a.container) != "STOPPED"):
        raise InvalidState(f"target volume {tname!r} is in use by a running container")
    if exists:
        clean_stale_temp_snapshots(dst_b, dst_ref)
    src_snaps = state.list_volume_snapshots(src_pool, name)
    dst_snaps = state.list_volume_snapshots(dst_pool, tname) if exists else None
    how = negotiate(src_b.migration_types(), dst_b.migration_types())
    plan = plan_transfer([SnapInfo(s.name, s.uuid) for s in src_snaps],
                         [SnapInfo(s.name, s.uuid) for s in dst_snaps]
                         if dst_snaps is not None else None,
                         how, native_base_ok(src_b, src_ref, dst_b, dst_ref))
    if volume_only:
        plan.send, plan.skipped = [], []
    result.method = plan.how
    by_name = {s.name: s for s in src_snaps}
    with journaled(state, "volume-refresh" if exists else "volume-copy", volume=name,
                   pool=src_pool, target=tname, target_pool=dst_pool,
                   method=plan.how) as op, Stages() as st:
        result.operation = op.id
        with _transfer(op, st, plan, result, src_b, src_ref, dst_b, dst_ref,
                       target_existed=exists, progress=progress) as staged:
            op.stage("commit", added=staged.added)
            with state.transaction():
                if not exists:
                    state.add_volume(VolumeRecord(dst_pool, "custom", tname))
                for n in staged.added:
                    s = by_name[n]
                    state.add_volume_snapshot(
                        VolumeSnapshotRecord(dst_pool, "custom", tname, n, s.created, s.uuid))
    result.seconds = time.monotonic() - t0
    return result


def move_volume(
    cts: Containers, name: str, target_pool: str | None = None, new_name: str | None = None,
    pool: str | None = None, verify: bool = False, progress: Progress = no_progress,
) -> CopyResult:
    """Move a volume to another pool and/or rename it; the source goes only once the
    target is verified and the record points at it. Volumes attached to a running
    container are refused."""
    t0 = time.monotonic()
    state = cts.state
    src_pool = Volumes(cts).pool_of(name, pool)
    dst_pool = PoolName(target_pool) if target_pool else src_pool
    tname = VolumeName(new_name) if new_name else VolumeName(name)
    users = state.list_attachments(pool=src_pool, volume=name)
    running = [a.container for a in users if cts.run_state(a.container) != "STOPPED"]
    if running:
        raise InvalidState(f"volume {name!r} is in use by running {', '.join(running)}",
                           "stop those containers first")
    src_ref, dst_ref = volume_ref(name), volume_ref(tname)
    if dst_pool == src_pool:
        if tname == name:
            raise InvalidInput("nothing to do: same pool and name")
        backend = cts.host.backend(src_pool)
        with Stages() as st:
            backend.rename_volume(src_ref, dst_ref)
            st.add_undo("rename back", lambda: backend.rename_volume(dst_ref, src_ref))
            with state.transaction():
                state.move_volume(src_pool, name, dst_pool, tname)
        return CopyResult(name, tname, dst_pool, "rename", seconds=time.monotonic() - t0)
    if _exists(cts, dst_pool, tname):
        raise AlreadyExists(f"volume {tname!r} already exists on pool {dst_pool!r}")
    result = CopyResult(name, tname, dst_pool, "")
    src_b, dst_b = cts.host.backend(src_pool), cts.host.backend(dst_pool)
    clean_stale_temp_snapshots(src_b, src_ref)
    if remove_leftover(dst_b, dst_ref):  # debris of an interrupted move: no record owns it
        result.notes.append("removed an unfinished copy left by an interrupted run")
    infos = [SnapInfo(s.name, s.uuid) for s in state.list_volume_snapshots(src_pool, name)]
    plan = plan_transfer(infos, None, negotiate(src_b.migration_types(),
                                                dst_b.migration_types()))
    result.method = plan.how
    with journaled(state, "volume-move", volume=name, from_pool=src_pool, to_pool=dst_pool,
                   target=tname, method=plan.how) as op, Stages() as st:
        result.operation = op.id
        with _transfer(op, st, plan, result, src_b, src_ref, dst_b, dst_ref,
                       target_existed=False, progress=progress):
            pass  # a move records nothing here: the switch below repoints the record
        op.stage("verify")
        result.verified = verify_volume(src_b, dst_b, src_ref, full=verify, dst_vol=dst_ref)
        sync_filesystem(dst_b.volume_path(dst_ref))  # the new copy on disk before...
        op.stage("switch")
        with state.transaction(durable=True):  # ...the record (with its snapshots and
            state.move_volume(src_pool, name, dst_pool, tname)  # attachments) points at it
        st.add_undo("point back at source", lambda: _move_record(cts, dst_pool, tname,
                                                                 src_pool, name))
        op.stage("delete-source")
        try:
            src_b.delete_volume(src_ref)
        except MigratorError as e:  # the move is done; the old copy is garbage now
            result.notes.append(f"could not remove the old copy: {e}")
    for a in users:  # their mount entries name the new place from the next start
        cts.render_lxc_config(a.container)
    result.seconds = time.monotonic() - t0
    return result


def _move_record(cts: Containers, pool: str, name: str, new_pool: str, new_name: str) -> None:
    with cts.state.transaction():
        cts.state.move_volume(pool, name, new_pool, new_name)

