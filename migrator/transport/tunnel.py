"""A TCP tunnel through the SSH connection: CRIU's lazy-pages stream from target to source.

Why: in post-copy the target's ``criu lazy-pages`` daemon connects to the page server that
``criu dump --lazy-pages`` runs on the source. The two hosts need not reach each other (only
this client reaches both), and the page stream must be encrypted and authenticated like every
other byte. So the target's sshd listens on its loopback (an SSH remote forward, which
OpenSSH allows by default: ``AllowTcpForwarding``), each connection arrives here as a channel,
and is relayed to the page server, opened by ``connect`` (in the source's network namespace).

The relay counts bytes both ways and remembers the first error, so the pipeline can tell a
stream that ended cleanly from one that was cut.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import paramiko

from migrator import errors

log = logging.getLogger(__name__)

CHUNK = 1 << 20


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
        with self._lock:
            if self._closed:
                chan.close()
                return
            self.connections += 1
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
        try:
            while data := sock.recv(CHUNK):
                chan.sendall(data)
                self.to_target += len(data)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"page stream to the target broke: {e or type(e).__name__}")
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.shutdown_write()

    def _up(self, chan: paramiko.Channel, sock: socket.socket) -> None:
        """Target (page requests) -> page server."""
        try:
            while data := chan.recv(CHUNK):
                sock.sendall(data)
                self.to_source += len(data)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(f"page requests from the target broke: {e or type(e).__name__}")
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Close every relayed connection now (fault tests: the link dies mid-stream)."""
        for o in list(self._open):
            with contextlib.suppress(Exception):
                o.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(Exception):
            if self.port:
                self.t.cancel_port_forward("127.0.0.1", self.port)
        for th in self._threads:
            th.join(timeout=5)
        self.cut()
