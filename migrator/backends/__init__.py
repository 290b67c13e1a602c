"""Storage pool drivers, in a plain registry (name -> class).

A pool's record names its driver and keeps its config; ``open_backend`` looks the driver up
here and lets the class read its own config (``from_config``), so a new driver is one class
and one entry below.
"""

from __future__ import annotations

from typing import Any

from migrator.backends.base import PoolUsage, Snapshot, StorageBackend, VolumeRef
from migrator.backends.btrfs import BtrfsBackend
from migrator.backends.dir import DirBackend
from migrator.backends.zfs import ZfsBackend
from migrator.core.errors import InvalidInput

BACKENDS: dict[str, type[StorageBackend]] = {
    "dir": DirBackend,
    "btrfs": BtrfsBackend,
    "zfs": ZfsBackend,
}


def driver_class(driver: str) -> type[StorageBackend]:
    """The class of a storage driver named by a user or a pool record."""
    cls = BACKENDS.get(driver)
    if cls is None:
        raise InvalidInput(f"unknown storage driver {driver!r}",
                           f"use one of: {', '.join(BACKENDS)}")
    return cls


def open_backend(driver: str, config: dict[str, Any]) -> StorageBackend:
    """Instantiate the driver for a pool from its stored config (paths)."""
    return driver_class(driver).from_config(config)


__all__ = ["BACKENDS", "PoolUsage", "Snapshot", "StorageBackend", "VolumeRef", "driver_class",
           "open_backend"]
