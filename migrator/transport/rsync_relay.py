"""rsync's delta protocol between this host and an agent: refresh across different drivers.

When the two pools share no native stream (dir <-> btrfs <-> zfs), a refresh must not send
the whole tree again. rsync already knows how to send only what changed (and keeps hard
links, sparse files, xattrs, ACLs and numeric owners, like the local fallback), so it is
run as is: the local rsync is the client, ``rsync --server`` runs on the far host, and the
two talk over one agent channel instead of an ssh of their own:

1. the local rsync is started with ``--rsh`` = ``rsync_shim`` and a placeholder target;
2. the shim passes its stdin/stdout pipes and the server argv to this relay (a unix socket
   in a private directory) and steps aside;
3. the relay asks the agent for ``rsync_receive``: the agent checks the argv against a short
   allow-list, puts the volume's path in place of the target, answers "ready" and *execs*
   rsync on the channel, so the far side has no Python in the data path;
4. the relay copies bytes both ways, counting them (what crossed the link), and finally
   hands the far rsync's exit status to the shim, which exits with it.

The client never names a path on the far host, and nothing runs through a shell there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.backends.generic import rsync_tree
from migrator.core import errors
from migrator.streams import ProgressMeter
from migrator.transport.base import Transport

CHUNK = 1 << 20
SHIM_WAIT = 30.0

# What a far rsync may be asked to run with (the arguments our own client sends for
# ``rsync_tree``'s flags): anything else is refused by the agent.
_BUNDLE_LETTERS = set("lHogDtpAXrcS")
_LONG_OPTIONS = {"--server", "--delete", "--stats", "--numeric-ids", "-@-1",
                 "--compress-choice=zstd", "--compress"}


def server_args(args: Any) -> list[str]:
    """Validate the ``rsync --server`` arguments a client asks an agent to run.

    Accepted: ``rsync --server -<flags>e.<caps> [known long options] . <placeholder>``; the
    returned list stops before the placeholder, which the agent replaces by the volume path.
    """
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise errors.InvalidInput("rsync arguments must be a list of strings")
    if len(args) < 5 or args[0] != "rsync" or args[1] != "--server" or args[-2] != ".":
        raise errors.InvalidInput(f"not an rsync receiver command: {args[:3]}")
    for a in args[2:-2]:
        if a in _LONG_OPTIONS:
            continue
        flags, _, caps = a.partition("e.")
        if a.startswith("-") and flags[1:] and set(flags[1:]) <= _BUNDLE_LETTERS and \
                caps.isalpha() and "--sender" not in args:
            continue
        raise errors.InvalidInput(f"rsync option {a!r} is not allowed through the agent")
    return args[:-1]


@dataclass
class RsyncResult:
    literal: int  # file data rsync sent (not matched on the far side)
    wire: int  # bytes that crossed the channel, both directions


def start_client(listener: socket.socket, run: Callable[[], dict[str, Any]]
                 ) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the local rsync (``run``, returning its results) in a thread. Its results, or
    its error under ``"error"``, land in the returned dict; when it ends the listener is
    shut down, so an ``accept`` still waiting for its shim returns at once."""
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            outcome.update(run())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e
        finally:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)

    runner = threading.Thread(target=client, daemon=True)
    runner.start()
    return runner, outcome


def rsync_push(transport: Transport, src: Path, request: dict[str, Any], exact_times: bool,
               compress: bool, meter: ProgressMeter | None = None) -> RsyncResult:
    """Make the agent-side volume named by ``request`` (pool, volume) a copy of ``src``."""
    with shim_socket() as (listener, path):
        runner, outcome = start_client(listener, lambda: {"literal": rsync_tree(
            src, "agent:/volume", meter, checksum=not exact_times, exact_times=exact_times,
            compress=compress, rsh=shim_rsh(path))})
        wire = 0
        try:
            listener.settimeout(SHIM_WAIT)
            try:
                conn, _ = listener.accept()
            except OSError:
                conn = None
            if conn is not None:
                with conn:
                    wire = _serve_shim(transport, conn, request)
        finally:
            listener.close()
            runner.join()
        if "error" in outcome:
            raise outcome["error"]
        if "literal" not in outcome:
            raise errors.CommandFailed(["rsync"], 255, "rsync did not start its transfer")
        return RsyncResult(outcome["literal"], wire)


def _serve_shim(transport: Transport, conn: socket.socket, request: dict[str, Any]) -> int:
    """Take the shim's pipes, open the agent's rsync and copy bytes both ways."""
    from_rsync, to_rsync, args = receive_pipes(conn)
    status = 255
    sent = received = 0
    try:
        chan = transport.open_raw("rsync_receive", {**request, "args": args})
        try:
            def upload() -> None:
                nonlocal sent
                try:
                    while chunk := os.read(from_rsync, CHUNK):
                        chan.sendall(chunk)
                        sent += len(chunk)
                    chan.shutdown_write()
                except OSError:
                    pass  # the channel went away: the download side sees it too

            up = threading.Thread(target=upload, daemon=True)
            up.start()
            with contextlib.suppress(OSError):
                while chunk := chan.recv(CHUNK):
                    os.write(to_rsync, chunk)
                    received += len(chunk)
            os.close(to_rsync)
            to_rsync = -1
            status = chan.recv_exit_status() if chan.status_event.wait(30) else 255
            # the shim exits with it, then rsync does, closing the pipe the uploader reads:
            # the status must go out before waiting for the uploader
            release_shim(conn, status)
            up.join(30)
        finally:
            chan.close()
    finally:
        for fd in (from_rsync, to_rsync):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        release_shim(conn, status)
    return sent + received


def release_shim(conn: socket.socket, status: int) -> None:
    """Send the far rsync's exit status to the shim (once; later calls do nothing)."""
    if conn.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        conn.sendall(bytes([status & 0xFF if status >= 0 else 255]))
    conn.close()


# shared with p2c's pull (``migrator.p2c.pull``: the rsync client on the target, the sender on a
# machine reached over SSH) ----------------------------------------------------------------
@contextlib.contextmanager
def shim_socket() -> Iterator[tuple[socket.socket, str]]:
    """A listening unix socket in a private (0700) directory for ``rsync_shim``."""
    with tempfile.TemporaryDirectory(prefix="migrator-rsync-") as tmp:
        os.chmod(tmp, 0o700)
        path = str(Path(tmp) / "relay")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            yield listener, path
        finally:
            listener.close()


def shim_rsh(path: str) -> str:
    """The ``--rsh`` value that makes rsync hand its pipes to the socket at ``path``."""
    return f"{sys.executable} -m migrator.transport.rsync_shim {path}"


def receive_pipes(conn: socket.socket) -> tuple[int, int, list[str]]:
    """The shim's two pipe ends (rsync's output, rsync's input) and the remote argv."""
    conn.settimeout(SHIM_WAIT)
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise errors.CommandFailed(["rsync"], 255, "the rsync shim sent no pipes")
    for fd in fds:
        # rsync made its socket pair non-blocking; a relay writing into a full one would
        # get EAGAIN and drop data, so this end blocks
        os.set_blocking(fd, True)
    args = json.loads(msg)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        for fd in fds:
            os.close(fd)
        raise errors.CommandFailed(["rsync"], 255, "the rsync shim sent no argument list")
    return fds[0], fds[1], args


# What a sender run on another machine for our own pulling client may be asked: the
# letters and options ``migrator.p2c.pull`` makes its client send, nothing that writes there
# (--remove-source-files, --log-file...), and the source root only.
_SENDER_LETTERS = set("lHogDtprAXSx")
_SENDER_OPTIONS = {"--server", "--sender", "--numeric-ids", "-@-1"}


def sender_args(args: Any) -> list[str]:
    """Validate ``rsync --server --sender -<flags>e.<caps> [options] . /`` (exact)."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise errors.InvalidInput("rsync arguments must be a list of strings")
    if len(args) < 6 or args[:3] != ["rsync", "--server", "--sender"] or \
            args[-2:] != [".", "/"]:
        raise errors.InvalidInput(f"not an rsync sender for /: {args[:4]}")
    for a in args[3:-2]:
        if a in _SENDER_OPTIONS:
            continue
        flags, _, caps = a.partition("e.")
        if a.startswith("-") and not a.startswith("--") and flags[1:] and \
                set(flags[1:]) <= _SENDER_LETTERS and caps.isalpha():
            continue
        raise errors.InvalidInput(f"rsync option {a!r} is not allowed for the source")
    return list(args)
