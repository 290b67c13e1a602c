"""Validation of tar archives before they are extracted: see ``migrator.targuard``.

The guard lives in ``migrator`` so every layer that takes a tar from outside (images in
``runtime``, pulls in ``migrator``, backups and exports here) uses the same one; this module
keeps the names backup code has always imported.
"""

from __future__ import annotations

from migrator.targuard import (
    BLOCK,
    MAX_META_BYTES,
    STANDARD_DEVICES,
    GnuTarInfo,
    TarChecker,
    TarGuard,
    TarRules,
    TarSummary,
    check_tar,
    device_refused,
)

__all__ = ["BLOCK", "MAX_META_BYTES", "STANDARD_DEVICES", "GnuTarInfo", "TarChecker",
           "TarGuard", "TarRules", "TarSummary", "check_tar", "device_refused"]
