"""What every transport to an agent promises: the contract the pipelines are written against.

A pipeline (a push, a move, a live migration, a conversion, a remote backup repository)
talks to "the far end" only through :class:`Transport`, and does not know what carries its
requests. Three transports keep that promise:

- ``transport/ssh.py`` ``SshTransport``: an inventory host's agent, one SSH channel per
  request (the usual case);
- ``transport/reverse.py`` ``ReverseTransport``: the client that asked for a pull, answering
  up the very channel the pushing agent was started on;
- ``transport/local.py`` ``LocalTransport``: this host itself, answered in process by the
  agent's dispatcher, which the top floor hands in as a :class:`RequestHandler` (so nothing
  below the agent imports it).

The design decision: one ``request`` signature for all three, so a pipeline never asks which
transport it holds. What a transport cannot do it refuses with a typed error (the reverse
channel carries no raw protocol) or quietly does without (no data link to negotiate in
process), and says so in the attributes the negotiation reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, Self

from migrator.streams import ProgressMeter, Stream
from migrator.transport.frames import DataWriter, Reader, Writer

# a message the far end sends before its reply (``{"event": ...}``), for the caller to show
EventHandler = Callable[[dict[str, Any]], None]
# a request the far end sends back during a pull (``{"call": ...}``), served with the
# channel's reader and writer (``reverse.py``)
CallHandler = Callable[[dict[str, Any], Reader, Writer], None]


class Transport(Protocol):
    """A connection to one agent: requests in, typed replies out.

    ``request`` sends one request (with a volume stream to upload, if given, framed and
    compressed with ``compress``) and returns the agent's reply, already parsed and checked
    (``replies.parse_reply``): an error reply is raised here as the agent's own error class
    with its exit code, a broken connection as ``NetworkError``. Events before the reply go
    to ``on_event``; calls back (a pull) to ``on_call``, and a transport that gets one with
    no ``on_call`` refuses it.

    ``open_raw`` starts a request whose channel then carries another protocol (rsync's, a
    repository's parts): the agent's "ready" reply is read, the open byte channel returned
    (``recv``/``sendall``/``close``).

    ``warm(n)`` may start agents ahead of the requests to come (a live migration must not
    wait for start-up while the container is frozen); ``close`` ends the connection. A
    transport is a context manager that closes itself.

    The data link attributes are what ``pipelines.remote_copy.negotiate_session`` reads and
    sets: ``data_link`` (the inventory's "auto", "tcp" or "ssh"), ``link_rate`` (bytes/s
    measured, or None), ``fast_link`` (offer the direct TCP link on uploads) and
    ``link_failed`` (why that link failed in this process, "" if it did not).
    """

    name: str
    fast_link: bool
    data_link: str
    link_rate: float | None
    link_failed: str

    def request(self, op: str, args: dict[str, Any] | None = None,
                stream: Stream | None = None, compress: str = "none",
                meter: ProgressMeter | None = None, on_event: EventHandler | None = None,
                on_call: CallHandler | None = None) -> dict[str, Any]: ...

    def open_raw(self, op: str, args: dict[str, Any]) -> Any: ...

    def warm(self, n: int) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class RequestHandler(Protocol):
    """This host's answer to one agent request: the agent's dispatcher, handed down as a
    parameter to what must serve requests in process (``LocalTransport``, a pull's calls)
    by the top floor that owns it, since nothing below the agent may import it.

    It returns the reply's fields (``{"ok": true}`` is added by whoever writes the reply)
    or raises the typed error that becomes the error reply; ``read`` gives the request's
    data frames, if it has any."""

    def __call__(self, op: str, req: dict[str, Any], read: Reader) -> dict[str, Any]: ...


class ChannelServer(Protocol):
    """Serves one whole request on a byte channel, as the agent does on its stdin and
    stdout: the request frame is read from ``read``, the reply (and any data) written to
    ``write``; returns the agent's exit status. ``LocalTransport.open_raw`` runs one in a
    thread of its own for a request whose channel carries another protocol."""

    def __call__(self, read: Reader, write: DataWriter) -> int: ...
