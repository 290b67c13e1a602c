"""Container copy, refresh, move between pools, and rename on one host.

Every pipeline here is staged with undo (``Stages``): the source is only read (through a
temporary snapshot) until the target is complete and verified, and the state store changes
in one transaction at the end, so an error at any point leaves the container whole where it
was and the target cleaned up. Temporary snapshots are named ``migrate.xfer-*``; any left by
an interrupted run are removed at the next run on that volume.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.errors import AlreadyExists, InvalidInput, InvalidState, MigratorError
from migrator.core.names import ContainerName, PoolName, SnapshotName
from migrator.pipelines.target_check import verify_volume
from migrator.pipelines.transfer import (
    NATIVE_TYPES,
    Plan,
    SnapInfo,
    execute,
    negotiate,
    plan_transfer,
    temp_snapshot_name,
)
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.network import allocate_ipv4
from migrator.runtime.operations import journaled
from migrator.runtime.state import ContainerRecord, SnapshotRecord
from migrator.streams import Progress, TransferStats, no_progress

TEMP_PREFIX = "migrate.xfer-"


@dataclass
class CopyResult:
    """What a copy, refresh or move did (the CLI prints it; ``--format json`` dumps it)."""

    source: str
    target: str
    pool: str
    method: str
    bytes: int = 0
    seconds: float = 0.0
    snapshots_added: list[str] = field(default_factory=list)
    snapshots_skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    downtime: float | None = None
    verified: str | None = None
    operation: str | None = None
    negotiated: str | None = None  # between hosts: method, link, compression and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_stale_temp_snapshots(backend: StorageBackend, vol: VolumeRef) -> list[str]:
    """Remove ``migrate.xfer-*`` snapshots an interrupted transfer left on a volume."""
    stale = [s.name for s in backend.list_snapshots(vol) if s.name.startswith(TEMP_PREFIX)]
    for name in stale:
        backend.delete_snapshot(vol, SnapshotName(name))
    return stale


def remove_leftover(backend: StorageBackend, vol: VolumeRef) -> bool:
    """Delete whatever of ``vol`` is on disk, volume and/or snapshots (an interrupted
    receive can leave snapshots without the volume); True if there was anything."""
    if backend.volume_exists(vol) or backend.list_snapshots(vol):
        backend.delete_volume(vol)
        return True
    return False


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
    known = {s.name for s in cts.state.list_snapshots(name)}
    dropped = [s.name for s in backend.list_snapshots(vol) if s.name not in known]
    for snap in dropped:
        backend.delete_snapshot(vol, SnapshotName(snap))
    return dropped


@contextlib.contextmanager
def consistent_snapshot(
    cts: Containers, rec: ContainerRecord, backend: StorageBackend, vol: VolumeRef,
    notes: list[str], keep: bool = False, name: SnapshotName | None = None,
) -> Iterator[SnapshotName]:
    """A temporary snapshot of the container's volume, taken while it is frozen if running.

    Freezing makes the snapshot one instant of the whole filesystem (crash-consistent);
    it lasts as long as the driver's snapshot (instant on btrfs/zfs, a copy on dir).
    ``name`` replaces the ``migrate.xfer-*`` default for a snapshot that must survive
    ``clean_stale_temp_snapshots`` (a backup's incremental base).
    """
    name = name or temp_snapshot_name()
    state = cts.lxc.state(rec.name)
    if state == "RUNNING":
        t0 = time.monotonic()
        cts.lxc.freeze(rec.name)
        try:
            backend.snapshot(vol, name)
        finally:
            cts.lxc.unfreeze(rec.name)
        frozen = time.monotonic() - t0
        if frozen > 1:
            notes.append(f"source was frozen {frozen:.1f}s for a consistent snapshot")
    else:
        backend.snapshot(vol, name)
    try:
        yield name
    except BaseException:
        with contextlib.suppress(MigratorError):
            backend.delete_snapshot(vol, name)
        raise
    if not keep:  # kept: the caller sends an increment from it later, then deletes it
        with contextlib.suppress(MigratorError):
            backend.delete_snapshot(vol, name)


def _copyable_config(config: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in config.items() if not k.startswith("volatile.")}


def native_base_ok(src: StorageBackend, src_vol: VolumeRef, dst: StorageBackend,
                    dst_vol: VolumeRef) -> Any:
    def check(name: str) -> bool:
        a = {s.name: s for s in src.list_snapshots(src_vol)}.get(name)
        b = {s.name: s for s in dst.list_snapshots(dst_vol)}.get(name)
        if a is None or b is None:
            return False
        ida, idb = src.snapshot_identity(a), dst.snapshot_identity(b)
        return ida is not None and ida == idb
    return check


def copy_container(
    cts: Containers,
    source: str,
    target: str,
    pool: str | None = None,
    instance_only: bool = False,
    refresh: bool = False,
    allow_inconsistent: bool = False,
    progress: Progress = no_progress,
) -> CopyResult:
    """Copy a container (with its snapshots unless ``instance_only``) to a new name.

    With ``refresh`` and an existing (stopped) target, only what changed since the newest
    shared snapshot is sent and missing snapshots are added (see ``migrator.pipelines.transfer``).
    """
    t0 = time.monotonic()
    host, state = cts.host, cts.state
    src = cts.get(source)
    dst_name = ContainerName(target)
    if dst_name == src.name:
        raise InvalidInput("source and target are the same container", "give another name")
    exists = state.has_container(dst_name)
    dst_rec: ContainerRecord | None = state.get_container(dst_name) if exists else None
    if exists and not refresh:
        raise AlreadyExists(f"container {dst_name!r} already exists",
                            "add --refresh to update it from the source")
    if dst_rec is not None:
        if pool and PoolName(pool) != dst_rec.pool:
            raise InvalidInput(f"{dst_name!r} is on pool {dst_rec.pool!r}, not {pool!r}",
                               "a refresh keeps the target's pool; move it afterwards")
        if cts.lxc.state(dst_name) != "STOPPED":
            raise InvalidState(f"target {dst_name!r} is running",
                               f"stop it first: `migrate stop {dst_name}`")
    elif (host.lxcpath / dst_name).exists():
        raise AlreadyExists(f"{host.lxcpath / dst_name} exists", "remove the leftover directory")
    dst_pool = dst_rec.pool if dst_rec else (PoolName(pool) if pool else src.pool)
    src_b, dst_b = host.backend(src.pool), host.backend(dst_pool)
    src_vol, dst_vol = VolumeRef("container", src.name), VolumeRef("container", dst_name)
    result = CopyResult(src.name, dst_name, dst_pool, "")
    clean_stale_temp_snapshots(src_b, src_vol)
    if dst_rec is None and remove_leftover(dst_b, dst_vol):  # no record owns it: debris
        result.notes.append(f"removed an unfinished copy of {dst_name} left on {dst_pool}")
    elif dst_rec is not None:
        clean_stale_temp_snapshots(dst_b, dst_vol)

    src_snaps = state.list_snapshots(src.name)
    src_infos = [SnapInfo(s.name, s.uuid) for s in src_snaps]
    dst_infos = ([SnapInfo(s.name, s.uuid) for s in state.list_snapshots(dst_name)]
                 if dst_rec else None)
    how = negotiate(src_b.migration_types(), dst_b.migration_types())
    plan = plan_transfer(src_infos, dst_infos, how, native_base_ok(src_b, src_vol, dst_b, dst_vol))
    if instance_only:
        plan.send, plan.skipped = [], []
        plan.notes = [n for n in plan.notes if not n.startswith("skipped")]
    result.method = plan.how
    running = cts.lxc.state(src.name) != "STOPPED"
    by_name = {s.name: s for s in src_snaps}
    added: list[str] = []
    keep: SnapshotName | None = None
    if dst_rec is not None and plan.how == "rsync" and dst_b.cheap_snapshots:
        keep = temp_snapshot_name()

    with journaled(state, "refresh" if dst_rec else "copy", container=src.name,
                   target=dst_name, pool=dst_pool, method=plan.how) as op, Stages() as st:
        result.operation = op.id
        op.stage("copy")
        if dst_rec is None:
            st.add_undo("delete target volume", lambda: dst_b.delete_volume(dst_vol))
        else:
            def drop_added() -> None:
                for n in added:
                    dst_b.delete_snapshot(dst_vol, SnapshotName(n))

            st.add_undo("delete added snapshots", drop_added)
            if keep is not None:
                # rsync rewrites the target in place: keep its content to put back on failure
                # (only where a snapshot is free; a dir target is completed by a re-run)
                saved: SnapshotName = keep
                dst_b.snapshot(dst_vol, saved)

                def put_back() -> None:
                    dst_b.restore_snapshot(dst_vol, saved)
                    dst_b.delete_snapshot(dst_vol, saved)

                st.add_undo("restore target", put_back)
        live = plan.how == "rsync" and (not running or allow_inconsistent)
        if live and running:
            result.notes.append("copied from the running container without a snapshot "
                                "(--allow-inconsistent)")
        with contextlib.ExitStack() as stack:
            final: str | Path
            if live:
                final = src_b.volume_path(src_vol)
            else:
                final = stack.enter_context(
                    consistent_snapshot(cts, src, src_b, src_vol, result.notes))
            stats = execute(plan, src_b, src_vol, dst_b, dst_vol, final, progress,
                            done=added.append)
        _merge(result, stats)
        op.stage("commit", added=added)
        with state.transaction():
            conf = _copyable_config(src.config)
            if dst_rec is None:
                ipv4 = allocate_ipv4(host.network_config(), state.used_ipv4())
                new = ContainerRecord(dst_name, dst_pool, src.image, ipv4, conf)
                state.add_container(new)
            else:
                state.update_container_config(dst_name, conf)
            for name in added:
                s = by_name[name]
                state.add_snapshot(SnapshotRecord(dst_name, name, s.created, dict(s.config),
                                                  s.expires, s.uuid))
        st.add_undo("remove record", lambda: _forget(cts, dst_name) if dst_rec is None else None)
        cts.lxc.write_config(cts.spec(cts.get(dst_name)))
        if keep is not None:
            dst_b.delete_snapshot(dst_vol, keep)
    result.seconds = time.monotonic() - t0
    return result


def _forget(cts: Containers, name: str) -> None:
    with cts.state.transaction():
        cts.state.delete_container(name)
    cts.lxc.remove_config(name)


def _merge(result: CopyResult, stats: TransferStats) -> None:
    result.bytes += stats.bytes
    result.snapshots_added.extend(stats.snapshots)
    result.snapshots_skipped.extend(stats.skipped)
    result.notes.extend(n for n in stats.notes if n not in result.notes)


def move_container(
    cts: Containers,
    name: str,
    pool: str,
    verify: bool = False,
    progress: Progress = no_progress,
) -> CopyResult:
    """Move a container and all its snapshots to another pool (any pair of drivers).

    A running container is copied live first, then stopped for a final incremental sync
    and started on the new pool; ``downtime`` says how long it was down. The target is
    verified (file list and metadata, plus a checksum sample or, with ``verify``, every
    file) before the state store points at it and the source is deleted.
    """
    t0 = time.monotonic()
    host, state = cts.host, cts.state
    rec = cts.get(name)
    pool = PoolName(pool)
    if rec.pool == pool:
        raise InvalidInput(f"{rec.name!r} is already on pool {pool!r}")
    status = cts.lxc.state(rec.name)
    if status == "FROZEN":
        raise InvalidState(f"{rec.name!r} is frozen",
                           f"unfreeze it first: `migrate unfreeze {rec.name}`")
    running = status == "RUNNING"
    src_b, dst_b = host.backend(rec.pool), host.backend(pool)
    vol = VolumeRef("container", rec.name)
    result = CopyResult(rec.name, rec.name, pool, "")
    clean_stale_temp_snapshots(src_b, vol)
    if remove_leftover(dst_b, vol):  # debris of an interrupted move: the record is on rec.pool
        result.notes.append(f"removed an unfinished copy left on {pool} by an interrupted move")
    infos = [SnapInfo(s.name, s.uuid) for s in state.list_snapshots(rec.name)]
    how = negotiate(src_b.migration_types(), dst_b.migration_types())
    plan = plan_transfer(infos, None, how)
    result.method = plan.how
    stopped_at: float | None = None

    with journaled(state, "move", container=rec.name, from_pool=rec.pool, to_pool=pool,
                   was_running=running, method=plan.how) as op, Stages() as st:
        result.operation = op.id
        op.stage("copy")
        st.add_undo("delete target volume", lambda: dst_b.delete_volume(vol))
        if running:
            st.add_undo("restart on source", lambda: _restart_if_stopped(cts, rec.name))
        # pass 1: everything, from a consistent snapshot (live if running)
        with consistent_snapshot(cts, rec, src_b, vol, result.notes) as first:
            stats = execute(plan, src_b, vol, dst_b, vol, first, progress,
                            keep_final=running)
            _merge(result, stats)
            if running:
                # pass 2: stop, send what changed since pass 1, start on the new pool
                op.stage("final-sync")
                stopped_at = time.monotonic()
                cts.lxc.stop(rec.name)
                with consistent_snapshot(cts, rec, src_b, vol, result.notes) as last:
                    base = first if plan.how in NATIVE_TYPES else None
                    final_plan = Plan(plan.how, base, [])
                    stats = execute(final_plan, src_b, vol, dst_b, vol, last, progress)
                    result.bytes += stats.bytes
                with contextlib.suppress(MigratorError):
                    dst_b.delete_snapshot(vol, SnapshotName(first))
        op.stage("verify")
        result.verified = verify_volume(src_b, dst_b, vol, full=verify)
        sync_filesystem(dst_b.volume_path(vol))  # the new copy on disk before...
        op.stage("switch")
        with state.transaction(durable=True):  # ...the record points at it, durably
            state.set_container_pool(rec.name, pool)
        st.add_undo("point back at source", lambda: _set_pool(cts, rec.name, rec.pool))
        if running:
            cts.start(rec.name)
            assert stopped_at is not None
            result.downtime = time.monotonic() - stopped_at
        else:
            cts.lxc.write_config(cts.spec(cts.get(rec.name)))
        op.stage("delete-source")
        try:
            src_b.delete_volume(vol)
        except Exception as e:  # noqa: BLE001 - the move is done; the old copy is garbage now
            result.notes.append(f"could not remove the old copy on {rec.pool}: {e}; delete "
                                f"{src_b.volume_path(vol)} by hand")
    result.seconds = time.monotonic() - t0
    return result


def _set_pool(cts: Containers, name: str, pool: str) -> None:
    with cts.state.transaction():
        cts.state.set_container_pool(name, pool)
    cts.lxc.write_config(cts.spec(cts.get(name)))


def _restart_if_stopped(cts: Containers, name: str) -> None:
    if cts.lxc.state(name) == "STOPPED":
        cts.start(name)


def rename_container(cts: Containers, old: str, new: str) -> None:
    """Rename a stopped container: its volume, snapshots, LXC directory and records."""
    rec = cts.get(old)
    new_name = ContainerName(new)
    if cts.state.has_container(new_name) or (cts.host.lxcpath / new_name).exists():
        raise AlreadyExists(f"container {new_name!r} already exists", "pick another name")
    if cts.lxc.state(rec.name) != "STOPPED":
        raise InvalidState(f"{rec.name!r} is running", f"stop it first: `migrate stop {rec.name}`")
    backend = cts.host.backend(rec.pool)
    old_vol, new_vol = VolumeRef("container", rec.name), VolumeRef("container", new_name)
    with Stages() as st:
        backend.rename_volume(old_vol, new_vol)
        st.add_undo("rename volume back", lambda: backend.rename_volume(new_vol, old_vol))
        cts.state.rename_container(rec.name, new_name)
        st.add_undo("rename record back", lambda: cts.state.rename_container(new_name, rec.name))
        cts.lxc.write_config(cts.spec(cts.get(new_name)))
        cts.lxc.remove_config(rec.name)
