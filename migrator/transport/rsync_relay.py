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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator import errors
from migrator.backends.generic import rsync_tree
from migrator.streams import ProgressMeter

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


def rsync_push(transport: Any, src: Path, request: dict[str, Any], exact_times: bool,
               compress: bool, meter: ProgressMeter | None = None) -> RsyncResult:
    """Make the agent-side volume named by ``request`` (pool, volume) a copy of ``src``."""
    with tempfile.TemporaryDirectory(prefix="migrator-rsync-") as tmp:
        os.chmod(tmp, 0o700)
        path = str(Path(tmp) / "relay")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        outcome: dict[str, Any] = {}

        def client() -> None:
            try:
                outcome["literal"] = rsync_tree(
                    src, "agent:/volume", meter, checksum=not exact_times,
                    exact_times=exact_times, compress=compress,
                    rsh=f"{sys.executable} -m migrator.transport.rsync_shim {path}")
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = e
            finally:
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)

        runner = threading.Thread(target=client, daemon=True)
        runner.start()
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


def _serve_shim(transport: Any, conn: socket.socket, request: dict[str, Any]) -> int:
    """Take the shim's pipes, open the agent's rsync and copy bytes both ways."""
    conn.settimeout(SHIM_WAIT)
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise errors.CommandFailed(["rsync"], 255, "the rsync shim sent no pipes")
    from_rsync, to_rsync = fds
    status = 255
    sent = received = 0
    try:
        chan = transport.open_raw("rsync_receive", {**request, "args": json.loads(msg)})
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
            _release_shim(conn, status)
            up.join(30)
        finally:
            chan.close()
    finally:
        for fd in (from_rsync, to_rsync):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _release_shim(conn, status)
    return sent + received


def _release_shim(conn: socket.socket, status: int) -> None:
    """Send the far rsync's exit status to the shim (once; later calls do nothing)."""
    if conn.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        conn.sendall(bytes([status & 0xFF if status >= 0 else 255]))
    conn.close()
