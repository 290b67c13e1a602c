"""A running container's cgroup freezer, driven through its files.

``lxc-freeze`` asks for the freeze and then, if the first look finds the cgroup still
FREEZING (it often is, for a moment), sleeps a whole second before it looks again: a
consistent snapshot (``temp_snapshots.consistent_snapshot``), which must hold the
container still only as long as the snapshot takes, then stopped it for ~1 s about one time
in three. Here the freezer is asked the same way (v1 ``freezer.state``, or cgroup v2's
``cgroup.freeze``) and watched every few milliseconds until it says frozen. Where neither
file is found the caller falls back to ``lxc-freeze``.

The state files are also how a live migration's final sync sees that the dump has frozen
the container (``checkpoint.lxc.wait_frozen``).
"""

from __future__ import annotations

import time
from pathlib import Path

#: how long a freeze may take before it is given up (the container is thawed again)
FREEZE_TIMEOUT = 10.0


def _read(path: Path | str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def freezer_state_file(init_pid: int) -> Path | None:
    """The file that says whether ``init_pid``'s cgroup is frozen: the v1 freezer's
    ``freezer.state`` where that controller is mounted, else cgroup v2's ``cgroup.events``.
    None when the process is gone or has neither."""
    try:
        lines = _read(f"/proc/{init_pid}/cgroup").splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            f = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
            if f.exists():
                return f
        elif controllers == "":
            v2 = Path("/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir()
                      else "/sys/fs/cgroup") / path.lstrip("/") / "cgroup.events"
    return v2 if v2 is not None and v2.exists() else None


def is_frozen(state_file: Path) -> bool:
    text = _read(state_file)
    if state_file.name == "freezer.state":
        return text.strip() == "FROZEN"
    return "frozen 1" in text.splitlines()


def _control(state_file: Path, freeze: bool) -> tuple[Path, str]:
    """The file that asks for a freeze or a thaw, and what to write there."""
    if state_file.name == "freezer.state":
        return state_file, "FROZEN" if freeze else "THAWED"
    return state_file.with_name("cgroup.freeze"), "1" if freeze else "0"


def freeze(state_file: Path, timeout: float = FREEZE_TIMEOUT) -> bool:
    """Freeze the cgroup of ``state_file`` and wait until it is; False (and thawed again)
    when it did not freeze within ``timeout``."""
    control, value = _control(state_file, True)
    control.write_text(value)
    deadline = time.monotonic() + timeout
    while not is_frozen(state_file):  # a v1 read also moves FREEZING on to FROZEN
        if time.monotonic() > deadline:
            thaw(state_file)
            return False
        time.sleep(0.002)
    return True


def thaw(state_file: Path) -> None:
    control, value = _control(state_file, False)
    control.write_text(value)
