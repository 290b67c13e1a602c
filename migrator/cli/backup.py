"""``migrate backup ...``: create, list, info, verify, restore, prune and protect backups."""

from __future__ import annotations

import typer

backup_app = typer.Typer(help="Compressed, verifiable, incremental backups in a repository.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(backup_app, name="backup")
