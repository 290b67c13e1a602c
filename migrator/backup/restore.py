"""``backup restore``: a backup (through its incremental chain) back into a container.

Nothing on the host changes until every part of every backup in the chain has been checked
against its index (``migrator.backup.verify.verify_chain``): a damaged backup is refused whole.
From a chunked repository the parts are read once: every chunk is checked present first,
then authenticated as it streams into the hidden scratch volume (removed on a bad one).
Parts stream from the repository (or store) straight into the pool's receive: nothing is
staged on local disk on the way. The
container is then rebuilt in a scratch volume by replaying the chain, oldest backup first,
point by point (full tar: received as the volume's new content; delta: removed paths, then
the tar of changed entries over the volume; native stream: the driver's own receive), taking
a snapshot at each point the restored backup lists. Every tar passes through
``migrator.targuard.TarGuard`` on its way to GNU tar: a member that would escape the rootfs, or
a device node in an unprivileged container, stops the restore before tar sees it.

Optimized backups restore natively onto a pool of their driver; onto another driver they
are received into a scratch volume on a pool of the backup's driver on this host, then
copied across with the transfer machinery (rsync between the two trees), then the scratch
volume goes. Only when the volume is complete is an existing container replaced (``force``)
and the new one recorded; any failure before removes everything the restore made.
Unprivileged containers keep the shifted uids they were stored with.

Before anything is copied on or recorded, the scratch volume and its snapshots are walked
(``migrator.runtime.treecheck``): a native stream passes no member check on its way in, so device
nodes and setuid/setgid files owned outside the container's ids are refused there (and a
tar's setuid files, which ``TarGuard`` does not judge, with them).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.generic import tar_extract
from migrator.backup.delta import decode_paths, remove_paths
from migrator.backup.model import BackupIndex, PartInfo, SnapshotInfo
from migrator.backup.parts import PartStream, read_small, real_error
from migrator.backup.repository import BackupRepository
from migrator.backup.verify import as_chunked, tar_rules, verify_chain
from migrator.core.errors import AlreadyExists, BackupError, InvalidInput, Protected
from migrator.core.names import ContainerName, PoolName, SnapshotName
from migrator.pipelines.transfer import Plan, execute, negotiate
from migrator.runtime import config as cfg
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.leftovers import remove_leftover
from migrator.runtime.operations import journaled
from migrator.runtime.state import SnapshotRecord
from migrator.runtime.treecheck import container_policy, inspect_volume
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.targuard import TarGuard


@dataclass
class RestoreResult:
    """What ``restore_backup`` did (the CLI prints it; ``--format json`` dumps it)."""

    id: str
    container: str
    pool: str
    method: str
    bytes: int = 0
    seconds: float = 0.0
    snapshots: list[str] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    replaced: bool = False
    notes: list[str] = field(default_factory=list)
    operation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _overrides(idx: BackupIndex, config: dict[str, str]) -> dict[str, str]:
    out = {k: cfg.validate(k, v) for k, v in config.items()}
    want = "true" if idx.privileged else "false"
    if out.get("security.privileged", want) != want:
        raise InvalidInput(
            "security.privileged cannot change at restore: the files are stored with the "
            f"uids of a {'privileged' if idx.privileged else 'unprivileged'} container",
            "restore first, then `migrate config set NAME security.privileged ...` (which "
            "shifts the files)")
    return out


def admitted_config(idx: BackupIndex, overrides: dict[str, str], allow_privileged: bool
                    ) -> tuple[dict[str, str], list[SnapshotInfo]]:
    """The index's config (with the operator's ``--config`` over it) and each snapshot's,
    through the configuration gate before anything is touched: an index is input from
    wherever the repository was kept. Its ``privileged`` field must agree with its config,
    and a privileged backup needs ``allow_privileged``."""
    origin = f"backup index {idx.id}"
    cfg.privilege_of(idx.config, origin, allow_privileged=allow_privileged,
                     claimed=idx.privileged)
    conf = cfg.admit_config({**idx.config, **overrides}, origin,
                            allow_privileged=allow_privileged)
    snaps = [replace(s, config=cfg.admit_config(
        s.config, f"{origin} (snapshot {s.name})", allow_privileged=allow_privileged))
        for s in idx.snapshots]
    return conf, snaps


def restore_backup(
    cts: Containers,
    repo: BackupRepository,
    backup_id: str,
    name: str | None = None,
    pool: str | None = None,
    config: dict[str, str] | None = None,
    force: bool = False,
    progress: Progress = no_progress,
    verify_first: bool = True,
    allow_privileged: bool = False,
) -> RestoreResult:
    """Restore backup ``backup_id`` as container ``name`` (default: the backed-up name).

    ``verify_first``: read every part of the chain and check its sha256 before anything is
    written (the default; not for a chunked repository, whose chunks are each authenticated
    as they stream, after a check that every one is present). Without it, the structure
    and every part's presence and size are checked first and the checksums as the parts
    stream into the hidden scratch volume, which is deleted on a mismatch: each part is
    read once (half the disk reads, or half the network traffic from a remote repository),
    the existing container is untouched either way, but a damaged backup is found only
    after its damaged part was written.

    ``allow_privileged``: the operator's ``--allow-privileged``, without which a privileged
    backup is refused (its root would be root on this host)."""
    t0 = time.monotonic()
    host, state = cts.host, cts.state
    repo.check()
    idx = repo.get(backup_id)
    target = ContainerName(name or idx.container)
    overrides = _overrides(idx, config or {})
    conf, snap_infos = admitted_config(idx, overrides, allow_privileged)
    existing = state.get_container(target) if state.has_container(target) else None
    if existing is not None:
        if not force:
            raise AlreadyExists(f"container {target!r} already exists",
                                "restore under another name with --name, or replace it "
                                "with --force")
        if cfg.is_true(existing.config, "security.protection.delete"):
            raise Protected(f"container {target!r} is protected from deletion, so it cannot "
                            "be replaced",
                            f"`migrate config unset {target} security.protection.delete`")
    elif (host.lxcpath / target).exists():
        raise AlreadyExists(f"{host.lxcpath / target} exists", "remove the leftover directory")
    pool_name = PoolName(pool) if pool else PoolName(host.default_pool())
    dst_b = host.backend(pool_name)
    dst_driver = state.get_pool(pool_name).driver
    recv_pool = pool_name
    if idx.kind == "optimized" and dst_driver != idx.driver:
        candidates = [p.name for p in state.list_pools() if p.driver == idx.driver]
        if not candidates:
            raise BackupError(
                f"backup {idx.id} holds {idx.driver} send streams; restoring them onto the "
                f"{dst_driver} pool {pool_name} needs a {idx.driver} pool on this host to "
                "receive them first",
                f"create one (`migrate pool create NAME {idx.driver}`) or restore onto a "
                f"{idx.driver} pool with --pool; nothing was changed")
        recv_pool = PoolName(candidates[0])
    recv_b = host.backend(recv_pool)

    # before anything is touched. A chunked repository is read once either way: its index
    # is authenticated and every chunk is authenticated as it streams (and all of them are
    # first checked to be present), so reading it all beforehand would only double the
    # traffic from the store; a damaged chunk fails the restore inside the scratch volume
    chain = verify_chain(repo, idx, progress, read=verify_first and as_chunked(repo) is None)
    method = "tar" if idx.kind == "generic" else idx.driver
    if recv_pool != pool_name:
        method += f" via pool {recv_pool}, then " + negotiate(recv_b.migration_types(),
                                                                dst_b.migration_types())
    result = RestoreResult(idx.id, target, pool_name, method, chain=[b.id for b in chain],
                           snapshots=[s.name for s in idx.snapshots], replaced=bool(existing))
    scratch = VolumeRef("container", f"{target[:40]}-restore-{secrets.token_hex(3)}")
    final_vol = VolumeRef("container", target)
    with journaled(state, "restore", container=target, backup=idx.id, pool=pool_name,
                   scratch=scratch.name, receive_pool=recv_pool) as op, Stages() as st:
        result.operation = op.id
        st.add_undo("delete the restored volume", lambda: remove_leftover(recv_b, scratch))
        op.stage("receive")
        result.bytes = _replay(repo, chain, idx, recv_b, scratch, progress)
        # Native streams passed no member check on their way in, and a tar's setuid files
        # none either: the scratch volume and its snapshots are walked before any of it
        # is copied on or recorded (migrator.runtime.treecheck). A container counts as privileged
        # here only when both its index and its config say so.
        op.stage("inspect")
        privileged = idx.privileged and cfg.is_true(conf, "security.privileged")
        inspect_volume(recv_b, scratch, container_policy(privileged),
                       f"backup {idx.id}", skip=(idx.final,))
        if recv_pool != pool_name:
            op.stage("convert")
            st.add_undo("delete the converted volume", lambda: remove_leftover(dst_b, scratch))
            how = negotiate(recv_b.migration_types(), dst_b.migration_types())
            plan = Plan(how, None, [s.name for s in idx.snapshots])
            execute(plan, recv_b, scratch, dst_b, scratch, idx.final, progress)
            remove_leftover(recv_b, scratch)
        elif idx.final in {s.name for s in dst_b.list_snapshots(scratch)}:
            dst_b.delete_snapshot(scratch, SnapshotName(idx.final))
        ipv4 = existing.ipv4 if existing is not None else None
        snaps = [SnapshotRecord(target, s.name, s.created, dict(s.config), None, s.uuid)
                 for s in snap_infos]
        # what the record needs is journaled first: once the replaced container is gone,
        # the restored volume is the only copy, and `migrate recover` completes the record
        # from this rather than removing it
        # durable before destructive: the restored volume on disk, and this journal entry
        # (what recover completes from) committed with a sync, before the old one goes
        if existing is not None:
            sync_filesystem(dst_b.volume_path(scratch))
        with state.durable():
            op.stage("replace", record={
                "image": idx.image, "config": conf, "ipv4": ipv4,
                "snapshots": [s.to_wire() for s in snaps],
                "allow_privileged": allow_privileged})
        if existing is not None:
            cts.delete(existing.name, force=True)
            result.notes.append(f"replaced the existing container {target}")
        dst_b.rename_volume(scratch, final_vol)
        st.add_undo("rename the volume back", lambda: dst_b.rename_volume(final_vol, scratch))
        op.stage("record")
        cts.record_received(target, pool_name, idx.image, conf, snaps, ipv4,
                            origin=f"backup index {idx.id}", allow_privileged=allow_privileged)
    result.seconds = time.monotonic() - t0
    return result


def complete_record(cts: Containers, op_detail: dict[str, Any]) -> bool:
    """Record a restored container from what its journal kept (``replace`` stage): for
    ``migrate recover`` when a restore was cut after its volume moved in. False when the
    volume is not there (it never moved in)."""
    name, pool = ContainerName(op_detail["container"]), PoolName(op_detail["pool"])
    rec = op_detail.get("record")
    if rec is None or not cts.host.backend(pool).volume_exists(VolumeRef("container", name)):
        return False
    snaps = [SnapshotRecord.from_wire(name, s) for s in rec["snapshots"]]
    # the restore admitted this config and the operator's privilege decision before it
    # journaled them (the journal is this host's own state). A journal of an older version
    # lacks the decision: the volume is the only copy then, so its own config decides.
    allow = rec.get("allow_privileged", cfg.is_true(rec["config"], "security.privileged"))
    cts.record_received(name, pool, rec["image"], dict(rec["config"]), snaps, rec["ipv4"],
                        origin=f"the journal of restore {op_detail.get('backup')}",
                        allow_privileged=bool(allow))
    return True


def _guard(idx: BackupIndex, existing: Path | None = None) -> Any:
    """The tar guard for ``idx``'s parts; ``existing``: the tree a delta is applied on
    (a member below a symlink already there is refused: GNU tar would follow it)."""
    rules = replace(tar_rules(idx), existing=None if existing is None else str(existing))

    def wrap(reader: IO[bytes]) -> IO[bytes]:
        return TarGuard(reader, rules)  # type: ignore[arg-type,return-value]
    return wrap


def _replay(repo: BackupRepository, chain: list[BackupIndex], idx: BackupIndex,
            backend: StorageBackend, vol: VolumeRef, progress: Progress) -> int:
    """Rebuild ``idx``'s container in ``vol``: every point of the chain in order, keeping the
    snapshots ``idx`` lists (and, for native streams, the final one). Returns raw bytes."""
    keep = {(s.backup, s.name) for s in idx.snapshots}
    native_points: list[tuple[str, str]] = []
    moved = 0
    for b in chain:
        for point in b.points():
            parts = b.parts_of(point)
            kinds = {p.kind for p in parts}
            wanted = (b.id, point) in keep
            data = next(p for p in parts if p.kind != "deleted")
            meter = ProgressMeter(progress, f"restore {b.container}@{point}", data.raw_size)
            if kinds == {"tar"}:
                stream = PartStream(repo, b.id, data, b.compression, "tar", point, None,
                                    _guard(b))
                _consume(stream, backend.receive, vol, point, stream, meter)
                if not wanted and not (b is idx and point == idx.final):
                    backend.delete_snapshot(vol, SnapshotName(point))
            elif kinds == {"delta", "deleted"}:
                _apply_delta(repo, b, point, parts, backend, vol, meter)
                if wanted:
                    backend.snapshot(vol, SnapshotName(point))
            else:
                older = [(bid, p) for bid, p in native_points if p == point]
                if older:  # a snapshot deleted and made again under the same name: the old
                    # one is no stream's parent any more (each starts from the point before)
                    backend.delete_snapshot(vol, SnapshotName(point))
                    native_points = [x for x in native_points if x not in older]
                stream = PartStream(repo, b.id, data, b.compression, data.kind, point,
                                    data.base)
                _consume(stream, backend.receive, vol, point, stream, meter)
                native_points.append((b.id, point))
            moved += data.raw_size
    for bid, point in native_points:  # only now: each incremental needed the one before
        if (bid, point) not in keep and (bid, point) != (idx.id, idx.final):
            backend.delete_snapshot(vol, SnapshotName(point))
    return moved


def _consume(stream: PartStream, receive: Any, *args: Any) -> None:
    """Run ``receive(*args)``, which consumes ``stream``; report the stream's own error
    (checksum, unsafe member) rather than what the receiver made of it."""
    try:
        receive(*args)
    except BaseException as e:
        err = real_error(stream, e)
        if err is e:
            raise
        raise err from e
    finally:
        stream.kill()


def _apply_delta(repo: BackupRepository, b: BackupIndex, point: str, parts: list[PartInfo],
                 backend: StorageBackend, vol: VolumeRef, meter: ProgressMeter) -> None:
    listed = next(p for p in parts if p.kind == "deleted")
    tar = next(p for p in parts if p.kind == "delta")
    where = f"backup {b.id}"
    paths = decode_paths(read_small(repo, b.id, listed, b.compression), where)
    root = backend.volume_path(vol)
    remove_paths(root, paths)
    stream = PartStream(repo, b.id, tar, b.compression, "tar", point, tar.base,
                        _guard(b, root))
    _consume(stream, tar_extract, stream, root, meter, bool(backend.supports_xattrs))
