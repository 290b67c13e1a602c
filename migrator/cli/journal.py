"""``migrate operations`` and ``migrate recover``: the journal of copies and moves, and
finishing or rolling back the ones whose process died part-way."""

from __future__ import annotations

import time

import typer

from migrator.cli.console import say
from migrator.cli.context import current, transport_for
from migrator.cli.options import format_option
from migrator.cli.render import Format, render


def register(app: typer.Typer) -> None:
    """Add ``operations`` and ``recover`` to ``app``."""
    app.command("operations")(operations_cmd)
    app.command("recover")(recover_cmd)


def operations_cmd(
    all_: bool = typer.Option(False, "--all", help="Also finished ones [default: running and "
                              "interrupted]"),
    fmt: Format = format_option(),
) -> None:
    """Journaled copies and moves: kind, status, last stage; interrupted ones need recover."""
    from migrator.runtime.operations import owner_alive

    state = current().host.state
    rows = []
    for op in state.list_operations():
        status = op.status
        if status == "running" and not owner_alive(op):
            status = "interrupted"
        if not all_ and status not in ("running", "interrupted", "failed"):
            continue
        what = op.detail.get("container", "")
        where = op.detail.get("host") or op.detail.get("to_pool") or op.detail.get("pool", "")
        rows.append({"id": op.id, "kind": op.kind, "status": status, "container": what,
                     "to": where, "stage": (op.stages or ["-"])[-1],
                     "method": op.detail.get("method", ""),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S",
                                              time.localtime(op.created)),
                     "error": op.error or ""})
    typer.echo(render(rows, ["id", "kind", "status", "container", "to", "stage", "method",
                             "started", "error"], fmt))


def recover_cmd(
    op_id: str = typer.Argument(None, help="Operation id (prefix) [default: every "
                                "interrupted one]"),
) -> None:
    """Roll back, or complete, operations whose process died part-way (on both hosts)."""
    from migrator.recover import recover
    from migrator.runtime.operations import interrupted

    state = current().host.state
    ops = [state.get_operation(op_id)] if op_id else interrupted(state)
    if not ops:
        say("nothing to recover")
        return
    for op in ops:
        say(f"{op.id} ({op.kind}): {recover(current().containers, op, transport_for)}")
