"""``migrate p2c SOURCE --to HOST NAME``: parse, wire the source, the target and the bars,
render the inventory and the report. The pipeline is ``migrator.p2c.convert``."""

from __future__ import annotations

from typing import Any

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, transport_for
from migrator.cli.options import format_option, pool_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size, render


def register(app: typer.Typer) -> None:
    """Add ``p2c`` to ``app``."""
    app.command("p2c")(p2c_cmd)


def p2c_cmd(
    source: str = typer.Argument(..., help="The machine: user@machine[:port] (SSH)"),
    name: str = typer.Argument(..., help="Name of the new container"),
    to: str = typer.Option("local", "--to", help="Target host from the inventory, or local"),
    pool: str = pool_option("Target pool [default: default]"),
    exclude: list[str] = typer.Option([], "--exclude", help="Leave this path out "
                                      "(repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the inventory only"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted "
                                "conversion into the same partial volume"),
    strict: bool = typer.Option(False, "--strict", help="Fail when a file cannot be read"),
    privileged: bool = typer.Option(False, "--privileged", help="Keep the machine's uids "
                                    "as they are (a privileged container)"),
    dhcp: bool = typer.Option(False, "--dhcp", help="Configure eth0 by DHCP, not with the "
                              "runtime's static address"),
    no_start: bool = typer.Option(False, "--no-start", help="Do not boot the container"),
    key: str = typer.Option(None, "--key", help="SSH private key for the machine "
                            "[default: ssh-agent and ~/.ssh keys]"),
    accept_host_key: bool = typer.Option(False, "--accept-host-key", help="Trust and record "
                                         "the machine's unknown SSH host key"),
    fmt: Format = format_option("table or json"),
) -> None:
    """Convert a running machine reached over SSH into a system container (inventory,
    transfer with a delta pass, fixups, first boot)."""
    from migrator.agent import local_transport
    from migrator.p2c.convert import P2cOptions, convert
    from migrator.p2c.source import SourceMachine, SourceSpec

    h = current().host
    spec = SourceSpec.parse(source)
    opts = P2cOptions(name, pool, list(exclude), dry_run, resume, strict, privileged, dhcp,
                      not no_start)
    machine = SourceMachine(spec, key, h.root / "ssh" / "known_hosts", accept_host_key,
                            netns=h.netns)
    if to == "local":
        target: Any = local_transport(current().containers)
    else:
        target = transport_for(to)
    with machine, target, Bars(enabled=None if fmt != Format.json else False) as bars:
        result = convert(h.state, machine, target, opts, bars,
                         show_inventory if fmt != Format.json else None)
    if fmt == Format.json:
        print_json(result.as_dict())
        return
    if dry_run:
        say("dry run: nothing was changed on the target")
        return
    if result.resumed:
        say(f"resumed operation {result.resumed}")
    for p in result.passes:
        say(f"pass {p['pass']}: {human_size(p['bytes'])} relayed, {p['files']} files sent, "
            f"{p['seconds']:.1f}s")
    if result.unreadable:
        say(f"{len(result.unreadable)} file(s) could not be read on the source and were "
            "skipped:")
        for u in result.unreadable:
            say(f"  {u}")
    say("changes made for the container (also in /root/p2c-report.txt):")
    for c in result.changes:
        say(f"  {c}")
    boot = f", systemd {result.boot}" if result.boot else ""
    failed = f" (failed: {', '.join(result.failed_units)})" if result.failed_units else ""
    say(f"converted {result.source} -> {result.target} on pool {result.pool}, address "
        f"{result.ipv4}: {human_size(result.bytes)} in {result.seconds:.1f}s, "
        f"{result.status.lower() or 'stopped'}{boot}{failed}")


def show_inventory(inv: Any) -> None:
    say(f"{inv.source}: {inv.distribution}, init {inv.init}, kernel {inv.kernel}, "
        f"hostname {inv.hostname or '-'}")
    say(f"to transfer: {human_size(inv.total_size)}"
        + (f" (excluding {', '.join(inv.excludes)})" if inv.excludes else ""))
    rows = [{"mount": m.path, "type": m.fstype, "source": m.source,
             "copy": "yes" if m.included else "no",
             "size": human_size(m.size) if m.size is not None else "",
             "why": m.reason} for m in inv.mounts]
    typer.echo(render(rows, ["mount", "type", "source", "copy", "size", "why"], Format.table))
    for i in inv.interfaces:
        say(f"interface {i['name']} {i['state']} {' '.join(i['addresses'])}")
    for r in inv.routes:
        say(f"route {r}")
    if inv.network_config:
        say(f"network configured by: {', '.join(inv.network_config)}")
    say(f"enabled services ({inv.services_from}): {', '.join(inv.services) or 'none'}")
