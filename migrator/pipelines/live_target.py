"""The target's half of a live migration (``live.py`` is the source's half).

The source drives it with four agent requests, after the push of the rootfs that
``remote_target.py`` serves: ``live_check`` (CPU flags, room, the address free: asked before
anything is frozen), ``receive_images`` (the checkpoint images, into memory-backed space
named by the operation), ``checkpoint_restore`` (CRIU restores the container from them;
in post-copy its memory follows from the source's page server) and ``drop_images`` (a
failed migration's leftovers).

The design decision: a half-restored container must never run on here, because the source
resumes its own frozen copy on any failure; so every failure of the restore stops it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
import time
from typing import Any

from migrator.backends.generic import tar_extract
from migrator.checkpoint.base import images_dir, remove_images_dir
from migrator.checkpoint.lxc import LxcCheckpointer
from migrator.core import errors
from migrator.core.names import ContainerName, PoolName
from migrator.pipelines.live import cpu_flags
from migrator.pipelines.remote_target import Handler, RemoteTarget
from migrator.transport.datapath import FrameStream
from migrator.transport.frames import Reader


def live_check(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """What the source checks before freezing: CPU flags, pool room, address free."""
    pool = PoolName(req["pool"])
    u = end.host.backend(pool).usage()
    ipv4 = req.get("ipv4")
    return {"cpu_flags": cpu_flags(), "free": u.total - u.used,
            "ipv4_free": not ipv4 or str(ipv4) not in end.state.used_ipv4()}


def receive_images(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Unpack checkpoint images into memory-backed space named by the operation."""
    images = images_dir(end.host.root, operation_tag(req["tag"]))
    stream = FrameStream(read, "tar", "images", None, str(req.get("compress", "none")),
                         answer=end.notify)
    try:
        tar_extract(stream, images, None, acls=False)
    except BaseException:
        remove_images_dir(images)
        raise
    finally:
        stream.kill()
    return {"raw": stream.raw, "wire": stream.wire}


def checkpoint_restore(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Restore a received container from its images. With ``lazy``, the memory comes
    from the source's page server, reached at ``127.0.0.1:port`` (an SSH forward): this
    agent connects there, shows the forward's ``token`` and hands the connection to
    ``criu lazy-pages`` (``transport/tunnel.py``). The "restored" event goes out as soon
    as it runs, the reply once every page is here.

    The container must be found stopped here before anything starts (the lazy-pages
    daemon, the page stream), and outside the ``try``: a running container is refused, not
    stopped. That check is done once, here; the restore then writes its LXC config, once
    (``LxcCheckpointer.restore_stopped``)."""
    cts = end.cts
    name = ContainerName(req["name"])
    rec = cts.get(name)
    if cts.run_state(rec.name) != "STOPPED":
        raise errors.InvalidState(f"{rec.name!r} is not stopped here")
    images = images_dir(end.host.root, operation_tag(req["tag"]))
    ckpt = LxcCheckpointer(cts)
    t0 = time.monotonic()
    pages = None
    try:
        if req.get("lazy"):
            with page_stream(req) as sock:  # criu holds its own copy once started
                pages = ckpt.start_lazy_pages(images, ps_socket=sock.fileno())
            stats = ckpt.restore_stopped(rec, images, lazy=True)
            end.notify({"event": "restored", "seconds": stats.seconds})
            pages.wait(float(req.get("timeout", 900)))
        else:
            stats = ckpt.restore_stopped(rec, images)
    except BaseException:
        if pages is not None:
            with contextlib.suppress(Exception):
                pages.abort()
        # a half-restored container must not run on here: the source resumes it
        with contextlib.suppress(errors.MigratorError):
            cts.stop_now(rec.name, force=True)
        raise
    finally:
        remove_images_dir(images)
    return {"restore_seconds": stats.seconds, "seconds": time.monotonic() - t0,
            "status": cts.run_state(rec.name)}


def drop_images(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    remove_images_dir(images_dir(end.host.root, operation_tag(req["tag"])))
    return {}


LIVE_OPS: dict[str, Handler] = {
    "live_check": live_check,
    "receive_images": receive_images,
    "checkpoint_restore": checkpoint_restore,
    "drop_images": drop_images,
}


def operation_tag(value: Any) -> str:
    """An operation id used as a directory name: hex digits and dashes only."""
    tag = str(value)
    if not tag or len(tag) > 64 or any(c not in "0123456789abcdef-" for c in tag):
        raise errors.InvalidInput(f"invalid operation tag {tag!r}")
    return tag


def page_stream(req: dict[str, Any]) -> socket.socket:
    """The post-copy page stream's connection: to the client's SSH forward on this host's
    loopback, opened by this agent (root) and authenticated with the tunnel's token; the
    tunnel relays nothing else, so another local user who reaches the port gets nowhere."""
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
