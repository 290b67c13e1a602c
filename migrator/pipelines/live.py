"""Live migration of running containers to another host with CRIU (``migrate live``).

The pipeline, for one container, pushed from this host (the source) to a transport's host:

1. check: CRIU and its features on both hosts pick the checkpoint mode (post-copy where both
   have userfaultfd, else stop-and-copy; pre-copy needs soft-dirty tracking, which this
   kernel lacks, so it is skipped with the reason); the target's CPU must have every flag
   the source's has, its pool room for the rootfs and the memory, the container's address
   must be free there, and nothing in the container may be something CRIU cannot dump.
   All of this happens before anything is frozen, so a refusal costs nothing.
2. sync: the rootfs and snapshots are copied while the container runs (the host-to-host
   copy of ``remote.py``, which records the container on the target, stopped).
3. dump: the container is frozen and CRIU dumps it into memory-backed space. From here on
   its tasks stay frozen on this host (never killed) until the target runs it.
4. final-sync: the rootfs delta since step 2 (CRIU checks open files' sizes on restore),
   sent beside the dump: a thread waits until criu holds the tasks still (the freezer
   says FROZEN, or init is ptrace-stopped by criu), snapshots the rootfs and sends it
   while criu writes the images. Where that moment is not seen, it runs after the dump.
5. images: the checkpoint images cross (a tar stream, compressed when negotiated). In
   post-copy they hold no memory pages.
6. restore: the target restores from them. In post-copy the memory follows on demand: the
   target's lazy-pages daemon reads pages from the source's page server through an SSH
   remote forward (``transport/tunnel.py``); the downtime ends when the restore returns,
   and the migration ends when the daemon has every page.
7. verify: the container runs on the target with its snapshots.
8. release: only now the frozen source tasks are killed and the source deleted (or kept
   stopped with ``--keep-source``).

Any failure before the restore deletes the target's copy and resumes the source from its
frozen state (or restores it from the same images), so the workload keeps its memory. Once
the restore may have begun, the target decides (``live_settle``): a container that resumed
there whole (every page in post-copy) has newer state than the frozen source, so the
migration goes forward (the source is released); short of that the target gives its copy
up and the source resumes. When the target cannot be asked, neither happens: the source
stays frozen and the operation is left to ``migrate recover``. The downtime is measured
from the freeze (the moment the final-sync thread saw it; the dump's start when it did
not) to the restore's return.

Every request finds its agent already started: ``transport.warm(2)`` keeps two agents
ready from the first request on (each costs ~0.3 s to start; paid inside each request, that
was most of a small container's migration time), and an agent serves one request after
another (``agent.py``'s sessions): the main thread's and the final sync's requests each
reuse one, and only the restore, which ends its agent, is replaced, once it is over.

The journal names every helper process started (``source_helpers``: lxc-checkpoint here;
``target_helpers``: criu lazy-pages and lxc-checkpoint there, announced by the target) with
its start time, so that ``migrate recover`` can end them after this process was killed.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrator.backends import VolumeRef
from migrator.backends.generic import TAR_TO_STDOUT
from migrator.checkpoint.base import (
    Checkpointer,
    CriuTls,
    Features,
    images_dir,
    live_tcp_note,
    remove_images_dir,
    tree_bytes,
)
from migrator.checkpoint.lxc import (
    LazyDump,
    LxcCheckpointer,
    helper_record,
    wait_frozen,
)
from migrator.core.errors import (
    AlreadyExists,
    CheckpointError,
    InvalidInput,
    InvalidState,
    MigratorError,
    MissingDependency,
    NetworkError,
    NoSpace,
)
from migrator.core.names import SnapshotName
from migrator.pipelines.remote_copy import RemoteCopy, choose_pool, negotiate_session
from migrator.pipelines.transfer import NATIVE_TYPES, negotiate
from migrator.runtime.containers import Containers
from migrator.runtime.freezer import freezer_state_file
from migrator.runtime.operations import Operation, journaled
from migrator.runtime.temp_snapshots import (
    clean_stale_temp_snapshots,
    consistent_snapshot,
    temporary_snapshot,
)
from migrator.streams import Progress, SendStream, no_progress
from migrator.transport.base import Transport
from migrator.transport.link import Identity, decode_cert, listen

if TYPE_CHECKING:  # paramiko: imported where post-copy runs, not on every agent's start-up
    from migrator.transport.tunnel import PageTunnel

MODES = ("auto", "post-copy", "stop-and-copy")
SERVE_WAIT = 120.0  # seconds for the dump to write the non-memory images (post-copy)
PAGES_WAIT = 900.0  # seconds for every page to reach the target (post-copy)


@dataclass
class LivePlan:
    """What a live migration will do: ``--dry-run`` prints it, the operation records it."""

    container: str
    source: str
    target: str
    pool: str
    storage: str  # migration type of the rootfs: btrfs, zfs, tar
    link: str
    compress: str
    mode: str  # post-copy | stop-and-copy
    reasons: list[str] = field(default_factory=list)
    rootfs_bytes: int = 0
    memory_bytes: int = 0
    ipv4: str | None = None
    hello: dict[str, Any] = field(default_factory=dict, repr=False)  # the target's

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "hello"}


@dataclass
class LiveResult:
    """What one live migration did, with the time of every stage."""

    container: str
    source: str
    target: str
    pool: str
    mode: str
    storage: str
    compress: str
    stages: dict[str, float] = field(default_factory=dict)
    downtime: float | None = None
    seconds: float = 0.0
    storage_bytes: int = 0
    image_bytes: int = 0
    page_bytes: int = 0
    ipv4: str | None = None
    kept_source: bool = False
    notes: list[str] = field(default_factory=list)
    operation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_flags() -> list[str]:
    """This machine's CPU flags (the first processor's, from /proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(line.partition(":")[2].split())
    return []


def running_containers(cts: Containers) -> list[str]:
    """What an evacuation moves: every running container of the host."""
    return [c.name for c in cts.list_all() if c.state == "RUNNING"]


def memory_bytes(cts: Containers, name: str) -> int:
    with contextlib.suppress(MigratorError, ValueError):
        return cts.memory_usage(name)
    return 0


def choose_mode(requested: str, local: Features, remote: dict[str, Any],
                unprivileged: bool = False) -> tuple[str, list[str]]:
    """Post-copy where both ends can serve and fault pages (userfaultfd), else stop-and-copy.

    ``local`` is this host's ``checkpoint.Features``; ``remote`` the target's hello. An
    ``unprivileged`` container faults its pages from inside its user namespace, which the
    target allows only with ``vm.unprivileged_userfaultfd = 1`` (its "unprivileged-uffd").
    """
    if requested not in MODES:
        raise InvalidInput(f"unknown checkpoint mode {requested!r}", f"one of {', '.join(MODES)}")
    feats = remote.get("criu_features") or {}
    remote_lazy = bool(feats.get("uffd")) and bool(feats.get("uffd-noncoop", True))
    reasons = []
    if not local.pre_dump:
        reasons.append(f"pre-copy skipped: {local.pre_dump_reason}")
    lazy = local.lazy_pages and remote_lazy
    if requested == "stop-and-copy":
        return "stop-and-copy", [*reasons, "stop-and-copy asked for"]
    if lazy and unprivileged and not feats.get("unprivileged-uffd"):
        why = ("the container is unprivileged and the target keeps userfaultfd to privileged "
               "processes (vm.unprivileged_userfaultfd = 0)")
        if requested == "post-copy":
            raise CheckpointError(f"post-copy is not possible: {why}",
                                  "use --mode stop-and-copy, or allow it on the target: "
                                  "`sysctl -w vm.unprivileged_userfaultfd=1`")
        return "stop-and-copy", [*reasons, f"stop-and-copy: {why}"]
    if lazy:
        return "post-copy", [*reasons, "post-copy: both hosts have userfaultfd (lazy pages)"]
    why = "this host" if not local.lazy_pages else "the target"
    if requested == "post-copy":
        raise CheckpointError(f"post-copy is not possible: {why} has no userfaultfd support",
                              "use --mode stop-and-copy")
    return "stop-and-copy", [*reasons, f"stop-and-copy: {why} has no userfaultfd (lazy pages)"]


def plan_live(cts: Containers, transport: Transport, name: str, pool: str | None = None,
              mode: str = "auto", compress: str = "auto") -> LivePlan:
    """Negotiate and check everything that can be checked without freezing the container."""
    rec = cts.get(name)
    status = cts.run_state(rec.name)
    if status != "RUNNING":
        raise InvalidState(f"{rec.name!r} is {status.lower()}, not running",
                           f"a stopped container moves with `migrate move {rec.name} "
                           f"{transport.name}`")
    ckpt = LxcCheckpointer(cts)
    with ThreadPoolExecutor(1, thread_name_prefix="criu-check") as beside:
        here = beside.submit(ckpt.check)  # this host's criu checks while the far side's run
        remote = transport.request("hello", {"criu_features": True})
        local = here.result()
    if not remote.get("criu"):
        raise MissingDependency(f"CRIU is not installed on {transport.name}",
                                "run `make setup` there (CRIU 4.x)")
    if not local.criu_version:
        raise MissingDependency("CRIU is not installed on this host", "run `make setup`")
    chosen, reasons = choose_mode(mode, local, remote,
                                  unprivileged=cts.spec(rec).idmap is not None)
    overlay = cts.host.network_config().overlay
    reasons.append(live_tcp_note(overlay is not None
                                 and remote.get("overlay_vni") == overlay.vni))
    session = negotiate_session(transport, remote, compress)
    state = transport.request("container_state", {"name": rec.name})
    if state["exists"]:
        raise AlreadyExists(f"{rec.name!r} already exists on {transport.name}",
                            "delete it there first, or `migrate move` under another name")
    rpool = choose_pool(remote, pool)
    storage = negotiate(cts.host.backend(rec.pool).migration_types(), rpool["types"],
                        local=False)
    plan = LivePlan(rec.name, "local", transport.name, rpool["name"],
                    "tar" if storage == "rsync" else storage, session.link, session.compress,
                    chosen, reasons + session.reasons, tree_bytes(cts.rootfs(rec)),
                    memory_bytes(cts, rec.name), rec.ipv4, hello=remote)
    check = transport.request("live_check", {"ipv4": rec.ipv4, "pool": rpool["name"]})
    missing = sorted(set(cpu_flags()) - set(check.get("cpu_flags", [])))
    if missing:
        raise CheckpointError(
            f"{transport.name}'s CPU lacks flags this one has: {' '.join(missing[:12])}",
            "a restored process may use those instructions; migrate to a host with the same "
            "or a newer CPU")
    if rec.ipv4 and not check.get("ipv4_free", True):
        raise InvalidState(f"address {rec.ipv4} is taken on {transport.name}",
                           "a live container keeps its address; free it there first")
    need = plan.rootfs_bytes + plan.memory_bytes
    if check.get("free", need + 1) < need:
        raise NoSpace(f"pool {rpool['name']} on {transport.name} has {check['free']} bytes "
                      f"free, {need} needed (rootfs and memory)", "free space there first")
    problems = ckpt.preflight(rec.name)
    if problems:
        raise CheckpointError(
            f"{rec.name} holds what CRIU cannot dump: "
            + "; ".join(f"pid {p.pid}: {p.what}" for p in problems),
            "; ".join(dict.fromkeys(p.hint for p in problems)))
    return plan


def page_server_address(transport: Transport) -> tuple[str, int]:
    """Where this host's page server listens for a post-copy's pages: the address the SSH
    connection leaves from (the target reaches it: the sync's direct link just did) and a
    free port there, in this host's network namespace.

    The two criu processes then talk to each other, with nothing in between: the stream
    does not depend on this process, so a client killed while the pages flow no longer
    takes the migration down with it. criu's TLS is mutual, with each end trusting only the
    other's certificate (``checkpoint.base.CriuTls``): whoever else connects can neither
    read a page nor feed one; the first stranger to connect makes the page server fail, and
    the migration goes back with the source's memory kept (criu serves one connection)."""
    from migrator.transport.ssh import SshTransport  # paramiko: see ``_live``

    if not isinstance(transport, SshTransport):
        raise CheckpointError("a post-copy migration needs an SSH transport")
    address = str(transport.connection().sock.getsockname()[0])
    probe = listen(address, transport.netns)
    port = int(probe.getsockname()[1])
    probe.close()
    return address, port


def _images_stream(images: Path) -> SendStream:
    return SendStream([*TAR_TO_STDOUT, "--numeric-owner", "-C", str(images), "."],
                      "checkpoint images", "images")


class _Clock:
    """Times named stages into a result."""

    def __init__(self, result: LiveResult) -> None:
        self.result = result
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def stage(self, op: Operation, name: str, **detail: Any) -> Any:
        op.stage(name, **detail)
        t = time.monotonic()
        try:
            yield
        finally:
            self.result.stages[name] = round(time.monotonic() - t, 3)


def live_migrate(cts: Containers, transport: Transport, name: str, pool: str | None = None,
                 mode: str = "auto", keep_source: bool = False, compress: str = "auto",
                 progress: Progress = no_progress) -> LiveResult:
    """Move a running container to the transport's host with its memory state (see above)."""
    with journaled(cts.state, "live", container=name, host=transport.name,
                   keep_source=keep_source) as op:
        return _live(cts, transport, name, pool, mode, keep_source, compress, progress, op)


def _live(cts: Containers, transport: Transport, name: str, pool: str | None, mode: str,
          keep_source: bool, compress: str, progress: Progress, op: Operation) -> LiveResult:
    t_start = time.monotonic()
    transport.warm(2)  # every request from here finds its agent started (see ``warm``)
    plan = plan_live(cts, transport, name, pool, mode, compress)
    op.stage("check", plan=plan.as_dict(), pool=plan.pool, mode=plan.mode,
             method=f"{plan.storage}+{plan.compress}")
    result = LiveResult(plan.container, "local", transport.name, plan.pool, plan.mode,
                        plan.storage, plan.compress, ipv4=plan.ipv4, notes=list(plan.reasons),
                        operation=op.id)
    clock = _Clock(result)
    ckpt = LxcCheckpointer(cts)
    rec = cts.get(name)
    src_b = cts.host.backend(rec.pool)
    vol = VolumeRef("container", rec.name)
    rc = RemoteCopy(cts, transport, progress, plan.compress, plan.hello)
    with clock.stage(op, "sync"):
        first = rc.copy(rec.name, rec.name, plan.pool, keep_base=True, op=op)
    result.storage_bytes = first.bytes
    base = SnapshotName(rc.base)
    images: Path | None = None
    dumped = False
    lazy: LazyDump | None = None
    tunnel: PageTunnel | None = None
    pages: Any = None  # this end of the page server's socket pair (post-copy)
    how = first.method.split("+")[0]

    privileged = str(rec.config.get("security.privileged")) == "true"

    def send_last(snap: SnapshotName) -> int:
        return rc.send_snapshot(src_b, vol, plan.pool, vol, snap,
                                base if how in NATIVE_TYPES else None, how, plan.compress, True,
                                privileged=privileged)

    def sync_once_frozen() -> int | None:
        """The final sync, beside the dump: from the moment the dump has frozen the
        container its rootfs holds still, so the delta is sent while criu works. None when
        the freeze was not seen (no freezer file, or the dump ended first)."""
        if not init or not wait_frozen(init, freezer, SERVE_WAIT, dump_over.is_set):
            return None
        frozen_at.append(time.monotonic())  # the downtime starts here, not at criu's start
        with temporary_snapshot(src_b, vol) as last:
            return send_last(last)

    dump_over = threading.Event()
    frozen_at: list[float] = []
    init = ckpt.lxc.init_pid(rec.name)
    freezer = freezer_state_file(init) if init else None
    beside: Future[int | None] | None = None
    tls: CriuTls | None = None
    me: Identity | None = None
    direct: tuple[str, int] | None = None  # where this host's page server listens
    try:
        images = images_dir(cts.host.root, op.id)
        op.note(images=str(images))
        if plan.mode == "post-copy" and transport.fast_link and not transport.link_failed:
            # the sync's direct link worked: the target's criu fetches the pages from this
            # one's page server directly, in criu's TLS with certificates pinned through
            # the channel (see ``page_server_address``)
            me = Identity()
            peer = decode_cert(transport.request("page_identity", {"tag": op.id})["cert"])
            tls = CriuTls.write(ckpt.page_tls_dir(op.id), me.key_pem(), me.der, peer)
            direct = page_server_address(transport)
        freeze = time.monotonic()
        side = ThreadPoolExecutor(1, thread_name_prefix="final-sync")
        beside = side.submit(sync_once_frozen)
        side.shutdown(wait=False)  # it runs on; ``beside.result()`` joins it
        with clock.stage(op, "dump", mode=plan.mode):
            if plan.mode == "post-copy" and direct is not None:
                lazy = ckpt.start_lazy_dump(rec.name, images, *direct, tls=tls)
            elif plan.mode == "post-copy":
                # the page server is handed one end of a connected pair (nothing listens:
                # the container's memory is out of other local users' reach); the tunnel
                # relays the other end to the target (``transport/tunnel.py``). Imported
                # here, as below: paramiko would add ~0.3 s to every agent's start-up,
                # which imports this module for its target half
                from migrator.transport.tunnel import socket_pair

                pages, criu_end = socket_pair()
                try:
                    lazy = ckpt.start_lazy_dump(rec.name, images, ps_socket=criu_end.fileno())
                finally:
                    criu_end.close()
            if lazy is not None:
                dumped = True  # from here the source's tasks are frozen: resume on failure
                op.note(source_helpers=[helper_record(lazy.pid, "lxc-checkpoint dump")])
                lazy.wait_serving(SERVE_WAIT)
            else:
                dumped = True
                ckpt.dump(rec.name, images, on_start=lambda pid: op.note(
                    source_helpers=[helper_record(pid, "lxc-checkpoint dump")]))
        dump_over.set()
        with clock.stage(op, "final-sync"):
            sent = beside.result()
            if sent is None:  # not done beside the dump: now, as the container is still
                result.notes.append("the final sync ran after the dump (the freeze was not "
                                    "seen), inside the downtime")
                with consistent_snapshot(cts, rec, src_b, vol, result.notes) as last:
                    sent = send_last(last)
            result.storage_bytes += sent
        with clock.stage(op, "images"):
            reply = transport.request("receive_images", {"tag": op.id, "compress": plan.compress},
                                      stream=_images_stream(images), compress=plan.compress)
            result.image_bytes = int(reply.get("raw", 0))
        restored: list[float] = []
        with clock.stage(op, "restore"):
            args: dict[str, Any] = {"name": rec.name, "tag": op.id}
            if plan.mode == "post-copy":
                from migrator.transport.ssh import SshTransport
                from migrator.transport.tunnel import PageTunnel

                assert isinstance(transport, SshTransport), "post-copy needs SSH"
                args |= {"lazy": True, "timeout": PAGES_WAIT}
                if direct is not None and me is not None:
                    args["link"] = {"address": direct[0], "port": direct[1],
                                    "cert": me.encoded()}
                    result.notes.append("pages: criu to criu over a direct TCP connection "
                                        "between the hosts, in criu's TLS (certificates "
                                        "pinned through SSH)")
                else:  # the page stream rides a remote forward of the SSH connection
                    forward = PageTunnel(transport.connection(), lambda: pages)
                    tunnel = forward
                    args |= {"port": forward.open(),
                             "token": base64.b64encode(forward.token).decode()}
                    result.notes.append("pages: through the SSH connection (no direct "
                                        "link between the hosts)")

            def on_event(ev: dict[str, Any]) -> None:
                if ev.get("event") == "restored":
                    restored.append(time.monotonic())
                elif ev.get("event") == "helper":  # the target's, for `migrate recover`
                    op.note(target_helpers=[*op.rec.detail.get("target_helpers", []),
                                            {k: ev.get(k) for k in ("pid", "start", "what")}])

            transport.request("checkpoint_restore", args, on_event=on_event)
            op.note(target_resumed=True)  # whole there: from here only forward
            end = restored[0] if restored else time.monotonic()
            result.downtime = round(end - (frozen_at[0] if frozen_at else freeze), 3)
            if lazy is not None:
                lazy.finish(60)
                if tunnel is not None:  # through the SSH forward: counted on the way
                    result.page_bytes = tunnel.to_target
                    if tunnel.error:
                        raise CheckpointError(f"the page stream failed: {tunnel.error}")
        with clock.stage(op, "verify"):
            there = transport.request("container_state", {"name": rec.name})
            want = {s.name: s.uuid for s in cts.state.list_snapshots(rec.name)}
            got = {s["name"]: s["uuid"] for s in there.get("snapshots", [])}
            if there.get("status") != "RUNNING" or any(got.get(n) != u
                                                       for n, u in want.items()):
                raise InvalidState(f"{rec.name} on {transport.name} is not as expected after "
                                   f"the restore (status {there.get('status')})")
            # durable before the release: the target's volume and record on its disk
            transport.request("sync_container", {"name": rec.name})
    except BaseException as e:
        dump_over.set()
        if beside is not None:  # a final sync still running must end before any undo
            with contextlib.suppress(BaseException):
                beside.result()
        if not _forward_after(e, cts, transport, rec.name, lazy, tunnel, op, result):
            result.notes.append(f"rolled back: {e}")
            _roll_back(cts, transport, ckpt, rec.name, images, dumped, lazy, tunnel, op)
            raise
    finally:
        if tunnel is not None:
            tunnel.close()
        if pages is not None:
            pages.close()
        if tls is not None:
            tls.remove()
    # the point of no return: the target runs the container
    with clock.stage(op, "release"):
        try:
            ckpt.release_source(rec.name)
            with contextlib.suppress(MigratorError):
                src_b.delete_snapshot(vol, base)
            with contextlib.suppress(MigratorError):
                transport.request("delete_snapshot", {"pool": plan.pool, "volume": {
                    "type": "container", "name": rec.name}, "snapshot": base})
            if keep_source:
                result.kept_source = True
                result.notes.append(f"a stopped copy stays here (`migrate delete {rec.name}`)")
            else:
                if rec.ipv4:  # it answers there now: never handed out here (shared network)
                    cts.host.reserve_ipv4(rec.ipv4)
                cts.delete(rec.name, force=True)
        except MigratorError as e:  # only warnings after the point of no return
            result.notes.append(f"warning: cleaning up the source: {e}")
        finally:
            if images is not None:
                remove_images_dir(images)
    result.seconds = round(time.monotonic() - t_start, 3)
    return result


def _forward_after(e: BaseException, cts: Containers, transport: Transport, name: str,
                   lazy: LazyDump | None, tunnel: PageTunnel | None, op: Operation,
                   result: LiveResult) -> bool:
    """After a failure once the restore may have begun: True when the target resumed whole
    (its state is newer: the caller goes on to the release, a warning noted), False when
    it gave its copy up (the caller rolls back). When the target cannot say, raise: the
    source stays frozen and ``migrate recover`` decides once the target answers."""
    if "restore" not in op.rec.stages:
        return False
    if tunnel is not None:
        tunnel.close()
    ask = {"name": name, "tag": op.id, "helpers": op.rec.detail.get("target_helpers", [])}
    try:
        try:
            settled = transport.request("live_settle", ask)
        except NetworkError:
            # the connection that failed may be the one cut: ask again on a new one
            transport.close()
            settled = transport.request("live_settle", ask)
    except MigratorError as err:
        if lazy is not None:  # the page server has nobody to serve any more
            with contextlib.suppress(MigratorError):
                lazy.abort()
        op.note(undo_incomplete=True)
        raise CheckpointError(
            f"{e}; and the target cannot say whether {name} resumed there ({err}), so it "
            "stays frozen here", "`migrate recover` finishes it (forward or back) once "
            f"{transport.name} answers") from e
    if not settled.get("whole"):
        return False
    if lazy is not None:
        with contextlib.suppress(MigratorError):
            lazy.abort()
    if not isinstance(e, Exception):  # interrupted: leave the release to `migrate recover`
        op.note(undo_incomplete=True)
        raise e
    result.notes.append(f"warning: {e}; but {name} had resumed on {transport.name} with all "
                        "its memory, so the migration went forward")
    return True


def _roll_back(cts: Containers, transport: Transport, ckpt: Checkpointer, name: str,
               images: Path | None, dumped: bool, lazy: LazyDump | None,
               tunnel: PageTunnel | None, op: Operation) -> None:
    """Target copy removed, source running again with its memory (if it was dumped)."""
    op.stage("rolling-back")
    if tunnel is not None:
        tunnel.close()
    try:
        transport.request("delete_container", {"name": name, "force": True})
    except MigratorError:
        op.note(undo_incomplete=True)  # `migrate recover` finishes it once reachable
    with contextlib.suppress(MigratorError):
        transport.request("drop_images", {"tag": op.id})
    if lazy is not None:
        with contextlib.suppress(MigratorError):
            lazy.abort()
    if dumped and images is not None:
        ckpt.resume_source(name, images)
    if images is not None:
        remove_images_dir(images)
    rec = cts.get(name)
    vol = VolumeRef("container", rec.name)
    with contextlib.suppress(MigratorError):
        clean_stale_temp_snapshots(cts.host.backend(rec.pool), vol)
