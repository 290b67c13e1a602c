"""Names validated once, into types, at the edge (CLI, wire, config).

Rules follow LXD's instance names (a DNS label): letters, digits and '-', starting with a
letter, not ending with '-', at most 63 characters. That keeps every name safe as a path
component, an LXC name, a btrfs subvolume and a zfs dataset component.
"""

from __future__ import annotations

import re

from migrator.core.errors import InvalidInput

_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
_SNAP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")

NAME_HINT = "use letters, digits and '-', start with a letter, at most 63 characters (e.g. web-1)"


class ContainerName(str):
    """A validated container (or pool, volume) name."""

    kind = "container"

    def __new__(cls, value: str) -> ContainerName:
        if not isinstance(value, str) or not _LABEL.fullmatch(value) or value.endswith("-"):
            raise InvalidInput(f"invalid {cls.kind} name {value!r}", NAME_HINT)
        return super().__new__(cls, value)


class PoolName(ContainerName):
    kind = "pool"


class VolumeName(ContainerName):
    kind = "volume"


class SnapshotName(str):
    """A validated snapshot name (also allows '.', '_' and a leading digit)."""

    def __new__(cls, value: str) -> SnapshotName:
        if not isinstance(value, str) or not _SNAP.fullmatch(value) or ".." in value:
            raise InvalidInput(
                f"invalid snapshot name {value!r}",
                "use letters, digits, '.', '_' and '-', at most 63 characters (e.g. snap0)",
            )
        return super().__new__(cls, value)


class ImageAlias(str):
    """An image alias such as ``debian/bookworm`` or ``busybox``."""

    def __new__(cls, value: str) -> ImageAlias:
        if (
            not isinstance(value, str)
            or not _ALIAS.fullmatch(value)
            or ".." in value
            or "//" in value
            or value.endswith("/")
        ):
            raise InvalidInput(
                f"invalid image alias {value!r}",
                "use letters, digits, '.', '_', '-' and '/' (e.g. debian/bookworm)",
            )
        return super().__new__(cls, value)


def host_address(value: object) -> str:
    """An IP address or a DNS name (letters, digits, '-' between dots), nothing else: an
    inventory address, on the CLI and again on the wire."""
    import ipaddress

    a = str(value)
    try:
        return str(ipaddress.ip_address(a))
    except ValueError:
        if a and all(p and p.replace("-", "").isalnum() for p in a.split(".")):
            return a
    raise InvalidInput(f"invalid address {a!r}", "an IP address or a host name")


def next_snapshot_name(existing: set[str]) -> SnapshotName:
    """The first free ``snapN`` (the default name of a new snapshot, as in LXD)."""
    i = 0
    while f"snap{i}" in existing:
        i += 1
    return SnapshotName(f"snap{i}")


def split_snapshot_ref(ref: str) -> tuple[ContainerName, SnapshotName | None]:
    """``web-1/snap0`` -> (web-1, snap0); ``web-1`` -> (web-1, None)."""
    if "/" in ref:
        ct, _, snap = ref.partition("/")
        return ContainerName(ct), SnapshotName(snap)
    return ContainerName(ref), None
