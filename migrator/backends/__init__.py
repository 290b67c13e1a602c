"""Storage pool drivers, in a plain registry (name -> class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from migrator.backends.base import PoolUsage, Snapshot, StorageBackend, VolumeRef
from migrator.backends.btrfs import BtrfsBackend
from migrator.backends.dir import DirBackend
from migrator.backends.zfs import ZfsBackend
from migrator.core.errors import InvalidInput

BACKENDS: dict[str, type] = {"dir": DirBackend, "btrfs": BtrfsBackend, "zfs": ZfsBackend}


def open_backend(driver: str, config: dict[str, Any]) -> StorageBackend:
    """Instantiate the driver for a pool from its stored config (paths)."""
    if driver == "dir":
        return DirBackend(Path(config["path"]))
    if driver == "btrfs":
        loop = config.get("loop_file")
        return BtrfsBackend(Path(config["path"]), Path(loop) if loop else None)
    if driver == "zfs":
        loop = config.get("loop_file")
        return ZfsBackend(Path(config["path"]), config["dataset"], config["zpool"],
                          Path(loop) if loop else None)
    raise InvalidInput(f"unknown storage driver {driver!r}", f"use one of: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "PoolUsage", "Snapshot", "StorageBackend", "VolumeRef", "open_backend"]
