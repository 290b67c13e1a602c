"""A simulated month of scheduled snapshots and backups over real containers.

``tick --now`` is driven twice a day (00:30 and 12:30) for March 2026 on one test host:
- ``sc-run`` (btrfs, running): daily snapshots ``auto-YYYYMMDD`` expiring after a week,
  daily backups kept by keep-daily=3,keep-weekly=2;
- ``sc-half`` (dir, stopped, snapshots.schedule.stopped=true): snapshots every 12 hours
  named ``snap%d``, expiring after 2 days, and a manual snapshot that must survive;
- ``sc-off`` (dir, stopped): scheduled, but stopped containers are skipped by default;
- ``sc-full``: daily backups into a repository on a 256 KiB tmpfs: they fail, every time,
  and the others carry on.
Every expectation below is worked out by hand from the calendar, not from the code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from migrator.backup.repository import Repository
from migrator.backup.scheduler import Scheduler

MONTH_START = datetime(2026, 3, 1, 0, 30)


@pytest.fixture
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def tiny_repo(host) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    path = host.root / "full-repo"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def ts(dt: datetime) -> float:
    return dt.timestamp()


def test_a_simulated_month(host, utc, tiny_repo) -> None:  # type: ignore[no-untyped-def]
    cts = host.cts
    cts.launch("busybox", "sc-run", "btrfs", {})
    cts.config_set("sc-run", {"snapshots.schedule": "@daily",
                              "snapshots.pattern": "auto-{date:%Y%m%d}",
                              "snapshots.expiry": "1w", "backups.schedule": "@daily",
                              "backups.retention": "keep-daily=3,keep-weekly=2"})
    cts.create("busybox", "sc-half", "dir", {})
    host.cli("config", "set", "sc-half", "snapshots.schedule=0 0,12 * * *",
             "snapshots.schedule.stopped=true", "snapshots.expiry=2d", check=True)
    cts.snapshot_create("sc-half", "manual0", created=ts(datetime(2026, 2, 1)))
    cts.create("busybox", "sc-off", "dir", {})
    cts.create("busybox", "sc-full", "dir", {})
    host.cli("config", "host", "set", "snapshots.schedule=@daily", check=True)  # sc-off's
    host.cli("config", "set", "sc-full", "backups.schedule=@daily",
             f"backups.repo={tiny_repo}", check=True)
    bad = host.cli("config", "set", "sc-full", "snapshots.expiry=3 days")
    assert bad.returncode == 3 and "for example" in bad.stderr, bad.stderr

    sched = Scheduler(cts)
    runs: dict[str, list[str]] = {}
    failures = 0
    at = MONTH_START
    while at <= datetime(2026, 3, 31, 12, 30):
        r = sched.tick(ts(at))
        for j in r.results:
            runs.setdefault(f"{j.container}/{j.job}", []).append(j.result)
        failures += len(r.failures)
        at += timedelta(hours=12)

    # first sight on 1 March counts from then: the first daily run is 2 March 00:30
    assert runs["sc-run/snapshot"] == ["ok"] * 30
    assert runs["sc-run/backup"] == ["ok"] * 30
    assert runs["sc-half/snapshot"] == ["ok"] * 61  # 1 March 12:30 .. 31 March 12:30
    assert runs["sc-off/snapshot"] == ["skipped"] * 30
    assert runs["sc-full/backup"] == ["failed"] * 30 and failures == 30
    assert cts.status("sc-run") == "RUNNING"

    # weekly expiry: created 25..31 March at 00:30 are alive on 31 March 12:30
    names = [s.name for s in cts.snapshot_list("sc-run")]
    assert names == [f"auto-202603{d:02d}" for d in range(25, 32)]
    for s in cts.snapshot_list("sc-run"):
        assert s.expires == s.created + 7 * 86400
    # 2-day expiry, counter never reused: snap0 on 1 March 12:30 ... snap60 on 31 March
    # 12:30; alive: 30 March 00:30 (snap57) .. 31 March 12:30, and the manual one
    half = {s.name: s for s in cts.snapshot_list("sc-half")}
    assert set(half) == {"manual0", "snap57", "snap58", "snap59", "snap60"}
    assert half["manual0"].expires is None
    assert half["snap60"].created == ts(datetime(2026, 3, 31, 12, 30))
    assert cts.snapshot_list("sc-off") == []

    # retention, PBS semantics: daily 31, 30, 29; weekly: ISO weeks of 30 March and of 23
    # March already hold a kept one, so the weeks of 16 and 9 March give 22 and 15 March
    kept = sorted(datetime.fromtimestamp(b.created).day
                  for b in Repository(host.root / "backups").list())
    assert kept == [15, 22, 29, 30, 31]

    st = host.cli("schedule", "status", "--format", "json", check=True)
    rows = {(r["container"], r["job"]): r for r in json.loads(st.stdout)["jobs"]}
    full = rows[("sc-full", "backup")]
    assert full["failures"] == 30 and "space" in full["error"].lower(), full
    assert rows[("sc-run", "snapshot")]["next"] == ts(datetime(2026, 4, 1))
    assert rows[("sc-off", "snapshot")]["schedule"] == "@daily"  # the host default

    # the CLI tick: one more day; exit code 23 names the failure, the others ran
    r = host.cli("schedule", "tick", "--now", "2026-04-01T00:30", "--format", "json")
    assert r.returncode == 23 and "sc-full" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    done = {(j["container"], j["job"]): j["result"] for j in out["jobs"]}
    assert done[("sc-run", "snapshot")] == "ok" and done[("sc-run", "backup")] == "ok"
    assert "sc-run/auto-20260325" in out["expired"]


def test_ticks_do_not_overlap(host) -> None:  # type: ignore[no-untyped-def]
    from migrator.backup.scheduler import tick_lock

    with tick_lock(host.root):
        r = host.cli("schedule", "tick")
    assert r.returncode == 6 and f"pid {os.getpid()}" in r.stderr, r.stderr


def test_install_writes_units_systemd_accepts_and_a_cron_line(host, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from croniter import croniter

    r = host.cli("schedule", "install", "--kind", "systemd", "--unit-dir", str(tmp_path),
                 check=True)
    service, timer = tmp_path / "migrate-schedule.service", tmp_path / "migrate-schedule.timer"
    assert "OnCalendar=*-*-* 00:30:00" in timer.read_text() and "Persistent=true" in \
        timer.read_text()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", "--man=no", str(service), str(timer)],
                           capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr
    exec_start = next(line for line in service.read_text().splitlines()
                      if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert Path(argv[0]).is_absolute() and argv[-4:-2] == ["schedule", "tick"]
    assert str(host.root) in argv
    r = host.cli("schedule", "install", "--kind", "cron", "--cron-dir", str(tmp_path),
                 "--cron", "15 1 * * *", check=True)
    line = next(x for x in (tmp_path / "migrate-schedule").read_text().splitlines()
                if x and not x.startswith("#"))
    fields = line.split()
    assert croniter.is_valid(" ".join(fields[:5])) and fields[:5] == ["15", "1", "*", "*", "*"]
    assert fields[5] == "root" and fields[-4:] == ["schedule", "tick", "--jitter", "1800"]
    assert r.returncode == 0
