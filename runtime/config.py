"""Container configuration keys (LXD-style), validated when set.

Only known keys are accepted (``user.*`` is free-form), each with a parser that turns the
text into its canonical form or refuses it with an example of a good value. ``image.*`` keys
are recorded by the runtime at creation and are read-only for users.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from migrator.errors import InvalidInput
from runtime.host import parse_size
from runtime.schedule_keys import SCHEDULE_KEYS


def _bool(v: str) -> str:
    low = v.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return "true"
    if low in ("false", "0", "no", "off"):
        return "false"
    raise InvalidInput(f"expected true or false, got {v!r}", "e.g. security.privileged=true")


def _memory(v: str) -> str:
    n = parse_size(v)
    if n < 16 * 2**20:
        raise InvalidInput(f"limits.memory {v!r} is below 16MiB", "e.g. limits.memory=512MiB")
    return str(n)


def _cpus(v: str) -> str:
    try:
        n = int(v)
    except ValueError as e:
        raise InvalidInput(
            f"limits.cpu must be a whole number of CPUs, got {v!r}", "e.g. limits.cpu=2"
        ) from e
    avail = os.cpu_count() or 1
    if not 1 <= n <= avail:
        raise InvalidInput(f"limits.cpu={n} but this host has {avail} CPUs", f"use 1..{avail}")
    return str(n)


KEYS: dict[str, Callable[[str], str]] = {
    "security.privileged": _bool,
    "security.protection.delete": _bool,
    "limits.memory": _memory,
    "limits.cpu": _cpus,
}
KEYS.update(SCHEDULE_KEYS)  # snapshots.* and backups.*: runtime/schedule_keys.py
KEYS.update({"snapshots.schedule.stopped": _bool, "backups.incremental": _bool})
READ_ONLY_PREFIXES = ("image.", "volatile.")


def validate(key: str, value: str) -> str:
    """The canonical value for ``key``, or InvalidInput naming the known keys."""
    if key.startswith("user.") and len(key) > 5:
        return value
    if key.startswith(READ_ONLY_PREFIXES):
        raise InvalidInput(f"{key} is set by the runtime and cannot be changed")
    parser = KEYS.get(key)
    if parser is None:
        raise InvalidInput(
            f"unknown configuration key {key!r}",
            "known keys: " + ", ".join(sorted(KEYS)) + ", user.*",
        )
    return parser(value)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["a=b", "c=d"]`` -> validated dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"expected KEY=VALUE, got {item!r}", "e.g. -c limits.memory=256MiB")
        out[key.strip()] = validate(key.strip(), value)
    return out


def is_true(config: dict[str, str], key: str) -> bool:
    return config.get(key, "false") == "true"
