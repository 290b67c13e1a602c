"""Post-copy pages over a direct TCP connection between the hosts, in criu's own TLS.

Why: through the SSH remote forward (``tunnel.py``) every page crosses paramiko, a Python
relay that carries 30-40 MB/s, so a 1 GB post-copy migration took 3-4 times as long as
stop-and-copy. Here the two criu processes talk TLS to each other (``criu --tls``, GnuTLS,
mutual authentication), and the bytes between them cross this process only through
``splice(2)``: kernel pipes, no copy into Python, no per-packet Python work.

Trust comes from the SSH channel, as for the data link (``link.py``): each host makes an
ephemeral key and self-signed certificate, the certificates cross inside the channel, and
each criu trusts exactly the other's (``checkpoint.base.CriuTls``: the peer's certificate is
its only CA; the certificate, not a name, is the identity). A stranger who reaches the
port, or who is handed the connection, cannot read a page nor feed a false one: the TLS
handshake fails and the migration rolls back with the source's memory kept.

The listener (port 0 on the address the SSH connection leaves from, in this host's network
namespace) admits one connection: the first one from the target's address (the address its
sshd answers on). Anything else is closed unheard, and no connection is taken after the
first one. There is no token in front of the stream, as the SSH forward has, because the
target's criu makes the connection itself: criu 4.x runs its TLS only on a connection it
made, not on a socket handed in (``--ps-socket``). A stranger on the target's own address
who connects first gets the TLS handshake, fails it, and the migration rolls back.

The relay counts bytes both ways and remembers the first error, as the tunnel does, so the
pipeline can tell a clean end from a cut.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from migrator.transport.link import listen

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes moved by one splice(2)


def splice_relay(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Move bytes from ``src`` to ``dst`` until ``src`` ends, through a kernel pipe
    (``splice(2)`` both ways: the data never enters this process); then half-close
    ``dst``. Raises OSError when either side fails."""
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):  # a bigger pipe, fewer calls (fs.pipe-max-size)
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        while n := os.splice(src.fileno(), w, CHUNK):
            while n:
                moved = os.splice(r, dst.fileno(), n)
                n -= moved
                count(moved)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    finally:
        os.close(r)
        os.close(w)


class PageLink:
    """A listener for the target's page-stream connection, relayed to ``connect()``."""

    def __init__(self, address: str, netns: str | None, peer: str,
                 connect: Callable[[], socket.socket]) -> None:
        self.connect = connect
        self.listener: socket.socket | None = listen(address, netns)
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.peer = peer  # the only address a connection is taken from
        self.to_target = 0  # bytes from the page server to the lazy-pages daemon
        self.to_source = 0
        self.connections = 0
        self.refused = 0  # connections from elsewhere, or after the first: closed unheard
        self.error: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop, "page-link-accept")

    def describe(self) -> dict[str, Any]:
        """What the target's agent needs to connect (it travels inside the SSH channel)."""
        return {"address": self.address, "port": self.port}

    def _spawn(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        th = threading.Thread(target=fn, args=args, daemon=True, name=name)
        th.start()
        self._threads.append(th)

    def _accept_loop(self) -> None:
        listener = self.listener
        assert listener is not None
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # closed: admitted, or the migration is over
            with self._lock:
                ok = peer[0] == self.peer and not self.connections and not self._closed
                if ok:
                    self.connections = 1
                else:
                    self.refused += 1
            if not ok:
                log.warning("page link: closed a connection from %s (not the target)", peer[0])
                conn.close()
                continue
            self._close_listener()  # one connection only
            self._relay_with(conn)
            return

    def _relay_with(self, conn: socket.socket) -> None:
        try:
            server = self.connect()
        except OSError as e:
            self._fail(f"cannot reach the page server: {e}")
            conn.close()
            return
        self._open += [conn, server]
        self._spawn(self._relay, "page-link-down", server, conn, True)
        self._spawn(self._relay, "page-link-up", conn, server, False)

    def _relay(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        def count(n: int) -> None:
            if down:
                self.to_target += n
            else:
                self.to_source += n

        try:
            splice_relay(src, dst, count)
        except OSError as e:
            self._fail(f"the page stream broke: {e.strerror or e}")
            for s in (src, dst):  # the other direction ends too
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _fail(self, what: str) -> None:
        with self._lock:
            if self.error is None and not self._closed:
                self.error = what
                log.warning("page link: %s", what)

    def _close_listener(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
            listener.close()

    def cut(self) -> None:
        """Break the stream now (tests: a link cut in the middle of the pages)."""
        for s in list(self._open):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._close_listener()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._open = []
