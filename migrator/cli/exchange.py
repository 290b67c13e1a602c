"""``migrate export`` / ``migrate import``: single-file archives in LXD's/Incus's layout."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``import`` to ``app``."""
