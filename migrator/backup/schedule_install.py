"""``migrate schedule install``: run the scheduler's tick from systemd or cron.

Where systemd is the init (``/run/systemd/system`` exists), a oneshot service and a timer
(``Persistent=true``: a run missed while the machine was off happens at the next boot,
once) are written; elsewhere a line in ``/etc/cron.d``. Nightly by default. The command is
an absolute path and plain words (no shell): a path with spaces or quotes is refused rather
than quoted for two different parsers.

A tick has no terminal to ask a passphrase on: a chunked repository's comes from
``MIGRATOR_PASSPHRASE_FILE`` (a 0600 file) or its key from ``MIGRATOR_KEY_FILE``, and an S3
store's endpoint and credentials the standard AWS way. The variables that *point* at those
(``PASSED_ENV``), set when ``schedule install`` runs, are written into the unit
(``Environment=``) or the cron file (its variable lines); never a secret itself
(``MIGRATOR_PASSPHRASE``, ``AWS_SECRET_ACCESS_KEY``: a unit file is world-readable).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from migrator.core.errors import InvalidInput

UNIT = "migrate-schedule"
DEFAULT_CALENDAR = "*-*-* 00:30:00"
DEFAULT_CRON = "30 0 * * *"
DEFAULT_JITTER = 1800


#: the environment a scheduled tick needs from the installer's: where secrets are kept,
#: never the secrets
PASSED_ENV = ("MIGRATOR_PASSPHRASE_FILE", "MIGRATOR_KEY_FILE", "AWS_PROFILE", "AWS_REGION",
              "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
#: set when installing, but not written (secrets): said so in the next steps
SECRET_ENV = ("MIGRATOR_PASSPHRASE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN")


def _plain(value: str) -> str:
    if not value or any(c.isspace() or c in "\"'\\%$`;" for c in value):
        raise InvalidInput(f"cannot write {value!r} into a unit file or crontab safely",
                           "install migrate and the state root under plain paths")
    return value


def passed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``PASSED_ENV`` variables set in ``environ`` (default: this process's), checked
    to be plain words."""
    env = dict(os.environ if environ is None else environ)
    out = {}
    for name in PASSED_ENV:
        if env.get(name):
            try:
                out[name] = _plain(env[name])
            except InvalidInput as e:
                raise InvalidInput(f"{name}: {e.message}", e.hint) from e
    return out


def tick_argv(root: Path, jitter: int) -> list[str]:
    """The tick command: the installed ``migrate`` beside this Python, else ``python -m``."""
    beside = Path(sys.executable).parent / "migrate"
    found = str(beside) if beside.exists() else shutil.which("migrate")
    base = [found] if found else [sys.executable, "-m", "migrator.cli.main"]
    argv = [*base, "--root", str(root), "schedule", "tick", "--jitter", str(jitter)]
    for a in argv:
        _plain(a)
    return argv


def has_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


@dataclass
class Installed:
    kind: str  # "systemd" or "cron"
    files: dict[str, str]  # path -> content
    next_steps: list[str]

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "files": sorted(self.files), "next_steps": self.next_steps}


def systemd_units(argv: list[str], calendar: str = DEFAULT_CALENDAR,
                  env: dict[str, str] | None = None) -> dict[str, str]:
    service = (
        "[Unit]\n"
        "Description=migrate: scheduled container snapshots and backups (one tick)\n"
        "After=local-fs.target network-online.target\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        + "".join(f"Environment={k}={v}\n" for k, v in (env or {}).items())
        + f"ExecStart={' '.join(argv)}\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
    )
    timer = (
        "[Unit]\n"
        "Description=migrate: run the snapshot and backup scheduler\n\n"
        "[Timer]\n"
        f"OnCalendar={calendar}\n"
        "Persistent=true\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def cron_entry(argv: list[str], spec: str = DEFAULT_CRON,
               env: dict[str, str] | None = None) -> str:
    from croniter import croniter

    if len(spec.split()) != 5 or not croniter.is_valid(spec):
        raise InvalidInput(f"not a cron time: {spec!r}", "five fields, e.g. 30 0 * * *")
    return ("# migrate: scheduled container snapshots and backups\n"
            + "".join(f"{k}={v}\n" for k, v in (env or {}).items())
            + f"{spec} root {' '.join(argv)}\n")


def install(root: Path, kind: str = "auto", calendar: str = DEFAULT_CALENDAR,
            cron_spec: str = DEFAULT_CRON, jitter: int = DEFAULT_JITTER,
            unit_dir: Path = Path("/etc/systemd/system"),
            cron_dir: Path = Path("/etc/cron.d"), dry_run: bool = False) -> Installed:
    """Write the timer (systemd) or the cron line; ``dry_run`` only returns them."""
    if kind == "auto":
        kind = "systemd" if has_systemd() else "cron"
    if kind not in ("systemd", "cron"):
        raise InvalidInput(f"unknown scheduler kind {kind!r}", "systemd, cron or auto")
    argv = tick_argv(root, jitter)
    env = passed_env()
    if kind == "systemd":
        files = {str(unit_dir / n): t for n, t in systemd_units(argv, calendar, env).items()}
        steps = ["systemctl daemon-reload", f"systemctl enable --now {UNIT}.timer"]
    else:
        files = {str(cron_dir / UNIT): cron_entry(argv, cron_spec, env)}
        steps = ["cron reads /etc/cron.d by itself (make sure cron runs)"]
    unsaid = [n for n in SECRET_ENV if os.environ.get(n)]
    if unsaid:
        steps.append(f"{', '.join(unsaid)} not written (secrets, and the file is readable "
                     "by all): give the tick MIGRATOR_PASSPHRASE_FILE (a 0600 file) and an "
                     "AWS profile or credentials file instead, then install again")
    if not dry_run:
        for path, text in files.items():
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            os.replace(tmp, p)
    return Installed(kind, files, steps)
