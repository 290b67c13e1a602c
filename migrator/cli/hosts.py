"""Commands for other hosts: the inventory (``host ...``) and the remote side (``agent``)."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, transport_for
from migrator.cli.options import format_option
from migrator.cli.render import Format, human_size, render
from migrator.core.errors import InvalidInput
from migrator.core.names import ContainerName, host_address

host_app = typer.Typer(help="Other hosts: inventory, host keys, connection checks.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the hidden ``agent`` command to ``app`` (the ``host`` group is added by main)."""
    app.command("agent", hidden=True)(agent_cmd)


def agent_cmd() -> None:
    """The far side of host-to-host operations (run over SSH by the client; not by hand)."""
    from migrator.agent import main_stdio

    raise typer.Exit(main_stdio(lambda: current().containers))


DATA_LINK_HELP = ("How bulk data travels: auto (a direct TCP connection from that host back "
                  "to this one, in TLS 1.3 with certificates pinned through SSH, falling back "
                  "to the SSH channel when it cannot connect), tcp, or ssh (the SSH channel "
                  "only: slower, but needs nothing beyond port 22)")
DATA_LINKS = ("auto", "tcp", "ssh")
FINGERPRINT_HELP = ("Accept only the SSH host key with this fingerprint (SHA256:..., as "
                    "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on the host)")


def _data_link(value: str) -> str:
    if value not in DATA_LINKS:
        raise InvalidInput(f"invalid data link {value!r}", "one of: auto, tcp, ssh")
    return value


@host_app.command("add")
def host_add(
    name: str = typer.Argument(..., help="Inventory name, e.g. host-b"),
    address: str = typer.Argument(..., help="IP address or DNS name of its sshd"),
    port: int = typer.Option(22, help="sshd port"),
    user: str = typer.Option("root", help="Login user"),
    key: str = typer.Option(None, help="Private key file [default: ssh-agent / ~/.ssh]"),
    root: str = typer.Option(None, "--remote-root",
                             help="State root on that host [default: its default]"),
    command: str = typer.Option(None, help="Path of migrate there [default: migrate]"),
    accept_host_key: bool = typer.Option(False, "--accept-host-key",
                                         help="Trust its SSH key now (shows the fingerprint)"),
    data_link: str = typer.Option("auto", "--data-link", help=DATA_LINK_HELP),
    fingerprint: str = typer.Option(None, "--fingerprint", help=FINGERPRINT_HELP),
) -> None:
    """Add a host to the inventory (and, with --accept-host-key or --fingerprint, record
    its SSH key).

    Then `migrate host check NAME` measures the link, which decides whether transfers are
    compressed (zstd only helps on links slower than it compresses)."""
    from migrator.runtime.state import HostRecord

    hname = ContainerName(name)
    if hname == "local":
        raise InvalidInput("'local' is this host", "pick another name")
    host_address(address)
    expected = _fingerprint(fingerprint) if fingerprint else None
    if key and not os.path.isfile(key):
        raise InvalidInput(f"key file {key} does not exist")
    h = current().host
    with h.state.transaction():
        h.state.add_host(HostRecord(hname, address, port, user,
                                    os.path.abspath(key) if key else None, root, command,
                                    _data_link(data_link)))
    say(f"host {hname} added ({user}@{address}:{port})")
    if accept_host_key or expected:
        host_trust(hname, expected)


@host_app.command("set")
def host_set(
    name: str,
    data_link: str = typer.Option(None, "--data-link", help=DATA_LINK_HELP),
    port: int = typer.Option(None, help="sshd port"),
    user: str = typer.Option(None, help="Login user"),
    command: str = typer.Option(None, help="Path of migrate there"),
) -> None:
    """Change a host's settings in the inventory."""
    values: dict[str, Any] = {k: v for k, v in (("port", port), ("user", user),
                                                ("command", command)) if v is not None}
    if data_link is not None:
        values["data_link"] = _data_link(data_link)
    if not values:
        raise InvalidInput("nothing to set", "e.g. `migrate host set host-b --data-link ssh`")
    h = current().host
    with h.state.transaction():
        h.state.update_host(name, **values)
    say(f"host {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def _fingerprint(value: str) -> str:
    """A SHA-256 key fingerprint as OpenSSH prints it: ``SHA256:`` and 43 base64 chars."""
    if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", value.strip()):
        raise InvalidInput(f"not a SHA-256 key fingerprint: {value!r}",
                           "copy it from `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` "
                           "on the host, e.g. SHA256:uNiVzt...")
    return value.strip()


@host_app.command("trust")
def host_trust(
    name: str,
    fingerprint: str | None = typer.Option(None, "--fingerprint", help=FINGERPRINT_HELP),
) -> None:
    """Record the host's SSH key in known_hosts. With --fingerprint only that key is
    accepted; without it, whatever key the host presents is, so check the fingerprint this
    prints against the host's own (`ssh-keygen -lf` there)."""
    expected = _fingerprint(fingerprint) if fingerprint else None
    with transport_for(name, accept_host_key=True, expect_fingerprint=expected) as t:
        shown = t.host_key()
    if expected:
        say(f"trusted {name}: {shown} (matches the fingerprint given)")
    else:
        say(f"trusted {name}: {shown} (not checked against a fingerprint: compare it with "
            f"the host's own, or use `migrate host trust {name} --fingerprint SHA256:...`)")


@host_app.command("list")
def host_list(fmt: Format = format_option()) -> None:
    """List the inventory (``local`` is always this host)."""
    h = current().host
    rows: list[dict[str, Any]] = [{"name": "local", "address": "-", "user": "-",
                                   "root": str(h.root)}]
    rows += [{"name": r.name, "address": f"{r.address}:{r.port}", "user": r.user,
              "root": r.root or "(default)", "data_link": r.data_link,
              "link_rate": f"{human_size(r.link_rate)}/s" if r.link_rate else "-"}
             for r in h.state.list_hosts()]
    typer.echo(render(rows, ["name", "address", "user", "root", "data_link", "link_rate"],
                      fmt))


@host_app.command("remove")
def host_remove(name: str) -> None:
    """Remove a host from the inventory (nothing on the host itself changes)."""
    h = current().host
    h.state.get_host(name)
    with h.state.transaction():
        h.state.delete_host(name)
    say(f"host {name} removed")


@host_app.command("check")
def host_check(
    name: str,
    probe_mib: int = typer.Option(64, help="MiB sent to measure the link (0: skip)"),
    fmt: Format = format_option(),
) -> None:
    """Connect, negotiate, and show both sides: versions, pools and their migration types,
    compressors, CRIU, and the link's throughput through the agent.

    The measured rate is kept in the inventory: with `--compress auto`, transfers to this
    host are compressed only if the link is slower than zstd."""
    from migrator.pipelines.remote_copy import negotiate_session
    from migrator.pipelines.remote_target import RemoteTarget, no_data

    local = RemoteTarget(current().containers).hello({"criu_features": True}, no_data)
    with transport_for(name) as t:
        t0 = time.monotonic()
        remote = t.request("hello", {"criu_features": True})
        rtt = time.monotonic() - t0
        rate = None
        session = negotiate_session(t, remote, "none")
        if probe_mib:
            from migrator.transport.probe import measure_upload

            rate = measure_upload(t, probe_mib << 20)
            link_used = "tcp" if t.last_link == "tcp" else "ssh"
            h = current().host
            with h.state.transaction():
                h.state.update_host(name, link_rate=rate, link_checked=time.time())
            t.link_rate = rate
        else:
            link_used = session.link
        comp = negotiate_session(t, remote, "auto")
    info = {"host": name, "key": "verified", "request_seconds": round(rtt, 3),
            "upload_bytes_per_second": rate, "data_link": link_used,
            "data_link_problem": t.link_failed or None, "compression": comp.compress,
            "compression_reason": comp.reasons[1], "local": local, "remote": remote}
    if fmt == Format.json:
        print_json(info)
        return
    for side, d in (("local", local), (name, remote)):
        typer.echo(f"{side}: migrator {d['version']} (protocol {d['protocol']}), "
                   f"criu {d.get('criu') or 'missing'}, compressors {','.join(d['compressors'])}")
        feats = d.get("criu_features") or {}
        if feats:
            typer.echo("  criu features: " + ", ".join(
                f"{k} {'yes' if v else 'no'}" for k, v in feats.items()))
        for p in d["pools"]:
            typer.echo(f"  pool {p['name']} ({p['driver']}): {','.join(p['types'])}, "
                       f"{human_size(p['free'])} free")
    typer.echo(f"request round trip {rtt * 1000:.0f} ms"
               + (f"; upload {human_size(rate)}/s" if rate else "")
               + f" over {'the direct TCP link' if link_used == 'tcp' else 'the SSH channel'}")
    if t.link_failed:
        typer.echo(f"  direct link failed: {t.link_failed} (`migrate host set {name} "
                   "--data-link ssh` skips trying)")
    typer.echo(f"transfers: compression {comp.compress} ({comp.reasons[1]})")


overlay_app = typer.Typer(
    help="The container network this host shares with others over VXLAN: its peers (set it "
         "up with `migrate init --vxlan-id N --vxlan-local ADDR`).", no_args_is_help=True)
host_app.add_typer(overlay_app, name="overlay")


def _overlay_row() -> dict[str, Any]:
    from migrator.runtime import network

    n = current().host.network_config()
    lo, hi = network.address_range(n)
    row: dict[str, Any] = {"bridge": n.bridge, "address": str(n.address),
                           "range": f"{lo}-{hi}", "reserved": sorted(n.reserved)}
    if n.overlay is not None:
        row.update({"vxlan_id": n.overlay.vni, "device": network.vxlan_device(n.bridge),
                    "local": str(n.overlay.local), "port": n.overlay.port,
                    "peers": [str(p) for p in n.overlay.peers],
                    "peers_now": network.overlay_peers_now(n)})
    return row


@overlay_app.command("show")
def overlay_show(fmt: Format = format_option()) -> None:
    """This host's shared network: bridge, address range, VXLAN id, peers (recorded, and
    those the device sends to now: they differ after a reboot until `migrate init`)."""
    row = _overlay_row()
    if fmt == Format.json:
        print_json(row)
        return
    typer.echo(f"bridge {row['bridge']} {row['address']}, containers from {row['range']}"
               + (f", reserved {','.join(row['reserved'])}" if row["reserved"] else ""))
    if "vxlan_id" not in row:
        typer.echo("no VXLAN overlay: this host's containers are on its bridge only")
        return
    now = row["peers_now"]
    typer.echo(f"VXLAN {row['vxlan_id']} on {row['device']}, from {row['local']} "
               f"port {row['port']}")
    state = "is missing" if now is None else "sends to " + (", ".join(now) or "none")
    typer.echo(f"peers: {', '.join(row['peers']) or 'none'}"
               + ("" if now == row["peers"] else f" (the device {state}: run `migrate init`)"))


@overlay_app.command("add")
def overlay_add(peers: list[str] = typer.Argument(..., help="Other hosts' IPv4 addresses on "
                                                  "the network the hosts share")) -> None:
    """Add VXLAN peers: recorded, and their entries made at once."""
    ov = current().host.set_overlay_peers(add=peers)
    say(f"VXLAN {ov.vni} peers: {', '.join(map(str, ov.peers)) or 'none'}")


@overlay_app.command("remove")
def overlay_remove(peers: list[str] = typer.Argument(..., help="Peer addresses to drop")) -> None:
    """Remove VXLAN peers: this host stops sending to them."""
    ov = current().host.set_overlay_peers(remove=peers)
    say(f"VXLAN {ov.vni} peers: {', '.join(map(str, ov.peers)) or 'none'}")


@overlay_app.command("reserve")
def overlay_reserve(addresses: list[str] = typer.Argument(..., help="IPv4 addresses")) -> None:
    """Keep addresses of this host's range out of its allocation: e.g. a stopped container
    of this host that was moved to another host (it keeps its address, and a stopped one
    does not answer the check made before an address is handed out)."""
    from migrator.runtime import network

    h = current().host
    for a in addresses:
        h.reserve_ipv4(str(network.parse_ipv4(a, "address")))
    say(f"reserved: {', '.join(sorted(h.network_config().reserved)) or 'none'}")


@overlay_app.command("release")
def overlay_release(addresses: list[str] = typer.Argument(..., help="IPv4 addresses")) -> None:
    """Let this host hand out reserved addresses again (their containers are gone)."""
    from migrator.runtime import network

    h = current().host
    for a in addresses:
        h.reserve_ipv4(str(network.parse_ipv4(a, "address")), reserved=False)
    say(f"reserved: {', '.join(sorted(h.network_config().reserved)) or 'none'}")
