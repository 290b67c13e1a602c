"""Commands that move data between pools: copy, move (and rename), custom volumes."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, delegation_target, transport_for
from migrator.cli.options import format_option, pool_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size, render
from migrator.core.errors import InvalidInput

if TYPE_CHECKING:
    from migrator.runtime.volumes import Volumes

volume_app = typer.Typer(
    help="Custom storage volumes: directories on a pool, mounted into containers.",
    no_args_is_help=True,
)
volume_snapshot_app = typer.Typer(help="Snapshots of custom volumes.", no_args_is_help=True)
volume_app.add_typer(volume_snapshot_app, name="snapshot")

FORMAT_OPT = format_option("table or json (a summary)")
POOL_OPT = pool_option("Pool the volume is on [default: the only pool with a volume of that "
                       "name]")


def report(result: Any, fmt: Format, verb: str) -> None:
    """Human summary on stderr, or the whole result as JSON on stdout."""
    if fmt == Format.json:
        print_json(result.as_dict())
        return
    line = (f"{verb} {result.source} -> {result.target} on pool {result.pool} via "
            f"{result.method}: {human_size(result.bytes)} in {result.seconds:.1f}s")
    say(line)
    if result.negotiated and current().verbose:
        say(f"  negotiated: {result.negotiated}")
    if result.snapshots_added:
        say(f"  snapshots added: {', '.join(result.snapshots_added)}")
    if result.snapshots_skipped:
        say(f"  snapshots skipped: {', '.join(result.snapshots_skipped)}")
    if result.downtime is not None:
        say(f"  down for {result.downtime:.1f}s (stop, final sync, start)")
    if result.verified:
        say(f"  verified: {result.verified}")
    for n in result.notes:
        say(f"  note: {n}")


def _reported(r: dict[str, Any]) -> Any:
    """Another host's copy result (a dict from its reply) in the shape ``report`` reads."""
    return SimpleNamespace(**r, as_dict=lambda: r)


def register(app: typer.Typer) -> None:
    """Add ``copy`` and ``move`` to ``app`` (the ``volume`` group is added by main)."""
    app.command("copy")(copy_cmd)
    app.command("move")(move_cmd)


def copy_cmd(
    source: str = typer.Argument(..., help="Container to copy"),
    target: str = typer.Argument(..., help="Name of the copy"),
    pool: str = pool_option("Pool of the copy [default: source's]"),
    instance_only: bool = typer.Option(False, "--instance-only",
                                       help="Copy the container without its snapshots"),
    refresh: bool = typer.Option(
        False, "--refresh",
        help="Update an existing (stopped) copy: send only what changed since the newest "
        "shared snapshot and add missing snapshots; target-only snapshots are kept"),
    allow_inconsistent: bool = typer.Option(
        False, "--allow-inconsistent",
        help="Copy a running container's live files without freezing it for a snapshot"),
    compress: str = typer.Option("auto", "--compress",
                                 help="Between hosts: zstd, none, or auto"),
    allow_privileged: bool = typer.Option(
        False, "--allow-privileged",
        help="A pull (HOST:NAME as the source) may bring a privileged container, whose "
        "root is root on this host; refused without this"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Copy a container with its snapshots: on this host (any pool to any pool), to another
    host with HOST:NAME as the target, from one with HOST:NAME as the source (a pull: that
    host sends over the same SSH connection), or between two others (see `migrate host
    add`).

    The fastest method both pools support is used: btrfs send/receive or zfs send/recv
    between pools of the same driver, rsync otherwise. A running container is copied from
    a snapshot taken while it is briefly frozen.
    """
    from migrator.pipelines.copy import copy_container
    from migrator.pipelines.remote_copy import RemoteCopy, split_ref

    src_host, src_name = split_ref(source)
    dst_host, dst_name = split_ref(target)
    if src_host is not None:
        if dst_host is None:
            _pull(src_host, src_name, dst_name, pool, instance_only, refresh, compress, fmt,
                  allow_privileged)
            return
        if dst_host == src_host:
            raise InvalidInput("a copy within another host runs on that host",
                               f"run `migrate copy {src_name} {dst_name}` on {src_host}")
        _delegate_copy(src_host, src_name, dst_host, dst_name, pool, instance_only, refresh,
                       compress, fmt)
        return
    with Bars() as bars:
        if dst_host is None:
            r = copy_container(current().containers, src_name, dst_name, pool, instance_only,
                               refresh, allow_inconsistent, bars)
        else:
            with transport_for(dst_host) as t:
                r = RemoteCopy(current().containers, t, bars, compress).copy(
                    src_name, dst_name, pool, instance_only, refresh, allow_inconsistent)
    report(r, fmt, "refreshed" if refresh else "copied")


def _delegate_copy(src_host: str, src: str, dst_host: str, dst: str, pool: str | None,
                   instance_only: bool, refresh: bool, compress: str, fmt: Format) -> None:
    """HOST-A:C1 HOST-B:C1: host a pushes to host b (with the host key this host verified
    for b); this host only drives it."""
    target = delegation_target(dst_host)
    with transport_for(src_host) as t:
        reply = t.request("delegate", {
            "command": "copy", "target": target, "source": src, "target_name": dst,
            "pool": pool, "instance_only": instance_only, "refresh": refresh,
            "compress": compress})
    from migrator.transport.replies import copy_result

    r = copy_result(src_host, reply.get("result"))  # another host's report: checked, cleaned
    r["source"] = f"{src_host}:{r['source']}"
    report(_reported(r), fmt, "refreshed" if refresh else "copied")


def _pull(src_host: str, src: str, dst: str, pool: str | None, instance_only: bool,
          refresh: bool, compress: str, fmt: Format, allow_privileged: bool = False) -> None:
    """HOST:C1 C1: the other host pushes to this one through the same SSH channel."""
    from migrator.pipelines.remote_copy import pull_copy

    with Bars() as bars, transport_for(src_host) as t:
        r = pull_copy(current().containers, t, src, dst, pool, instance_only, refresh, compress,
                      bars, allow_privileged)
    report(_reported(r), fmt, "refreshed" if refresh else "copied")



def move_cmd(
    name: str = typer.Argument(..., help="Container to move or rename"),
    new_name: str = typer.Argument(None, help="New name (rename; the container must be "
                                   "stopped), or an inventory host to move it to"),
    pool: str = pool_option("Move to this pool"),
    verify: bool = typer.Option(False, "--verify",
                                help="Checksum every file before removing the source "
                                "[default: file list, metadata and a checksum sample]"),
    compress: str = typer.Option("auto", "--compress",
                                 help="Between hosts: zstd, none, or auto"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Move a container to another pool (with all snapshots), or rename it.

    Staged: the source is removed only after the target is verified; a failure at any
    point leaves the container whole on its source pool. A running container is copied
    live, then stopped for a final sync and started on the new pool (downtime reported).
    """
    from migrator.pipelines.copy import move_container, rename_container
    from migrator.pipelines.remote_copy import move_to_host, split_ref

    if not pool and not new_name:
        raise InvalidInput("nothing to do", "give --pool P to move, or a NEW_NAME to rename")
    cts = current().containers
    src_host, name = split_ref(name)
    if src_host is not None:
        raise InvalidInput(f"a move from {src_host} runs on {src_host}",
                           f"run `migrate move {name} ...` there, or pull a copy with "
                           f"`migrate copy {src_host}:{name} {name}`")
    target_host = new_name.rstrip(":") if new_name else None
    if target_host and any(h.name == target_host for h in cts.state.list_hosts()):
        with Bars() as bars, transport_for(target_host) as t:
            r = move_to_host(cts, t, name, pool, bars, compress)
        report(r, fmt, "moved")
        return
    old_name = name
    if pool:
        with Bars() as bars:
            r = move_container(cts, name, pool, verify, bars)
        report(r, fmt, "moved")
    if new_name:
        rename_container(cts, old_name, new_name)
        if fmt == Format.json and not pool:
            typer.echo(json.dumps({"source": name, "target": new_name, "method": "rename"}))
        else:
            say(f"renamed {name} -> {new_name}")


# volumes ---------------------------------------------------------------------------------
def _volumes() -> Volumes:
    from migrator.runtime.volumes import Volumes

    return Volumes(current().containers)


@volume_app.command("create")
def volume_create(name: str,
                  pool: str = pool_option("Pool [default: default]")) -> None:
    """Create an empty custom volume."""
    rec = _volumes().create(name, pool)
    say(f"volume {rec.name} created on pool {rec.pool}")


@volume_app.command("list")
def volume_list(pool: str = pool_option("Only this pool"),
                fmt: Format = format_option()) -> None:
    """List custom volumes with their users."""
    rows = [v.as_dict() | {"used_by": ",".join(v.used_by)} for v in _volumes().list_all(pool)]
    typer.echo(render(rows, ["pool", "name", "used_by", "snapshots", "path"], fmt))


@volume_app.command("delete")
def volume_delete(name: str, pool: str = POOL_OPT) -> None:
    """Delete a detached volume and its snapshots."""
    _volumes().delete(name, pool)
    say(f"volume {name} deleted")


@volume_app.command("attach")
def volume_attach(name: str, container: str,
                  path: str = typer.Argument(..., help="Mount point inside, e.g. /srv/data"),
                  pool: str = POOL_OPT) -> None:
    """Mount a volume into a container at PATH (takes effect at the next start)."""
    running = _volumes().attach(name, container, path, pool)
    say(f"volume {name} attached to {container} at {path}"
        + (f"; restart {container} to mount it" if running else ""))


@volume_app.command("detach")
def volume_detach(name: str, container: str, pool: str = POOL_OPT) -> None:
    """Remove a volume from a container (takes effect at the next start)."""
    running = _volumes().detach(name, container, pool)
    say(f"volume {name} detached from {container}"
        + (f"; restart {container} to unmount it" if running else ""))


@volume_snapshot_app.command("create")
def volume_snapshot_create(name: str, snap: str = typer.Argument(None),
                           pool: str = POOL_OPT) -> None:
    """Snapshot a volume (default names snap0, snap1...)."""
    s = _volumes().snapshot_create(name, snap, pool)
    say(f"snapshot {name}/{s} created")


@volume_snapshot_app.command("list")
def volume_snapshot_list(name: str, pool: str = POOL_OPT,
                         fmt: Format = format_option()) -> None:
    """List a volume's snapshots."""
    rows = [{"name": s.name, "created": s.created, "uuid": s.uuid}
            for s in _volumes().snapshot_list(name, pool)]
    typer.echo(render(rows, ["name", "created", "uuid"], fmt))


@volume_snapshot_app.command("delete")
def volume_snapshot_delete(name: str, snap: str, pool: str = POOL_OPT) -> None:
    """Delete a volume snapshot."""
    _volumes().snapshot_delete(name, snap, pool)
    say(f"snapshot {name}/{snap} deleted")


@volume_app.command("copy")
def volume_copy(
    name: str, target: str, pool: str = POOL_OPT,
    target_pool: str = typer.Option(None, "--target-pool", help="[default: the same pool]"),
    refresh: bool = typer.Option(False, "--refresh", help="Update an existing copy"),
    volume_only: bool = typer.Option(False, "--volume-only", help="Without snapshots"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Copy a volume with its snapshots (to another pool with --target-pool)."""
    from migrator.pipelines.volume_copy import copy_volume

    with Bars() as bars:
        r = copy_volume(current().containers, name, target, pool, target_pool, refresh,
                        volume_only, bars)
    report(r, fmt, "refreshed" if refresh else "copied")


@volume_app.command("move")
def volume_move(
    name: str, new_name: str = typer.Argument(None, help="New name"), pool: str = POOL_OPT,
    target_pool: str = typer.Option(None, "--target-pool", help="Move to this pool"),
    verify: bool = typer.Option(False, "--verify", help="Checksum every file first"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Move a volume to another pool and/or rename it (its containers must be stopped)."""
    from migrator.pipelines.volume_copy import move_volume

    with Bars() as bars:
        r = move_volume(current().containers, name, target_pool, new_name, pool, verify, bars)
    report(r, fmt, "moved")
