"""``migrate schedule install``: run the scheduler's tick from systemd or cron.

Where systemd is the init (``/run/systemd/system`` exists), a oneshot service and a timer
(``Persistent=true``: a run missed while the machine was off happens at the next boot,
once) are written; elsewhere a line in ``/etc/cron.d``. Nightly by default. The command is
an absolute path and plain words (no shell): a path with spaces or quotes is refused rather
than quoted for two different parsers.
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


def tick_argv(root: Path, jitter: int) -> list[str]:
    """The tick command: the installed ``migrate`` beside this Python, else ``python -m``."""
    beside = Path(sys.executable).parent / "migrate"
    found = str(beside) if beside.exists() else shutil.which("migrate")
    base = [found] if found else [sys.executable, "-m", "migrator.cli.main"]
    argv = [*base, "--root", str(root), "schedule", "tick", "--jitter", str(jitter)]
    for a in argv:
        if not a or any(c.isspace() or c in "\"'\\%$`;" for c in a):
            raise InvalidInput(f"cannot write {a!r} into a unit file or crontab safely",
                               "install migrate and the state root under plain paths")
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


def systemd_units(argv: list[str], calendar: str = DEFAULT_CALENDAR) -> dict[str, str]:
    service = (
        "[Unit]\n"
        "Description=migrate: scheduled container snapshots and backups (one tick)\n"
        "After=local-fs.target network-online.target\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(argv)}\n"
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


def cron_entry(argv: list[str], spec: str = DEFAULT_CRON) -> str:
    from croniter import croniter

    if len(spec.split()) != 5 or not croniter.is_valid(spec):
        raise InvalidInput(f"not a cron time: {spec!r}", "five fields, e.g. 30 0 * * *")
    return (f"# migrate: scheduled container snapshots and backups\n"
            f"{spec} root {' '.join(argv)}\n")


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
    if kind == "systemd":
        files = {str(unit_dir / n): t for n, t in systemd_units(argv, calendar).items()}
        steps = ["systemctl daemon-reload", f"systemctl enable --now {UNIT}.timer"]
    else:
        files = {str(cron_dir / UNIT): cron_entry(argv, cron_spec)}
        steps = ["cron reads /etc/cron.d by itself (make sure cron runs)"]
    if not dry_run:
        for path, text in files.items():
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            os.replace(tmp, p)
    return Installed(kind, files, steps)
