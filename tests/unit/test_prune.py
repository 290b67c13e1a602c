"""migrator.backup.prune: retention on a synthetic calendar (PBS semantics, see the module
docstring).

The calendar: one backup a day at 03:00 UTC from 2025-01-01 for 400 days (the last one on
Wednesday 2026-02-04), plus six more on that last day at 04:00..09:00. Expected sets are
written out by hand from the calendar, not recomputed by the code under test.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from migrator.backup.prune import PruneItem, RetentionPolicy, plan_prune
from migrator.core.errors import InvalidInput

FIRST_DAY = date(2025, 1, 1)
LAST_DAY = date(2026, 2, 4)


def _at(d: date, hour: int) -> float:
    return datetime(d.year, d.month, d.day, hour, tzinfo=UTC).timestamp()


def _daily_id(d: date) -> str:
    return f"d-{d.isoformat()}"


def calendar(container: str = "web-1") -> list[PruneItem]:
    items = []
    for n in range(400):
        d = FIRST_DAY + timedelta(days=n)
        items.append(PruneItem(_daily_id(d), container, _at(d, 3)))
    assert d == LAST_DAY
    for hour in range(4, 10):
        items.append(PruneItem(f"h-{hour:02d}", container, _at(LAST_DAY, hour)))
    return items


def kept(items: list[PruneItem], policy: str) -> set[str]:
    plan = plan_prune(items, RetentionPolicy.parse(policy))
    assert set(plan.keep) | set(plan.remove) == {i.id for i in items}
    assert not set(plan.keep) & set(plan.remove)
    return set(plan.keep)


def days(*isodates: str) -> set[str]:
    return {f"d-{d}" for d in isodates}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("keep-last=3", {"h-09", "h-08", "h-07"}),
        ("keep-hourly=2", {"h-09", "h-08"}),
        # the last day's newest is h-09; then one per earlier day
        ("keep-daily=3", {"h-09"} | days("2026-02-03", "2026-02-02")),
        # ISO weeks: Mon 2026-02-02..; Sun 2026-02-01 ends the week before; Sun 2026-01-25
        ("keep-weekly=3", {"h-09"} | days("2026-02-01", "2026-01-25")),
        ("keep-monthly=3", {"h-09"} | days("2026-01-31", "2025-12-31")),
        # only two years hold backups; no "keep the oldest" fallback (PBS, unlike borg)
        ("keep-yearly=5", {"h-09"} | days("2025-12-31")),
    ],
)
def test_single_rule(policy: str, expected: set[str]) -> None:
    assert kept(calendar(), policy) == expected


def test_a_period_covered_by_an_earlier_rule_is_not_counted_again() -> None:
    # keep-last covers the last day; keep-daily then takes two *earlier* days
    assert kept(calendar(), "keep-last=2,keep-daily=2") == {"h-09", "h-08"} | days(
        "2026-02-03", "2026-02-02"
    )


def test_daily_then_weekly_reaches_further_back() -> None:
    # daily: Feb 4 (h-09) and Feb 3..Jan 29; those cover ISO weeks 6 and 5 of 2026, so weekly
    # takes the Sundays of weeks 4, 3, 2 and 1 (2026-W01 runs Mon 2025-12-29 .. Sun 2026-01-04)
    expected = {"h-09"} | days(
        "2026-02-03", "2026-02-02", "2026-02-01", "2026-01-31", "2026-01-30", "2026-01-29",
        "2026-01-25", "2026-01-18", "2026-01-11", "2026-01-04",
    )
    assert kept(calendar(), "keep-daily=7,keep-weekly=4") == expected


def test_full_policy_on_the_calendar() -> None:
    plan = plan_prune(calendar(), RetentionPolicy.parse("keep-last=2 keep-daily=3 "
                                                        "keep-monthly=2 keep-yearly=3"))
    assert plan.keep == {
        "h-09": ["last 1"],
        "h-08": ["last 2"],
        "d-2026-02-03": ["daily 1"],
        "d-2026-02-02": ["daily 2"],
        "d-2026-02-01": ["daily 3"],
        # February 2026 is covered by the daily ones
        "d-2026-01-31": ["monthly 1"],
        "d-2025-12-31": ["monthly 2"],
        # 2026 and 2025 are covered; nothing older exists
    }
    assert len(plan.remove) == 406 - 7
    assert plan.remove[0] == "h-07"  # newest first


def test_iso_weeks_across_new_year() -> None:
    # Mon 2025-12-29 .. Fri 2026-01-02 are one ISO week (2026-W01); Sun 2025-12-28 is 2025-W52
    items = [
        PruneItem(_daily_id(date(2025, 12, 27) + timedelta(days=n)), "c",
                  _at(date(2025, 12, 27) + timedelta(days=n), 3))
        for n in range(7)
    ]
    assert kept(items, "keep-weekly=2") == days("2026-01-02", "2025-12-28")


def test_empty_policy_keeps_everything() -> None:
    items = calendar()
    plan = plan_prune(items, RetentionPolicy())
    assert plan.remove == []
    assert set(plan.keep) == {i.id for i in items}


def test_protected_is_kept_and_uses_no_slot() -> None:
    items = [
        PruneItem(i.id, i.container, i.created, protected=i.id in {"d-2026-02-03",
                                                                      "d-2025-03-01"})
        for i in calendar()
    ]
    plan = plan_prune(items, RetentionPolicy(keep_daily=2))
    # Feb 3's only backup is protected: it neither counts nor covers its day
    assert set(plan.keep) == {"h-09", "d-2026-02-03", "d-2026-02-02", "d-2025-03-01"}
    assert plan.keep["d-2026-02-03"] == ["protected"]
    assert plan.keep["d-2026-02-02"] == ["daily 2"]


def test_incremental_chain_is_kept_for_its_newest_member() -> None:
    t0 = _at(date(2026, 1, 1), 0)
    items = [
        PruneItem("full-1", "db", t0),
        PruneItem("inc-1", "db", t0 + 3600, parent="full-1"),
        PruneItem("inc-2", "db", t0 + 7200, parent="inc-1"),
        PruneItem("full-2", "db", t0 + 86400),
        PruneItem("inc-3", "db", t0 + 90000, parent="full-2"),
        PruneItem("inc-4", "db", t0 + 93600, parent="inc-3"),
    ]
    plan = plan_prune(items, RetentionPolicy(keep_last=1))
    assert plan.keep == {
        "inc-4": ["last 1"],
        "inc-3": ["needed by inc-4"],
        "full-2": ["needed by inc-3"],
    }
    assert plan.remove == ["inc-2", "inc-1", "full-1"]

    # day 1's newest is inc-2: keeping it keeps its whole chain back to full-1
    plan = plan_prune(items, RetentionPolicy(keep_daily=2))
    assert set(plan.keep) == {"inc-4", "inc-3", "full-2", "inc-2", "inc-1", "full-1"}
    assert plan.keep["inc-1"] == ["needed by inc-2"]


def test_a_kept_parent_may_be_kept_for_two_reasons() -> None:
    t0 = _at(date(2026, 1, 1), 0)
    items = [PruneItem("full", "db", t0), PruneItem("inc", "db", t0 + 60, parent="full")]
    plan = plan_prune(items, RetentionPolicy(keep_last=2))
    assert plan.keep == {"inc": ["last 1"], "full": ["last 2", "needed by inc"]}
    assert plan.remove == []


def test_containers_are_pruned_separately() -> None:
    items = calendar("web-1") + [
        PruneItem(f"db-{n}", "db-1", _at(date(2024, 6, 1), n)) for n in range(5)
    ]
    plan = plan_prune(items, RetentionPolicy(keep_last=1))
    assert set(plan.keep) == {"h-09", "db-4"}
    assert "db-0" in plan.remove


def test_periods_follow_the_given_zone() -> None:
    # 23:30 and 00:30 UTC are two UTC days but the same day at UTC+02:00
    items = [
        PruneItem("late", "c", datetime(2026, 1, 1, 23, 30, tzinfo=UTC).timestamp()),
        PruneItem("early", "c", datetime(2026, 1, 2, 0, 30, tzinfo=UTC).timestamp()),
    ]
    policy = RetentionPolicy(keep_daily=2)
    assert set(plan_prune(items, policy).keep) == {"late", "early"}
    plus2 = timezone(timedelta(hours=2))
    assert set(plan_prune(items, policy, tz=plus2).keep) == {"early"}


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidInput, match="twice"):
        plan_prune([PruneItem("a", "c", 1.0), PruneItem("a", "c", 2.0)], RetentionPolicy())


def test_parse_accepts_commas_and_spaces() -> None:
    policy = RetentionPolicy.parse(" keep-last=3, keep-daily=7  keep-YEARLY=1 ")
    assert policy == RetentionPolicy(keep_last=3, keep_daily=7, keep_yearly=1)
    assert str(policy) == "keep-last=3,keep-daily=7,keep-yearly=1"
    assert RetentionPolicy.parse("") == RetentionPolicy()
    assert RetentionPolicy.parse("").keeps_everything


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep-lats=3", "unknown retention rule 'keep-lats=3'"),
        ("last=3", "unknown retention rule"),
        ("keep-daily", "unknown retention rule"),
        ("keep-daily=-1", "needs a whole number"),
        ("keep-daily=x", "needs a whole number"),
        ("keep-daily=1,keep-daily=2", "given twice"),
    ],
)
def test_parse_refuses_with_an_example(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        RetentionPolicy.parse(text)
    assert "keep-last=3,keep-daily=7" in info.value.hint


def test_policy_refuses_negative_counts() -> None:
    with pytest.raises(InvalidInput, match="keep-weekly"):
        RetentionPolicy(keep_weekly=-2)
