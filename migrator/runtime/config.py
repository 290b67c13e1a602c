"""Container configuration keys (LXD-style): the one gate every configuration passes.

Two doors lead in. An operator sets keys (``config set``, ``-c``): ``validate`` checks one,
and ``image.*``/``volatile.*`` are refused there (the runtime writes them). A whole config
also *arrives*: from another host's agent, a backup's index and its snapshots, an LXD or
Incus export, an adopted LXC container, a converted machine, an image's properties.
``admit_config`` is the gate for those, and ``Containers.record_received`` runs it on every
config and snapshot config it records, so no arrival path can skip it.

The design decision: only what is known passes, each value parsed by its key's type into a
canonical form. ``user.*`` stays free-form text, but no key or value anywhere may hold a
control character: these values end up in files LXC parses line by line, where a newline
would add a line of the sender's choosing (``lxc.hook.pre-start`` runs as root on this host).
``volatile.*`` is limited to what this project writes (``volatile.eth0.hwaddr``: a unicast
MAC); ``volatile.last_state.idmap`` is read from LXD exports but never stored.

Privilege is decided in one place too (``privilege_of``): a config that arrives may only
make a privileged container (root inside is root on this host) when the operator said so on
the command line (``--allow-privileged``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

from migrator.core.errors import InvalidInput
from migrator.runtime.host import parse_size
from migrator.runtime.lxc import (  # the renderer refuses the same characters
    CONTROL_CHARS,
    MAC_ADDRESS,
)
from migrator.runtime.schedule_keys import SCHEDULE_KEYS

#: longest key and value accepted (a config lives in the state database and in journals)
MAX_KEY = 256
MAX_VALUE = 64 * 1024


class ConfigRefused(InvalidInput):
    """A configuration from elsewhere holds a key or value this host will not record."""


def control_char(text: str) -> str | None:
    """The first control character of ``text`` (as ``repr`` shows it), or None."""
    m = CONTROL_CHARS.search(text)
    return repr(m.group())[1:-1] if m else None


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
VOLATILE_PREFIX = "volatile."
READ_ONLY_PREFIXES = ("image.", VOLATILE_PREFIX)


def without_volatile(config: Mapping[str, str]) -> dict[str, str]:
    """``config`` without its ``volatile.*`` keys.

    They hold the state of one instance on one host (its MAC, how its files were last
    shifted): a copy, a backup, an export or a report of the container must not carry them
    over, and whoever records the container again writes its own.
    """
    return {k: v for k, v in config.items() if not k.startswith(VOLATILE_PREFIX)}


# image.* : what the runtime records about the image a container came from --------------------
#: the inits the runtime knows (the LXC config differs for systemd; the rest boot alike)
INITS = ("systemd", "busybox", "unknown")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+~:/()-]{0,63}")


def _label(v: str) -> str:
    if not _LABEL.fullmatch(v):
        raise InvalidInput(f"expected a short label (letters, digits, . _ + ~ : / ( ) - and "
                           f"spaces, at most 64), got {v!r}", "e.g. debian, bookworm, 12")
    return v


def _release(v: str) -> str:
    return v if v == "" else _label(v)


def _init(v: str) -> str:
    if v not in INITS:
        raise InvalidInput(f"init {v!r} is not one the runtime knows",
                           "one of " + ", ".join(INITS))
    return v


def _description(v: str) -> str:
    if len(v) > 256:
        raise InvalidInput(f"a description of {len(v)} characters (at most 256)")
    return v


IMAGE_KEYS: dict[str, Callable[[str], str]] = {
    "image.os": _label,
    "image.release": _release,
    "image.init": _init,
    "image.description": _description,
}

# volatile.* : what the runtime keeps for itself ------------------------------------------------


def parse_mac(v: str) -> str:
    """A unicast Ethernet address, ``xx:xx:xx:xx:xx:xx`` (lower case), or InvalidInput."""
    low = v.lower()
    if not MAC_ADDRESS.fullmatch(low):
        raise InvalidInput(f"expected a MAC address xx:xx:xx:xx:xx:xx, got {v!r}",
                           "e.g. 00:16:3e:12:34:56")
    if int(low[:2], 16) & 1 or low == "00:00:00:00:00:00":
        raise InvalidInput(f"{v!r} is not a unicast MAC address",
                           "the first octet must be even, e.g. 00:16:3e:12:34:56")
    return low


VOLATILE_KEYS: dict[str, Callable[[str], str]] = {
    # an adopted LXC container keeps its MAC (adopt/adoption.py)
    "volatile.eth0.hwaddr": parse_mac,
}


def _text(what: str, text: str, limit: int, origin: str | None) -> None:
    bad = control_char(text)
    if bad is not None:
        raise _refused(origin, f"{what} holds a control character ({bad})",
                       "configuration keys and values are single-line text")
    if len(text) > limit:
        raise _refused(origin, f"{what} is {len(text)} characters long (at most {limit})")


def _refused(origin: str | None, what: str, hint: str | None = None) -> InvalidInput:
    if origin is None:
        return InvalidInput(what, hint)
    return ConfigRefused(f"refused from {origin}: {what}",
                         hint or "nothing was changed; do not trust the source of this "
                         "configuration")


def _check(key: str, value: str, origin: str | None) -> str:
    """The canonical value of one key, or an error naming it (and ``origin``, when the key
    arrived from elsewhere: then ``image.*`` and ``volatile.*`` are allowed)."""
    _text(f"key {key!r}", key, MAX_KEY, origin)
    _text(f"{key}", value, MAX_VALUE, origin)
    if key.startswith("user.") and len(key) > 5:
        return value
    if origin is None and key.startswith(READ_ONLY_PREFIXES):
        raise InvalidInput(f"{key} is set by the runtime and cannot be changed")
    parser = KEYS.get(key) or (IMAGE_KEYS.get(key) or VOLATILE_KEYS.get(key)
                               if origin is not None else None)
    if parser is None:
        known = ", ".join(sorted(KEYS)) + ", user.*"
        if origin is not None:
            known += ", " + ", ".join(sorted({**IMAGE_KEYS, **VOLATILE_KEYS}))
        if origin is None:
            raise InvalidInput(f"unknown configuration key {key!r}", "known keys: " + known)
        raise _refused(origin, f"unknown configuration key {key!r}", "known keys: " + known)
    try:
        return parser(value)
    except InvalidInput as e:
        if origin is None:
            raise
        raise _refused(origin, f"{key}={value!r}: {e.message}", e.hint or None) from e


def validate(key: str, value: str) -> str:
    """The canonical value for ``key`` as an operator sets it, or InvalidInput naming the
    known keys."""
    return _check(key, value, None)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["a=b", "c=d"]`` -> validated dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"expected KEY=VALUE, got {item!r}", "e.g. -c limits.memory=256MiB")
        out[key.strip()] = validate(key.strip(), value)
    return out


def admit_config(config: Mapping[str, object], origin: str, *,
                 allow_privileged: bool) -> dict[str, str]:
    """The gate for a config that arrives from elsewhere (``origin`` says from where, for
    the error: "backup index ID", "the agent's commit_container" ...).

    Every key must be known (``user.*`` free-form, ``image.*`` and ``volatile.*`` only the
    runtime's own, each in its format), keys and values must be text without control
    characters, and a privileged config needs ``allow_privileged`` (``privilege_of``).
    Returns the canonical config; raises ``ConfigRefused`` naming the key and the origin.
    """
    if not isinstance(config, Mapping):
        raise ConfigRefused(f"refused from {origin}: the config is not a mapping of keys")
    out: dict[str, str] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigRefused(f"refused from {origin}: {key!r}={value!r}: configuration "
                                "keys and values must be text")
        out[key] = _check(key, value, origin)
    privilege_of(out, origin, allow_privileged=allow_privileged)
    return out


def privilege_of(config: Mapping[str, str], origin: str, *, allow_privileged: bool,
                 claimed: bool | None = None) -> bool:
    """Whether a container that arrives with ``config`` is privileged: the one decision.

    A privileged container's root is root on this host, so it is only made when the
    operator passed ``--allow-privileged``. ``claimed`` is what the source says elsewhere
    (a backup index's ``privileged`` field): it must agree with the config.
    """
    value = config.get("security.privileged", "false")
    try:
        privileged = _bool(value) == "true"
    except InvalidInput as e:
        raise ConfigRefused(f"refused from {origin}: security.privileged={value!r}: "
                            f"{e.message}") from e
    if claimed is not None and claimed != privileged:
        raise ConfigRefused(
            f"refused from {origin}: it says privileged={str(claimed).lower()} but its "
            f"config has security.privileged={str(privileged).lower()}",
            "the source contradicts itself; nothing was changed; do not trust it")
    if privileged and not allow_privileged:
        raise ConfigRefused(
            f"refused from {origin}: security.privileged=true (a privileged container's "
            "root is root on this host)",
            "if you trust its source, run the command again with --allow-privileged")
    return privileged


def is_true(config: Mapping[str, str], key: str) -> bool:
    return config.get(key, "false") == "true"
