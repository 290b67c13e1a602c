"""An agent's session (``agent.serve``): after a successful request that asked for it, the
agent waits on the same channel for another one; after anything else it ends. And the
client's side of it (``transport.ssh.session_goes_on``): a channel goes back to the pool
only on a success that says so, when it was asked.

Both ends are driven in process over a byte stream (the channel's content): the agent's
handlers are replaced by small ones, since what is checked is the loop around them."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migrator import agent
from migrator.transport.frames import PROTOCOL, read_json, write_json
from migrator.transport.ssh import session_goes_on


def _requests(*reqs: dict[str, Any], tail: bytes = b"") -> io.BytesIO:
    buf = io.BytesIO()
    for r in reqs:
        write_json(buf.write, {"protocol": PROTOCOL, **r})
    buf.write(tail)
    buf.seek(0)
    return buf


def _serve(monkeypatch: pytest.MonkeyPatch, channel: io.BytesIO
           ) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Serve ``channel`` with an "echo" op (answers its ``n``) and a "boom" op (fails);
    returns the exit status, the replies and the ops that ran."""
    ran: list[str] = []

    def echo(end: Any, req: dict[str, Any], read: Any) -> dict[str, Any]:
        ran.append(f"echo {req.get('n')}")
        return {"n": req.get("n")}

    def boom(end: Any, req: dict[str, Any], read: Any) -> dict[str, Any]:
        ran.append("boom")
        raise RuntimeError("it failed")

    monkeypatch.setitem(agent.OPS, "echo", echo)
    monkeypatch.setitem(agent.OPS, "boom", boom)
    out = io.BytesIO()
    cts = SimpleNamespace(host=SimpleNamespace(root=Path("/nonexistent")), state=None)
    status = agent.serve(lambda: cts, channel.read, out.write)  # type: ignore[arg-type,return-value]
    out.seek(0)
    replies = []
    while out.tell() < len(out.getvalue()):
        replies.append(read_json(out.read))
    return status, replies, ran


def test_a_session_serves_requests_until_the_channel_ends(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    status, replies, ran = _serve(monkeypatch, _requests(
        {"op": "echo", "n": 1, "session": True}, {"op": "echo", "n": 2, "session": True},
        {"op": "echo", "n": 3}))
    assert status == 0
    assert ran == ["echo 1", "echo 2", "echo 3"]
    assert replies == [{"ok": True, "n": 1, "session": True},
                       {"ok": True, "n": 2, "session": True}, {"ok": True, "n": 3}]


def test_without_asking_the_agent_ends_after_one_request(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A request that does not ask (or asks with anything but true) is the last: what
    follows on the channel is never read as a request."""
    for asked in (None, "true", 1, ["yes"]):
        extra = {} if asked is None else {"session": asked}
        status, replies, ran = _serve(monkeypatch, _requests(
            {"op": "echo", "n": 1, **extra}, {"op": "echo", "n": 2}))
        assert (status, ran) == (0, ["echo 1"]), asked
        assert replies == [{"ok": True, "n": 1}], asked


def test_a_failure_ends_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error reply (a failing handler, an unknown op, a malformed request) is the
    agent's last word, whatever the request asked: its state after a failure is unknown."""
    for first in ({"op": "boom", "session": True}, {"op": "nope", "session": True},
                  {"session": True, "op": "echo", "protocol": PROTOCOL + 99}):
        status, replies, ran = _serve(monkeypatch, _requests(
            first, {"op": "echo", "n": 2, "session": True}))
        assert status != 0, first
        assert "echo 2" not in ran, first
        assert len(replies) == 1 and replies[0]["ok"] is False, first
        assert "session" not in replies[0], first


def test_a_watched_request_ends_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watched request's channel is read by the watcher thread while it runs: nothing
    after it can be trusted to be a whole request, so it is the last."""
    monkeypatch.setattr(agent, "WATCHED_OPS", frozenset({"echo"}))
    status, replies, ran = _serve(monkeypatch, _requests(
        {"op": "echo", "n": 1, "session": True}, {"op": "echo", "n": 2, "session": True}))
    assert (status, ran) == (0, ["echo 1"])
    assert replies == [{"ok": True, "n": 1}]


def test_a_cut_or_garbled_next_request_ends_the_session(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """What comes after a session's reply is parsed like any request: half a frame or
    bytes that are no frame get an error reply and end the agent; nothing runs."""
    for tail in (b"J\x00\x00", b"\xff" * 40):
        status, replies, ran = _serve(monkeypatch, _requests(
            {"op": "echo", "n": 1, "session": True}, tail=tail))
        assert ran == ["echo 1"], tail
        assert replies[0] == {"ok": True, "n": 1, "session": True}, tail
        assert len(replies) == 2 and replies[1]["ok"] is False, tail
        assert status != 0, tail


def test_the_client_keeps_a_channel_only_when_it_asked_and_the_success_says_so() -> None:
    assert session_goes_on(True, {"ok": True, "session": True})
    assert not session_goes_on(False, {"ok": True, "session": True})  # not asked
    assert not session_goes_on(True, {"ok": True})  # an agent without sessions
    for said in ("true", 1, [True], {"x": 1}, None):
        assert not session_goes_on(True, {"ok": True, "session": said}), said
    err = {"ok": False, "session": True, "error": {"type": "X", "message": "m"}}
    assert not session_goes_on(True, err)
    reply = {"ok": True, "session": True, "n": 1}
    session_goes_on(True, reply)
    assert reply == {"ok": True, "n": 1}  # the marker is the transport's, not the op's
