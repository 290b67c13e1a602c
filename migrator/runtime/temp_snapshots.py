"""Temporary snapshots: how a pipeline reads a volume that may be in use.

A transfer, a backup or an export never reads a live volume directly: it reads a snapshot
taken for the purpose. Those snapshots are named ``migrate.xfer-*`` so that any left by an
interrupted run are recognised and removed at the next run on that volume; a snapshot that
must outlive its run (a backup's incremental base) gets another name from its caller.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.errors import MigratorError
from migrator.core.names import SnapshotName
from migrator.runtime.containers import Containers
from migrator.runtime.state import ContainerRecord

TEMP_PREFIX = "migrate.xfer-"


def temp_snapshot_name() -> SnapshotName:
    """Name of the short-lived snapshot a transfer reads the live volume through."""
    return SnapshotName(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}")


def clean_stale_temp_snapshots(backend: StorageBackend, vol: VolumeRef) -> list[str]:
    """Remove ``migrate.xfer-*`` snapshots an interrupted transfer left on a volume."""
    stale = [s.name for s in backend.list_snapshots(vol) if s.name.startswith(TEMP_PREFIX)]
    for name in stale:
        backend.delete_snapshot(vol, SnapshotName(name))
    return stale


@contextlib.contextmanager
def held_snapshot(backend: StorageBackend, vol: VolumeRef, name: SnapshotName,
                  keep: bool = False) -> Iterator[SnapshotName]:
    """Hold a snapshot just taken for the length of a block, then delete it.

    It goes whatever the block's outcome, unless the block ends well and ``keep`` (the
    caller sends an increment from it later, then deletes it). A failed delete is left to
    ``clean_stale_temp_snapshots``: the block's own outcome is what the caller reports.
    """
    try:
        yield name
    except BaseException:
        with contextlib.suppress(MigratorError):
            backend.delete_snapshot(vol, name)
        raise
    if not keep:
        with contextlib.suppress(MigratorError):
            backend.delete_snapshot(vol, name)


@contextlib.contextmanager
def temporary_snapshot(backend: StorageBackend, vol: VolumeRef) -> Iterator[SnapshotName]:
    """A ``migrate.xfer-*`` snapshot of a volume no container freezes for (a custom
    volume: its users are stopped, or their writes are theirs to order)."""
    name = temp_snapshot_name()
    backend.snapshot(vol, name)
    with held_snapshot(backend, vol, name) as held:
        yield held


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
    if cts.run_state(rec.name) == "RUNNING":
        t0 = time.monotonic()
        with cts.frozen(rec.name):
            backend.snapshot(vol, name)
        frozen = time.monotonic() - t0
        if frozen > 1:
            notes.append(f"source was frozen {frozen:.1f}s for a consistent snapshot")
    else:
        backend.snapshot(vol, name)
    with held_snapshot(backend, vol, name, keep) as held:
        yield held
