"""SSH transports to the other hosts named in this host's inventory.

The inventory (``StateStore.get_host``) says where a peer is and how to log in; this host's
``known_hosts`` says which key it must show; this host's network namespace is where the
connection leaves from. The transport layer below knows none of that, so the one function
that joins them lives here, on the runtime floor. It is a module of its own, not part of
``host.py``, because it imports paramiko (about 0.3 s): ``Host`` is imported by every
agent, and most agents never open a connection of their own.
"""

from __future__ import annotations

from migrator.core.names import ContainerName
from migrator.runtime.host import Host
from migrator.transport.ssh import SshTransport


def inventory_transport(host: Host, name: str, accept_host_key: bool = False,
                        expect_fingerprint: str | None = None) -> SshTransport:
    """An (unconnected) transport to inventory host ``name`` of ``host``: its address,
    login and agent command from the inventory, its key checked against the host's
    known_hosts, connecting from the host's network namespace."""
    rec = host.state.get_host(ContainerName(name))
    t = SshTransport(rec.name, rec.address, rec.port, rec.user, rec.key, rec.root,
                     rec.command, known_hosts=host.root / "ssh" / "known_hosts",
                     netns=host.netns, accept_host_key=accept_host_key,
                     expect_fingerprint=expect_fingerprint)
    t.data_link, t.link_rate = rec.data_link, rec.link_rate  # negotiate_session reads them
    return t
