"""Requests sent back to the client over the channel an agent was started on: pulls.

``migrate copy host-a:c1 c1`` copies *to* the host the command runs on, which host a may
not be able to reach (no sshd here, no route back). So the client asks host a's agent to
push as usual (``delegate``), with this transport as the target: each request the push
makes (``hello``, ``receive`` with its data frames, ``commit_container`` ...) goes up the
same SSH channel as a ``{"call": op, ...}`` message, the client serves it with its own
``Agent`` and writes the reply back down. The whole push logic (negotiation, refresh plan,
undo) is the same code as a push; only the direction of the channel differs.

Calls carry control messages and volume streams only: rsync's protocol and the direct TCP
data link are not offered in this direction (a refresh across drivers sends a tar stream).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from migrator import errors
from migrator.streams import ProgressMeter, Stream
from migrator.transport.datapath import send_frames
from migrator.transport.frames import DataWriter, Reader, read_json, write_json

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

    def request(self, op: str, args: dict[str, Any] | None = None, stream: Stream | None = None,
                compress: str = "none", meter: ProgressMeter | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        write_json(self.write, {"call": op, **(args or {})})
        if stream is not None:
            send_frames(stream, self.write, compress, meter)
        reply = read_json(self.read)
        if op == "hello":
            reply["rsync"] = False  # no raw protocol in this direction
            reply["links"] = ["ssh"]
        if not reply.get("ok"):
            from migrator.transport.ssh import remote_error

            raise remote_error(self.name, reply.get("error") or {})
        return reply

    def open_raw(self, op: str, args: dict[str, Any]) -> Any:
        raise errors.InvalidInput(f"{op!r} cannot run back through the client's channel")


# the client's side ---------------------------------------------------------------------------
CALLABLE = {"hello", "container_state", "receive", "commit_container", "abort_container",
            "delete_snapshot", "snapshot_volume"}


def answer_call(agent: Any, call: dict[str, Any], read: Reader,
                write: Callable[[bytes], Any]) -> None:
    """Serve one call from the far side with this host's ``Agent``; write its reply (a
    typed error too, so the push there unwinds with its own undo).

    A ``receive`` that failed has left the rest of its data frames unread, so the channel
    can no longer be trusted: after its error reply the error is raised here too, which
    ends the pull (the caller cleans up this side itself)."""
    from migrator.agent import OPS, error_reply

    op = str(call.get("call"))
    try:
        if op not in CALLABLE:
            raise errors.InvalidInput(f"{op!r} may not be called back on the client")
        result = OPS[op](agent, call, read)
    except (KeyError, TypeError, ValueError) as e:
        write_json(write, error_reply(errors.InvalidInput(f"malformed call: {e!r}")))
        raise errors.InvalidInput(f"the far side sent a malformed {op!r} call: {e!r}") from e
    except errors.MigratorError as e:
        write_json(write, error_reply(e))
        if op == "receive":
            raise
        return
    write_json(write, {"ok": True, **result})
