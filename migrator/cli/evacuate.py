"""``migrate evacuate HOST``: every container of a host onto other hosts, and back."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, delegation_target, transport_for
from migrator.cli.options import format_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size
from migrator.core.errors import InvalidInput, MigratorError, NotFound
from migrator.transport.replies import clean_event


def register(app: typer.Typer) -> None:
    """Add ``evacuate`` to ``app``."""
    app.command("evacuate")(evacuate_cmd)


def evacuate_cmd(
    host: str = typer.Argument(..., help="The host to empty: local (this host), or an "
                               "inventory host, which then evacuates itself to the hosts of "
                               "its own inventory"),
    to: str = typer.Option(None, "--to",
                           help="Target hosts, comma-separated [default: every inventory host]"),
    parallel: int = typer.Option(1, "--parallel", "-j", min=1, max=16,
                                 help="Containers moved at once"),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Place and check every container, print the plan, "
                                 "change nothing"),
    running_only: bool = typer.Option(False, "--running-only",
                                      help="Stopped containers stay"),
    restore: bool = typer.Option(False, "--restore",
                                 help="Bring back what an evacuation moved away"),
    as_name: str = typer.Option(None, "--as",
                                help="With --restore: this host's name in its own inventory, "
                                "how the targets reach it to send a running container back "
                                "[default: the entry whose agent is this host]"),
    target_pool: str = typer.Option(None, "--target-pool", "-p",
                                    help="Pool on every target [default: each one's default]"),
    mode: str = typer.Option("auto", "--mode",
                             help="Checkpoint mode of the live moves: auto, post-copy, "
                             "stop-and-copy"),
    compress: str = typer.Option("auto", "--compress", help="zstd, none, or auto"),
    fmt: Format = format_option(),
) -> None:
    """Move every container off a host: live where CRIU can, stateless where it cannot.

    Each running container goes to the target with the most free memory that has room in
    its pool for it, live (with its memory) where the live checks pass, else stopped,
    copied and started there, with the reason. Stopped containers move stateless, or stay
    with --running-only. Where each one went is recorded on this host, and --restore brings
    them back (live if running there). A container that fails stays here, running if it
    was; the exit code is non-zero if any failed. A running container comes back live
    through its host's agent, which needs this host in its own inventory (`migrate host
    add host-a ADDRESS` on host-a). Examples:

      migrate evacuate local --dry-run                 # the plan: where, how, why
      migrate evacuate local --to host-b,host-c -j 2   # two at a time
      migrate evacuate local --running-only --format json
      migrate evacuate local --restore                 # back here, live if running
      migrate evacuate host-a --to host-b,host-c       # host-a empties itself (its inventory)
    """
    if host != "local":
        _elsewhere(host, {"to": [t for t in (to or "").split(",") if t], "parallel": parallel,
                          "dry_run": dry_run, "running_only": running_only,
                          "restore": restore, "as_name": as_name, "pool": target_pool,
                          "mode": mode, "compress": compress}, fmt)
        return
    cts = current().containers
    inventory = [h.name for h in cts.state.list_hosts()]
    if restore:
        _restore(as_name, target_pool, mode, compress, fmt, dry_run)
        return
    targets = [t for t in (to.split(",") if to else inventory) if t]
    for t in targets:
        if t == "local" or t not in inventory:
            raise NotFound(f"{t!r} is not a host in the inventory",
                           "add it with `migrate host add NAME ADDRESS`")
    if not targets:
        raise NotFound("no target host", "add one: `migrate host add NAME ADDRESS`")
    from migrator.pipelines import evacuate as ev

    cands = ev.candidates(cts)
    if not cands:
        say("no container to evacuate")
        if fmt == Format.json:
            print_json([])
        return
    from migrator.pipelines.remote_target import host_id

    me = host_id(cts.host.root)
    figures = []
    for t in targets:
        with transport_for(t) as tr:
            fig = ev.survey(tr, target_pool)
        if fig.host_id == me:
            if to:
                raise InvalidInput(f"{t} is this host", "name other hosts with --to")
            say(f"{t} is this host: not a target")
            continue
        figures.append(fig)
    if not figures:
        raise NotFound("no target host but this one",
                       "add another: `migrate host add NAME ADDRESS`")
    placed = ev.place(cands, figures, running_only)
    decided = []
    for p in placed:
        if p.to is not None and p.state == "RUNNING":
            with transport_for(p.to) as tr:
                p = ev.decide(cts, tr, p, mode, compress)
        decided.append(p)
    if dry_run:
        if fmt == Format.json:
            print_json([p.as_dict() for p in decided])
            return
        for p in decided:
            say(f"{p.name} ({p.state.lower()}, memory {human_size(p.memory)}, rootfs "
                f"{human_size(p.rootfs)}): "
                + (f"{p.how} to {p.to} pool {p.pool}: {p.reason}" if p.to and p.how != "failed"
                   else f"{'FAILS' if p.how == 'failed' else 'stays'}: {p.reason}"))
        return

    moving = [p for p in decided if p.to is not None]
    say(f"evacuating {len(moving)} of {len(decided)} container(s) to "
        f"{', '.join(f.name for f in figures)}")
    # inventory look-ups here, in the main thread (the state's SQLite stays in its thread)
    transports = {p.name: transport_for(p.to) for p in moving if p.to}
    privileged = {i.name: i.privileged for i in cts.list_all()}

    def one(p: ev.Placement) -> ev.Outcome:
        if p.to is None:
            return ev.Outcome(p.name, "local", None, "stayed", p.reason)
        from migrator.runtime.containers import Containers
        from migrator.runtime.host import Host

        own = cts if parallel == 1 else Containers(Host(cts.host.root))
        try:
            with transports[p.name] as t, \
                    Bars(enabled=None if parallel == 1 else False) as bars:
                return ev.evacuate_one(own, t, p, mode, compress, bars)
        finally:
            if own is not cts:
                own.host.close()

    outcomes: list[ev.Outcome] = []

    def collect(p: ev.Placement, o: ev.Outcome) -> None:
        outcomes.append(o)
        ev.remember(cts.host.root, o, p.state == "RUNNING", privileged.get(p.name, False))
        if fmt != Format.json:
            _report(o)

    if parallel == 1:
        for p in decided:
            collect(p, one(p))
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(one, p): p for p in decided}
            for fut in as_completed(futures):  # each recorded as soon as it has moved
                collect(futures[fut], fut.result())
    _finish(outcomes, fmt)


def _restore(as_name: str | None, pool: str | None, mode: str, compress: str, fmt: Format,
             dry_run: bool) -> None:
    from migrator.pipelines import evacuate as ev

    cts = current().containers
    entries = ev.load_record(cts.host.root)
    if not entries:
        say("nothing evacuated from this host to restore")
        if fmt == Format.json:
            print_json([])
        return
    if dry_run:
        rows = [{"name": n, "from": e["to"], "to": "local", "how": e.get("how")}
                for n, e in entries.items()]
        if fmt == Format.json:
            print_json(rows)
        for r in rows if fmt != Format.json else []:
            say(f"{r['name']}: back from {r['from']} (it left {r['how']})")
        return
    if as_name is None and any(e.get("was_running") for e in entries.values()):
        as_name = _find_self(cts)
    self_target = delegation_target(as_name) if as_name else None
    say(f"restoring {len(entries)} container(s) to this host")
    outcomes = []
    for name, entry in sorted(entries.items()):
        with transport_for(str(entry["to"])) as t, Bars() as bars:
            o = ev.restore_one(cts, t, name, entry, self_target, pool, mode, compress, bars)
        if o.how != "failed":
            ev.forget(cts.host.root, name)
        outcomes.append(o)
        if fmt != Format.json:
            _report(o)
    _finish(outcomes, fmt)


def _find_self(cts: Any) -> str | None:
    """This host's entry in its own inventory (how the targets reach it back), found by
    the id its agent names; None when there is none (a running container then cannot come
    back live, and the restore says how to add one)."""
    from migrator.pipelines import evacuate as ev

    for h in cts.state.list_hosts():
        with contextlib.suppress(MigratorError), transport_for(h.name) as t:
            if ev.is_this_host(cts, t):
                say(f"the targets reach this host as {h.name}")
                return str(h.name)
    return None


def _finish(outcomes: list[Any], fmt: Format) -> None:
    if fmt == Format.json:
        print_json([o.as_dict() for o in outcomes])
    failed = [o for o in outcomes if o.how == "failed"]
    if failed:
        say(f"FAILED: {', '.join(o.name for o in failed)}")
        raise typer.Exit(max(o.exit_code or 1 for o in failed))


def _report(o: Any) -> None:
    if o.how == "failed":
        say(f"{o.name}: FAILED ({o.error}); {'; '.join(o.notes)}")
    elif o.how == "stayed":
        say(f"{o.name}: stays ({o.reason})")
    else:
        down = f", down {o.downtime:.2f}s" if o.downtime is not None else ""
        why = f" ({o.reason})" if o.reason else ""
        say(f"{o.name}: {o.how} {o.source} -> {o.to} in {o.seconds:.1f}s{down}{why}")


def _elsewhere(host: str, args: dict[str, Any], fmt: Format) -> None:
    """Another host evacuates itself (its agent runs ``migrate evacuate local`` there, with
    its own inventory and record): its lines are shown as they come, then its rows."""
    def line(event: dict[str, Any]) -> None:
        if event.get("event") == "say" and event.get("text"):
            say(f"{host}: {event['text']}")

    with transport_for(host) as t:
        reply = t.request("evacuate", args, on_event=line)
    rows = clean_event({"rows": reply["rows"]})["rows"]
    if fmt == Format.json:
        print_json(rows)
    else:
        for row in rows:
            say(_row_line(row))
    if reply["exit_code"]:
        raise typer.Exit(int(reply["exit_code"]))


def _row_line(row: dict[str, Any]) -> str:
    """One row of a far evacuation (a move, a plan's line or a restore) as a sentence."""
    name, how = row.get("name"), row.get("how")
    if how == "failed":
        return f"{name}: FAILED ({row.get('error') or row.get('reason')})"
    if how == "stayed" or (row.get("to") is None and "seconds" not in row):
        return f"{name}: stays ({row.get('reason')})"
    if "seconds" in row:
        down = f", down {row['downtime']:.2f}s" if isinstance(row.get("downtime"),
                                                               float | int) else ""
        return f"{name}: {how} {row.get('from')} -> {row.get('to')} in " \
               f"{float(row.get('seconds') or 0):.1f}s{down}"
    return f"{name}: {how} to {row.get('to')} pool {row.get('pool')}: {row.get('reason')}"

