"""The ``migrate`` command line: the app, its global options, the command groups and the
one place where errors become exit codes. Each group lives in a module of its own
(containers, snapshots, images, pools, storage, ...); logic lives in the library.

Exit codes: 0 success; 2 usage error; each ``MigratorError`` subclass has its own code
(``migrate --help`` lists them); 130 interrupted. ``migrate exec`` returns the command's own
exit code.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from migrator.cli import (
    adopt,
    backup,
    containers,
    evacuate,
    exchange,
    hosts,
    hostsetup,
    images,
    journal,
    live,
    p2c,
    pools,
    schedule,
    snapshots,
    storage,
)
from migrator.cli.context import begin
from migrator.core.errors import ALL_ERRORS, MigratorError

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 2 usage, "
    + ", ".join(f"{c.exit_code} {c.__name__}" for c in ALL_ERRORS if c.exit_code != 1)
    + ", 1 other error."
)

app = typer.Typer(
    help="System containers on LXC: run, snapshot, copy, migrate and back them up.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    root: Path = typer.Option(
        None,
        "--root",
        envvar="MIGRATOR_ROOT",
        help="State root of this host [default: /var/lib/migrator]",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show commands and details"),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = begin(root, verbose)


# Commands, then groups, in the order `migrate --help` lists them.
hostsetup.register(app)  # init, teardown
containers.register(app)  # launch, create, start, stop, ..., list, info, delete
storage.register(app)  # copy, move
hosts.register(app)  # agent (hidden)
journal.register(app)  # operations, recover
live.register(app)  # live
evacuate.register(app)  # evacuate
exchange.register(app)  # export, import
adopt.register(app)  # import-lxc
p2c.register(app)  # p2c
app.add_typer(images.image_app, name="image")
app.add_typer(pools.pool_app, name="pool")
app.add_typer(snapshots.snapshot_app, name="snapshot")
app.add_typer(containers.config_app, name="config")
containers.config_app.add_typer(schedule.host_config_app, name="host")
app.add_typer(storage.volume_app, name="volume")
app.add_typer(hosts.host_app, name="host")
app.add_typer(backup.backup_app, name="backup")
app.add_typer(schedule.schedule_app, name="schedule")


def main() -> None:
    """Entry point: the only place exceptions become exit codes and messages.

    Click's standalone mode handles usage errors (exit 2) and ``typer.Exit``; a
    ``MigratorError`` becomes its message, its hint and its own exit code, never a traceback.
    """
    try:
        app(standalone_mode=True)
    except MigratorError as e:
        typer.echo(f"Error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"Hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("Interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
