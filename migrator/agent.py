"""``migrate agent``: the far side of a host-to-host operation, one request per channel.

The client opens an SSH channel per request and runs ``migrate --root R agent`` there. The
first frame is the JSON request ``{"op": ..., "protocol": N, ...}``; a ``receive`` request
is followed by DATA frames and an END trailer; the agent answers with one JSON frame:
``{"ok": true, ...}`` or ``{"ok": false, "error": {"type", "message", "hint"}}``.

Everything that arrives is validated before use: names through the same types as the CLI
(ContainerName, PoolName, SnapshotName), volume types against the known list, methods and
compressors against what this host offers. Nothing is ever run through a shell.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

from migrator.backends import VolumeRef
from migrator.core import errors, proc
from migrator.core.names import ContainerName, PoolName, SnapshotName, host_address
from migrator.runtime.leftovers import undo_partial_target
from migrator.transport.datapath import COMPRESSORS, FrameStream
from migrator.transport.frames import ProtocolError, Reader, Writer, read_json, write_json

PROTOCOL = 1
VERSION = "0.1.0"


def _criu_version() -> str | None:
    path = shutil.which("criu") or ("/usr/sbin/criu" if shutil.which("/usr/sbin/criu") else None)
    if not path:
        return None
    from migrator.core import proc

    r = proc.run([path, "--version"], check=False, timeout=10)
    first = r.stdout.strip().splitlines()[:1]
    return first[0].removeprefix("Version: ").strip() if first else None


CRIU_FEATURES = {"uffd": "lazy pages (post-copy)", "uffd-noncoop": "lazy pages, forks",
                 "mem_dirty_track": "pre-dump (iterative)"}


def _criu_features() -> dict[str, bool]:
    """What ``criu check --feature`` says of the features live migration negotiates."""
    path = shutil.which("criu") or "/usr/sbin/criu"
    if not shutil.which(path):
        return {}
    from migrator.core import proc

    return {f: proc.run([path, "check", "--feature", f], check=False, timeout=30).returncode
            == 0 for f in CRIU_FEATURES}


class Agent:
    """Serves requests against this host's state root."""

    def __init__(self, cts: Any, notify: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cts = cts
        self.host = cts.host
        self.state = cts.state
        # an event to the client before the reply (``{"event": name, ...}``)
        self.notify = notify or (lambda event: None)
        # the channel back to the client, for the data of a pull (``reverse.py``)
        self.write: Callable[[Any], Any] = lambda data: None
        # where a receive reports its progress (the client's bars, when serving a pull)
        self.progress: Any = None
        # a program this agent becomes once its reply is out (``rsync_receive``)
        self.exec_after_reply: list[str] | None = None
        # serving a pull's calls (``reverse.py``): the sender is the host pulled from, not
        # the operator's client, so a LINK offer is refused and device nodes pass a tar
        # stream only for a privileged container
        self.pulling = False
        # who sends the requests (named in refusals), and whether a container it sends may
        # be privileged: no, unless the operator said so (``--allow-privileged`` on a pull);
        # ``serve`` allows it, as its client logged in here as root
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
        return {"version": VERSION, "protocol": PROTOCOL, "pools": pools,
                "compressors": list(COMPRESSORS), "links": ["ssh", "tcp"],
                "rsync": shutil.which("rsync") is not None,
                "criu": _criu_version(),
                "criu_features": _criu_features() if req.get("criu_features") else None,
                "network": str(self.host.network_config().address)}

    def container_state(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        name = ContainerName(req["name"])
        if not self.state.has_container(name):
            return {"exists": False}
        rec = self.state.get_container(name)
        b = self.host.backend(rec.pool)
        vol = VolumeRef("container", name)
        native = {s.name: b.snapshot_identity(s) for s in b.list_snapshots(vol)}
        return {
            "exists": True, "pool": rec.pool, "status": self.cts.lxc.state(name),
            "ipv4": rec.ipv4,
            "snapshots": [{"name": s.name, "uuid": s.uuid, "native": native.get(s.name)}
                          for s in self.state.list_snapshots(name)],
        }

    def receive(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        pool = PoolName(req["pool"])
        vol = _volume(req["volume"])
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
        check = _tar_checker(bool(req.get("privileged")) or not self.pulling) \
            if how == "tar" else None
        stream = FrameStream(read, how, snap, parent, compress, check,
                             follow_link=not self.pulling, answer=self.notify)
        meter = None
        if self.progress is not None:
            from migrator.streams import ProgressMeter

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
        from migrator.transport.rsync_relay import server_args

        backend = self.host.backend(PoolName(req["pool"]))
        vol = _volume(req["volume"])
        if not backend.volume_exists(vol):
            raise errors.NotFound(f"no volume {vol.name!r} in pool {req['pool']!r} to refresh")
        args = server_args(req["args"])
        self.exec_after_reply = [*args, f"{backend.volume_path(vol)}/"]
        return {"ready": True}

    def snapshot_volume(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Snapshot a volume after an rsync pass filled it (what ``receive`` does itself)."""
        backend = self.host.backend(PoolName(req["pool"]))
        backend.snapshot(_volume(req["volume"]), SnapshotName(req["snapshot"]))
        return {}

    def commit_container(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Record a container whose volume has been received (or refresh its record).

        Its config and its snapshots' configs pass ``migrator.runtime.config.admit_config`` inside
        ``record_received``; a privileged one only when ``allow_privileged`` (a pull: the
        operator's ``--allow-privileged``)."""
        from migrator.runtime.state import SnapshotRecord

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
        import os
        import time

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
        backend.delete_snapshot(_volume(req["volume"]), SnapshotName(req["snapshot"]))
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
        from migrator.runtime.durable import sync_filesystem

        rec = self.cts.get(ContainerName(req["name"]))
        sync_filesystem(self.host.backend(rec.pool).volume_path(
            VolumeRef("container", rec.name)))
        self.state.flush()
        return {"synced": rec.pool}


    # live migration (the target side) --------------------------------------------------
    def live_check(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """What the source checks before freezing: CPU flags, pool room, address free."""
        from migrator.pipelines.live import cpu_flags

        pool = PoolName(req["pool"])
        u = self.host.backend(pool).usage()
        ipv4 = req.get("ipv4")
        return {"cpu_flags": cpu_flags(), "free": u.total - u.used,
                "ipv4_free": not ipv4 or str(ipv4) not in self.state.used_ipv4()}

    def receive_images(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Unpack checkpoint images into memory-backed space named by the operation."""
        from migrator.backends.generic import tar_extract
        from migrator.checkpoint.base import images_dir, remove_images_dir

        images = images_dir(self.host.root, _tag(req["tag"]))
        stream = FrameStream(read, "tar", "images", None, str(req.get("compress", "none")),
                             answer=self.notify)
        try:
            tar_extract(stream, images, None, acls=False)
        except BaseException:
            remove_images_dir(images)
            raise
        finally:
            stream.kill()
        return {"raw": stream.raw, "wire": stream.wire}

    def checkpoint_restore(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Restore a received container from its images. With ``lazy``, the memory comes
        from the source's page server, reached at ``127.0.0.1:port`` (an SSH forward): this
        agent connects there, shows the forward's ``token`` and hands the connection to
        ``criu lazy-pages`` (``transport/tunnel.py``). The "restored" event goes out as soon
        as it runs, the reply once every page is here."""
        import time

        from migrator.checkpoint.base import images_dir, remove_images_dir
        from migrator.checkpoint.lxc import LxcCheckpointer

        name = ContainerName(req["name"])
        rec = self.cts.get(name)
        if self.cts.lxc.state(rec.name) != "STOPPED":
            raise errors.InvalidState(f"{rec.name!r} is not stopped here")
        images = images_dir(self.host.root, _tag(req["tag"]))
        ckpt = LxcCheckpointer(self.cts)
        self.cts.lxc.write_config(self.cts.spec(rec))
        t0 = time.monotonic()
        pages = None
        try:
            if req.get("lazy"):
                with _page_stream(req) as sock:  # criu holds its own copy once started
                    pages = ckpt.start_lazy_pages(images, ps_socket=sock.fileno())
                stats = ckpt.restore(rec.name, images, lazy=True)
                self.notify({"event": "restored", "seconds": stats.seconds})
                pages.wait(float(req.get("timeout", 900)))
            else:
                stats = ckpt.restore(rec.name, images)
        except BaseException:
            if pages is not None:
                with contextlib.suppress(Exception):
                    pages.abort()
            # a half-restored container must not run on here: the source resumes it
            with contextlib.suppress(errors.MigratorError):
                self.cts.lxc.stop(rec.name, force=True)
            raise
        finally:
            remove_images_dir(images)
        return {"restore_seconds": stats.seconds, "seconds": time.monotonic() - t0,
                "status": self.cts.lxc.state(rec.name)}

    def drop_images(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        from migrator.checkpoint.base import images_dir, remove_images_dir

        remove_images_dir(images_dir(self.host.root, _tag(req["tag"])))
        return {}


    # p2c: a machine converted into a container here (logic in p2c/target.py) -------------
    def p2c_pull(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Run rsync's client into the new (or, resuming, partial) volume; its transport is
        relayed by the client to the machine (``migrator.p2c.pull``). "started" goes out first."""
        from migrator.p2c.pull import check_rules, serve_pull
        from migrator.p2c.target import prepare_volume

        rules = check_rules(req.get("rules", []))
        rootfs = prepare_volume(self.cts, req["name"], req["pool"], bool(req.get("resume")))
        write_json(self.write, {"ok": True, "started": True})
        return serve_pull(rootfs, rules, read, self.write)

    def p2c_finish(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Fixups, report, uid shift, record and first boot of a received machine."""
        from migrator.p2c.target import finish

        return finish(self.cts, req)


    # pushes on the client's behalf ----------------------------------------------------
    def delegate(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Run a push from this host for a client that drives two other hosts
        (``migrate live host-a host-b``, ``migrate copy host-a:c1 host-b:c1``).

        The client describes the target and sends the host key *it* verified for it, so this
        host trusts exactly that key and nothing more; the login key is the client's path
        if it exists here, else this host's own keys and ssh-agent.
        """
        import os
        import tempfile
        from pathlib import Path

        from migrator.transport.ssh import SshTransport

        tgt = dict(req["target"])
        if tgt.get("reverse"):
            if req.get("command") != "copy":
                raise errors.InvalidInput("only a copy can be pulled through the client")
            return self._pull_source(req, read)
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
                             netns=self.host.netns)
            t.data_link = str(tgt.get("data_link", "auto"))
            t.link_rate = float(tgt["link_rate"]) if tgt.get("link_rate") else None
            with t:
                if req.get("command") == "live":
                    return self._delegated_live(req, t)
                if req.get("command") == "copy":
                    from migrator.pipelines.remote_copy import RemoteCopy

                    r = RemoteCopy(self.cts, t, compress=str(req.get("compress", "auto"))
                                   ).copy(str(ContainerName(req["source"])),
                                          str(ContainerName(req["target_name"])),
                                          req.get("pool"), bool(req.get("instance_only")),
                                          bool(req.get("refresh")))
                    return {"result": r.as_dict()}
        raise errors.InvalidInput(f"cannot delegate {req.get('command')!r}")

    def repository(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """A backup repository on this host, for a client whose ``--repo`` is
        ``ssh://THIS-HOST/PATH`` (``backup/remote.py``)."""
        from migrator.backup.remote import serve_repository

        return serve_repository(self, req, read)

    def backup_restore(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Restore, on this host, a backup from one of this host's repositories."""
        from migrator.backup.remote import serve_restore

        return serve_restore(self, req, read)

    def _pull_source(self, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        """Push to the client that asked, through its own channel (``reverse.py``)."""
        from migrator.pipelines.remote_copy import RemoteCopy
        from migrator.transport.reverse import ReverseTransport

        r = RemoteCopy(self.cts, ReverseTransport(read, self.write),
                       compress=str(req.get("compress", "auto"))
                       ).copy(str(ContainerName(req["source"])),
                              str(ContainerName(req["target_name"])), req.get("pool"),
                              bool(req.get("instance_only")), bool(req.get("refresh")))
        return {"result": r.as_dict()}

    def _delegated_live(self, req: dict[str, Any], t: Any) -> dict[str, Any]:
        from migrator.pipelines.live import live_migrate

        names = [str(ContainerName(n)) for n in req.get("names") or []]
        if not names:
            from migrator.pipelines.live import running_containers

            names = running_containers(self.cts)
        results, failures = [], []
        for n in names:
            try:
                r = live_migrate(self.cts, t, n, req.get("pool"), str(req.get("mode", "auto")),
                                 bool(req.get("keep_source")), str(req.get("compress", "auto")))
            except errors.MigratorError as e:
                failures.append({"name": n, **error_reply(e)["error"]})
                self.notify({"event": "failed", "name": n, "message": e.message})
                continue
            results.append(r.as_dict())
            self.notify({"event": "migrated", **r.as_dict()})
        return {"results": results, "failures": failures}


def _tar_checker(allow_devices: bool) -> Any:
    """The restore's tar guard (``migrator.targuard``) for a container volume's tar stream:
    members inside ``rootfs/`` (and its parents) only, no escape through links, every
    header written anew from checked values; device nodes only if allowed, else only the
    harmless standard ones an image puts in ``/dev`` (``/dev/null``...)."""
    from migrator.targuard import TarChecker, TarRules

    return TarChecker(TarRules(allow_devices=allow_devices, root="rootfs",
                               standard_devices=True))


def _tag(value: Any) -> str:
    """An operation id used as a directory name: hex digits and dashes only."""
    tag = str(value)
    if not tag or len(tag) > 64 or any(c not in "0123456789abcdef-" for c in tag):
        raise errors.InvalidInput(f"invalid operation tag {tag!r}")
    return tag


def _volume(obj: Any) -> VolumeRef:
    if not isinstance(obj, dict):
        raise errors.InvalidInput("volume must be an object")
    try:
        return VolumeRef(str(obj["type"]), str(obj["name"]))
    except ValueError as e:
        raise errors.InvalidInput(str(e)) from e


OPS: dict[str, Callable[[Agent, dict[str, Any], Reader], dict[str, Any]]] = {
    "hello": Agent.hello,
    "container_state": Agent.container_state,
    "receive": Agent.receive,
    "commit_container": Agent.commit_container,
    "rsync_receive": Agent.rsync_receive,
    "snapshot_volume": Agent.snapshot_volume,
    "abort_container": Agent.abort_container,
    "delete_snapshot": Agent.delete_snapshot,
    "sink": Agent.sink,
    "start": Agent.start,
    "delete_container": Agent.delete_container,
    "sync_container": Agent.sync_container,
    "live_check": Agent.live_check,
    "receive_images": Agent.receive_images,
    "checkpoint_restore": Agent.checkpoint_restore,
    "drop_images": Agent.drop_images,
    "delegate": Agent.delegate,
    "p2c_pull": Agent.p2c_pull,
    "p2c_finish": Agent.p2c_finish,
    "repository": Agent.repository,
    "backup_restore": Agent.backup_restore,
}


def error_reply(e: BaseException) -> dict[str, Any]:
    if isinstance(e, errors.MigratorError):
        return {"ok": False, "error": {"type": type(e).__name__, "message": e.message,
                                       "hint": e.hint}}
    return {"ok": False, "error": {"type": type(e).__name__, "message": str(e), "hint": None}}


def serve(cts_factory: Callable[[], Any], read: Reader, write: Writer) -> int:
    """Handle one request from ``read``; answer on ``write``. Returns the exit status."""
    try:
        req = read_json(read)
        if req.get("protocol") != PROTOCOL:
            raise ProtocolError(
                f"protocol {req.get('protocol')} requested; this agent speaks {PROTOCOL}",
                "install the same migrator version on both hosts")
        op = OPS.get(str(req.get("op")))
        if op is None:
            raise errors.InvalidInput(f"unknown agent request {req.get('op')!r}")
        agent = Agent(cts_factory(), lambda ev: write_json(write, ev))
        agent.write = write
        # the client logged in here as root over SSH: it could run anything, so what it
        # sends may be privileged (a pull's source host, which is not, never gets here)
        agent.peer, agent.allow_privileged = "the client", True
        result = op(agent, req, read)
        write_json(write, {"ok": True, **result})
        if agent.exec_after_reply:
            proc.exec_replace(agent.exec_after_reply)
        return 0
    except (KeyError, TypeError, ValueError) as e:
        write_json(write, error_reply(errors.InvalidInput(f"malformed request: {e!r}")))
        return errors.InvalidInput.exit_code
    except BaseException as e:  # noqa: BLE001 - every failure becomes a typed reply
        write_json(write, error_reply(e))
        return getattr(e, "exit_code", 1)


def _page_stream(req: dict[str, Any]) -> Any:
    """The post-copy page stream's connection: to the client's SSH forward on this host's
    loopback, opened by this agent (root) and authenticated with the tunnel's token; the
    tunnel relays nothing else, so another local user who reaches the port gets nowhere."""
    import base64
    import binascii
    import socket

    try:
        token = base64.b64decode(str(req["token"]), validate=True)
    except (KeyError, binascii.Error) as e:
        raise errors.InvalidInput("the page stream's token is missing or malformed") from e
    if len(token) != 32:
        raise errors.InvalidInput("the page stream's token is malformed")
    sock = socket.create_connection(("127.0.0.1", int(req["port"])), timeout=10)
    try:
        sock.sendall(token)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main_stdio(cts_factory: Callable[[], Any]) -> int:
    # a dropped SSH connection sends SIGHUP: unwind normally so partial receives are removed
    import signal

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def write(b: bytes) -> None:
        stdout.write(b)
        stdout.flush()

    return serve(cts_factory, stdin.read1 if hasattr(stdin, "read1") else stdin.read, write)
