"""Host-to-host copy, refresh and stateless move of containers (push: this host sends).

Same plan as a local copy (``migrator.pipelines.transfer``), carried by a transport: each snapshot,
then a temporary snapshot of the live state, is sent as its own agent request with the
storage's native stream where both pools share one (btrfs send -p, zfs send -i: only the
delta crosses on a refresh), a tar stream otherwise (zstd-compressed when negotiated), and
rsync's delta protocol over the agent to update an existing target across drivers.
The target records the container only after every stream arrived intact (``commit``);
any failure asks the agent to remove what was received (``abort``), and the source is only
read until a move's target is started and confirmed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidState,
    MigratorError,
    NotFound,
    Protected,
)
from migrator.core.names import ContainerName, SnapshotName
from migrator.pipelines.copy import CopyResult
from migrator.pipelines.pull_scope import PullScope, answer_call
from migrator.pipelines.remote_target import RemoteTarget
from migrator.pipelines.transfer import NATIVE_TYPES, SnapInfo, negotiate, plan_transfer
from migrator.runtime import config as cfg
from migrator.runtime.containers import Containers
from migrator.runtime.operations import Operation, journaled
from migrator.runtime.state import ContainerRecord
from migrator.runtime.temp_snapshots import clean_stale_temp_snapshots, consistent_snapshot
from migrator.runtime.treecheck import container_policy, inspect_volume
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.transport.base import Transport
from migrator.transport.frames import Reader, Writer
from migrator.transport.replies import copy_result
from migrator.transport.rsync_relay import rsync_push


def split_ref(ref: str) -> tuple[str | None, str]:
    """``host-b:web-1`` -> (``host-b``, ``web-1``); ``web-1`` or ``local:web-1`` -> (None, ...)."""
    if ":" in ref:
        host, _, name = ref.partition(":")
        return (None if host == "local" else str(ContainerName(host))), name
    return None, ref


def choose_pool(remote: dict[str, Any], wanted: str | None) -> dict[str, Any]:
    pools = {p["name"]: p for p in remote["pools"]}
    if wanted:
        if wanted not in pools:
            raise NotFound(f"the target host has no pool {wanted!r}",
                           f"its pools: {', '.join(pools) or 'none'}")
        return pools[wanted]
    if not pools:
        raise NotFound("the target host has no storage pool",
                       "create one there: `migrate pool create default --driver dir`")
    return pools.get("default") or next(iter(pools.values()))


# What zstd level 1 sustains in the datapath's compressor thread on these machines
# (bench_transport: ~250-300 MB/s of mixed data). A link faster than this is slowed down by
# compressing, so "auto" sends plain data there.
ZSTD_RATE = 250e6


@dataclass
class Negotiated:
    """What a pair of hosts agreed for a transfer: printed with -v, stored with the operation."""

    link: str  # "tcp" (direct data link, link.py) or "ssh" (the SSH channel)
    compress: str  # "zstd" or "none"
    reasons: list[str]

    def summary(self) -> str:
        return f"link {self.link}, compression {self.compress} ({'; '.join(self.reasons)})"


def choose_link(remote: dict[str, Any], setting: str) -> tuple[str, str]:
    """The data link from the host's ``data_link`` setting and what its agent offers."""
    offered = remote.get("links") or ["ssh"]
    if setting == "ssh":
        return "ssh", "data link set to ssh for this host"
    if "tcp" not in offered:
        if setting == "tcp":
            raise InvalidInput("the target's agent offers no direct data link",
                               "upgrade migrate there, or `migrate host set NAME "
                               "--data-link ssh`")
        return "ssh", "the agent offers only the SSH channel"
    return "tcp", "direct TCP data link (TLS 1.3, certificates pinned through SSH)"


def choose_compression(remote: dict[str, Any], requested: str,
                       link_rate: float | None = None) -> tuple[str, str]:
    """zstd unless asked otherwise or the link was measured faster than zstd compresses."""
    if requested != "auto":
        if requested not in remote["compressors"]:
            raise InvalidInput(f"the target host cannot decompress {requested!r}",
                               f"it knows: {', '.join(remote['compressors'])}")
        return requested, "asked for"
    if "zstd" not in remote["compressors"]:
        return "none", "the target has no zstd"
    if link_rate is None:
        return "zstd", "link speed not measured (`migrate host check` measures it)"
    mbs = f"link {link_rate / 1e6:.0f} MB/s"
    if link_rate > ZSTD_RATE:
        return "none", f"{mbs} is faster than zstd (~{ZSTD_RATE / 1e6:.0f} MB/s)"
    return "zstd", f"{mbs} is slower than zstd (~{ZSTD_RATE / 1e6:.0f} MB/s)"


def negotiate_session(transport: Transport, remote: dict[str, Any], compress: str) -> Negotiated:
    """Link and compression for this transport's transfers; turns the link on or off."""
    link, why_link = choose_link(remote, transport.data_link)
    transport.fast_link = link == "tcp"
    comp, why_comp = choose_compression(remote, compress, transport.link_rate)
    return Negotiated(link, comp, [why_link, why_comp])


class RemoteCopy:
    """One push of a container to another host through an agent transport."""

    def __init__(self, cts: Containers, transport: Transport, progress: Progress = no_progress,
                 compress: str = "auto", hello: dict[str, Any] | None = None) -> None:
        self.cts, self.t, self.progress, self.compress = cts, transport, progress, compress
        self.hello = hello  # the target's hello when the caller has it (one request less)
        self.rsync_ok = False  # the target can run rsync's receiver (``rsync_receive``)
        self.exact_times = True  # both pools keep sub-second mtimes (else rsync --checksum)

    def send_snapshot(self, src_b: StorageBackend, vol: VolumeRef, pool: str,
                      dst_vol: VolumeRef, name: str, parent: str | None, how: str,
                      compress: str, drop_after: bool, first: bool = False,
                      privileged: bool | None = None) -> int:
        """Send one snapshot (an increment from ``parent`` for native types, the changed
        files for rsync); the bytes that crossed the link. ``privileged``: the container's
        setting when the caller has it (a thread beside the caller's must not open the
        state database, which belongs to the caller's thread)."""
        snaps = {s.name: s for s in src_b.list_snapshots(vol)}
        target = {"pool": pool, "volume": {"type": dst_vol.type, "name": dst_vol.name}}
        if how == "rsync":
            meter = ProgressMeter(self.progress, f"{vol.name}@{name}")
            with src_b.mount_snapshot(snaps[name]) as path:
                pushed = rsync_push(self.t, path, target, self.exact_times,
                                    compress == "zstd", meter)
            if not drop_after:
                self.t.request("snapshot_volume", {**target, "snapshot": name})
            return pushed.wire
        # announced with the data: the receiver lets device nodes through a tar stream only
        # for a privileged container, and a pull's client holds the commit to the same
        if privileged is None:
            privileged = str(self.cts.get(vol.name).config.get("security.privileged")) == "true"
        stream = src_b.send(snaps[name], snaps[parent] if parent else None, how)
        meter = ProgressMeter(self.progress, f"{vol.name}@{name}", stream.size_hint)
        try:
            reply = self.t.request("receive", {
                **target, "snapshot": name, "parent": parent, "how": how,
                "compress": compress, "drop_after": drop_after, "first": first,
                "size": stream.size_hint, "privileged": privileged},
                stream=stream, compress=compress, meter=meter)
        finally:
            stream.kill()
        return int(reply.get("wire", 0))

    def copy(self, source: str, target: str, pool: str | None = None,
             instance_only: bool = False, refresh: bool = False,
             allow_inconsistent: bool = False, keep_base: bool = False,
             op: Operation | None = None) -> CopyResult:
        """Push ``source`` to ``target`` on the transport's host (journaled unless ``op``
        is the operation of an enclosing move)."""
        if op is None:
            with journaled(self.cts.state, "copy-remote", container=source,
                           host=self.t.name, target=target) as own:
                return self.copy(source, target, pool, instance_only, refresh,
                                 allow_inconsistent, keep_base, own)
        t0 = time.monotonic()
        src = self.cts.get(source)
        dst_name = ContainerName(target)
        remote = self.hello or self.t.request("hello")
        state = self.t.request("container_state", {"name": dst_name})
        if state["exists"] and not refresh:
            raise AlreadyExists(f"{dst_name!r} already exists on {self.t.name}",
                                "add --refresh to update it")
        if state["exists"] and state["status"] != "STOPPED":
            raise InvalidState(f"{dst_name!r} is running on {self.t.name}", "stop it first")
        rpool = choose_pool(remote, state["pool"] if state["exists"] else pool)
        src_b = self.cts.host.backend(src.pool)
        vol = VolumeRef("container", src.name)
        dst_vol = VolumeRef("container", dst_name)
        clean_stale_temp_snapshots(src_b, vol)
        how = negotiate(src_b.migration_types(), rpool["types"], local=False)
        session = negotiate_session(self.t, remote, self.compress)
        compress = session.compress
        src_snaps = self.cts.state.list_snapshots(src.name)
        dst_infos = None
        native: dict[str, Any] = {}
        if state["exists"]:
            dst_infos = [SnapInfo(s["name"], s["uuid"]) for s in state["snapshots"]]
            native = {s["name"]: s.get("native") for s in state["snapshots"]}
        local_native = {s.name: src_b.snapshot_identity(s) for s in src_b.list_snapshots(vol)}
        plan = plan_transfer([SnapInfo(s.name, s.uuid) for s in src_snaps], dst_infos, how,
                             lambda n: local_native.get(n) is not None
                             and local_native.get(n) == native.get(n))
        self.rsync_ok = bool(remote.get("rsync"))
        self.exact_times = src_b.subsecond_mtimes and bool(rpool.get("subsecond_mtimes"))
        if state["exists"] and plan.how == "tar" and self.rsync_ok:
            plan.how = "rsync"
            plan.notes.append("the pools share no native stream: rsync sends the changed "
                              "files only")
        elif plan.how == "rsync" and not self.rsync_ok:
            plan.how = "tar"
            plan.notes.append("the target has no rsync: sending the full state as a tar "
                              "stream")
        if instance_only:
            plan.send, plan.skipped = [], []
        result = CopyResult(src.name, f"{self.t.name}:{dst_name}", rpool["name"],
                            f"{plan.how}+{compress}", notes=list(plan.notes),
                            snapshots_skipped=list(plan.skipped), operation=op.id)
        result.negotiated = f"{plan.how}, {session.summary()}"
        op.stage("send", pool=rpool["name"], method=plan.how, compress=compress,
                 link=session.link, negotiated=result.negotiated,
                 target_existed=bool(state["exists"]))
        by_name = {s.name: s for s in src_snaps}
        try:
            with consistent_snapshot(self.cts, src, src_b, vol, result.notes,
                                     keep=keep_base) as final:
                parent = plan.base if plan.how in NATIVE_TYPES else None
                first = not state["exists"]
                for name in plan.send:
                    result.bytes += self.send_snapshot(
                        src_b, vol, rpool["name"], dst_vol, name, parent, plan.how,
                        compress, False, first)
                    first = False
                    result.snapshots_added.append(name)
                    if plan.how in NATIVE_TYPES:
                        parent = name
                result.bytes += self.send_snapshot(
                    src_b, vol, rpool["name"], dst_vol, final, parent, plan.how, compress,
                    not keep_base, first)
                self.base = final
                op.stage("commit")
                rec = self.t.request("commit_container", {
                    "name": dst_name, "pool": rpool["name"], "image": src.image,
                    "ipv4": src.ipv4,
                    "config": cfg.without_volatile(src.config),
                    "snapshots": [by_name[n].to_wire() for n in result.snapshots_added],
                })
        except BaseException:
            if not state["exists"] or "commit" not in op.rec.stages:
                try:
                    self.t.request("abort_container", {"name": dst_name,
                                                       "pool": rpool["name"]})
                except MigratorError:
                    op.note(undo_incomplete=True)  # `migrate recover` finishes the undo
            raise
        result.notes.append(f"address on {self.t.name}: {rec['ipv4']}")
        if session.link == "tcp" and self.t.link_failed:
            result.notes.append(f"data went over the SSH channel: {self.t.link_failed}")
            op.note(data_link_failed=self.t.link_failed)  # the operation's log says it too
        result.seconds = time.monotonic() - t0
        return result


def pull_copy(cts: Containers, transport: Transport, source: str, target: str,
              pool: str | None = None, instance_only: bool = False, refresh: bool = False,
              compress: str = "auto",
              progress: Progress = no_progress, allow_privileged: bool = False
              ) -> dict[str, Any]:
    """``migrate copy host-a:c1 c1``: host a pushes to this host through the request's own
    channel (``transport/reverse.py``), so host a never has to reach this host.

    The push (plan, negotiation, undo) runs in host a's agent and is journaled there; this
    side serves its calls with its own target half (``remote_target.py``), each checked
    first against the pull's ``PullScope`` (``pull_scope.py``): this one container, new or
    refreshed as asked, tar data through the restore's guard, no LINK offer followed. If
    the pull breaks or a call is refused before the copy was committed here, this side
    removes what the pull wrote itself: the far side cannot ask it to any more, and may be
    the cause. The source host sends the config: a privileged container is refused unless
    ``allow_privileged`` (the operator's ``--allow-privileged``), before any of its data is
    written.
    """
    dst = ContainerName(target)
    scope = PullScope.begin(cts, transport.name, dst, pool, refresh, allow_privileged)
    end = RemoteTarget(cts)
    end.progress = progress
    end.peer, end.allow_privileged = f"host {transport.name}", allow_privileged
    end.pulling = True

    def inspect(scope: PullScope) -> None:
        """A native stream's content passed no member check: walk what arrived (the
        volume, the snapshots the pull added) as a restore does, before it is recorded."""
        if not scope.native or scope.pool is None:
            return
        inspect_volume(cts.host.backend(scope.pool), VolumeRef("container", dst),
                       container_policy(bool(scope.privileged)),
                       f"{dst!r} pulled from {transport.name}", skip=tuple(scope.known))

    scope.inspect = inspect

    def on_call(call: dict[str, Any], read: Reader, write: Writer) -> None:
        answer_call(end, call, read, write, scope)

    try:
        reply = transport.request("delegate", {
            "command": "copy", "target": {"reverse": True}, "source": str(ContainerName(source)),
            "target_name": dst, "pool": pool, "instance_only": instance_only,
            "refresh": refresh, "compress": compress}, on_call=on_call)
        if scope.phase != "committed":
            raise InvalidState(f"{transport.name} reported the copy of {dst!r} done without "
                               "committing it here", "nothing was recorded here; retry")
    except BaseException:
        with contextlib.suppress(MigratorError):
            scope.undo(cts)
        raise
    result = copy_result(transport.name, reply.get("result"))
    result["source"] = f"{transport.name}:{result['source']}"
    result["target"] = str(dst)
    return result


def move_to_host(cts: Containers, transport: Transport, name: str, pool: str | None = None,
                 progress: Progress = no_progress, compress: str = "auto") -> CopyResult:
    """Stateless move: copy while running, stop, send the delta, start there, delete here.
    A stopped container arrives stopped: nothing runs, so there is no delta and no start.

    Until the container is checked on the target, a failure leaves it here as it was
    (restarted if it had been stopped for the move) and the target's partial copy removed.
    """
    rec = cts.get(name)
    status = cts.run_state(rec.name)
    if status == "FROZEN":
        raise InvalidState(f"{rec.name!r} is frozen", f"`migrate unfreeze {rec.name}` first")
    if rec.config.get("security.protection.delete") == "true":
        raise Protected(f"{rec.name!r} is protected from deletion, which a move ends with",
                        f"`migrate config unset {rec.name} security.protection.delete` first")
    with journaled(cts.state, "move-remote", container=rec.name, host=transport.name,
                   was_running=status == "RUNNING") as op:
        return _move_to_host(cts, transport, rec, status == "RUNNING", pool, progress,
                             compress, op)


def _move_to_host(cts: Containers, transport: Transport, rec: ContainerRecord, running: bool,
                  pool: str | None, progress: Progress, compress: str, op: Operation) -> CopyResult:
    t0 = time.monotonic()
    rc = RemoteCopy(cts, transport, progress, compress)
    first = rc.copy(rec.name, rec.name, pool, keep_base=running, op=op)
    result = first
    stopped_at = None
    try:
        if running:
            op.stage("final-sync")
            transport.warm(3)  # final sync, start, check: agents started before the stop
            stopped_at = time.monotonic()
            cts.stop_now(rec.name)
            src_b = cts.host.backend(rec.pool)
            vol = VolumeRef("container", rec.name)
            # the first pass kept its temporary snapshot on both sides: the base of the delta
            base = SnapshotName(rc.base)
            how, compress_used = first.method.split("+")
            if how == "tar" and rc.rsync_ok:
                how = "rsync"  # only the files that changed since the first pass
            try:
                with consistent_snapshot(cts, rec, src_b, vol, result.notes) as last:
                    result.bytes += rc.send_snapshot(
                        src_b, vol, first.pool, vol, last,
                        base if how in NATIVE_TYPES else None, how, compress_used, True)
            finally:
                with contextlib.suppress(MigratorError):
                    src_b.delete_snapshot(vol, base)
            with contextlib.suppress(MigratorError):
                transport.request("delete_snapshot", {"pool": first.pool, "volume": {
                    "type": "container", "name": rec.name}, "snapshot": base})
        expected = "RUNNING" if running else "STOPPED"
        if running:
            op.stage("start-remote")
            started = transport.request("start", {"name": rec.name})
            if started.get("status") != "RUNNING":
                expected = "started"  # not what the check below finds: refused
        there = transport.request("container_state", {"name": rec.name})
        want = {s.name: s.uuid for s in cts.state.list_snapshots(rec.name)}
        got = {s["name"]: s["uuid"] for s in there.get("snapshots", [])}
        if there.get("status") != expected or any(got.get(n) != u for n, u in want.items()) \
                or (not running and cts.run_state(rec.name) != "STOPPED"):
            raise InvalidState(
                f"{rec.name} on {transport.name} is not as expected after the move "
                f"(status {there.get('status')}, snapshots {sorted(got)})",
                "the source was kept (restarted if it ran); the target copy was removed")
        transport.request("sync_container", {"name": rec.name})  # on disk there first
        result.verified = (f"{'running' if running else 'stopped'} on {transport.name} with "
                           f"all {len(want)} snapshots")
    except BaseException:
        try:
            transport.request("delete_container", {"name": rec.name, "force": True})
        except MigratorError:
            op.note(undo_incomplete=True)
        if running and cts.run_state(rec.name) == "STOPPED":
            cts.start(rec.name)
        raise
    if stopped_at is not None:
        result.downtime = time.monotonic() - stopped_at
    op.stage("delete-source")
    if rec.ipv4:  # it keeps its address there: on a shared network, never handed out here
        cts.host.reserve_ipv4(rec.ipv4)
    cts.delete(rec.name, force=True)
    result.seconds = time.monotonic() - t0
    return result


