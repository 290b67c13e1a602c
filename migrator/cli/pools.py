"""``migrate pool ...``: create, list, inspect and delete storage pools."""

from __future__ import annotations

import typer

from migrator.cli.console import print_fields, print_json, say
from migrator.cli.context import current
from migrator.cli.options import format_option
from migrator.cli.render import Format, human_size, render

pool_app = typer.Typer(help="Storage pools (dir, btrfs, zfs).", no_args_is_help=True)

FORMAT_OPT = format_option("table, json or csv")


@pool_app.command("create")
def pool_create(
    name: str,
    driver: str = typer.Option(..., "--driver", "-d", help="dir, btrfs or zfs"),
    source: str = typer.Option(
        None,
        help="dir: an empty directory; btrfs: a directory on a mounted btrfs; zfs: an "
        "existing pool or dataset [default: a loop file under the state root]",
    ),
    size: str = typer.Option(None, help="Size of the btrfs/zfs loop file [default: 10GiB]"),
) -> None:
    """Create a storage pool."""
    rec = current().host.create_pool(name, driver, source, size)
    say(f"storage pool {rec.name} ({rec.driver}) created at {rec.config['path']}")


@pool_app.command("list")
def pool_list(fmt: Format = FORMAT_OPT) -> None:
    """List storage pools with usage."""
    h = current().host
    rows = []
    for p in h.state.list_pools():
        u = h.backend(p.name).usage()
        rows.append(
            {
                "name": p.name,
                "driver": p.driver,
                "path": p.config["path"],
                "used": human_size(u.used),
                "total": human_size(u.total),
                "used_by": len(h.state.pool_users(p.name)),
            }
        )
    typer.echo(render(rows, ["name", "driver", "path", "used", "total", "used_by"], fmt))


@pool_app.command("info")
def pool_info(name: str, fmt: Format = FORMAT_OPT) -> None:
    """Show a pool's driver, source, usage and users."""
    h = current().host
    p = h.state.get_pool(name)
    b = h.backend(p.name)
    u = b.usage()
    info = {
        "name": p.name,
        "driver": p.driver,
        "source": p.source or "(managed)",
        "path": p.config["path"],
        "loop_file": p.config.get("loop_file"),
        "used_bytes": u.used,
        "total_bytes": u.total,
        "migration_types": b.migration_types(),
        "used_by": h.state.pool_users(p.name),
    }
    if fmt == Format.json:
        print_json(info)
    else:
        print_fields(info)


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Delete an unused pool and its disk."""
    current().host.delete_pool(name)
    say(f"storage pool {name} deleted")
