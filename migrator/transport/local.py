"""This host as the far end: requests answered in process, for a conversion into a local
container (``migrate p2c ... --to local``), so one client serves both cases.

The answers come from the agent's own dispatcher, which the top floor hands in (a
:class:`~migrator.transport.base.RequestHandler` and a
:class:`~migrator.transport.base.ChannelServer`): the transport layer carries requests and
knows nothing of what serves them. A request whose channel carries another protocol
(``p2c_pull``) runs on a socket pair, served in a thread of its own.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from migrator.core import errors
from migrator.streams import ProgressMeter, Stream
from migrator.transport.base import CallHandler, ChannelServer, EventHandler, RequestHandler
from migrator.transport.frames import PROTOCOL, read_json, write_json
from migrator.transport.replies import remote_error

THREAD_WAIT = 30.0  # seconds for a raw request's server thread to end when this closes


def _no_data(n: int) -> bytes:
    return b""


class LocalTransport:
    """Requests to this host, answered in this process by ``handle`` (and ``serve`` for a
    raw one): no connection, no data link to negotiate."""

    name = "local"

    def __init__(self, handle: RequestHandler, serve: ChannelServer) -> None:
        self.handle, self.serve = handle, serve
        self.fast_link = False
        self.data_link = "ssh"
        self.link_rate: float | None = None
        self.link_failed = ""
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the raw requests' server threads (their channels are closed by then)."""
        for t in self._threads:
            t.join(THREAD_WAIT)

    def warm(self, n: int) -> None:
        """Nothing to start: requests are answered in this process."""

    def request(self, op: str, args: dict[str, Any] | None = None,
                stream: Stream | None = None, compress: str = "none",
                meter: ProgressMeter | None = None, on_event: EventHandler | None = None,
                on_call: CallHandler | None = None) -> dict[str, Any]:
        """The handler's answer (no data streams: none is needed in process)."""
        if stream is not None:
            raise errors.InvalidInput(f"{op!r} with a data stream cannot be served in process")
        return self.handle(op, dict(args or {}), _no_data)

    def open_raw(self, op: str, args: dict[str, Any]) -> socket.socket:
        mine, theirs = socket.socketpair()

        def run() -> None:
            try:
                self.serve(theirs.recv, theirs.sendall)
            finally:
                theirs.close()

        t = threading.Thread(target=run, daemon=True)
        self._threads.append(t)
        t.start()
        write_json(mine.sendall, {"op": op, "protocol": PROTOCOL, **args})
        reply = read_json(mine.recv)
        if not reply.get("ok"):
            mine.close()
            raise remote_error(self.name, reply.get("error") or {})
        return mine
