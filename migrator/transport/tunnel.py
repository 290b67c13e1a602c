"""A TCP tunnel through the SSH connection: CRIU's lazy-pages stream from target to source.

Why: in post-copy the target's ``criu lazy-pages`` daemon reads pages from the page server
that ``criu dump --lazy-pages`` runs on the source. The two hosts need not reach each other
(only this client reaches both), and the page stream must be encrypted and authenticated like
every other byte. So the target's sshd listens on its loopback (an SSH remote forward, which
OpenSSH allows by default: ``AllowTcpForwarding``), each connection arrives here as a channel,
and is relayed to the page server's socket, given by ``connect``.

The page stream is the container's memory, so no other local user may reach it on either
host. Neither CRIU listens anywhere: both are handed an already connected socket
(``--ps-socket``). On the source that is one end of ``socket_pair()``, made by this process;
on the target the agent (root) connects to the forward itself and hands that connection to
``criu lazy-pages``. The forward's port on the target's loopback is the one thing another
local user could reach, so a connection there is relayed only after it has sent the
tunnel's ``token`` (32 random bytes, given to the agent inside the SSH channel); anything
else is closed unheard, and only one connection is ever relayed.

The relay counts bytes both ways and remembers the first error, so the pipeline can tell a
stream that ended cleanly from one that was cut.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from migrator.core import errors

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TOKEN_BYTES = 32
HELLO_WAIT = 10.0  # seconds a connection to the forward has to show the token
PAIR_WAIT = 5.0


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback, no listener left behind: one for CRIU
    (``--ps-socket``), one for the relay. A listener exists only while the pair is made; a
    connection to it from anyone else is closed, and only ours is taken."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.socket()
    try:
        listener.settimeout(PAIR_WAIT)
        ours.connect(listener.getsockname())
        deadline = time.monotonic() + PAIR_WAIT
        while time.monotonic() < deadline:
            theirs, peer = listener.accept()
            if peer == ours.getsockname():
                return ours, theirs
            theirs.close()  # somebody else's
        raise TimeoutError("the page stream's socket pair could not be made")
    except BaseException:
        ours.close()
        raise
    finally:
        listener.close()


class PageTunnel:
    """``127.0.0.1:port`` on the transport's host -> ``connect()`` on this side."""

    def __init__(self, ssh_transport: paramiko.Transport, connect: Callable[[], socket.socket]
                 ) -> None:
        self.t = ssh_transport
        self.connect = connect
        self.port = 0
        self.to_target = 0  # bytes from the page server to the lazy-pages daemon
        self.to_source = 0
        self.connections = 0
        self.error: str | None = None
        self.token = secrets.token_bytes(TOKEN_BYTES)  # the agent's connection shows it
        self.refused = 0  # connections to the forward without the token: closed unheard
        self._admitted = False
        self._waiting: list[paramiko.Channel] = []  # connections yet to show the token
        self._threads: list[threading.Thread] = []
        self._open: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def open(self) -> int:
        """Ask the far sshd to listen on its loopback; the port it chose."""
        try:
            self.port = int(self.t.request_port_forward("127.0.0.1", 0, self._accept))
        except paramiko.SSHException as e:
            raise errors.NetworkError(
                f"the target's sshd refused a port forward for the page stream: {e}",
                "allow it (sshd_config: AllowTcpForwarding remote), or use "
                "--mode stop-and-copy") from e
        return self.port

    def _accept(self, chan: paramiko.Channel, origin: Any, server: Any) -> None:
        # called in paramiko's transport thread: the token is awaited in a thread of its
        # own, so that a silent connection holds up nothing
        with self._lock:
            if self._closed:
                chan.close()
                return
        self._waiting.append(chan)
        th = threading.Thread(target=self._admit, args=(chan,), daemon=True,
                              name="page-tunnel-admit")
        th.start()
        self._threads.append(th)

    def _admit(self, chan: paramiko.Channel) -> None:
        """Relay ``chan`` once it has shown the token; close it otherwise."""
        got = b""
        try:
            chan.settimeout(HELLO_WAIT)
            while len(got) < TOKEN_BYTES:
                piece = chan.recv(TOKEN_BYTES - len(got))
                if not piece:
                    break
                got += piece
            chan.settimeout(None)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        with self._lock:
            ok = (len(got) == TOKEN_BYTES and hmac.compare_digest(got, self.token)
                  and not self._admitted and not self._closed)
            if ok:
                self._admitted = True
                self.connections += 1
            else:
                self.refused += 1
        if not ok:
            log.warning("page tunnel: closed a connection to the forward that did not show "
                        "the token (another local user on the target?)")
            chan.close()
            return
        try:
            sock = self.connect()
        except OSError as e:
            self._fail(f"cannot reach the page server: {e}")
            chan.close()
            return
        self._open += [chan, sock]
        for fn in (self._down, self._up):
            th = threading.Thread(target=fn, args=(chan, sock), daemon=True,
                                  name=f"page-tunnel-{fn.__name__}")
            th.start()
            self._threads.append(th)

    def _fail(self, what: str) -> None:
        with self._lock:
            if self.error is None and not self._closed:
                self.error = what
                log.warning("page tunnel: %s", what)

    def _down(self, chan: paramiko.Channel, sock: socket.socket) -> None:
        """Page server -> target."""
        def count(n: int) -> None:
            self.to_target += n

        self._relay(sock.recv, chan.sendall, count, chan.shutdown_write,
                    "page stream to the target")

    def _up(self, chan: paramiko.Channel, sock: socket.socket) -> None:
        """Target (page requests) -> page server."""
        def count(n: int) -> None:
            self.to_source += n

        self._relay(chan.recv, sock.sendall, count, lambda: sock.shutdown(socket.SHUT_WR),
                    "page requests from the target")

    def _relay(self, recv: Callable[[int], bytes], send: Callable[[bytes], object],
               count: Callable[[int], None], end: Callable[[], object], what: str) -> None:
        """One direction until its sender ends: every byte counted as it passes (the
        pipeline reads the counts), the first error kept (``_fail``), and the other side
        told the stream ended (a half-close, so the opposite direction goes on)."""
        try:
            while data := recv(CHUNK):
                send(data)
                count(len(data))
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"{what} broke: {e or type(e).__name__}")
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                end()

    def cut(self) -> None:
        """Close every relayed connection now (fault tests: the link dies mid-stream)."""
        for o in list(self._open):
            with contextlib.suppress(Exception):
                o.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for chan in self._waiting:  # a silent connection must not hold up the join below
            with contextlib.suppress(Exception):
                if not self._admitted or chan not in self._open:
                    chan.close()
        with contextlib.suppress(Exception):
            if self.port:
                self.t.cancel_port_forward("127.0.0.1", self.port)
        for th in self._threads:
            th.join(timeout=5)
        self.cut()
