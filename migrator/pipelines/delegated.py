"""Pushes this host runs on a client's behalf (the agent's ``delegate`` request).

``migrate live host-a host-b`` and ``migrate copy host-a:c1 host-b:c1`` drive two other
hosts: the client asks host a's agent to push to host b, as if the command ran on host a.
``migrate copy host-a:c1 c1`` (a pull) asks host a to push back up the request's own
channel (``transport/reverse.py``), as the client may not be reachable from host a.

The design decision: the client describes the target and sends the host key *it*
verified for it, so this host trusts exactly that key and nothing more; the login key is
the client's path if it exists here, else this host's own keys and ssh-agent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from migrator.core import errors
from migrator.core.names import ContainerName, host_address
from migrator.pipelines.live import live_migrate, running_containers
from migrator.pipelines.remote_copy import RemoteCopy, move_to_host
from migrator.pipelines.remote_target import RemoteTarget
from migrator.transport.base import Transport
from migrator.transport.frames import Reader
from migrator.transport.replies import error_reply
from migrator.transport.reverse import ReverseTransport


def delegate(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Run a push from this host for a client that drives two other hosts (or pulls)."""
    tgt = dict(req["target"])
    if tgt.get("reverse"):
        if req.get("command") != "copy":
            raise errors.InvalidInput("only a copy can be pulled through the client")
        return _pull_source(end, req, read)
    # paramiko only for the requests that need it: it would add ~0.3 s to the start-up of
    # every agent (one per request), which imports this module for its dispatch table
    from migrator.transport.ssh import SshTransport

    name = str(ContainerName(str(tgt["name"])))
    address, port = host_address(tgt["address"]), int(tgt.get("port", 22))
    key_type, key_b64 = (str(x) for x in tgt["host_key"])
    if not key_type.replace("-", "").replace("@", "").replace(".", "").isalnum() or \
            not key_b64.replace("+", "").replace("/", "").rstrip("=").isalnum():
        raise errors.InvalidInput("malformed host key for the target")
    login_key = tgt.get("key") if tgt.get("key") and os.path.isfile(str(tgt["key"])) \
        else None
    with tempfile.TemporaryDirectory(prefix="migrator-delegate-") as d:
        known = Path(d) / "known_hosts"
        hostname = address if port == 22 else f"[{address}]:{port}"
        known.write_text(f"{hostname} {key_type} {key_b64}\n")
        known.chmod(0o600)
        t = SshTransport(name, address, port, str(tgt.get("user", "root")), login_key,
                         tgt.get("root"), tgt.get("command"), known_hosts=known,
                         netns=end.host.netns)
        t.data_link = str(tgt.get("data_link", "auto"))
        t.link_rate = float(tgt["link_rate"]) if tgt.get("link_rate") else None
        with t:
            if req.get("command") == "live":
                return _delegated_live(end, req, t)
            if req.get("command") == "copy":
                r = RemoteCopy(end.cts, t, compress=str(req.get("compress", "auto"))
                               ).copy(str(ContainerName(req["source"])),
                                      str(ContainerName(req["target_name"])),
                                      req.get("pool"), bool(req.get("instance_only")),
                                      bool(req.get("refresh")))
                return {"result": r.as_dict()}
            # a stateless move: evacuate --restore of a container that cannot go live
            if req.get("command") == "move":
                m = move_to_host(end.cts, t, str(ContainerName(req["source"])), req.get("pool"),
                                 compress=str(req.get("compress", "auto")))
                return {"result": m.as_dict()}
    raise errors.InvalidInput(f"cannot delegate {req.get('command')!r}")


def _pull_source(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Push to the client that asked, through its own channel (``reverse.py``)."""
    r = RemoteCopy(end.cts, ReverseTransport(read, end.write),
                   compress=str(req.get("compress", "auto"))
                   ).copy(str(ContainerName(req["source"])),
                          str(ContainerName(req["target_name"])), req.get("pool"),
                          bool(req.get("instance_only")), bool(req.get("refresh")))
    return {"result": r.as_dict()}


def _delegated_live(end: RemoteTarget, req: dict[str, Any], t: Transport) -> dict[str, Any]:
    names = [str(ContainerName(n)) for n in req.get("names") or []]
    if not names:
        names = running_containers(end.cts)
    results, failures = [], []
    for n in names:
        try:
            r = live_migrate(end.cts, t, n, req.get("pool"), str(req.get("mode", "auto")),
                             bool(req.get("keep_source")), str(req.get("compress", "auto")))
        except errors.MigratorError as e:
            failures.append({"name": n, **error_reply(e)["error"]})
            end.notify({"event": "failed", "name": n, "message": e.message})
            continue
        results.append(r.as_dict())
        end.notify({"event": "migrated", **r.as_dict()})
    return {"results": results, "failures": failures}
