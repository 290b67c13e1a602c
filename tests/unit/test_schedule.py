"""Schedule keys and the scheduler's choice of due jobs (pure: no containers)."""

from __future__ import annotations

from datetime import datetime

import pytest

from migrator.backup.scheduler import SchedulerState, due_jobs, effective, jitter_offset, next_after
from migrator.core.errors import InvalidInput
from migrator.runtime.config import validate
from migrator.runtime.schedule_keys import expiry_after, parse_schedule, render_pattern


def ts(text: str) -> float:
    return datetime.fromisoformat(text).astimezone().timestamp()


def test_schedules_with_commas_inside_fields_and_aliases() -> None:
    assert parse_schedule("0 6,18 * * *, @daily") == ["0 6,18 * * *", "@daily"]
    assert parse_schedule("@hourly") == ["@hourly"]
    assert validate("snapshots.schedule", "0 3 * * *,@weekly") == "0 3 * * *, @weekly"


@pytest.mark.parametrize("bad", ["", "daily", "0 6,18 * *", "61 * * * *", "@often",
                                 "0 3 * * *, nonsense"])
def test_bad_schedules_are_refused_with_an_example(bad: str) -> None:
    with pytest.raises(InvalidInput) as e:
        validate("snapshots.schedule", bad)
    assert "@daily" in (e.value.hint or "")


def test_next_run_is_the_earliest_of_all_expressions() -> None:
    exprs = parse_schedule("0 6,18 * * *, 30 12 * * *")
    assert next_after(exprs, ts("2026-03-01T07:00")) == ts("2026-03-01T12:30")
    assert next_after(exprs, ts("2026-03-01T12:30")) == ts("2026-03-01T18:00")


def test_pattern_counter_date_and_collisions() -> None:
    when = datetime(2026, 3, 1, 4, 5)
    assert render_pattern("snap%d", when, {"snap0", "snap1"}) == "snap2"
    assert render_pattern("snap%d", when, {"snap3", "other7"}) == "snap4"  # never reused
    assert render_pattern("snap%d", when, set()) == "snap0"
    assert render_pattern("auto-{date:%Y%m%d-%H%M}", when, set()) == "auto-20260301-0405"
    assert render_pattern("auto-{date:%Y%m%d}", when, {"auto-20260301"}) == "auto-20260301-1"
    for bad in ("snap", "bad/{date:%Y}", "x%d/../y"):
        with pytest.raises(InvalidInput):
            validate("snapshots.pattern", bad)


def test_expiry_follows_the_calendar() -> None:
    assert expiry_after(datetime(2026, 1, 31), "1m") == datetime(2026, 2, 28)
    assert expiry_after(datetime(2026, 1, 1), "1d 12H") == datetime(2026, 1, 2, 12)
    assert expiry_after(datetime(2026, 1, 1), "2w 30M") == datetime(2026, 1, 15, 0, 30)
    for bad in ("", "3x", "0d", "1 d"):
        with pytest.raises(InvalidInput):
            validate("snapshots.expiry", bad)


def test_retention_and_repo_values() -> None:
    assert validate("backups.retention", "keep-last=3 keep-daily=7") == \
        "keep-last=3,keep-daily=7"
    for bad in ("keep-daily", "keep-often=2", "keep-last=-1", "keep-last=1,keep-last=2", ""):
        with pytest.raises(InvalidInput):
            validate("backups.retention", bad)
    assert validate("backups.repo", "ssh://host-b/srv/b") == "ssh://host-b/srv/b"
    for bad in ("relative/path", "ssh://host-b", "ssh:///x"):
        with pytest.raises(InvalidInput):
            validate("backups.repo", bad)


def test_container_keys_override_host_defaults() -> None:
    conf = effective({"snapshots.schedule": "@hourly", "limits.cpu": "1"},
                     {"snapshots.schedule": "@daily", "snapshots.expiry": "1w"})
    assert conf == {"snapshots.schedule": "@hourly", "snapshots.expiry": "1w"}


def test_first_sight_is_not_due_then_due_once_after_a_missed_week() -> None:
    settings = {"c1": {"snapshots.schedule": "@daily"}, "c2": {}}
    st = SchedulerState()
    assert due_jobs(settings, st, ts("2026-03-01T10:00")) == []  # seen now, not due
    assert due_jobs(settings, st, ts("2026-03-01T23:59")) == []
    due = due_jobs(settings, st, ts("2026-03-02T00:00"))
    assert [(d.container, d.job) for d in due] == [("c1", "snapshot")]
    assert due[0].scheduled == ts("2026-03-02T00:00")
    st.job("c1", "snapshot").last = ts("2026-03-02T00:00")
    # the machine is off for a week: one run, not seven
    due = due_jobs(settings, st, ts("2026-03-09T08:00"))
    assert len(due) == 1
    st.job("c1", "snapshot").last = ts("2026-03-09T08:00")
    assert due_jobs(settings, st, ts("2026-03-09T23:00")) == []


def test_jitter_spreads_containers_in_a_fixed_order() -> None:
    offsets = [jitter_offset(f"c{i}", 600) for i in range(1000)]
    assert all(0 <= o < 600 for o in offsets)
    assert len({int(o) for o in offsets}) > 400  # spread, not bunched in one second
    assert offsets == [jitter_offset(f"c{i}", 600) for i in range(1000)]  # stable
    settings = {f"c{i}": {"backups.schedule": "@hourly"} for i in range(20)}
    st = SchedulerState()
    due_jobs(settings, st, ts("2026-03-01T10:30"))
    due = due_jobs(settings, st, ts("2026-03-01T11:00"), jitter=600)
    assert [d.offset for d in due] == sorted(d.offset for d in due) and len(due) == 20
