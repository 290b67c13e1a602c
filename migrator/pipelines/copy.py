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
from collections.abc import Callable, Iterator
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
)
from migrator.runtime import config as cfg
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.leftovers import remove_leftover
from migrator.runtime.network import allocate_ipv4
from migrator.runtime.operations import Operation, journaled
from migrator.runtime.state import ContainerRecord, SnapshotRecord
from migrator.runtime.temp_snapshots import (
    clean_stale_temp_snapshots,
    consistent_snapshot,
    temp_snapshot_name,
)
from migrator.streams import Progress, TransferStats, no_progress


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

    def merge(self, stats: TransferStats) -> None:
        """Add what one transfer moved (a move's passes add up; a note is said once)."""
        self.bytes += stats.bytes
        self.snapshots_added.extend(stats.snapshots)
        self.snapshots_skipped.extend(stats.skipped)
        self.notes.extend(n for n in stats.notes if n not in self.notes)


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
        if cts.run_state(dst_name) != "STOPPED":
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
    running = cts.run_state(src.name) != "STOPPED"
    by_name = {s.name: s for s in src_snaps}
    live = plan.how == "rsync" and (not running or allow_inconsistent)

    def read_source() -> contextlib.AbstractContextManager[str | Path]:
        if live:
            return contextlib.nullcontext(src_b.volume_path(src_vol))
        return consistent_snapshot(cts, src, src_b, src_vol, result.notes)

    with journaled(state, "refresh" if dst_rec else "copy", container=src.name,
                   target=dst_name, pool=dst_pool, method=plan.how) as op, Stages() as st:
        result.operation = op.id
        if live and running:
            result.notes.append("copied from the running container without a snapshot "
                                "(--allow-inconsistent)")
        with transfer_stage(op, st, plan, src_b, src_vol, dst_b, dst_vol,
                            target_existed=dst_rec is not None, read_source=read_source,
                            progress=progress) as staged:
            result.merge(staged.stats)
            added = staged.added
            op.stage("commit", added=added)
            with state.transaction():
                conf = cfg.without_volatile(src.config)
                if dst_rec is None:
                    ipv4 = allocate_ipv4(host.network_config(), state.used_ipv4())
                    new = ContainerRecord(dst_name, dst_pool, src.image, ipv4, conf)
                    state.add_container(new)
                else:
                    state.update_container_config(dst_name, conf)
                for name in added:
                    s = by_name[name]
                    state.add_snapshot(SnapshotRecord(dst_name, name, s.created,
                                                      dict(s.config), s.expires, s.uuid))
            st.add_undo("remove record",
                        lambda: _forget(cts, dst_name) if dst_rec is None else None)
            cts.render_lxc_config(dst_name)
    result.seconds = time.monotonic() - t0
    return result


@dataclass
class StagedTransfer:
    """What ``transfer_stage`` did: the snapshots it created on the target, oldest first
    (the caller records them), and the transfer's ``stats``."""

    added: list[str] = field(default_factory=list)
    stats: TransferStats = field(default_factory=TransferStats)


@contextlib.contextmanager
def transfer_stage(
    op: Operation, st: Stages, plan: Plan,
    src_b: StorageBackend, src_vol: VolumeRef, dst_b: StorageBackend, dst_vol: VolumeRef,
    *, target_existed: bool,
    read_source: Callable[[], contextlib.AbstractContextManager[str | Path]],
    progress: Progress = no_progress,
) -> Iterator[StagedTransfer]:
    """The journaled ``copy`` stage of one volume's copy, refresh or move on this host,
    with its undo; the block records what was added.

    Container and custom volumes go through the same stage, so both get the same undo:
    a new target is deleted on failure; an existing one (a refresh) loses the snapshots
    added, and where rsync rewrites it in place on a pool with free snapshots, its content
    is saved first and put back (a dir target is completed by a re-run). The saved content
    goes once the block has succeeded. ``read_source`` gives what the target must end up
    with: a temporary snapshot, or a live directory for rsync.
    """
    op.stage("copy")
    staged = StagedTransfer()
    added = staged.added
    keep: SnapshotName | None = None
    if not target_existed:
        st.add_undo("delete target volume", lambda: dst_b.delete_volume(dst_vol))
    else:
        def drop_added() -> None:
            for n in added:
                dst_b.delete_snapshot(dst_vol, SnapshotName(n))

        st.add_undo("delete added snapshots", drop_added)
        if plan.how == "rsync" and dst_b.cheap_snapshots:
            # rsync rewrites the target in place: keep its content to put back on failure
            saved = keep = temp_snapshot_name()
            dst_b.snapshot(dst_vol, saved)

            def put_back() -> None:
                dst_b.restore_snapshot(dst_vol, saved)
                dst_b.delete_snapshot(dst_vol, saved)

            st.add_undo("restore target", put_back)
    with read_source() as final:
        staged.stats = execute(plan, src_b, src_vol, dst_b, dst_vol, final, progress,
                               done=added.append)
    yield staged
    if keep is not None:
        dst_b.delete_snapshot(dst_vol, keep)


def _forget(cts: Containers, name: str) -> None:
    with cts.state.transaction():
        cts.state.delete_container(name)
    cts.remove_lxc_config(name)


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
    status = cts.run_state(rec.name)
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
            result.merge(stats)
            if running:
                # pass 2: stop, send what changed since pass 1, start on the new pool
                op.stage("final-sync")
                stopped_at = time.monotonic()
                cts.stop_now(rec.name)
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
            cts.render_lxc_config(rec.name)
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
    cts.render_lxc_config(name)


def _restart_if_stopped(cts: Containers, name: str) -> None:
    if cts.run_state(name) == "STOPPED":
        cts.start(name)


def rename_container(cts: Containers, old: str, new: str) -> None:
    """Rename a stopped container: its volume, snapshots, LXC directory and records."""
    rec = cts.get(old)
    new_name = ContainerName(new)
    if cts.state.has_container(new_name) or (cts.host.lxcpath / new_name).exists():
        raise AlreadyExists(f"container {new_name!r} already exists", "pick another name")
    if cts.run_state(rec.name) != "STOPPED":
        raise InvalidState(f"{rec.name!r} is running", f"stop it first: `migrate stop {rec.name}`")
    backend = cts.host.backend(rec.pool)
    old_vol, new_vol = VolumeRef("container", rec.name), VolumeRef("container", new_name)
    with Stages() as st:
        backend.rename_volume(old_vol, new_vol)
        st.add_undo("rename volume back", lambda: backend.rename_volume(new_vol, old_vol))
        cts.state.rename_container(rec.name, new_name)
        st.add_undo("rename record back", lambda: cts.state.rename_container(new_name, rec.name))
        cts.render_lxc_config(new_name)
        cts.remove_lxc_config(rec.name)
