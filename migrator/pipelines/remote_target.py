"""The target's half of a push: what this host does when another host copies, moves or
pulls a container onto it (``remote_copy.py`` is the sending half).

A push arrives as agent requests in a fixed order: ``hello`` (what this host offers),
``container_state`` (what it already has), one ``receive`` per snapshot (or an
``rsync_receive`` then ``snapshot_volume`` across drivers), then ``commit_container``,
which records the container only once every stream arrived; ``abort_container`` undoes a
failed one. A move then ``start``\\s it, ``sync_container``\\s it to disk and lets the
source go; ``delete_container`` and ``delete_snapshot`` clean up. ``sink`` measures a link.

:class:`RemoteTarget` is also what every other far-end half is served with (live
migration's ``live_target.py``, ``p2c/target.py``, ``backup/remote.py``): this host's
containers, who sends the requests, the channel back to them. The agent (the top floor)
only parses a request, looks its handler up and writes the reply.

Everything that arrives is validated before use: names through the same types as the CLI
(ContainerName, PoolName, SnapshotName), volume types against the known list, methods and
compressors against what this host offers, tar members through the restore's guard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migrator.backends import VolumeRef
from migrator.checkpoint.lxc import (
    criu_binary,
    criu_supports_all,
    criu_version,
    unprivileged_uffd,
)
from migrator.core import errors
from migrator.core.names import ContainerName, PoolName, SnapshotName
from migrator.runtime.containers import Containers
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.leftovers import undo_partial_target
from migrator.runtime.state import SnapshotRecord
from migrator.streams import Progress, ProgressMeter
from migrator.targuard import TarChecker, TarRules
from migrator.transport.base import EventHandler
from migrator.transport.datapath import COMPRESSORS, FrameStream
from migrator.transport.frames import PROTOCOL, DataWriter, Reader
from migrator.transport.rsync_relay import server_args

VERSION = "0.1.0"

CRIU_FEATURES = {"uffd": "lazy pages (post-copy)", "uffd-noncoop": "lazy pages, forks",
                 "mem_dirty_track": "pre-dump (iterative)"}


def criu_features() -> dict[str, bool]:
    """What ``criu check --feature`` says of the features live migration negotiates."""
    if criu_binary() is None:
        return {}
    # not criu's: whether an unprivileged container may fault its pages in (post-copy)
    return {**criu_supports_all(CRIU_FEATURES), "unprivileged-uffd": unprivileged_uffd()}


def memory_info(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """This machine's MemTotal and MemAvailable in bytes (absent when unreadable): an
    evacuation places each running container where the most memory is free."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _sep, rest = line.partition(":")
        field = {"MemTotal": "mem_total", "MemAvailable": "mem_available"}.get(key)
        parts = rest.split()
        if field and parts and parts[0].isdigit():
            out[field] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def host_id(root: Path) -> str:
    """This state root's identity (a random id made on first use, ``<root>/host-id``): an
    evacuation tells by it which inventory host is this one (never a target, and how the
    targets reach it back), since addresses and paths may look alike on different hosts."""
    path = root / "host-id"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    made = uuid.uuid4().hex
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another agent made it first
        return path.read_text().strip()
    try:
        os.write(fd, f"{made}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return made


def no_data(n: int) -> bytes:
    """The reader of a request that carries no data frames (one served in process)."""
    return b""


class RemoteTarget:
    """This host serving one request from another: its state root, who sends, the channel
    back. The methods are the requests of a push (and a pull's calls)."""

    def __init__(self, cts: Containers, notify: EventHandler | None = None) -> None:
        self.cts = cts
        self.host = cts.host
        self.state = cts.state
        # an event to the client before the reply (``{"event": name, ...}``)
        self.notify: EventHandler = notify or (lambda event: None)
        # the channel back to the client, for the data of a pull (``reverse.py``)
        self.write: DataWriter = lambda data: None
        # where a receive reports its progress (the client's bars, when serving a pull)
        self.progress: Progress | None = None
        # a program this agent becomes once its reply is out (``rsync_receive``)
        self.exec_after_reply: list[str] | None = None
        # serving a pull's calls (``pull_scope.py``): the sender is the host pulled from, not
        # the operator's client, so a LINK offer is refused and device nodes pass a tar
        # stream only for a privileged container
        self.pulling = False
        # who sends the requests (named in refusals), and whether a container it sends may
        # be privileged: no, unless the operator said so (``--allow-privileged`` on a pull);
        # the agent's ``serve`` allows it, as its client logged in here as root
        self.peer = "the sending host"
        self.allow_privileged = False

    # requests ------------------------------------------------------------------------------
    def hello(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        pools = []
        for p in self.state.list_pools():
            b = self.host.backend(p.name)
            u = b.usage()
            pools.append({"name": p.name, "driver": p.driver, "types": b.migration_types(),
                          "free": u.total - u.used, "subsecond_mtimes": b.subsecond_mtimes})
        net = self.host.network_config()
        return {"version": VERSION, "protocol": PROTOCOL, "pools": pools,
                "compressors": list(COMPRESSORS), "links": ["ssh", "tcp"],
                "rsync": shutil.which("rsync") is not None,
                "criu": criu_version(),
                "criu_features": criu_features() if req.get("criu_features") else None,
                "network": str(net.address),
                # the VXLAN network this host's bridge is on: equal ids, one container network
                "overlay_vni": net.overlay.vni if net.overlay else None,
                "host_id": host_id(self.host.root), **memory_info()}

    def container_state(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        name = ContainerName(req["name"])
        if not self.state.has_container(name):
            return {"exists": False}
        rec = self.state.get_container(name)
        b = self.host.backend(rec.pool)
        vol = VolumeRef("container", name)
        native = {s.name: b.snapshot_identity(s) for s in b.list_snapshots(vol)}
        return {
            "exists": True, "pool": rec.pool, "status": self.cts.run_state(name),
            "ipv4": rec.ipv4,
            "snapshots": [{"name": s.name, "uuid": s.uuid, "native": native.get(s.name)}
                          for s in self.state.list_snapshots(name)],
        }

    def receive(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        pool = PoolName(req["pool"])
        vol = volume_ref(req["volume"])
        snap = SnapshotName(req["snapshot"])
        parent = SnapshotName(req["parent"]) if req.get("parent") else None
        backend = self.host.backend(pool)
        how = str(req["how"])
        if how not in backend.migration_types() or how == "rsync":
            raise errors.InvalidInput(f"pool {pool!r} cannot receive a {how!r} stream")
        compress = str(req.get("compress", "none"))
        if req.get("first") and vol.type == "container":
            undo_partial_target(self.cts, vol.name, pool)  # debris of a cut-off transfer
        # every tar member is checked before tar sees it (as in a restore); devices pass
        # for a privileged container, or from the operator's own client (a push)
        check = volume_tar_checker(bool(req.get("privileged")) or not self.pulling) \
            if how == "tar" else None
        stream = FrameStream(read, how, snap, parent, compress, check,
                             follow_link=not self.pulling, answer=self.notify)
        meter = None
        if self.progress is not None:
            size = req.get("size")
            meter = ProgressMeter(self.progress, f"{vol.name}@{snap}",
                                  int(size) if isinstance(size, int) else None)
        try:
            backend.receive(vol, snap, stream, meter)
        except BaseException as e:
            # the receiver saw only a cut stream: the refused member or link is the cause
            if isinstance(stream.error, errors.MigratorError) and stream.error is not e:
                raise stream.error from e
            raise
        finally:
            stream.kill()
        if req.get("drop_after"):
            backend.delete_snapshot(vol, snap)
        return {"raw": stream.raw, "wire": stream.wire}

    def rsync_receive(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Become ``rsync --server`` on this channel, writing into an existing volume (the
        client's rsync sends only what changed: ``migrator.transport.rsync_relay``)."""
        backend = self.host.backend(PoolName(req["pool"]))
        vol = volume_ref(req["volume"])
        if not backend.volume_exists(vol):
            raise errors.NotFound(f"no volume {vol.name!r} in pool {req['pool']!r} to refresh")
        args = server_args(req["args"])
        self.exec_after_reply = [*args, f"{backend.volume_path(vol)}/"]
        return {"ready": True}

    def snapshot_volume(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Snapshot a volume after an rsync pass filled it (what ``receive`` does itself)."""
        backend = self.host.backend(PoolName(req["pool"]))
        backend.snapshot(volume_ref(req["volume"]), SnapshotName(req["snapshot"]))
        return {}

    def commit_container(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Record a container whose volume has been received (or refresh its record).

        Its config and its snapshots' configs pass ``migrator.runtime.config.admit_config``
        inside ``record_received``; a privileged one only when ``allow_privileged`` (a pull:
        the operator's ``--allow-privileged``)."""
        name = ContainerName(req["name"])
        pool = PoolName(req["pool"])
        snaps = [SnapshotRecord.from_wire(name, s) for s in req.get("snapshots", [])]
        want = req.get("ipv4")
        image = req.get("image")
        if image is not None and not isinstance(image, str):
            raise errors.InvalidInput(f"commit_container: image {image!r} is not a name")
        rec = self.cts.record_received(name, pool, image, req.get("config", {}), snaps,
                                       str(want) if want else None,
                                       origin=f"{self.peer}'s commit_container",
                                       allow_privileged=self.allow_privileged)
        return {"ipv4": rec.ipv4}

    def abort_container(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Undo a failed transfer: the partial volume of an unrecorded container, or the
        snapshots a failed refresh added to a recorded one."""
        dropped = undo_partial_target(self.cts, ContainerName(req["name"]),
                                      PoolName(req["pool"]))
        return {"removed": "volume" if dropped is None else dropped}

    def sink(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Read a data stream and drop it (link throughput probe)."""
        stream = FrameStream(read, "probe", "probe", None, str(req.get("compress", "none")),
                             answer=self.notify)
        fd = stream.fileno()
        first = os.read(fd, 1 << 20)
        t0 = time.monotonic()  # from the first byte: the rate of the link, not of start-up
        n = len(first)
        while chunk := os.read(fd, 1 << 20):
            n += len(chunk)
        seconds = time.monotonic() - t0
        stream.close()
        return {"raw": stream.raw, "wire": stream.wire, "seconds": seconds,
                "rate": (n - len(first)) / seconds if seconds > 0 else None}

    def delete_snapshot(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        backend = self.host.backend(PoolName(req["pool"]))
        backend.delete_snapshot(volume_ref(req["volume"]), SnapshotName(req["snapshot"]))
        return {}

    def start(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        self.cts.start(ContainerName(req["name"]))
        return {"status": self.cts.status(req["name"])}

    def delete_container(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        self.cts.delete(ContainerName(req["name"]), force=bool(req.get("force")))
        return {}

    def sync_container(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Put a received container on disk before the source deletes its copy (a move's
        or a live migration's last request before that): the filesystem of its volume is
        synced, then every record committed so far is made durable. Only this reply lets
        the source go."""
        rec = self.cts.get(ContainerName(req["name"]))
        sync_filesystem(self.host.backend(rec.pool).volume_path(
            VolumeRef("container", rec.name)))
        self.state.flush()
        return {"synced": rec.pool}


# a request's handler: this host's answer (the reply's fields), or a typed error raised
Handler = Callable[[RemoteTarget, dict[str, Any], Reader], dict[str, Any]]

# the requests of a push, a move and a pull, by their names on the wire
TARGET_OPS: dict[str, Handler] = {
    "hello": RemoteTarget.hello,
    "container_state": RemoteTarget.container_state,
    "receive": RemoteTarget.receive,
    "commit_container": RemoteTarget.commit_container,
    "rsync_receive": RemoteTarget.rsync_receive,
    "snapshot_volume": RemoteTarget.snapshot_volume,
    "abort_container": RemoteTarget.abort_container,
    "delete_snapshot": RemoteTarget.delete_snapshot,
    "sink": RemoteTarget.sink,
    "start": RemoteTarget.start,
    "delete_container": RemoteTarget.delete_container,
    "sync_container": RemoteTarget.sync_container,
}


def volume_tar_checker(allow_devices: bool) -> TarChecker:
    """The restore's tar guard (``migrator.targuard``) for a container volume's tar stream:
    members inside ``rootfs/`` (and its parents) only, no escape through links, every
    header written anew from checked values; device nodes only if allowed, else only the
    harmless standard ones an image puts in ``/dev`` (``/dev/null``...)."""
    return TarChecker(TarRules(allow_devices=allow_devices, root="rootfs",
                               standard_devices=True))


def volume_ref(obj: Any) -> VolumeRef:
    """A volume named in a request (``{"type", "name"}``), its type and name checked."""
    if not isinstance(obj, dict):
        raise errors.InvalidInput("volume must be an object")
    try:
        return VolumeRef(str(obj["type"]), str(obj["name"]))
    except ValueError as e:
        raise errors.InvalidInput(str(e)) from e
