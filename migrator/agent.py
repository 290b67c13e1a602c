"""``migrate agent``: the far side of a host-to-host operation, one request at a time.

The client opens an SSH channel and runs ``migrate --root R agent`` there. The first frame
is the JSON request ``{"op": ..., "protocol": N, ...}``; a ``receive`` request is followed
by DATA frames and an END trailer; the agent answers with one JSON frame: ``{"ok": true,
...}`` or ``{"ok": false, "error": {"type", "message", "hint"}}``.

A request that carries ``"session": true`` (the client sends it with requests that have no
data stream and no calls back) keeps the agent for the next one: its successful reply says
``"session": true`` and the agent then waits on the same channel for another request, until
the channel ends. Starting an agent costs sshd's session, Python and its imports (~0.3 s,
more on a busy host); a migration's dozen small requests no longer pay it each. After a
failure, a watched request or one that handed its channel to another program, the agent
ends as before, so a channel is only ever reused in a state both ends know.

The agent only dispatches: it parses a request, looks its handler up in :data:`OPS` and
writes the reply. Each handler lives beside the pipeline whose far end it is (a push's in
``pipelines/remote_target.py``, live migration's in ``pipelines/live_target.py``, a
conversion's in ``p2c/target.py``, a remote repository's in ``backup/remote.py`` (a chunked
one's object store in ``backup/sshstore.py``), a
delegated push in ``pipelines/delegated.py``). This is the top floor: nothing below imports
it; what must answer requests in process (``transport/local.py``) is handed
:func:`local_transport`'s dispatcher as a parameter.

An agent notices when its channel ends. A dropped SSH connection closes the agent's stdin
(sshd sends no signal to a session without a terminal), which a request that reads its
channel sees at once; one that waits on this host with nothing more to read (a live
migration's restore, waiting for pages: ``live_target.WATCHED_OPS``) would wait on,
orphaned, holding what it started. For those a thread watches stdin and, when it closes,
turns it into the SIGTERM path below: the handler unwinds and gives up its own half.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from migrator.core import errors, proc
from migrator.pipelines.remote_target import Handler, RemoteTarget
from migrator.runtime.containers import Containers
from migrator.runtime.host import Host
from migrator.transport.base import Transport
from migrator.transport.frames import (
    PROTOCOL,
    DataWriter,
    ProtocolError,
    Reader,
    read_json,
    write_json,
)
from migrator.transport.local import LocalTransport
from migrator.transport.replies import error_reply

_TARGET = ("migrator.pipelines.remote_target", "TARGET_OPS")
_LIVE = ("migrator.pipelines.live_target", "LIVE_OPS")
_P2C = ("migrator.p2c.target", "P2C_OPS")

#: every request this agent answers, by its name on the wire: the module its handler lives
#: in and the name there (a table of handlers, or the handler itself). A module is imported
#: when its first request comes: an agent serves a few kinds of request, and importing
#: every handler's module (backups, conversions, live migration, TLS) cost ~0.1 s of each
#: agent's start. tests/unit/test_agent_ops.py holds this table to the modules' own.
HOMES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("hello", "container_state", "receive", "commit_container",
                     "rsync_receive", "snapshot_volume", "abort_container", "delete_snapshot",
                     "sink", "start", "delete_container", "sync_container"), _TARGET),
    **dict.fromkeys(("live_check", "page_identity", "receive_images", "checkpoint_restore",
                     "live_settle", "drop_images"), _LIVE),
    "delegate": ("migrator.pipelines.delegated", "delegate"),
    "evacuate": ("migrator.pipelines.evacuate", "serve_evacuate"),
    **dict.fromkeys(("p2c_pull", "p2c_finish"), _P2C),
    "repository": ("migrator.backup.remote", "serve_repository"),
    "backup_restore": ("migrator.backup.remote", "serve_restore"),
    "objects": ("migrator.backup.sshstore", "serve_objects"),
}

#: requests that, once read, wait on this host with nothing more to read from the channel
#: (``live_target.WATCHED_OPS``, which the test above holds this to): the agent watches
#: their channel and gives them up when it ends
WATCHED_OPS = frozenset({"checkpoint_restore"})


class _Handlers(dict[str, Handler]):
    """The handlers by request name, each looked up in ``HOMES`` on first use."""

    def __missing__(self, op: str) -> Handler:
        home = HOMES.get(op)
        if home is None:
            raise KeyError(op)
        found = getattr(importlib.import_module(home[0]), home[1])
        handler: Handler = found[op] if isinstance(found, dict) else found
        self[op] = handler
        return handler


OPS = _Handlers()


def handler_for(op: str) -> Handler | None:
    try:
        return OPS[op]
    except KeyError:
        return None


def serve(cts_factory: Callable[[], Containers], read: Reader, write: DataWriter,
          channel_fd: int | None = None) -> int:
    """Handle one request from ``read``; answer on ``write``. Returns the exit status.
    ``channel_fd``: the descriptor ``read`` reads (stdin), watched during a request of
    ``WATCHED_OPS`` (see the module docstring)."""
    while True:
        status, again = _serve_one(cts_factory, read, write, channel_fd)
        if not again:
            return status
        try:  # the next request of the session; the channel's end is the session's
            first = read(1)
        except (OSError, EOFError):
            return 0
        if not first:
            return 0
        read = _prepend(first, read)


def _prepend(first: bytes | memoryview, read: Reader) -> Reader:
    """``read`` with ``first`` (already read, to tell the channel's end from a request) in
    front of what it returns."""
    pending = [first]

    def reader(n: int = -1, /) -> bytes | memoryview:
        if pending:
            return pending.pop()
        return read(n)
    return reader


def _serve_one(cts_factory: Callable[[], Containers], read: Reader, write: DataWriter,
               channel_fd: int | None) -> tuple[int, bool]:
    """One request and its reply: (exit status, whether the session goes on)."""
    done = threading.Event()
    try:
        req = read_json(read)
        session = req.pop("session", None) is True
        if req.get("protocol") != PROTOCOL:
            raise ProtocolError(
                f"protocol {req.get('protocol')} requested; this agent speaks {PROTOCOL}",
                "install the same migrator version on both hosts")
        op = handler_for(str(req.get("op")))
        if op is None:
            raise errors.InvalidInput(f"unknown agent request {req.get('op')!r}")
        end = RemoteTarget(cts_factory(), lambda ev: write_json(write, ev))
        end.write = write
        # the client logged in here as root over SSH: it could run anything, so what it
        # sends may be privileged (a pull's source host, which is not, never gets here)
        end.peer, end.allow_privileged = "the client", True
        if channel_fd is not None and req.get("op") in WATCHED_OPS:
            threading.Thread(target=_watch_channel, args=(channel_fd, done), daemon=True,
                             name="channel-watch").start()
        result = op(end, req, read)
        done.set()
        again = session and not end.exec_after_reply and req.get("op") not in WATCHED_OPS
        write_json(write, {"ok": True, **result, **({"session": True} if again else {})})
        if end.exec_after_reply:
            proc.exec_replace(end.exec_after_reply)
        return 0, again
    except (KeyError, TypeError, ValueError) as e:
        done.set()
        write_json(write, error_reply(errors.InvalidInput(f"malformed request: {e!r}")))
        return errors.InvalidInput.exit_code, False
    except BaseException as e:  # noqa: BLE001 - every failure becomes a typed reply
        done.set()
        with contextlib.suppress(OSError):  # the channel is gone: nobody to tell
            write_json(write, error_reply(e))
        return getattr(e, "exit_code", 1), False


def _watch_channel(fd: int, done: threading.Event) -> None:
    """Wait until ``fd`` (the channel's read side) ends, then SIGTERM this process, unless
    the request is ``done`` first. Nothing more is sent on the channel of a watched
    request; bytes that come anyway are read and dropped."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while not done.is_set():
        events = poller.poll(500)
        ended = False
        for _fd, ev in events:
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                ended = True
            elif ev & select.POLLIN:
                try:
                    ended = not os.read(fd, 1 << 16)
                except OSError:
                    ended = True
        if ended and not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            return


def local_transport(cts: Containers) -> Transport:
    """This host as a transport, answered in process by the agent's handlers (a conversion
    into a local container). A raw request (``p2c_pull``) is served in a thread with its own
    state connection: SQLite connections stay in the thread that made them."""
    root = cts.host.root

    def handle(op: str, req: dict[str, Any], read: Reader) -> dict[str, Any]:
        return OPS[op](RemoteTarget(cts), req, read)

    def serve_here(read: Reader, write: DataWriter) -> int:
        host = Host(root)
        try:
            return serve(lambda: Containers(host), read, write)
        finally:
            host.close()

    return LocalTransport(handle, serve_here)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main_stdio(cts_factory: Callable[[], Containers]) -> int:
    # a dropped SSH connection sends SIGHUP: unwind normally so partial receives are removed
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def write(b: bytes | memoryview) -> None:
        stdout.write(b)
        stdout.flush()

    return serve(cts_factory, stdin.read1 if hasattr(stdin, "read1") else stdin.read, write,
                 channel_fd=stdin.fileno())
