"""The repository's catalog as users see it: rows for ``list``/``info``, and pruning.

``prune_repository`` feeds the repository's backups to the pure planner
(``migrator.backup.prune.plan_prune``: keep-last/hourly/daily/weekly/monthly/yearly buckets per
container, protected backups kept, every parent a kept incremental needs kept) and deletes
what it says, under the writer lock, newest first. ``dry_run`` only plans.
``collect_garbage`` then removes, in a chunked repository, the chunks no backup references
any more (two phases: see ``migrator.backup.chunkrepo``); the CLI's prune and the
scheduler's retention both call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from migrator.backup.model import BackupIndex
from migrator.backup.prune import PruneItem, RetentionPolicy, plan_prune
from migrator.backup.repository import BackupRepository


def row(b: BackupIndex) -> dict[str, Any]:
    """One backup as a table/JSON row."""
    return {
        "id": b.id, "container": b.container,
        "created": datetime.fromtimestamp(b.created, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "created_epoch": b.created, "kind": b.kind, "driver": b.driver,
        "incremental": b.parent is not None, "parent": b.parent,
        "compression": b.compression, "snapshots": len(b.snapshots),
        "size": b.stored_size(), "raw_size": b.raw_size(), "protected": b.protected,
    }


#: seconds an unreferenced chunk stays recorded before a later prune deletes it (``prune
#: --gc-grace``; the scheduler's retention uses it too)
GC_GRACE = 3600.0


def collect_garbage(repo: BackupRepository, grace: float | None = None,
                    dry_run: bool = False) -> Any | None:
    """A chunked repository's garbage collection (its ``GcResult``), under its lock, with
    ``grace`` seconds (default ``GC_GRACE``); None for a repository that stores no shared
    chunks (the directory format frees a backup's bytes when it is deleted)."""
    collect = getattr(repo, "collect_garbage", None)
    if collect is None:
        return None
    with repo.lock():
        return collect(GC_GRACE if grace is None else grace, dry_run)


@dataclass
class PruneResult:
    policy: str
    dry_run: bool
    keep: dict[str, list[str]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    freed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune_repository(repo: BackupRepository, policy: RetentionPolicy, dry_run: bool = False,
                     container: str | None = None) -> PruneResult:
    """Apply ``policy`` to the backups (of ``container`` only, if given)."""
    repo.check()
    with repo.lock():
        backups = [b for b in repo.list() if container is None or b.container == container]
        items = [PruneItem(b.id, b.container, b.created, b.protected, b.parent)
                 for b in backups]
        plan = plan_prune(items, policy)
        result = PruneResult(str(policy), dry_run, plan.keep, list(plan.remove))
        sizes = {b.id: b.stored_size() for b in backups}
        if not dry_run:
            for bid in plan.remove:
                repo.delete(bid)
                result.removed.append(bid)
                result.freed += sizes.get(bid, 0)
        else:
            result.freed = sum(sizes.get(b, 0) for b in plan.remove)
    return result
