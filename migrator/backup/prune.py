"""Retention planning: which backups a ``keep-*`` policy keeps and which it removes.

Pure logic, no I/O: the repository hands over a list of :class:`PruneItem`, gets back a
:class:`PrunePlan`, and does the deleting itself (or only prints the plan for ``--dry-run``).

Semantics follow Proxmox Backup Server's prune (``mark_selections`` in PBS, documented in its
"Maintenance Tasks / Pruning" page), which borg prune shares in its essentials:

- Rules run in the order keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly,
  keep-yearly, over the backups of one container sorted newest first.
- A bucket rule (hourly ... yearly) puts each backup in a period (hour, day, ISO week with
  Monday as its first day, month, year) and keeps the newest backup of each of the N most
  recent periods that have one. keep-last is the same with every backup its own period.
- A period that already holds a backup kept by an earlier rule is skipped: it neither counts
  towards this rule's N nor gets a second backup kept. So "keep-daily=7" after "keep-last=3"
  reaches seven *further* days into the past (PBS: "the next option does not take care of
  already covered backups. It will only consider older backups").
- Protected backups are always kept; they neither use up a slot nor cover a period.
- All counts zero means "no policy": everything is kept (as PBS does).
- Unlike borg (which, when a rule finds fewer periods than N, also keeps the oldest backup as
  "[oldest]"), PBS has no such fallback, and neither do we.

Added here, because our backups may be incremental: every backup that a kept backup needs to
restore (its ``parent`` chain) is kept too, with the reason ``needed by ID``. Chains may cross
containers only if the repository says so; we follow ``parent`` ids wherever they lead.

Periods are computed in UTC by default, not in local time as borg and PBS do: a repository can
be pruned from several hosts (a remote repository over SSH), and the same repository must give
the same plan whichever host's clock zone runs the prune. Pass ``tz`` to bucket in another zone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, tzinfo

from migrator.core.errors import InvalidInput
from migrator.runtime.schedule_keys import parse_retention

POLICY_EXAMPLE = "keep-last=3,keep-daily=7,keep-weekly=4,keep-monthly=6"

# Rule name (as in "keep-daily") -> function giving a backup's period key in that rule.
_Period = Callable[[datetime], tuple[int, ...]]
_BUCKETS: dict[str, _Period] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),  # (ISO year, ISO week): Monday..Sunday
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}
RULES: tuple[str, ...] = ("last", *_BUCKETS)


@dataclass(frozen=True)
class RetentionPolicy:
    """How many of the most recent backups (last) or periods (the rest) to keep."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(
                    f"{f.name.replace('_', '-')} must be a whole number >= 0, not {value!r}",
                    f"for example: {POLICY_EXAMPLE}",
                )

    @property
    def keeps_everything(self) -> bool:
        """True when no rule is set: a prune with this policy removes nothing."""
        return all(getattr(self, f.name) == 0 for f in fields(self))

    def count(self, rule: str) -> int:
        """The N of ``keep-RULE``."""
        return int(getattr(self, f"keep_{rule}"))

    @classmethod
    def parse(cls, text: str) -> RetentionPolicy:
        """Parse ``"keep-last=3,keep-daily=7"`` (commas and/or spaces between the rules).

        Used by schedules, whose retention is one string in a config file. An empty string is
        the empty policy (keep everything).
        """
        values = {f"keep_{rule}": n for rule, n in parse_retention(text).items()}
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"keep-{r}={self.count(r)}" for r in RULES if self.count(r)]
        return ",".join(parts) if parts else "keep-all"


@dataclass(frozen=True)
class PruneItem:
    """One backup as retention sees it. ``created`` is seconds since the epoch (UTC)."""

    id: str
    container: str
    created: float
    protected: bool = False
    parent: str | None = None


@dataclass
class PrunePlan:
    """``keep``: backup id -> why it is kept (``"daily 2"``, ``"protected"``,
    ``"needed by ID"``); ``remove``: the ids to delete, newest first per container."""

    keep: dict[str, list[str]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


def plan_prune(
    items: Iterable[PruneItem], policy: RetentionPolicy, tz: tzinfo = UTC
) -> PrunePlan:
    """Apply ``policy`` to every container's backups separately; see the module docstring."""
    all_items = list(items)
    ids = [i.id for i in all_items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidInput(f"backup id {dup!r} appears twice in the prune input")

    plan = PrunePlan()
    by_container: dict[str, list[PruneItem]] = {}
    for item in all_items:
        by_container.setdefault(item.container, []).append(item)

    for container in sorted(by_container):
        newest_first = sorted(by_container[container], key=lambda i: (i.created, i.id),
                              reverse=True)
        for item in newest_first:
            if item.protected:
                plan.keep.setdefault(item.id, []).append("protected")
        if policy.keeps_everything:
            for item in newest_first:
                plan.keep.setdefault(item.id, []).append("no retention policy")
            continue
        kept_by_rule: set[str] = set()
        for rule in RULES:
            _mark_rule(newest_first, rule, policy.count(rule), tz, kept_by_rule, plan)

    _keep_parent_chains(all_items, plan)
    for container in sorted(by_container):
        newest_first = sorted(by_container[container], key=lambda i: (i.created, i.id),
                              reverse=True)
        plan.remove.extend(i.id for i in newest_first if i.id not in plan.keep)
    return plan


def _period_of(item: PruneItem, rule: str, tz: tzinfo) -> tuple[int, ...] | str:
    if rule == "last":
        return item.id
    return _BUCKETS[rule](datetime.fromtimestamp(item.created, tz))


def _mark_rule(
    newest_first: list[PruneItem],
    rule: str,
    count: int,
    tz: tzinfo,
    kept_by_rule: set[str],
    plan: PrunePlan,
) -> None:
    """Keep the newest backup of each of the ``count`` most recent uncovered periods."""
    if count == 0:
        return
    covered = {_period_of(i, rule, tz) for i in newest_first if i.id in kept_by_rule}
    seen: set[tuple[int, ...] | str] = set()
    for item in newest_first:
        if item.id in kept_by_rule or item.protected:
            continue
        period = _period_of(item, rule, tz)
        if period in covered or period in seen:
            continue
        if len(seen) >= count:
            break
        seen.add(period)
        kept_by_rule.add(item.id)
        plan.keep.setdefault(item.id, []).append(f"{rule} {len(seen)}")


def _keep_parent_chains(items: list[PruneItem], plan: PrunePlan) -> None:
    """Keep every ancestor of a kept incremental backup; a missing parent is left to verify."""
    by_id = {i.id: i for i in items}
    pending = list(plan.keep)
    while pending:
        child = by_id.get(pending.pop())
        parent_id = child.parent if child else None
        if child is None or parent_id is None or parent_id not in by_id:
            continue
        reason = f"needed by {child.id}"
        reasons = plan.keep.setdefault(parent_id, [])
        if reason not in reasons:
            reasons.append(reason)
            pending.append(parent_id)
