"""The target's half of a live migration (``live.py`` is the source's half).

The source drives it with four agent requests, after the push of the rootfs that
``remote_target.py`` serves: ``live_check`` (CPU flags, room, the address free: asked before
anything is frozen), ``receive_images`` (the checkpoint images, into memory-backed space
named by the operation), ``checkpoint_restore`` (CRIU restores the container from them;
in post-copy its memory follows from the source's page server) and ``drop_images`` (a
failed migration's leftovers).

The design decision: a half-restored container must never run on here, because the source
resumes its own frozen copy on any failure; so every failure of the restore stops it. Once
it has resumed whole (restored, and in post-copy every page here), its state is newer than
the frozen source's: from then on it is never stopped, and the migration only goes forward.

Which of the two holds is kept on this host, beside the images, in a small file under a lock
(``RestoreMark``): ``checkpoint_restore`` advances it (restoring, restored, complete) and
``live_settle`` (asked by the source's rollback or by ``migrate recover`` when the restore
may have begun) reads it and, short of complete, marks it abandoned under the same lock,
so a restore that ends afterwards stops its container instead of calling it whole. The
helpers the restore starts (criu lazy-pages, lxc-checkpoint) are recorded there too, with
their start times, and announced to the source for its journal; ``live_settle`` kills them,
so a restore that waits for pages which will never come cannot hold LXC's monitor.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from migrator.backends import VolumeRef
from migrator.backends.generic import tar_extract
from migrator.checkpoint.base import CriuTls, images_dir, remove_images_dir
from migrator.checkpoint.lxc import (
    LxcCheckpointer,
    bounded_lxc,
    find_helpers,
    helper_record,
    kill_helpers,
    lazy_pages_complete,
)
from migrator.core import errors
from migrator.core.names import ContainerName, PoolName
from migrator.pipelines.live import cpu_flags
from migrator.pipelines.remote_target import Handler, RemoteTarget
from migrator.runtime.temp_snapshots import clean_stale_temp_snapshots
from migrator.transport.datapath import FrameStream
from migrator.transport.frames import Reader
from migrator.transport.link import Identity, decode_cert

LXC_WAIT = 20.0  # seconds any lxc-* command may take while settling a cut migration
PAGES_GRACE = 5.0  # seconds the pages may still need when the channel ends after "restored"
#: how long a settle waits for a resumed restore's pages when its agent is gone (within the
#: 30 s a cut migration has to end in)
SETTLE_PAGES_WAIT = 15.0
MARK_AGE = 7 * 86400.0  # seconds a restore mark is kept (recover may come days later)


class RestoreMark:
    """How far one migration's restore got on this host (see the module docstring), in
    ``<root>/checkpoint/live-TAG.json``, read and written under an exclusive flock."""

    def __init__(self, root: Path, tag: str) -> None:
        self.path = Path(root) / "checkpoint" / f"live-{operation_tag(tag)}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The mark's contents for the block, written back at its end."""
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data: Any = {}
            with contextlib.suppress(ValueError):
                raw = os.pread(fd, 1 << 16, 0)
                data = json.loads(raw) if raw else {}
            mark: dict[str, Any] = data if isinstance(data, dict) else {}
            yield mark
            text = json.dumps(mark).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, text, 0)
        finally:
            os.close(fd)

    def advance(self, phase: str) -> None:
        """Record ``phase`` unless the restore was abandoned meanwhile (then raise)."""
        with self.locked() as mark:
            if mark.get("phase") == "abandoned":
                raise errors.InvalidState("this restore was given up (the migration was "
                                          "rolled back meanwhile)")
            mark["phase"] = phase

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def sweep(root: Path, max_age: float = MARK_AGE) -> None:
        """Remove the marks of migrations older than ``max_age`` seconds: a migration that
        ended well leaves its mark (a late ``live_settle`` reads it), nobody else does."""
        cutoff = time.time() - max_age
        for old in (Path(root) / "checkpoint").glob("live-*.json"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()


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
    (``LxcCheckpointer.restore_stopped``).

    Each helper started is recorded in the ``RestoreMark`` and announced (a "helper" event,
    for the source's journal). When the agent's channel ends mid-way (the agent turns that
    into SystemExit) the restore is given up like any failure, unless the container has
    resumed whole: a post-copy restore whose pages are all here within ``PAGES_GRACE`` is
    left running, as its state is newer than the source's."""
    cts = end.cts
    name = ContainerName(req["name"])
    rec = cts.get(name)
    if cts.run_state(rec.name) != "STOPPED":
        raise errors.InvalidState(f"{rec.name!r} is not stopped here")
    tag = operation_tag(req["tag"])
    images = images_dir(end.host.root, tag)
    RestoreMark.sweep(end.host.root)
    mark = RestoreMark(end.host.root, tag)
    mark.advance("restoring")
    ckpt = LxcCheckpointer(cts)
    t0 = time.monotonic()
    pages = None
    tls: CriuTls | None = None

    def started(pid: int, what: str) -> None:
        helper = helper_record(pid, what)
        with mark.locked() as m:
            m.setdefault("helpers", []).append(helper)
        end.notify({"event": "helper", **helper})

    try:
        if req.get("lazy"):
            if req.get("link") is not None:
                # criu connects to the source's link itself: its TLS (the source's
                # certificate pinned) runs only on a connection it made (criu 4.x skips it
                # on a socket handed in with --ps-socket)
                address, port, peer = _page_link(req["link"])
                tls = CriuTls(ckpt.page_tls_dir(tag))
                tls.add_peer(peer)
                pages = ckpt.start_lazy_pages(images, address=address, port=port, tls=tls)
            else:
                with page_stream(req) as sock:  # criu holds its own copy once started
                    pages = ckpt.start_lazy_pages(images, ps_socket=sock.fileno())
            started(pages.pid, "criu lazy-pages")
            stats = ckpt.restore_stopped(rec, images, lazy=True,
                                         on_start=lambda pid: started(pid, "lxc-checkpoint"))
            mark.advance("restored")
            end.notify({"event": "restored", "seconds": stats.seconds})
            pages.wait(float(req.get("timeout", 900)))
        else:
            stats = ckpt.restore_stopped(rec, images,
                                         on_start=lambda pid: started(pid, "lxc-checkpoint"))
        mark.advance("complete")
    except BaseException:
        if pages is not None and _pages_arrived_anyway(pages, mark):
            # the channel ended, but the container has all its memory and runs: newer
            # than the source, so it stays (the source's side goes forward)
            raise
        mark_failed(mark)
        if pages is not None:
            with contextlib.suppress(Exception):
                pages.abort()
        with contextlib.suppress(errors.MigratorError):
            kill_helpers([], images, ("criu",))
        # a half-restored container must not run on here: the source resumes it
        with contextlib.suppress(errors.MigratorError):
            cts.stop_now(rec.name, force=True)
        raise
    finally:
        remove_images_dir(images)
        CriuTls(ckpt.page_tls_dir(tag)).remove()  # the key goes with its migration
    return {"restore_seconds": stats.seconds, "seconds": time.monotonic() - t0,
            "status": cts.run_state(rec.name)}


def _pages_arrived_anyway(pages: Any, mark: RestoreMark) -> bool:
    """After an interruption in post-copy: did the lazy-pages daemon still end well (every
    page here) within ``PAGES_GRACE``? Then the restore is complete after all."""
    try:
        rc = pages.popen.wait(timeout=PAGES_GRACE)
    except BaseException:  # noqa: BLE001 - still fetching, or interrupted again: not whole
        return False
    if rc != 0:
        return False
    try:
        mark.advance("complete")
    except errors.MigratorError:
        return False
    return True


def mark_failed(mark: RestoreMark) -> None:
    with contextlib.suppress(OSError), mark.locked() as m:
        if m.get("phase") != "abandoned":
            m["phase"] = "failed"


def live_settle(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Which way a cut migration goes, decided here, where the restore ran: ``whole``
    (the container resumed with every page and runs: the source must go forward and be
    released) or not (then this side is given up now: the restore marked abandoned, its
    helpers killed, the container stopped, the images removed; the source resumes).

    The helpers are killed before any lxc-* command: LXC's monitor does not answer while
    a restore it runs waits for criu. Every lxc-* command here ends within ``LXC_WAIT``."""
    cts = end.cts
    name = ContainerName(req["name"])
    tag = operation_tag(req["tag"])
    images = images_dir(end.host.root, tag)
    mark = RestoreMark(end.host.root, tag)
    with mark.locked() as m:
        phase = m.get("phase")
        helpers = [h for h in [*(req.get("helpers") or []), *m.get("helpers", [])]
                   if isinstance(h, dict)]
    if phase == "restored":  # resumed: it may be whole though its agent is gone
        _settle_pages(LxcCheckpointer(cts), images, helpers, mark)
    with mark.locked() as m:
        phase = m.get("phase")
        if phase != "complete":
            m["phase"] = "abandoned"
    with bounded_lxc(cts, LXC_WAIT):
        exists = cts.state.has_container(name)
        if phase == "complete" and exists and cts.run_state(name) == "RUNNING":
            remove_images_dir(images)
            with contextlib.suppress(errors.MigratorError):
                rec = cts.get(name)
                clean_stale_temp_snapshots(cts.host.backend(rec.pool),
                                           VolumeRef("container", rec.name))
            return {"whole": True, "phase": phase}
        with mark.locked() as m:  # complete but dead: going back is allowed
            m["phase"] = "abandoned"
        # criu only: lxc-checkpoint's monitor then gives the failed restore up itself
        killed = kill_helpers([h for h in helpers if str(h.get("what", "")).startswith("criu")],
                              images, ("criu",))
        if exists and cts.run_state(name) != "STOPPED":
            cts.stop_now(name, force=True)
    remove_images_dir(images)
    return {"whole": False, "phase": phase, "killed": killed}


def _settle_pages(ckpt: LxcCheckpointer, images: Path, helpers: list[dict[str, Any]],
                  mark: RestoreMark) -> None:
    """Mark "complete" a restore that had resumed when its migration was cut, once its
    lazy-pages daemon has delivered every page though the agent that waited for it is
    gone (killed: nobody else would mark it). The container
    then runs with all its memory and state newer than the source's, so going back would
    lose what it did since; only a daemon that failed, or still fetches after
    ``SETTLE_PAGES_WAIT``, leaves it short of memory, and the migration goes back."""
    daemons = [h for h in helpers if h.get("what") == "criu lazy-pages"]
    deadline = time.monotonic() + SETTLE_PAGES_WAIT
    while daemons and find_helpers(daemons, None, ("criu",)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with mark.locked() as m:
        if m.get("phase") == "restored" and daemons \
                and not find_helpers(daemons, None, ("criu",)):
            with contextlib.suppress(OSError):
                if lazy_pages_complete(ckpt.lazy_pages_log(images).read_text(
                        errors="replace")):
                    m["phase"] = "complete"


def drop_images(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    tag = operation_tag(req["tag"])
    remove_images_dir(images_dir(end.host.root, tag))
    CriuTls(LxcCheckpointer(end.cts).page_tls_dir(tag)).remove()
    RestoreMark(end.host.root, tag).remove()
    return {}




def operation_tag(value: Any) -> str:
    """An operation id used as a directory name: hex digits and dashes only."""
    tag = str(value)
    if not tag or len(tag) > 64 or any(c not in "0123456789abcdef-" for c in tag):
        raise errors.InvalidInput(f"invalid operation tag {tag!r}")
    return tag


def _token(value: Any) -> bytes:
    try:
        token = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as e:
        raise errors.InvalidInput("the page stream's token is malformed") from e
    if len(token) != 32:
        raise errors.InvalidInput("the page stream's token is malformed")
    return token


def _page_link(link: Any) -> tuple[str, int, bytes]:
    """The source's direct page link, checked: an IP address, a port, its certificate."""
    if not isinstance(link, dict):
        raise errors.InvalidInput("the page link is malformed")
    try:
        address = str(ipaddress.ip_address(str(link.get("address"))))
    except ValueError as e:
        raise errors.InvalidInput("the page link's address is not an IP address") from e
    return address, _port(link.get("port")), decode_cert(link.get("cert"))


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise errors.InvalidInput(f"invalid page stream port {str(value)[:20]!r}")
    return value


def page_identity(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """This host's half of the page stream's TLS, made before the freeze: an ephemeral key
    and certificate (kept root-only for the restore), the certificate answered. The source
    pins it; the restore's request brings the source's (``live.page_server_address``)."""
    tag = operation_tag(req["tag"])
    me = Identity()
    CriuTls.write(LxcCheckpointer(end.cts).page_tls_dir(tag), me.key_pem(), me.der)
    return {"cert": me.encoded()}


def page_stream(req: dict[str, Any]) -> socket.socket:
    """The post-copy page stream's connection through the client's SSH forward on this
    host's loopback, opened by this agent (root) and shown the tunnel's token: the tunnel
    relays nothing else, so another local user who reaches the port gets nowhere."""
    if "token" not in req:
        raise errors.InvalidInput("the page stream's token is missing")
    token = _token(req["token"])
    sock = socket.create_connection(("127.0.0.1", _port(req.get("port"))), timeout=10)
    try:
        sock.sendall(token)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


LIVE_OPS: dict[str, Handler] = {
    "live_check": live_check,
    "page_identity": page_identity,
    "receive_images": receive_images,
    "checkpoint_restore": checkpoint_restore,
    "live_settle": live_settle,
    "drop_images": drop_images,
}

#: requests that, once read, wait on this host with nothing more to read from the channel:
#: the agent watches their channel and gives them up when it ends (``agent.py``)
WATCHED_OPS = frozenset({"checkpoint_restore"})
