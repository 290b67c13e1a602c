"""``migrate init`` and ``migrate teardown``: set this host up, and take it down again."""

from __future__ import annotations

import typer

from migrator.cli.console import say
from migrator.cli.context import current
from migrator.core.errors import InvalidInput


def register(app: typer.Typer) -> None:
    """Add ``init`` and ``teardown`` to ``app``."""
    app.command("init")(init_cmd)
    app.command("teardown")(teardown_cmd)


def init_cmd(
    netns: str = typer.Option(
        None, help="Run this host's containers in this network namespace (created if missing)"
    ),
    subnet: str = typer.Option(None, help="Bridge address and prefix [default: 203.0.113.1/24]"),
    bridge: str = typer.Option(None, help="Bridge name [default: migbr0]"),
) -> None:
    """Set up this host: state root, network namespace (optional) and bridge. Idempotent."""
    h = current().host
    h.init(netns, subnet, bridge)
    n = h.network_config()
    say(
        f"host ready at {h.root}: bridge {n.bridge} {n.address}"
        + (f" in netns {n.netns}" if n.netns else "")
    )


def teardown_cmd(
    yes: bool = typer.Option(False, "--yes", help="Confirm"),
    purge: bool = typer.Option(False, help="Also delete the state root with all containers"),
) -> None:
    """Stop every container, unmount pools, remove the host's network namespace."""
    if not yes:
        raise InvalidInput("teardown stops every container of this host", "add --yes to confirm")
    from migrator.runtime.teardown import teardown

    teardown(current().host, purge=purge)
    say("host torn down")
