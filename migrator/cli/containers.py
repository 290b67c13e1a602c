"""The container commands: ``launch``, ``create``, ``start``, ``stop``, ``restart``,
``freeze``, ``unfreeze``, ``exec``, ``shell``, ``list``, ``info``, ``delete``, and the
``migrate config ...`` group of their configuration keys."""

from __future__ import annotations

import os
import time

import typer

from migrator.cli.console import print_fields, print_json, say
from migrator.cli.context import current
from migrator.cli.options import config_option, format_option, pool_option
from migrator.cli.render import Format, render

config_app = typer.Typer(help="Container configuration keys.", no_args_is_help=True)

FORMAT_OPT = format_option("table, json or csv")
IMAGE_ARG = typer.Argument(..., help="Image alias or fingerprint")
NAME_ARG = typer.Argument(..., help="Container name")
POOL_OPT = pool_option("Storage pool [default: default]")
CONFIG_OPT = config_option("KEY=VALUE, repeatable")
WAIT_OPT = typer.Option(False, "--wait", help="Wait until init has finished booting "
                        "(systemd: is-system-running)")
LIST_COLUMNS = ["name", "state", "ipv4", "pool", "snapshots"]


def register(app: typer.Typer) -> None:
    """Add the container commands to ``app`` (the ``config`` group is added by main)."""
    app.command("launch")(launch)
    app.command("create")(create)
    app.command("start")(start)
    app.command("stop")(stop)
    app.command("restart")(restart)
    app.command("freeze")(freeze)
    app.command("unfreeze")(unfreeze)
    app.command("exec", context_settings={"ignore_unknown_options": True})(exec_cmd)
    app.command("shell")(shell)
    app.command("list")(list_cmd)
    app.command("info")(info)
    app.command("delete")(delete)


def _create(image: str, name: str, pool: str | None, config: list[str], start: bool,
            wait: bool = False) -> None:
    from migrator.runtime.config import parse_assignments

    c = current().containers
    t = time.monotonic()
    conf = parse_assignments(config or [])
    rec = (c.launch if start else c.create)(image, name, pool, conf)
    verb = "launched" if start else "created"
    say(f"{verb} {rec.name} on pool {rec.pool} ({rec.ipv4}) in {time.monotonic() - t:.2f}s")
    if wait:
        say(f"{rec.name} booted: {c.wait_booted(rec.name)} after {time.monotonic() - t:.1f}s")


def launch(
    image: str = IMAGE_ARG,
    name: str = NAME_ARG,
    pool: str = POOL_OPT,
    config: list[str] = CONFIG_OPT,
    wait: bool = WAIT_OPT,
) -> None:
    """Create a container from an image and start it."""
    _create(image, name, pool, config, True, wait)


def create(
    image: str = IMAGE_ARG,
    name: str = NAME_ARG,
    pool: str = POOL_OPT,
    config: list[str] = CONFIG_OPT,
) -> None:
    """Create a container from an image without starting it."""
    _create(image, name, pool, config, False)


def start(names: list[str], wait: bool = WAIT_OPT) -> None:
    """Start containers."""
    for n in names:
        current().containers.start(n)
        if wait:
            say(f"{n} booted: {current().containers.wait_booted(n)}")


def stop(
    names: list[str],
    force: bool = typer.Option(False, "--force", help="Kill instead of a clean shutdown"),
    timeout: int = typer.Option(30, help="Seconds to wait for a clean shutdown, then kill"),
) -> None:
    """Stop containers (clean shutdown, killed after --timeout)."""
    for n in names:
        current().containers.stop(n, force=force, timeout=timeout)


def restart(
    names: list[str],
    force: bool = typer.Option(False, "--force"),
    timeout: int = typer.Option(30),
) -> None:
    """Restart containers."""
    for n in names:
        current().containers.restart(n, force=force, timeout=timeout)


def freeze(names: list[str]) -> None:
    """Freeze (pause) running containers."""
    for n in names:
        current().containers.freeze(n)


def unfreeze(names: list[str]) -> None:
    """Unfreeze containers."""
    for n in names:
        current().containers.unfreeze(n)


def exec_cmd(
    name: str,
    command: list[str] = typer.Argument(..., help="Command after --"),
) -> None:
    """Run a command in a container: `migrate exec web-1 -- ls /`. Passes its exit code."""
    rc = current().containers.exec_interactive(name, command, os.environ.get("TERM"))
    raise typer.Exit(rc)


def shell(name: str) -> None:
    """An interactive login shell in the container."""
    rc = current().containers.exec_interactive(name, ["/bin/sh", "-l"], os.environ.get("TERM"))
    raise typer.Exit(rc)


def list_cmd(fmt: Format = FORMAT_OPT) -> None:
    """List containers: NAME, STATE, IPV4, POOL, SNAPSHOTS."""
    infos = current().containers.list_all()
    if fmt == Format.json:
        print_json([i.as_dict() for i in infos])
    else:
        typer.echo(render([i.as_dict() for i in infos], LIST_COLUMNS, fmt))


def info(name: str, fmt: Format = FORMAT_OPT) -> None:
    """Show one container."""
    c = current().containers
    i = c.info(name).as_dict()
    i["snapshots"] = [s.name for s in c.snapshot_list(name)]
    if fmt == Format.json:
        print_json(i)
    else:
        print_fields(i)


def delete(
    names: list[str],
    force: bool = typer.Option(False, "--force", help="Stop a running container first"),
) -> None:
    """Delete containers with their snapshots."""
    for n in names:
        current().containers.delete(n, force=force)
        say(f"deleted {n}")


# config ----------------------------------------------------------------------------------------
@config_app.command("set")
def config_set(
    name: str, assignments: list[str] = typer.Argument(..., help="KEY=VALUE...")
) -> None:
    """Set keys: security.privileged, security.protection.delete, limits.memory, limits.cpu,
    user.*, and the schedule keys: snapshots.schedule (cron, @daily...; several separated by
    commas), snapshots.schedule.stopped, snapshots.pattern (snap%d, auto-{date:%Y%m%d}),
    snapshots.expiry (1H 2d 3w 4m 1y), backups.schedule, backups.repo, backups.retention
    (keep-last=3,keep-daily=7), backups.incremental. Host defaults: `migrate config host`."""
    from migrator.runtime.config import parse_assignments

    current().containers.config_set(name, parse_assignments(assignments))


@config_app.command("get")
def config_get(name: str, key: str) -> None:
    """Print one key's value (empty if unset)."""
    typer.echo(current().containers.get(name).config.get(key, ""))


@config_app.command("unset")
def config_unset(name: str, keys: list[str]) -> None:
    """Remove keys (back to their defaults)."""
    current().containers.config_unset(name, keys)


@config_app.command("show")
def config_show(name: str, fmt: Format = FORMAT_OPT) -> None:
    """Show all keys of a container."""
    conf = current().containers.get(name).config
    if fmt == Format.json:
        print_json(conf)
    else:
        print_fields(conf, sort=True)
