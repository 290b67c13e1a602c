"""``migrate p2c``: the pipeline that turns a machine reached over SSH into a container.

Stages, journaled as a ``p2c`` operation on this (the client's) host:

1. ``inventory`` (``--dry-run`` stops after it): what the machine is and what will move;
2. ``pull``: two rsync passes into the target's volume (the second picks up what changed
   while the first ran), relayed by this process (``migrator.p2c.pull``);
3. ``finish``: fixups, report, uid shift, record and first boot on the target.

A transfer that is cut (the link, the machine or the agent went away) keeps the partial
volume and leaves the operation ``failed`` with ``resumable``: ``--resume`` continues it
into the same volume (rsync sends only what is missing), ``migrate recover`` removes it.
Any other failure before the record removes the partial volume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from migrator.core import errors
from migrator.core.names import ContainerName
from migrator.p2c.inventory import Inventory, exclude_rules, gather
from migrator.p2c.pull import relay
from migrator.p2c.source import SourceMachine
from migrator.pipelines.remote_copy import choose_pool
from migrator.pipelines.remote_target import RemoteTarget, no_data
from migrator.runtime.containers import Containers
from migrator.runtime.operations import Operation, journaled, owner_alive
from migrator.runtime.state import OperationRecord, StateStore
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.transport.base import Transport
from migrator.transport.replies import remote_error

KIND = "p2c"
RESUMABLE = (errors.NetworkError, errors.CommandFailed, errors.RemoteError,
             errors.CommandTimeout)


@dataclass
class P2cOptions:
    name: str
    pool: str | None = None
    excludes: list[str] = field(default_factory=list)
    dry_run: bool = False
    resume: bool = False
    strict: bool = False
    privileged: bool = False
    dhcp: bool = False
    start: bool = True


@dataclass
class P2cResult:
    source: str
    target: str
    inventory: Inventory
    pool: str = ""
    operation: str = ""
    ipv4: str | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0  # relayed between the machine and the target, both directions
    unreadable: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    status: str = ""
    boot: str = ""
    failed_units: list[str] = field(default_factory=list)
    resumed: str | None = None  # the operation this run continued
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inventory"] = self.inventory.as_dict()
        return d


def interrupted_conversion(state: StateStore, name: str, host: str) -> OperationRecord | None:
    """The p2c operation for ``name`` onto ``host`` that was cut and not yet recovered."""
    for op in state.list_operations():
        if op.kind == KIND and op.detail.get("container") == name and \
                op.detail.get("host") == host and \
                (op.status == "failed" or (op.status == "running" and not owner_alive(op))):
            return op
    return None


def convert(state: StateStore, source: SourceMachine, target: Transport, opts: P2cOptions,
            progress: Progress = no_progress,
            on_inventory: Callable[[Inventory], None] | None = None) -> P2cResult:
    """Inventory (handed to ``on_inventory`` before anything moves), then (unless
    ``dry_run``) pull, finish and boot on ``target``."""
    t0 = time.monotonic()
    name = ContainerName(opts.name)
    inv = gather(source, opts.excludes)
    if on_inventory is not None:
        on_inventory(inv)
    result = P2cResult(str(source.spec), f"{target.name}:{name}", inv)
    if opts.dry_run:
        result.seconds = time.monotonic() - t0
        return result
    if not inv.tools.get("rsync"):
        raise errors.MissingDependency(
            f"{source.spec} has no rsync" + ("" if inv.tools.get("tar") else " (nor tar)"),
            "install rsync there (`apt-get install rsync`): p2c needs it for the delta pass "
            "and --resume; a tar copy would start over after any cut")
    if inv.init != "systemd":
        raise errors.InvalidInput(f"{source.spec} runs {inv.init!r} as init",
                                  "p2c converts systemd machines only")
    old = interrupted_conversion(state, name, target.name)
    if old is not None and not opts.resume:
        raise errors.InvalidState(
            f"an interrupted conversion into {name!r} on {target.name} exists "
            f"(operation {old.id})", "continue it with --resume, or `migrate recover "
            f"{old.id}` to remove it")
    if opts.resume and old is None:
        raise errors.NotFound(f"no interrupted conversion into {name!r} on {target.name}",
                              "run it without --resume")
    remote = target.request("hello")
    pool = old.detail["pool"] if old is not None else choose_pool(remote, opts.pool)["name"]
    result.pool = pool
    with journaled(state, KIND, container=str(name), host=target.name, pool=pool,
                   source=str(source.spec), target=str(name)) as op:
        result.operation = op.id
        if old is not None:
            result.resumed = old.id
            old.status = "resumed"
            old.error = (old.error + "; " if old.error else "") + f"continued by {op.id}"
            with state.transaction():
                state.update_operation(old)
        op.stage("pull", method="rsync", total=inv.total_size)
        try:
            _pull(source, target, name, pool, inv, opts, result, progress,
                  resume=old is not None, link_from=_link_from(target, remote))
        except RESUMABLE as e:
            op.note(undo_incomplete=True, resumable=True)
            e.hint = (e.hint + "; " if e.hint else "") + \
                f"the partial copy is kept: add --resume to continue (operation {op.id})"
            raise
        except BaseException:
            _abort(target, name, pool, op)
            raise
        if result.unreadable and opts.strict:
            _abort(target, name, pool, op)
            raise errors.CommandFailed(
                ["rsync"], 23, "unreadable on the source: " + ", ".join(result.unreadable[:10]),
                "--strict refuses a partial copy (it was removed); repair or --exclude "
                "those files")
        op.stage("finish")
        try:
            reply = _finish(target, name, pool, inv, opts, result, source, op)
        except BaseException:
            # not recorded: the half-fixed, half-shifted volume goes (a retry starts over);
            # recorded (the first boot failed): the container stays for a look inside
            _abort(target, name, pool, op)
            raise
        result.ipv4 = reply.get("ipv4")
        result.changes = list(reply.get("changes", []))
        result.status = str(reply.get("status", ""))
        result.boot = str(reply.get("boot", ""))
        result.failed_units = list(reply.get("failed_units", []))
    result.seconds = time.monotonic() - t0
    return result


def _finish(target: Transport, name: str, pool: str, inv: Inventory, opts: P2cOptions,
            result: P2cResult, source: SourceMachine, op: Operation) -> dict[str, Any]:
    reply: dict[str, Any] = target.request("p2c_finish", {
        "name": str(name), "pool": pool, "privileged": opts.privileged,
        "dhcp": opts.dhcp, "start": opts.start, "unreadable": result.unreadable,
        "os": inv.os_id, "release": inv.version,
        "header": {"source": str(source.spec), "distribution": inv.distribution,
                   "hostname": inv.hostname, "init": inv.init, "operation": op.id}})
    return reply


def _link_from(target: Transport, remote: dict[str, Any]) -> tuple[str, str | None] | None:
    """Where to offer the direct data link from (the address this host's SSH connection
    to the target leaves from, in its namespace), when the host's setting and agent allow."""
    if getattr(target, "data_link", "ssh") == "ssh" or "tcp" not in remote.get("links", []):
        return None
    client = getattr(target, "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is None:
        return None
    return str(transport.sock.getsockname()[0]), getattr(target, "netns", None)


def _pull(source: SourceMachine, target: Transport, name: str, pool: str, inv: Inventory,
          opts: P2cOptions, result: P2cResult, progress: Progress, resume: bool,
          link_from: tuple[str, str | None] | None = None) -> None:
    rules = exclude_rules(inv.mounts, inv.excludes)
    for n in (1, 2):
        meter = ProgressMeter(progress, f"pass {n}" if n == 2 else "copy",
                              inv.total_size if n == 1 else None)
        t = time.monotonic()
        chan = target.open_raw("p2c_pull", {"name": name, "pool": pool, "rules": rules,
                                            "resume": resume or n == 2})
        try:
            reply, moved = relay(chan, source, meter, link_from if n == 1 else None)
        finally:
            chan.close()
        meter.finish()
        if not reply.get("ok"):
            raise remote_error(target.name, reply.get("error") or {})
        result.bytes += moved
        result.passes.append({"pass": n, "bytes": moved, "seconds": time.monotonic() - t,
                              "literal": reply.get("literal", 0), "link": reply.get("link"),
                              "files": reply.get("files", 0),
                              "vanished": len(reply.get("vanished", []))})
        result.unreadable = list(reply.get("unreadable", []))


def _abort(target: Transport, name: str, pool: str, op: Operation) -> None:
    """Remove the partial volume (best effort: recover finishes it otherwise)."""
    try:
        target.request("abort_container", {"name": name, "pool": pool})
    except errors.MigratorError:
        op.note(undo_incomplete=True)


def recover_p2c(cts: Containers, op: OperationRecord,
                transport_for: Callable[[str], Transport]) -> str:
    """``migrate recover`` of a p2c: remove the partial volume; a recorded container stays."""
    name, pool, host = op.detail["container"], op.detail["pool"], op.detail["host"]
    if host == "local":  # this host's own target half, in process
        reply = RemoteTarget(cts).abort_container({"name": name, "pool": pool}, no_data)
    else:
        with transport_for(host) as target:
            reply = target.request("abort_container", {"name": name, "pool": pool})
    if reply.get("removed") == "volume":
        return f"rolled back: the partial conversion {name} on {host} ({pool}) was removed"
    return f"completed: {name} on {host} was already recorded; nothing removed"
