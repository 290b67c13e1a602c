"""The syntax of the schedule keys (``snapshots.*``, ``backups.*``), checked at ``config set``.

These are configuration values like ``limits.memory``, so they are parsed here, where every
key is validated (also when a container arrives from another host with its schedule). The
scheduler (``backup/scheduler.py``) uses the same functions to act on them.

- ``snapshots.schedule`` / ``backups.schedule``: cron expressions (five fields, or
  ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``), several separated by
  commas. Commas inside a cron field (``0 6,18 * * *``) are told apart by trying the pieces:
  a piece that is not a whole expression is joined with the next. Checked by croniter.
- ``snapshots.pattern``: ``%d`` is a counter (one more than the highest in use, as in LXD),
  ``{date:FORMAT}`` the scheduled time through strftime (``auto-{date:%Y%m%d-%H%M}``).
- ``snapshots.expiry``: ``1M 2H 3d 4w 5m 6y`` (minutes, hours, days, weeks, months, years,
  LXD's letters), added to the snapshot's creation time by the calendar (a month after
  31 January is the end of February).
- ``backups.retention``: ``keep-last=3,keep-daily=7`` (see ``backup/prune.py``).
- ``backups.repo``: a directory, ``ssh://HOST/PATH`` or ``s3://BUCKET/PREFIX``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

from migrator.core.errors import InvalidInput
from migrator.core.names import SnapshotName

SCHEDULE_EXAMPLE = "@daily, or 0 3 * * *, or 0 6,18 * * *, @weekly"
PATTERN_EXAMPLE = "snap%d, or auto-{date:%Y%m%d-%H%M}"
EXPIRY_EXAMPLE = "2w, or 1d 12H, or 3m"
RETENTION_EXAMPLE = "keep-last=3,keep-daily=7,keep-weekly=4"
RETENTION_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
            "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
            "@annually": "0 0 1 1 *"}


def _valid_cron(expr: str) -> bool:
    from croniter import croniter

    expr = _ALIASES.get(expr, expr)
    return len(expr.split()) == 5 and bool(croniter.is_valid(expr))


def parse_schedule(text: str) -> list[str]:
    """The cron expressions in ``text`` (each checked), in the order given."""
    pieces = [p.strip() for p in text.split(",")]
    exprs: list[str] = []
    pending = ""
    for piece in pieces:
        candidate = f"{pending},{piece}" if pending else piece
        if _valid_cron(candidate):
            exprs.append(candidate)
            pending = ""
        else:
            pending = candidate
    if pending or not exprs:
        bad = pending or text
        raise InvalidInput(f"not a cron schedule: {bad.strip()!r}",
                           f"five fields (minute hour day month weekday) or @hourly/@daily/"
                           f"@weekly/@monthly/@yearly; for example: {SCHEDULE_EXAMPLE}")
    return exprs


def cron_expression(expr: str) -> str:
    """The five-field form of ``expr`` (aliases expanded), as croniter takes it."""
    return _ALIASES.get(expr, expr)


def _schedule(value: str) -> str:
    return ", ".join(parse_schedule(value))


_DATE = re.compile(r"\{date:([^{}]*)\}")


def render_pattern(pattern: str, when: datetime, existing: set[str]) -> SnapshotName:
    """The name of an automatic snapshot taken at ``when`` (never one in ``existing``)."""
    dated = _DATE.sub(lambda m: when.strftime(m.group(1)), pattern)
    if "%d" in dated:  # one more than the highest number in use, as LXD: never reused
        head, _, tail = dated.partition("%d")
        counter = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail.replace("%d", "")))
        used = [int(m.group(1)) for e in existing if (m := counter.fullmatch(e))]
        return SnapshotName(head + str(max(used) + 1 if used else 0) + tail.replace("%d", ""))
    name, n = dated, 1
    while name in existing:  # two runs in the same minute: keep both
        name = f"{dated}-{n}"
        n += 1
    return SnapshotName(name)


def _pattern(value: str) -> str:
    value = value.strip()
    if "%d" not in value and not _DATE.search(value):
        raise InvalidInput(f"snapshots.pattern {value!r} gives every snapshot the same name",
                           f"use a counter or a date; for example: {PATTERN_EXAMPLE}")
    try:
        render_pattern(value, datetime(2026, 12, 31, 23, 59, 58), set())
    except (InvalidInput, ValueError) as e:
        raise InvalidInput(f"snapshots.pattern {value!r} does not make valid snapshot names "
                           f"({e})", f"letters, digits, '-', '_' and '.'; for example: "
                           f"{PATTERN_EXAMPLE}") from e
    return value


_EXPIRY = re.compile(r"^(\d+)([MHdwmy])$")
_EXPIRY_UNITS = {"M": "minutes", "H": "hours", "d": "days", "w": "weeks", "m": "months",
                 "y": "years"}


def parse_expiry(text: str) -> dict[str, int]:
    """``"1d 12H"`` -> ``{"days": 1, "hours": 12}`` (relativedelta's arguments)."""
    out: dict[str, int] = {}
    parts = text.split()
    for part in parts:
        m = _EXPIRY.match(part)
        if not m:
            raise InvalidInput(f"snapshots.expiry: cannot read {part!r}",
                               "a number and one of M (minutes), H (hours), d, w, m (months), "
                               f"y; for example: {EXPIRY_EXAMPLE}")
        unit = _EXPIRY_UNITS[m.group(2)]
        out[unit] = out.get(unit, 0) + int(m.group(1))
    if not out or not any(out.values()):
        raise InvalidInput(f"snapshots.expiry {text!r} is empty or zero",
                           f"for example: {EXPIRY_EXAMPLE}")
    return out


def expiry_after(created: datetime, text: str) -> datetime:
    """When a snapshot created at ``created`` with ``snapshots.expiry`` = ``text`` expires."""
    from dateutil.relativedelta import relativedelta

    return created + relativedelta(**parse_expiry(text))  # type: ignore[arg-type]


def _expiry(value: str) -> str:
    parse_expiry(value)
    return " ".join(value.split())


def parse_retention(text: str) -> dict[str, int]:
    """``"keep-last=3,keep-daily=7"`` -> ``{"last": 3, "daily": 7}`` (commas or spaces)."""
    values: dict[str, int] = {}
    for part in (p for p in re.split(r"[,\s]+", text.strip()) if p):
        key, sep, raw = part.partition("=")
        rule = key.strip().lower().removeprefix("keep-")
        if not sep or not key.strip().lower().startswith("keep-") or rule not in RETENTION_RULES:
            raise InvalidInput(f"unknown retention rule {part!r}",
                               f"rules are keep-{', keep-'.join(RETENTION_RULES)}; for "
                               f"example: {RETENTION_EXAMPLE}")
        if not raw.strip().isdigit():
            raise InvalidInput(f"{key} needs a whole number >= 0, not {raw!r}",
                               f"for example: {RETENTION_EXAMPLE}")
        if rule in values:
            raise InvalidInput(f"{key} is given twice", f"for example: {RETENTION_EXAMPLE}")
        values[rule] = int(raw)
    return values


def _retention(value: str) -> str:
    rules = parse_retention(value)
    if not rules:
        raise InvalidInput("backups.retention is empty",
                           f"unset it to keep every backup; for example: {RETENTION_EXAMPLE}")
    return ",".join(f"keep-{r}={n}" for r, n in rules.items())


_S3_REPO = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*")


def _repo(value: str) -> str:
    """A directory, ``ssh://HOST/PATH`` (either format there) or ``s3://BUCKET[/PREFIX]``
    (syntax only here: ``backup/s3store.py`` parses it again, strictly, when used)."""
    value = value.strip()
    if value.startswith("ssh://"):
        host, _, path = value.removeprefix("ssh://").partition("/")
        if not host or not path:
            raise InvalidInput(f"backups.repo {value!r} needs a host and a path",
                               "for example: ssh://host-b/var/backups/migrate")
        return value
    if value.startswith("s3:"):
        if not _S3_REPO.fullmatch(value) or ".." in value.split("/"):
            raise InvalidInput(f"backups.repo {value!r} is not an s3://BUCKET/PREFIX address",
                               "for example: s3://backups/host-a (a bucket name of lower-case "
                               "letters, digits, '.' and '-'; the endpoint and credentials "
                               "come from AWS_* variables, never from the address)")
        return value
    if not value.startswith("/"):
        raise InvalidInput(f"backups.repo {value!r} must be an absolute path, ssh://HOST/PATH "
                           "or s3://BUCKET/PREFIX",
                           "for example: /srv/backups, ssh://host-b/srv/backups or "
                           "s3://backups/host-a")
    return value


# (the two true/false keys, snapshots.schedule.stopped and backups.incremental, are parsed
# by runtime/config.py's boolean parser like every other flag)
SCHEDULE_KEYS: dict[str, Callable[[str], str]] = {
    "snapshots.schedule": _schedule,
    "snapshots.pattern": _pattern,
    "snapshots.expiry": _expiry,
    "backups.schedule": _schedule,
    "backups.repo": _repo,
    "backups.retention": _retention,
}
