"""``migrate snapshot ...``: create, list, restore and delete container snapshots."""

from __future__ import annotations

import time

import typer

from migrator.cli.console import say
from migrator.cli.context import current
from migrator.cli.options import format_option
from migrator.cli.render import Format, render
from migrator.core.errors import InvalidInput
from migrator.core.names import split_snapshot_ref

snapshot_app = typer.Typer(help="Container snapshots.", no_args_is_help=True)


def _named_snapshot(ref: str, snap: str | None, verb: str) -> tuple[str, str]:
    """Container and snapshot from NAME/SNAP or NAME SNAP; a snapshot must be named."""
    ct, s = split_snapshot_ref(ref)
    which = s or snap
    if not which:
        raise InvalidInput("which snapshot?", f"e.g. `migrate snapshot {verb} web-1/snap0`")
    return ct, which


@snapshot_app.command("create")
def snapshot_create(
    ref: str = typer.Argument(..., help="NAME or NAME/SNAP"),
    snap: str = typer.Argument(None, help="Snapshot name [default: snapN]"),
) -> None:
    """Snapshot a container (storage-native on btrfs, a copy on dir)."""
    ct, s = split_snapshot_ref(ref)
    rec = current().containers.snapshot_create(ct, s or snap)
    say(f"snapshot {rec.container}/{rec.name} created")


@snapshot_app.command("list")
def snapshot_list(name: str, fmt: Format = format_option("table, json or csv")) -> None:
    """List a container's snapshots."""
    rows = [
        {
            "name": s.name,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
            "expires": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.expires))
            if s.expires is not None else None,
        }
        for s in current().containers.snapshot_list(name)
    ]
    typer.echo(render(rows, ["name", "created", "expires"], fmt))


@snapshot_app.command("restore")
def snapshot_restore(
    ref: str = typer.Argument(..., help="NAME/SNAP or NAME"),
    snap: str = typer.Argument(None, help="Snapshot name when not given as NAME/SNAP"),
) -> None:
    """Restore a snapshot's files and config exactly (a running container is restarted)."""
    ct, which = _named_snapshot(ref, snap, "restore")
    restarted = current().containers.snapshot_restore(ct, which)
    say(f"restored {ct} to {which}" + (" (restarted)" if restarted else ""))


@snapshot_app.command("delete")
def snapshot_delete(
    ref: str = typer.Argument(..., help="NAME/SNAP"),
    snap: str = typer.Argument(None),
) -> None:
    """Delete a snapshot."""
    ct, which = _named_snapshot(ref, snap, "delete")
    current().containers.snapshot_delete(ct, which)
    say(f"deleted snapshot {ct}/{which}")
