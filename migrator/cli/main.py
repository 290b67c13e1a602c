"""The ``migrate`` command line: parse, wire objects, render. Logic lives in the library.

Exit codes: 0 success; 2 usage error; each ``MigratorError`` subclass has its own code
(``migrate --help`` lists them); 130 interrupted. ``migrate exec`` returns the command's own
exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import typer

from migrator.cli.render import Format, human_size, render
from migrator.core.errors import ALL_ERRORS, InvalidInput, MigratorError
from migrator.core.names import split_snapshot_ref

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
image_app = typer.Typer(
    help="Build, import, export and delete images (LXD unified tarballs).", no_args_is_help=True
)
pool_app = typer.Typer(help="Storage pools (dir, btrfs, zfs).", no_args_is_help=True)
snapshot_app = typer.Typer(help="Container snapshots.", no_args_is_help=True)
config_app = typer.Typer(help="Container configuration keys.", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(pool_app, name="pool")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(config_app, name="config")

FORMAT_OPT = typer.Option(Format.table, "--format", "-f", help="table, json or csv")


from migrator.cli.context import _CURRENT, Ctx, _ctx  # noqa: E402


def say(msg: str) -> None:
    typer.echo(msg, err=True)


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
    ctx.obj = Ctx(root, verbose)
    _CURRENT.append(ctx.obj)


# host ------------------------------------------------------------------------------------------
@app.command("init")
def init_cmd(
    netns: str = typer.Option(
        None, help="Run this host's containers in this network namespace (created if missing)"
    ),
    subnet: str = typer.Option(None, help="Bridge address and prefix [default: 203.0.113.1/24]"),
    bridge: str = typer.Option(None, help="Bridge name [default: migbr0]"),
) -> None:
    """Set up this host: state root, network namespace (optional) and bridge. Idempotent."""
    h = _ctx().host
    h.init(netns, subnet, bridge)
    n = h.network_config()
    say(
        f"host ready at {h.root}: bridge {n.bridge} {n.address}"
        + (f" in netns {n.netns}" if n.netns else "")
    )


@app.command("teardown")
def teardown_cmd(
    yes: bool = typer.Option(False, "--yes", help="Confirm"),
    purge: bool = typer.Option(False, help="Also delete the state root with all containers"),
) -> None:
    """Stop every container, unmount pools, remove the host's network namespace."""
    if not yes:
        raise InvalidInput("teardown stops every container of this host", "add --yes to confirm")
    from migrator.runtime.teardown import teardown

    teardown(_ctx().host, purge=purge)
    say("host torn down")


# images ----------------------------------------------------------------------------------------
@image_app.command("build")
def image_build(
    recipe: str = typer.Argument(..., help="busybox or debian/SUITE (bookworm, trixie)"),
    alias: str = typer.Option(None, help="Alias [default: the recipe name]"),
    rebuild: bool = typer.Option(False, help="Ignore the machine-wide build cache"),
) -> None:
    """Build an image (debootstrap for Debian, with systemd as init) and import it."""
    c = _ctx().containers
    t = time.monotonic()
    rec = c.images.build(recipe, alias, say, rebuild=rebuild)
    say(
        f"image {rec.alias} ({rec.fingerprint[:12]}, {human_size(rec.size)}) ready in "
        f"{time.monotonic() - t:.1f}s"
    )


@image_app.command("import")
def image_import(
    file: str = typer.Argument(..., help="Unified tarball (.tar.zst/.tar.gz/.tar.xz) or -"),
    alias: str = typer.Option(None, help="Alias for the image"),
) -> None:
    """Import a unified image tarball (as made by `image export`, LXD or Incus)."""
    c = _ctx().containers
    if file == "-":
        import tempfile

        from migrator.runtime.images import read_stream_to_file

        with tempfile.NamedTemporaryFile(dir=c.host.images_dir, prefix=".stdin-") as tmp:
            read_stream_to_file(sys.stdin.buffer, Path(tmp.name))
            rec = c.images.import_file(Path(tmp.name), alias)
    else:
        rec = c.images.import_file(Path(file), alias)
    say(f"imported image {rec.fingerprint[:12]}" + (f" as {rec.alias}" if rec.alias else ""))


@image_app.command("export")
def image_export(
    image: str = typer.Argument(..., help="Alias or fingerprint"),
    file: str = typer.Argument(..., help="Destination file, or - for standard output"),
) -> None:
    """Write the image's unified tarball (the same bytes and fingerprint as imported)."""
    rec = _ctx().containers.images.export(image, file)
    if file != "-":
        say(f"exported {rec.fingerprint[:12]} to {file}")


@image_app.command("list")
def image_list(fmt: Format = FORMAT_OPT) -> None:
    """List images."""
    rows = [
        {
            "alias": r.alias,
            "fingerprint": r.fingerprint[:12],
            "os": r.properties.get("os"),
            "release": r.properties.get("release"),
            "size": human_size(r.size),
            "description": r.properties.get("description"),
        }
        for r in _ctx().containers.images.list()
    ]
    cols = ["alias", "fingerprint", "os", "release", "size", "description"]
    typer.echo(render(rows, cols, fmt))


@image_app.command("delete")
def image_delete(image: str = typer.Argument(..., help="Alias or fingerprint")) -> None:
    """Delete an image (containers made from it are not affected)."""
    rec = _ctx().containers.images.delete(image)
    say(f"deleted image {rec.fingerprint[:12]}")


# pools -----------------------------------------------------------------------------------------
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
    rec = _ctx().host.create_pool(name, driver, source, size)
    say(f"storage pool {rec.name} ({rec.driver}) created at {rec.config['path']}")


@pool_app.command("list")
def pool_list(fmt: Format = FORMAT_OPT) -> None:
    """List storage pools with usage."""
    h = _ctx().host
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
    h = _ctx().host
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
        typer.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            typer.echo(f"{k}: {v}")


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Delete an unused pool and its disk."""
    _ctx().host.delete_pool(name)
    say(f"storage pool {name} deleted")


# containers ------------------------------------------------------------------------------------
def _create(image: str, name: str, pool: str | None, config: list[str], start: bool,
            wait: bool = False) -> None:
    from migrator.runtime.config import parse_assignments

    c = _ctx().containers
    t = time.monotonic()
    conf = parse_assignments(config or [])
    rec = (c.launch if start else c.create)(image, name, pool, conf)
    verb = "launched" if start else "created"
    say(f"{verb} {rec.name} on pool {rec.pool} ({rec.ipv4}) in {time.monotonic() - t:.2f}s")
    if wait:
        say(f"{rec.name} booted: {c.wait_booted(rec.name)} after {time.monotonic() - t:.1f}s")


WAIT_OPT = typer.Option(False, "--wait", help="Wait until init has finished booting "
                        "(systemd: is-system-running)")


@app.command("launch")
def launch(
    image: str = typer.Argument(..., help="Image alias or fingerprint"),
    name: str = typer.Argument(..., help="Container name"),
    pool: str = typer.Option(None, "--pool", "-p", help="Storage pool [default: default]"),
    config: list[str] = typer.Option(None, "--config", "-c", help="KEY=VALUE, repeatable"),
    wait: bool = WAIT_OPT,
) -> None:
    """Create a container from an image and start it."""
    _create(image, name, pool, config, True, wait)


@app.command("create")
def create(
    image: str = typer.Argument(..., help="Image alias or fingerprint"),
    name: str = typer.Argument(..., help="Container name"),
    pool: str = typer.Option(None, "--pool", "-p", help="Storage pool [default: default]"),
    config: list[str] = typer.Option(None, "--config", "-c", help="KEY=VALUE, repeatable"),
) -> None:
    """Create a container from an image without starting it."""
    _create(image, name, pool, config, False)


@app.command("start")
def start(names: list[str], wait: bool = WAIT_OPT) -> None:
    """Start containers."""
    for n in names:
        _ctx().containers.start(n)
        if wait:
            say(f"{n} booted: {_ctx().containers.wait_booted(n)}")


@app.command("stop")
def stop(
    names: list[str],
    force: bool = typer.Option(False, "--force", help="Kill instead of a clean shutdown"),
    timeout: int = typer.Option(30, help="Seconds to wait for a clean shutdown, then kill"),
) -> None:
    """Stop containers (clean shutdown, killed after --timeout)."""
    for n in names:
        _ctx().containers.stop(n, force=force, timeout=timeout)


@app.command("restart")
def restart(
    names: list[str],
    force: bool = typer.Option(False, "--force"),
    timeout: int = typer.Option(30),
) -> None:
    """Restart containers."""
    for n in names:
        _ctx().containers.restart(n, force=force, timeout=timeout)


@app.command("freeze")
def freeze(names: list[str]) -> None:
    """Freeze (pause) running containers."""
    for n in names:
        _ctx().containers.freeze(n)


@app.command("unfreeze")
def unfreeze(names: list[str]) -> None:
    """Unfreeze containers."""
    for n in names:
        _ctx().containers.unfreeze(n)


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_cmd(
    name: str,
    command: list[str] = typer.Argument(..., help="Command after --"),
) -> None:
    """Run a command in a container: `migrate exec web-1 -- ls /`. Passes its exit code."""
    rc = _ctx().containers.exec_interactive(name, command, os.environ.get("TERM"))
    raise typer.Exit(rc)


@app.command("shell")
def shell(name: str) -> None:
    """An interactive login shell in the container."""
    rc = _ctx().containers.exec_interactive(name, ["/bin/sh", "-l"], os.environ.get("TERM"))
    raise typer.Exit(rc)


LIST_COLUMNS = ["name", "state", "ipv4", "pool", "snapshots"]


@app.command("list")
def list_cmd(fmt: Format = FORMAT_OPT) -> None:
    """List containers: NAME, STATE, IPV4, POOL, SNAPSHOTS."""
    infos = _ctx().containers.list_all()
    if fmt == Format.json:
        typer.echo(json.dumps([i.as_dict() for i in infos], indent=2))
    else:
        typer.echo(render([i.as_dict() for i in infos], LIST_COLUMNS, fmt))


@app.command("info")
def info(name: str, fmt: Format = FORMAT_OPT) -> None:
    """Show one container."""
    c = _ctx().containers
    i = c.info(name).as_dict()
    i["snapshots"] = [s.name for s in c.snapshot_list(name)]
    if fmt == Format.json:
        typer.echo(json.dumps(i, indent=2))
    else:
        for k, v in i.items():
            typer.echo(f"{k}: {v}")


@app.command("delete")
def delete(
    names: list[str],
    force: bool = typer.Option(False, "--force", help="Stop a running container first"),
) -> None:
    """Delete containers with their snapshots."""
    for n in names:
        _ctx().containers.delete(n, force=force)
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

    _ctx().containers.config_set(name, parse_assignments(assignments))


@config_app.command("get")
def config_get(name: str, key: str) -> None:
    """Print one key's value (empty if unset)."""
    typer.echo(_ctx().containers.get(name).config.get(key, ""))


@config_app.command("unset")
def config_unset(name: str, keys: list[str]) -> None:
    """Remove keys (back to their defaults)."""
    _ctx().containers.config_unset(name, keys)


@config_app.command("show")
def config_show(name: str, fmt: Format = FORMAT_OPT) -> None:
    """Show all keys of a container."""
    conf = _ctx().containers.get(name).config
    if fmt == Format.json:
        typer.echo(json.dumps(conf, indent=2))
    else:
        for k in sorted(conf):
            typer.echo(f"{k}: {conf[k]}")


# snapshots -------------------------------------------------------------------------------------
@snapshot_app.command("create")
def snapshot_create(
    ref: str = typer.Argument(..., help="NAME or NAME/SNAP"),
    snap: str = typer.Argument(None, help="Snapshot name [default: snapN]"),
) -> None:
    """Snapshot a container (storage-native on btrfs, a copy on dir)."""
    ct, s = split_snapshot_ref(ref)
    rec = _ctx().containers.snapshot_create(ct, s or snap)
    say(f"snapshot {rec.container}/{rec.name} created")


@snapshot_app.command("list")
def snapshot_list(name: str, fmt: Format = FORMAT_OPT) -> None:
    """List a container's snapshots."""
    rows = [
        {
            "name": s.name,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
            "expires": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.expires))
            if s.expires is not None else None,
        }
        for s in _ctx().containers.snapshot_list(name)
    ]
    typer.echo(render(rows, ["name", "created", "expires"], fmt))


@snapshot_app.command("restore")
def snapshot_restore(
    ref: str = typer.Argument(..., help="NAME/SNAP or NAME"),
    snap: str = typer.Argument(None, help="Snapshot name when not given as NAME/SNAP"),
) -> None:
    """Restore a snapshot's files and config exactly (a running container is restarted)."""
    ct, s = split_snapshot_ref(ref)
    which = s or snap
    if not which:
        raise InvalidInput("which snapshot?", "e.g. `migrate snapshot restore web-1/snap0`")
    restarted = _ctx().containers.snapshot_restore(ct, which)
    say(f"restored {ct} to {which}" + (" (restarted)" if restarted else ""))


@snapshot_app.command("delete")
def snapshot_delete(
    ref: str = typer.Argument(..., help="NAME/SNAP"),
    snap: str = typer.Argument(None),
) -> None:
    """Delete a snapshot."""
    ct, s = split_snapshot_ref(ref)
    which = s or snap
    if not which:
        raise InvalidInput("which snapshot?", "e.g. `migrate snapshot delete web-1/snap0`")
    _ctx().containers.snapshot_delete(ct, which)
    say(f"deleted snapshot {ct}/{which}")


from migrator.cli import backup, exchange, hosts, importlxc, live, schedule, storage  # noqa: E402

storage.register(app)
hosts.register(app)
live.register(app)
backup.register(app)
exchange.register(app)
schedule.register(app, config_app)
importlxc.register(app)

from migrator.cli import p2c as p2c_cli  # noqa: E402

p2c_cli.register(app)


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
