"""Requests sent back to the client over the channel an agent was started on: pulls.

``migrate copy host-a:c1 c1`` copies *to* the host the command runs on, which host a may
not be able to reach (no sshd here, no route back). So the client asks host a's agent to
push as usual (``delegate``), with this transport as the target: each request the push
makes (``hello``, ``receive`` with its data frames, ``commit_container`` ...) goes up the
same SSH channel as a ``{"call": op, ...}`` message, the client serves it itself
(``pipelines/pull_scope.py``) and writes the reply back down. The whole push logic
(negotiation, refresh plan, undo) is the same code as a push; only the direction of the
channel differs.

Calls carry control messages and volume streams only: rsync's protocol and the direct TCP
data link are not offered in this direction (a refresh across drivers sends a tar stream).

Host a is *input*, not a peer the client trusts: the client checks every call against the
pull's scope before serving it (``pipelines/pull_scope.py``, ``PullScope``). This module is
only the channel.
"""

from __future__ import annotations

from typing import Any

from migrator.core import errors
from migrator.streams import ProgressMeter, Stream
from migrator.transport.base import CallHandler, EventHandler
from migrator.transport.datapath import send_frames
from migrator.transport.frames import DataWriter, Reader, read_json, write_json
from migrator.transport.replies import parse_reply

CALLER = "client"


class ReverseTransport:
    """The push side's view of the client, through the agent's own stdin and stdout."""

    def __init__(self, read: Reader, write: DataWriter, name: str = CALLER) -> None:
        self.name = name
        self.read, self.write = read, write
        self.fast_link = False
        self.data_link = "ssh"
        self.link_rate: float | None = None
        self.link_failed = ""

    def warm(self, n: int) -> None:
        """Nothing to start: the client answers on the open channel."""

    def close(self) -> None:
        """Nothing to close: the channel belongs to the agent's own request."""

    def __enter__(self) -> ReverseTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, args: dict[str, Any] | None = None, stream: Stream | None = None,
                compress: str = "none", meter: ProgressMeter | None = None,
                on_event: EventHandler | None = None, on_call: CallHandler | None = None
                ) -> dict[str, Any]:
        """The client's answer to one call (events and calls back never come this way:
        the client sends its reply only)."""
        write_json(self.write, {"call": op, **(args or {})})
        if stream is not None:
            send_frames(stream, self.write, compress, meter)
        reply = parse_reply(self.name, op, read_json(self.read))
        if op == "hello":
            reply["rsync"] = False  # no raw protocol in this direction
            reply["links"] = ["ssh"]
        return reply

    def open_raw(self, op: str, args: dict[str, Any]) -> Any:
        raise errors.InvalidInput(f"{op!r} cannot run back through the client's channel")
