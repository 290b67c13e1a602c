"""CRIU checkpoint/restore of containers on one host (see ``lxc.py`` for the safety model)."""

from migrator.checkpoint.base import (
    Checkpointer,
    DumpStats,
    Features,
    Problem,
    RestoreStats,
    images_dir,
    remove_images_dir,
)
from migrator.checkpoint.lxc import LazyDump, LazyPages, LxcCheckpointer

__all__ = [
    "Checkpointer",
    "DumpStats",
    "Features",
    "LazyDump",
    "LazyPages",
    "LxcCheckpointer",
    "Problem",
    "RestoreStats",
    "images_dir",
    "remove_images_dir",
]
