"""Automatic snapshots and backups: one ``tick`` takes what is due, expires, prunes, exits.

Settings are container config keys (``runtime/schedule_keys.py``), with host defaults
(``migrate config host set``) for containers that set none of their own; the container's
keys travel with it to another host, the host defaults stay.

When is a job due? Each (container, job) remembers when it last ran (``<root>/schedule/
state.json``); the job is due when a scheduled time has passed since then. A job never run
before counts from when the scheduler first saw it, so adding a schedule does not fire at
once. After a run the job counts from *now*: a host that was off for a week catches a
missed ``@daily`` up once, not seven times.

Spreading: with ``jitter`` seconds, each container gets a fixed offset in that window
(from a hash of its name) and the tick waits until its offset has passed before running
its jobs, so a thousand containers do not snapshot in the same second. A simulated tick
(``now`` given) does not wait.

One failed job never stops the others: each is run, timed and recorded (last result,
consecutive failures, the error) and reported. A lock file keeps two ticks from running
at once; the second is refused at once with the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from migrator.backup.catalog import collect_garbage, prune_repository
from migrator.backup.create import create_backup
from migrator.backup.prune import RetentionPolicy
from migrator.backup.remote import close_repository, open_repository
from migrator.backup.repository import BackupRepository
from migrator.core.errors import InvalidState, MigratorError
from migrator.runtime.containers import Containers
from migrator.runtime.schedule_keys import (
    cron_expression,
    expiry_after,
    parse_schedule,
    render_pattern,
)
from migrator.runtime.state import StateStore

JOBS = ("snapshot", "backup")
DEFAULTS_PREFIX = "default."  # host defaults in the settings table
DEFAULT_PATTERN = "snap%d"


def schedule_dir(root: Path) -> Path:
    return root / "schedule"


# settings ------------------------------------------------------------------------------------
def host_defaults(state: StateStore) -> dict[str, str]:
    """The host-wide schedule keys (``migrate config host set``)."""
    return dict(state.settings_with_prefix(DEFAULTS_PREFIX))


def effective(config: dict[str, str], defaults: dict[str, str]) -> dict[str, str]:
    """The container's own schedule keys over the host defaults."""
    out = dict(defaults)
    out.update({k: v for k, v in config.items() if k.startswith(("snapshots.", "backups."))})
    return out


# when ----------------------------------------------------------------------------------------
def local_time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts).astimezone()


def next_after(exprs: list[str], after: float) -> float:
    """The first time any of ``exprs`` fires strictly after ``after`` (local time, as cron)."""
    from croniter import croniter

    start = local_time(after)
    return min(croniter(cron_expression(e), start).get_next(float) for e in exprs)


def jitter_offset(name: str, jitter: float) -> float:
    """A container's fixed place in the jitter window (the same on every tick)."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter


@dataclass
class JobState:
    last: float | None = None  # when it last ran (or was first seen: ``seen``)
    seen: float | None = None
    result: str = ""  # "ok", "skipped: ...", "failed: ..."
    failures: int = 0  # consecutive
    error: str = ""
    seconds: float = 0.0


@dataclass
class SchedulerState:
    """What the scheduler remembers between ticks (JSON, written atomically)."""

    jobs: dict[str, dict[str, JobState]] = field(default_factory=dict)
    last_tick: float | None = None
    last_tick_failures: int = 0

    @classmethod
    def load(cls, path: Path) -> SchedulerState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise InvalidState(f"the scheduler state {path} is unreadable: {e}",
                               "move it away; jobs then count from the next tick") from e
        jobs = {ct: {j: JobState(**v) for j, v in per.items()}
                for ct, per in raw.get("jobs", {}).items()}
        return cls(jobs, raw.get("last_tick"), int(raw.get("last_tick_failures", 0)))

    def save(self, path: Path) -> None:
        data = {"jobs": {ct: {j: asdict(s) for j, s in per.items()}
                         for ct, per in self.jobs.items()},
                "last_tick": self.last_tick, "last_tick_failures": self.last_tick_failures}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def job(self, container: str, job: str) -> JobState:
        return self.jobs.setdefault(container, {}).setdefault(job, JobState())


@dataclass
class Due:
    container: str
    job: str
    scheduled: float  # the scheduled time that made it due
    offset: float  # its place in the jitter window


def due_jobs(settings: dict[str, dict[str, str]], state: SchedulerState, now: float,
             jitter: float = 0.0) -> list[Due]:
    """Which jobs are due at ``now`` (pure: settings per container, remembered state).

    A job seen for the first time is remembered as seen now and is not due yet.
    """
    out = []
    for ct, conf in settings.items():
        for job in JOBS:
            text = conf.get(f"{job}s.schedule")
            if not text:
                continue
            js = state.job(ct, job)
            since = js.last if js.last is not None else js.seen
            if since is None:
                js.seen = now
                continue
            scheduled = next_after(parse_schedule(text), since)
            if scheduled <= now:
                out.append(Due(ct, job, scheduled, jitter_offset(ct, jitter)))
    out.sort(key=lambda d: (d.offset, d.container, d.job))
    return out


# a tick --------------------------------------------------------------------------------------
@dataclass
class JobResult:
    container: str
    job: str
    result: str  # ok / skipped / failed
    detail: str = ""
    seconds: float = 0.0


@dataclass
class TickResult:
    now: float
    results: list[JobResult] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[JobResult]:
        return [r for r in self.results if r.result == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now, "seconds": round(self.seconds, 3),
                "jobs": [asdict(r) for r in self.results], "expired": self.expired,
                "failures": len(self.failures)}


@contextlib.contextmanager
def tick_lock(root: Path) -> Iterator[None]:
    """One tick at a time per host: a second one is refused with the holder's pid."""
    d = schedule_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InvalidState(f"another scheduler tick is running (pid {holder})",
                               "it finishes on its own; `migrate schedule status` shows "
                               "the last results") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Scheduler:
    """Runs the due jobs of one host's containers."""

    def __init__(self, cts: Containers, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cts = cts
        self.root: Path = cts.host.root
        self.state_path = schedule_dir(self.root) / "state.json"
        self.sleep = sleep
        self._live: dict[str, tuple[str, str]] | None = None
        self._repos: dict[str | None, BackupRepository] = {}
        self._pruned: set[str | None] = set()  # repositories whose retention ran this tick

    def settings(self) -> dict[str, dict[str, str]]:
        defaults = host_defaults(self.cts.state)
        return {c.name: effective(c.config, defaults) for c in self.cts.state.list_containers()}

    def tick(self, now: float | None = None, jitter: float = 0.0) -> TickResult:
        simulated = now is not None
        t0 = time.monotonic()
        at = now if now is not None else time.time()
        with tick_lock(self.root):
            state = SchedulerState.load(self.state_path)
            settings = self.settings()
            result = TickResult(at)
            self._live = None
            saved = time.monotonic()
            try:
                for due in due_jobs(settings, state, at, jitter):
                    if not simulated:
                        wait = due.offset - (time.monotonic() - t0)
                        if wait > 0:
                            self.sleep(wait)
                    job_at = at if simulated else time.time()
                    result.results.append(self._run(due, settings[due.container], state,
                                                    job_at))
                    if time.monotonic() - saved > 1.0:  # a crash repeats a second's jobs
                        state.save(self.state_path)
                        saved = time.monotonic()
                result.results.extend(self._collect_garbage())
            finally:
                self._close_repositories()
            result.expired = self._expire(at, result)
            for ct in [c for c in state.jobs if c not in settings]:
                del state.jobs[ct]  # deleted or moved away: its schedule went with it
            state.last_tick = at
            state.last_tick_failures = len(result.failures)
            state.save(self.state_path)
        result.seconds = time.monotonic() - t0
        return result

    def _run(self, due: Due, conf: dict[str, str], state: SchedulerState,
             at: float) -> JobResult:
        js = state.job(due.container, due.job)
        t0 = time.monotonic()
        try:
            if due.job == "snapshot":
                detail = self._snapshot(due.container, conf, at)
            else:
                detail = self._backup(due.container, conf, at)
            outcome = "skipped" if detail.startswith("skipped") else "ok"
            js.failures, js.error = 0, ""
        except Exception as e:  # noqa: BLE001 - one failed job never stops the others
            outcome = "failed"
            detail = e.message if isinstance(e, MigratorError) else f"{type(e).__name__}: {e}"
            js.failures += 1
            js.error = detail
        js.last = at
        js.seconds = time.monotonic() - t0
        js.result = outcome if outcome != "skipped" else detail
        return JobResult(due.container, due.job, outcome, detail, js.seconds)

    def _snapshot(self, name: str, conf: dict[str, str], at: float) -> str:
        if conf.get("snapshots.schedule.stopped") != "true" and \
                self._state_of(name) != "RUNNING":
            return "skipped: stopped (snapshots.schedule.stopped=false)"
        when = local_time(at)
        existing = {s.name for s in self.cts.state.list_snapshots(name)}
        snap = render_pattern(conf.get("snapshots.pattern") or DEFAULT_PATTERN, when, existing)
        expiry = conf.get("snapshots.expiry")
        expires = expiry_after(when, expiry).timestamp() if expiry else None
        self.cts.snapshot_create(name, snap, created=at, expires=expires)
        return f"snapshot {snap}" + (f", expires {local_time(expires):%Y-%m-%d %H:%M}"
                                     if expires else "")

    def _state_of(self, name: str) -> str:
        """A container's state, from one ``lxc-ls`` per tick (not one ``lxc-info`` each)."""
        if self._live is None:
            self._live = self.cts.run_states()
        return self._live.get(name, ("STOPPED", ""))[0]

    def _backup(self, name: str, conf: dict[str, str], at: float) -> str:
        repo = self._repository(conf.get("backups.repo") or None)
        r = create_backup(self.cts, name, repo,
                          incremental=conf.get("backups.incremental") == "true", created=at)
        detail = f"backup {r.id}"
        retention = conf.get("backups.retention")
        if retention:
            pruned = prune_repository(repo, RetentionPolicy.parse(retention), container=name)
            self._pruned.add(conf.get("backups.repo") or None)
            if pruned.removed:
                detail += f", pruned {len(pruned.removed)}"
        return detail

    def _collect_garbage(self) -> list[JobResult]:
        """Once per tick and chunked repository whose retention ran: the chunks no backup
        references any more are recorded, and those recorded by an earlier tick (at least
        ``catalog.GC_GRACE`` ago, with no backup being written) deleted. A repository of
        the directory format has nothing to collect. A failure is reported like a job's."""
        out = []
        for spec in sorted(self._pruned, key=str):
            repo = self._repos[spec]
            t0 = time.monotonic()
            try:
                gc = collect_garbage(repo)
                if gc is None:  # the directory format: nothing shared to collect
                    continue
                detail = (f"{repo}: deleted {gc.deleted} unreferenced chunk(s), "
                          f"{gc.pending} recorded for a later tick"
                          + (f", {gc.postponed} postponed while backups are written"
                             if gc.postponed else ""))
                outcome = "ok"
            except Exception as e:  # noqa: BLE001 - reported, like a failed job
                detail = f"{repo}: " + (e.message if isinstance(e, MigratorError)
                                        else f"{type(e).__name__}: {e}")
                outcome = "failed"
            out.append(JobResult(str(repo), "collect", outcome, detail,
                                 time.monotonic() - t0))
        self._pruned.clear()
        return out

    def _repository(self, spec: str | None) -> BackupRepository:
        """One repository object per ``backups.repo`` value and tick: a remote one keeps its
        SSH connection for every container that backs up there."""
        if spec not in self._repos:
            self._repos[spec] = open_repository(self.cts.host, spec)
        return self._repos[spec]

    def _close_repositories(self) -> None:
        for repo in self._repos.values():
            with contextlib.suppress(Exception):  # a connection that broke: gone anyway
                close_repository(repo)
        self._repos.clear()

    def _expire(self, at: float, result: TickResult) -> list[str]:
        """Delete automatic snapshots whose time is up (manual ones carry no expiry)."""
        gone = []
        for s in self.cts.state.expired_snapshots(at):
            try:
                self.cts.snapshot_delete(s.container, s.name)
                gone.append(f"{s.container}/{s.name}")
            except MigratorError as e:
                result.results.append(JobResult(s.container, "expire", "failed",
                                                f"{s.name}: {e.message}"))
        return gone

    # status ----------------------------------------------------------------------------------
    def status(self, now: float | None = None) -> dict[str, Any]:
        at = now if now is not None else time.time()
        state = SchedulerState.load(self.state_path)
        rows = []
        for ct, conf in sorted(self.settings().items()):
            for job in JOBS:
                text = conf.get(f"{job}s.schedule")
                if not text:
                    continue
                js = state.jobs.get(ct, {}).get(job, JobState())
                since = js.last if js.last is not None else (js.seen or at)
                rows.append({
                    "container": ct, "job": job, "schedule": text,
                    "next": next_after(parse_schedule(text), since),
                    "last": js.last, "result": js.result or "never run",
                    "failures": js.failures, "error": js.error,
                })
        return {"last_tick": state.last_tick, "last_tick_failures": state.last_tick_failures,
                "jobs": rows}
