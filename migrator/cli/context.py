"""The per-invocation context shared by the command modules: this host, its containers,
and the SSH transports to the hosts of its inventory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrator.core.errors import HostKeyError
from migrator.core.names import ContainerName

if TYPE_CHECKING:
    from migrator.runtime.containers import Containers
    from migrator.runtime.host import Host
    from migrator.transport.ssh import SshTransport


class Ctx:
    """Per-invocation objects, opened lazily so `--help` never touches the state root."""

    def __init__(self, root: Path | None, verbose: bool) -> None:
        self.root = root
        self.verbose = verbose
        self._host: Host | None = None
        self._cts: Containers | None = None

    @property
    def host(self) -> Host:
        if self._host is None:
            from migrator.runtime.host import Host, root_from_env

            self._host = Host(root_from_env(self.root))
        return self._host

    @property
    def containers(self) -> Containers:
        if self._cts is None:
            from migrator.runtime.containers import Containers

            self._cts = Containers(self.host)
        return self._cts


_CURRENT: list[Ctx] = []


def begin(root: Path | None, verbose: bool) -> Ctx:
    """The context of this invocation (the app's callback opens it before any command)."""
    ctx = Ctx(root, verbose)
    _CURRENT.append(ctx)
    return ctx


def current() -> Ctx:
    """The context the running command works in."""
    return _CURRENT[-1]


def transport_for(name: str, accept_host_key: bool = False,
                  expect_fingerprint: str | None = None) -> SshTransport:
    """An (unconnected) SSH transport to an inventory host, from this host's namespace."""
    from migrator.runtime.peers import inventory_transport

    return inventory_transport(current().host, name, accept_host_key, expect_fingerprint)


def delegation_target(name: str) -> dict[str, Any]:
    """An inventory host as another host needs it to push there for us, with the host key
    this host verified (so the pushing host trusts exactly that key)."""
    import paramiko

    h = current().host
    rec = h.state.get_host(ContainerName(name))
    hostname = rec.address if rec.port == 22 else f"[{rec.address}]:{rec.port}"
    known = h.root / "ssh" / "known_hosts"
    keys = paramiko.HostKeys(str(known)) if known.exists() else paramiko.HostKeys()
    entry = keys.lookup(hostname)
    if not entry:
        raise HostKeyError(f"no verified SSH key for {name}",
                           f"check its fingerprint, then `migrate host trust {name}`")
    ktype, key = next(iter(entry.items()))
    return {"name": rec.name, "address": rec.address, "port": rec.port, "user": rec.user,
            "key": rec.key, "root": rec.root, "command": rec.command,
            "data_link": rec.data_link, "link_rate": rec.link_rate,
            "host_key": [ktype, key.get_base64()]}
