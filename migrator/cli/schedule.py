"""``migrate schedule ...`` and ``migrate config host ...``: automatic snapshots and backups."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from migrator.cli.console import print_fields, print_json, say
from migrator.cli.context import current
from migrator.cli.options import format_option
from migrator.cli.render import Format, render
from migrator.core.errors import InvalidInput, JobsFailed

if TYPE_CHECKING:
    from migrator.backup.scheduler import Scheduler

schedule_app = typer.Typer(
    help="Automatic snapshots and backups from the snapshots.* and backups.* keys "
    "(`migrate config set web-1 snapshots.schedule=@daily`).",
    no_args_is_help=True,
)
host_config_app = typer.Typer(
    help="Host defaults for the schedule keys: used by every container that does not set "
    "its own (they stay on this host when a container moves; its own keys go with it).",
    no_args_is_help=True,
)
FORMAT_OPT = format_option("table or json")
JITTER_OPT = typer.Option(
    0, "--jitter", min=0,
    help="Spread the due jobs over this many seconds (a fixed place per container)")


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _parse_now(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidInput(f"cannot read the time {text!r}",
                           "ISO 8601, e.g. 2026-11-21T03:00 (local time) or with +00:00") from e
    return (dt if dt.tzinfo else dt.astimezone()).timestamp()


def _scheduler() -> Scheduler:
    from migrator.backup.scheduler import Scheduler

    return Scheduler(current().containers)


@schedule_app.command("tick")
def tick_cmd(
    now: str = typer.Option(None, "--now", help="Act as if it were this time (ISO 8601): "
                            "simulate a calendar, or test a schedule"),
    jitter: int = JITTER_OPT,
    fmt: Format = FORMAT_OPT,
) -> None:
    """One pass: take the due snapshots and backups, expire snapshots, prune repositories.

    A job is due when one of its scheduled times passed since it last ran (a missed run is
    caught up once). Exit code 23 when some jobs failed; the others still ran.
    """
    r = _scheduler().tick(_parse_now(now), float(jitter))
    if fmt == Format.json:
        print_json(r.as_dict())
    else:
        for j in r.results:
            say(f"{j.container}: {j.job} {j.result}" + (f" ({j.detail})" if j.detail else ""))
        for e in r.expired:
            say(f"expired {e}")
        if not r.results and not r.expired:
            say("nothing due")
    if r.failures:
        raise JobsFailed(f"{len(r.failures)} of {len(r.results)} scheduled jobs failed: " +
                         "; ".join(f"{f.container} {f.job}: {f.detail}" for f in r.failures))


@schedule_app.command("run")
def run_cmd(
    jitter: int = JITTER_OPT,
    interval: int = typer.Option(60, "--interval", min=1,
                                 help="Seconds between passes at most"),
) -> None:
    """Tick in the foreground until stopped (Ctrl-C or SIGTERM); failures are reported and
    the loop goes on."""
    stop = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    sched = _scheduler()
    while not stop:
        try:
            r = sched.tick(None, float(jitter))
            for j in r.results:
                say(f"{_when(time.time())} {j.container}: {j.job} {j.result} {j.detail}")
        except Exception as e:  # noqa: BLE001 - a bad pass must not end the loop
            say(f"{_when(time.time())} tick failed: {e}")
        nexts = [row["next"] for row in sched.status()["jobs"]]
        wait = min([interval, *[max(1.0, n - time.time()) for n in nexts]])
        end = time.monotonic() + wait
        while not stop and time.monotonic() < end:
            time.sleep(min(1.0, end - time.monotonic()))


@schedule_app.command("status")
def status_cmd(fmt: Format = FORMAT_OPT) -> None:
    """Each container's scheduled jobs: schedule, next run, last run and result, failures."""
    st = _scheduler().status()
    if fmt == Format.json:
        print_json(st)
        return
    rows = [{**r, "next": _when(r["next"]), "last": _when(r["last"])} for r in st["jobs"]]
    typer.echo(render(rows, ["container", "job", "schedule", "next", "last", "result",
                             "failures"], fmt))
    say(f"last tick: {_when(st['last_tick']) or 'never'}"
        + (f", {st['last_tick_failures']} failed" if st["last_tick_failures"] else ""))


@schedule_app.command("install")
def install_cmd(
    kind: str = typer.Option("auto", "--kind",
                             help="systemd (service + timer), cron (/etc/cron.d), or auto"),
    on_calendar: str = typer.Option("*-*-* 00:30:00", "--on-calendar",
                                    help="systemd timer time [default: nightly at 00:30]"),
    cron: str = typer.Option("30 0 * * *", "--cron", help="cron time for the cron entry"),
    jitter: int = typer.Option(1800, "--jitter", min=0,
                               help="Spread the jobs of one tick over this many seconds"),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir"),
    cron_dir: Path = typer.Option(Path("/etc/cron.d"), "--cron-dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files, write nothing"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Run `schedule tick` nightly: a systemd timer where systemd runs, else a cron entry."""
    from migrator.backup.schedule_install import install
    from migrator.runtime.host import root_from_env

    r = install(root_from_env(current().root), kind, on_calendar, cron, jitter, unit_dir,
                cron_dir, dry_run)
    if fmt == Format.json:
        print_json({**r.as_dict(), "dry_run": dry_run})
        return
    for path, text in r.files.items():
        say(f"{'would write' if dry_run else 'wrote'} {path}:")
        typer.echo(text)
    for step in r.next_steps:
        say(f"next: {step}")


# host defaults ---------------------------------------------------------------------------------
def _check_schedule_key(key: str) -> None:
    if not key.startswith(("snapshots.", "backups.")):
        raise InvalidInput(f"{key} cannot be a host default",
                           "host defaults are the snapshots.* and backups.* keys")


@host_config_app.command("set")
def host_set(assignments: list[str] = typer.Argument(..., help="KEY=VALUE...")) -> None:
    """Set host defaults, e.g. `snapshots.schedule=@daily snapshots.expiry=2w`."""
    from migrator.backup.scheduler import DEFAULTS_PREFIX
    from migrator.runtime.config import parse_assignments

    values = parse_assignments(assignments)
    for k in values:
        _check_schedule_key(k)
    state = current().host.state
    with state.transaction():
        for k, v in values.items():
            state.set_setting(DEFAULTS_PREFIX + k, v)


@host_config_app.command("unset")
def host_unset(keys: list[str]) -> None:
    """Remove host defaults."""
    from migrator.backup.scheduler import DEFAULTS_PREFIX

    state = current().host.state
    with state.transaction():
        for k in keys:
            _check_schedule_key(k)
            state.delete_setting(DEFAULTS_PREFIX + k)


@host_config_app.command("show")
def host_show(fmt: Format = FORMAT_OPT) -> None:
    """Show the host defaults."""
    from migrator.backup.scheduler import host_defaults

    d = host_defaults(current().host.state)
    if fmt == Format.json:
        print_json(d)
    else:
        print_fields(d, sort=True)
