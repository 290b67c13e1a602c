"""Option declarations that several commands share, so each spelling is written once.

The help text stays each command's own (it says what the option means there); the flag
names, short forms and defaults come from here.
"""

from __future__ import annotations

from typing import Any

import typer

from migrator.cli.render import Format


def format_option(help: str | None = None) -> Any:
    """``--format/-f``: table (the default), json, or csv where the command supports it."""
    return typer.Option(Format.table, "--format", "-f", help=help)


def pool_option(help: str) -> Any:
    """``--pool/-p``: the storage pool a command works on."""
    return typer.Option(None, "--pool", "-p", help=help)


def config_option(help: str, default: Any = None) -> Any:
    """``--config/-c KEY=VALUE``, repeatable."""
    return typer.Option(default, "--config", "-c", help=help)
