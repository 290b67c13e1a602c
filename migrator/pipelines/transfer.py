"""Moving one volume with its snapshots from a pool to another: negotiation, plan, execution.

The plan is pure logic (unit tested): which method, which shared snapshot to start from,
which snapshots to add, which to leave alone. Execution drives the backends' streams
(native ``btrfs``/``zfs``, generic ``tar``) or ``rsync`` between two local trees. The same
plan will drive host-to-host transfers, where only the stream's carrier changes.

Refresh rules (documented in the README):
- the base is the newest source snapshot that the target also has with the same identity
  (the snapshot uuid that travels with every copy);
- source snapshots newer than the base are added on the target, oldest first;
- source snapshots older than the base that the target lacks are *skipped* (history cannot
  be inserted before an existing snapshot without rewriting the target) and reported;
- target-only snapshots are kept untouched and reported;
- a snapshot with the same name but another identity on each side is a conflict: the
  transfer is refused and nothing is changed;
- a native incremental needs the base's native identity (btrfs received UUID, zfs guid) to
  match, and for zfs the base must be the target's newest snapshot; otherwise the transfer
  falls back to rsync, which sends only changed files, and says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from migrator.backends import Snapshot, StorageBackend, VolumeRef
from migrator.backends.generic import copy_into_empty, rsync_tree
from migrator.core.errors import InvalidInput, InvalidState
from migrator.core.names import SnapshotName
from migrator.streams import Progress, ProgressMeter, TransferStats, no_progress

NATIVE_TYPES = ("btrfs", "zfs")


@dataclass(frozen=True)
class SnapInfo:
    """A snapshot as the pipelines see it: its name and its travelling identity."""

    name: str
    uuid: str = ""


def negotiate(src_types: Sequence[str], dst_types: Sequence[str], local: bool = True) -> str:
    """The best method both ends support, in the source's order of preference.

    ``rsync`` needs both trees reachable by one rsync process (``local``); ``tar`` is the
    stream every driver speaks, so there is always an answer.
    """
    for t in src_types:
        if t in dst_types and (t != "rsync" or local):
            return t
    if "tar" in src_types and "tar" in dst_types:
        return "tar"
    raise InvalidInput(
        f"no common transfer method between {list(src_types)} and {list(dst_types)}"
    )


@dataclass
class Plan:
    how: str
    base: str | None  # newest shared snapshot: the incremental starting point
    send: list[str]  # source snapshots to create on the target, oldest first
    skipped: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _same(a: SnapInfo, b: SnapInfo) -> bool:
    return not a.uuid or not b.uuid or a.uuid == b.uuid


def plan_transfer(
    src: Sequence[SnapInfo],
    dst: Sequence[SnapInfo] | None,
    how: str,
    native_base_ok: Callable[[str], bool] = lambda name: True,
) -> Plan:
    """Decide what to send. ``dst`` is None when the target volume does not exist yet."""
    if dst is None:
        return Plan(how, None, [s.name for s in src])
    dst_by_name = {s.name: s for s in dst}
    src_names = {s.name for s in src}
    conflicts = [s.name for s in src if s.name in dst_by_name and not _same(s, dst_by_name[s.name])]
    if conflicts:
        raise InvalidState(
            f"snapshot(s) {', '.join(conflicts)} exist on both sides with different content",
            "nothing was changed; delete or rename them on the target, or copy to a new name",
        )
    shared = [s.name for s in src if s.name in dst_by_name]
    base = shared[-1] if shared else None
    base_index = [s.name for s in src].index(base) if base else -1
    send = [s.name for s in src[base_index + 1:] if s.name not in dst_by_name]
    skipped = [s.name for s in src[: base_index + 1] if s.name not in dst_by_name]
    target_only = [s.name for s in dst if s.name not in src_names]
    plan = Plan(how, base, send, skipped, target_only)
    if skipped:
        plan.notes.append(
            f"skipped {', '.join(skipped)}: older than the shared snapshot {base}, "
            "history cannot be inserted on the target"
        )
    if target_only:
        plan.notes.append(f"kept target-only snapshot(s) {', '.join(target_only)}")
    if how in NATIVE_TYPES:
        if base is None:
            plan.how = "rsync"
            plan.notes.append(
                f"no shared snapshot to send {how} increments from: using rsync (changed files "
                "only) over the existing target"
            )
        elif not native_base_ok(base):
            plan.how = "rsync"
            plan.notes.append(
                f"shared snapshot {base} was not copied with {how} send: using rsync instead"
            )
        elif how == "zfs" and dst and dst[-1].name != base:
            plan.how = "rsync"
            plan.notes.append(
                f"the target has snapshots newer than {base}; zfs receive would destroy "
                "them, so using rsync instead"
            )
    return plan


def _snap(snaps: dict[str, Snapshot], vol: VolumeRef, name: str) -> Snapshot:
    if name not in snaps:
        raise InvalidState(f"snapshot {vol}/{name} is missing on disk")
    return snaps[name]


def execute(
    plan: Plan,
    src: StorageBackend,
    src_vol: VolumeRef,
    dst: StorageBackend,
    dst_vol: VolumeRef,
    final: str | Path,
    progress: Progress = no_progress,
    done: Callable[[str], None] = lambda name: None,
    keep_final: bool = False,
) -> TransferStats:
    """Carry out ``plan``; the target volume then has the content of ``final``.

    ``final`` is a source snapshot name (usually a temporary one) or, for rsync only, a
    live directory. Snapshots named in ``plan.send`` are created on the target and
    ``done(name)`` is called after each, so the caller can record or undo them. A temporary
    ``final`` snapshot is not kept on the target unless ``keep_final`` (the base of a later
    incremental pass).
    """
    stats = TransferStats(methods=[plan.how])
    snaps = {s.name: s for s in src.list_snapshots(src_vol)}  # once: zfs lists by subprocess
    stats.notes.extend(plan.notes)
    stats.skipped.extend(plan.skipped)
    if plan.how in NATIVE_TYPES or plan.how == "tar":
        if not isinstance(final, str):
            raise InvalidInput(f"a {plan.how} transfer needs a snapshot to send")
        parent = _snap(snaps, src_vol, plan.base) if plan.base and plan.how != "tar" else None
        for name in [*plan.send, final]:
            snap = _snap(snaps, src_vol, name)
            stream = src.send(snap, parent, plan.how)
            meter = ProgressMeter(progress, f"{src_vol.name}@{name}", stream.size_hint)
            dst.receive(dst_vol, name, stream, meter)
            stats.bytes += meter.done
            if plan.how != "tar":
                parent = snap
            if name == final and not keep_final:
                dst.delete_snapshot(dst_vol, SnapshotName(name))
            elif name != final:
                stats.snapshots.append(name)
                done(name)
        return stats
    if plan.how != "rsync":
        raise InvalidInput(f"unknown transfer method {plan.how!r}")
    existed = dst.volume_exists(dst_vol)
    target = dst.volume_path(dst_vol) if existed else dst.create_volume(dst_vol)
    exact = src.subsecond_mtimes and dst.subsecond_mtimes  # else compare contents
    # the first tree into a new (empty) target is a plain exact copy: rsync would only
    # compare with nothing, at 2.5x the cost. Where the target keeps no xattrs, rsync stays,
    # for its error on each one it cannot store.
    empty = not existed and exact and src.supports_xattrs and dst.supports_xattrs

    def copy(path: Path, meter: ProgressMeter) -> int:
        nonlocal empty
        if empty:
            empty = False
            return copy_into_empty(Path(path), target, meter)
        return rsync_tree(path, target, meter, checksum=not exact, exact_times=exact)

    for name in plan.send:
        with src.mount_snapshot(_snap(snaps, src_vol, name)) as path:
            meter = ProgressMeter(progress, f"{src_vol.name}@{name}")
            stats.bytes += copy(path, meter)
        dst.snapshot(dst_vol, SnapshotName(name))
        stats.snapshots.append(name)
        done(name)
    with contextlib.ExitStack() as stack:
        if isinstance(final, str):
            path = stack.enter_context(src.mount_snapshot(_snap(snaps, src_vol, final)))
        else:
            path = final
        stats.bytes += copy(Path(path), ProgressMeter(progress, f"{src_vol.name}"))
    return stats
