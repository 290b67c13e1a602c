"""``migrate init`` and ``migrate teardown``: set this host up, and take it down again."""

from __future__ import annotations

import typer

from migrator.cli.console import say
from migrator.cli.context import current
from migrator.core.errors import InvalidInput
from migrator.runtime import network


def register(app: typer.Typer) -> None:
    """Add ``init`` and ``teardown`` to ``app``."""
    app.command("init")(init_cmd)
    app.command("teardown")(teardown_cmd)


def init_cmd(
    netns: str = typer.Option(
        None, help="Run this host's containers in this network namespace (created if missing)"
    ),
    subnet: str = typer.Option(None, help="Bridge address and prefix [default: 203.0.113.1/24]; "
                               "on a shared network each host's bridge has its own address"),
    bridge: str = typer.Option(None, help="Bridge name [default: migbr0]"),
    addr_range: str = typer.Option(
        None, "--range", help="Addresses this host gives its containers, FIRST-LAST inside the "
        "subnet [default: .10 to the end]; on a shared network a range of its own per host, "
        "so two hosts never hand out the same one ('' for the default)"),
    vxlan_id: int = typer.Option(
        None, "--vxlan-id", help="Join the bridge to other hosts' over VXLAN with this network "
        "id (1-16777215, the same on every host)"),
    vxlan_local: str = typer.Option(
        None, "--vxlan-local", help="This host's IPv4 address on the network the hosts share "
        "(the tunnel's source)"),
    vxlan_peer: list[str] = typer.Option(
        None, "--vxlan-peer", help="Another host's IPv4 address there (repeat it; this host's "
        "own is skipped, so every host can be given the same list). Replaces the list"),
    vxlan_port: int = typer.Option(None, "--vxlan-port",
                                   help="UDP port of the tunnel [default: 4789]"),
    no_vxlan: bool = typer.Option(False, "--no-vxlan",
                                  help="Leave the shared network: remove the VXLAN device"),
) -> None:
    """Set up this host: state root, network namespace (optional), bridge and (optional) a
    VXLAN overlay joining it to other hosts' bridges. Idempotent: run again with no options
    (e.g. after a reboot), it makes what is recorded again."""
    h = current().host
    overlay = None
    old = h.network_config().overlay
    if vxlan_id is not None or vxlan_local or vxlan_peer or vxlan_port is not None:
        if (vxlan_id is None or not vxlan_local) and old is None:
            raise InvalidInput("a VXLAN overlay needs --vxlan-id and --vxlan-local",
                               "e.g. --vxlan-id 16 --vxlan-local 198.51.100.10 "
                               "--vxlan-peer 198.51.100.11")
        overlay = network.make_overlay(
            vxlan_id if vxlan_id is not None else old.vni if old else 0,
            vxlan_local or (str(old.local) if old else ""),
            vxlan_peer if vxlan_peer else [str(p) for p in old.peers] if old else [],
            vxlan_port if vxlan_port is not None else old.port if old else network.VXLAN_PORT)
    for w in h.init(netns, subnet, bridge, addr_range=addr_range, overlay=overlay,
                    no_overlay=no_vxlan):
        say(f"warning: {w}")
    n = h.network_config()
    lo, hi = network.address_range(n)
    say(
        f"host ready at {h.root}: bridge {n.bridge} {n.address}"
        + (f" in netns {n.netns}" if n.netns else "")
        + f", containers from {lo} to {hi}"
        + (f"; VXLAN {n.overlay.vni} from {n.overlay.local} to "
           f"{', '.join(map(str, n.overlay.peers)) or 'no peer yet'}" if n.overlay else "")
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
