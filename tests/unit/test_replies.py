"""A hostile agent reply (``transport/replies.py``): the error class and exit code come only
from the known error classes, text is cut and cleaned of escape sequences and control
characters, and a reply of the wrong shape is a ``ProtocolError``, not a crash deep inside a
pipeline. Driven through ``SshTransport.request``'s own reading code over a fake channel."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest

from migrator.core import errors
from migrator.transport.frames import ProtocolError, write_json
from migrator.transport.replies import clean_text, copy_result, parse_reply, remote_error
from migrator.transport.ssh import SshTransport


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "BaseException",
                                  "CommandFailed", "__class__", "ProtocolError", "Exception",
                                  "", None, 26, ["InvalidInput"]])
def test_an_unknown_or_unsafe_type_becomes_remote_error(kind: Any) -> None:
    e = remote_error("host-b", {"type": kind, "message": "boom", "hint": "h"})
    assert type(e) is errors.RemoteError and e.exit_code == errors.RemoteError.exit_code
    assert e.message == "on host-b: boom" and e.hint == "h"


def test_a_known_type_keeps_its_class_and_exit_code() -> None:
    e = remote_error("host-b", {"type": "NoSpace", "message": "full", "hint": None})
    assert type(e) is errors.NoSpace and e.exit_code == 12
    assert e.hint == errors.NoSpace.hint  # no hint sent: the class's own


def test_hostile_text_is_cleaned_and_capped() -> None:
    nasty = ("\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\rover\x00write\x9b31m\x7f"
             "\nsecond line\t" + "A" * 100_000)
    e = remote_error("host-b\x1b[5m", {"type": "InvalidInput", "message": nasty,
                                       "hint": nasty})
    for text in (e.message, e.hint):
        assert not any(ord(c) < 32 and c not in "\n\t" or 0x7f <= ord(c) <= 0x9f
                       for c in text), repr(text[:80])
        assert "pwned" not in text and len(text) <= 2100
    assert e.message.startswith("on host-b: redoverwrite31m\nsecond line\t")
    assert e.message.endswith("…")


@pytest.mark.parametrize("err", [None, "a string", ["list"], 5])
def test_a_malformed_error_is_a_remote_error(err: Any) -> None:
    e = remote_error("host-b", err)
    assert type(e) is errors.RemoteError and "malformed" in e.message


def test_a_non_string_hint_is_dropped() -> None:
    e = remote_error("h", {"type": "NotFound", "message": "x", "hint": {"a": 1}})
    assert e.hint == errors.NotFound.hint


def test_clean_text_keeps_plain_text() -> None:
    assert clean_text("tar: ./a: Cannot open\n  line 2") == "tar: ./a: Cannot open\n  line 2"
    assert clean_text(None) == "" and clean_text(42) == "42"


GOOD_HELLO: dict[str, Any] = {"ok": True, "version": "0.1.0", "protocol": 1,
              "pools": [{"name": "fast", "driver": "btrfs", "types": ["btrfs", "tar"],
                         "free": 10, "subsecond_mtimes": True}],
              "compressors": ["zstd", "none"], "links": ["ssh", "tcp"], "rsync": True,
              "criu": None, "criu_features": None, "network": "10.0.0.1/24",
              "mem_total": 8 << 30, "mem_available": 5 << 30, "host_id": "0f" * 16}


@pytest.mark.parametrize(("op", "reply", "what"), [
    ("hello", {**GOOD_HELLO, "pools": ["fast"]}, "pools must be objects"),
    ("hello", {**GOOD_HELLO, "pools": [{**GOOD_HELLO["pools"][0], "free": "lots"}]}, "free"),
    ("hello", {**GOOD_HELLO, "pools": [{**GOOD_HELLO["pools"][0], "free": True}]}, "free"),
    ("hello", {**GOOD_HELLO, "compressors": "zstd"}, "compressors"),
    ("hello", {**GOOD_HELLO, "criu_features": {"uffd": "yes"}}, "criu_features"),
    ("hello", {**GOOD_HELLO, "version": "x" * 5000}, "characters long"),
    ("hello", {**GOOD_HELLO, "mem_available": "5G"}, "mem_available"),
    ("hello", {**GOOD_HELLO, "mem_available": True}, "mem_available"),
    ("hello", {**GOOD_HELLO, "mem_total": -1}, "mem_total"),
    ("hello", {**GOOD_HELLO, "mem_available": 1.5}, "mem_available"),
    ("hello", {**GOOD_HELLO, "host_id": 7}, "host_id"),
    ("hello", {**GOOD_HELLO, "host_id": "x" * 300}, "host_id"),
    ("hello", {**GOOD_HELLO, "overlay_vni": "16"}, "overlay_vni"),
    ("hello", {**GOOD_HELLO, "overlay_vni": True}, "overlay_vni"),
    ("container_state", {"ok": True, "exists": "yes"}, "exists"),
    ("container_state", {"ok": True, "exists": True, "pool": "p", "status": "STOPPED",
                         "snapshots": [{"name": 1}]}, "name"),
    ("receive", {"ok": True, "raw": "1", "wire": 1}, "raw"),
    ("commit_container", {"ok": True, "ipv4": ["10.0.0.2"]}, "ipv4"),
    ("live_settle", {"ok": True, "whole": "false"}, "whole"),
    ("live_settle", {"ok": True}, "whole"),
    ("page_identity", {"ok": True, "cert": b"der"}, "cert"),
    ("page_identity", {"ok": True, "cert": "A" * 9000}, "characters long"),
    ("evacuate", {"ok": True, "rows": "all moved", "exit_code": 0}, "rows"),
    ("evacuate", {"ok": True, "rows": ["r1"], "exit_code": 0}, "objects"),
    ("evacuate", {"ok": True, "rows": [], "exit_code": 300}, "exit code"),
    ("evacuate", {"ok": True, "rows": [], "exit_code": "0"}, "exit_code"),
])
def test_a_reply_of_the_wrong_shape_is_a_protocol_error(op: str, reply: dict[str, Any],
                                                        what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        parse_reply("host-b", op, reply)


def test_good_replies_pass_and_ok_must_be_true() -> None:
    assert parse_reply("host-b", "hello", GOOD_HELLO) is GOOD_HELLO
    older = {k: v for k, v in GOOD_HELLO.items() if not k.startswith(("mem_", "host_id"))}
    assert parse_reply("host-b", "hello", older) is older  # an agent without memory figures
    assert parse_reply("h", "container_state", {"ok": True, "exists": False})["exists"] is False
    with pytest.raises(errors.RemoteError):
        parse_reply("h", "receive", {"ok": 1, "raw": 1, "wire": 1})
    with pytest.raises(ProtocolError, match="not an object"):
        parse_reply("h", "hello", ["ok"])


def test_a_copy_result_keeps_known_fields_only_cleaned() -> None:
    r = copy_result("h", {"source": "c1\x1b[2J", "target": "c1", "pool": "p",
                          "method": "tar+zstd", "bytes": -5, "seconds": "fast",
                          "notes": ["ok", "\x1b]8;;http://x\x07click\x1b]8;;\x07"],
                          "snapshots_added": "s0", "evil": "x", "downtime": True})
    assert r["source"] == "c1" and r["bytes"] == 0 and r["seconds"] == 0.0
    assert r["notes"] == ["ok", "click"] and r["snapshots_added"] == []
    assert "evil" not in r and r["downtime"] is None
    with pytest.raises(ProtocolError):
        copy_result("h", "not a dict")


class FakeChannel:
    """What ``SshTransport.request`` reads from: the agent's frames, pre-recorded."""

    def __init__(self, frames: bytes) -> None:
        self._in = io.BytesIO(frames)
        self.sent = io.BytesIO()
        self.closed = False
        self.status_event = threading.Event()
        self.status_event.set()
        self.exit_status = 0

    def recv(self, n: int) -> bytes:
        return self._in.read(n)

    def sendall(self, data: bytes) -> None:
        self.sent.write(data)

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    def is_active(self) -> bool:
        return True


def request_with_reply(monkeypatch: pytest.MonkeyPatch, op: str, *replies: Any) -> Any:
    buf = io.BytesIO()
    for r in replies:
        write_json(buf.write, r)
    t = SshTransport("host-b", "192.0.2.1")
    chan = FakeChannel(buf.getvalue())
    t.client = type("C", (), {"get_transport": lambda self: FakeTransport()})()  # type: ignore[assignment]
    monkeypatch.setattr(t, "_open_agent", lambda transport: chan)
    return t.request(op)


def test_a_hostile_reply_through_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.RemoteError) as e:
        request_with_reply(monkeypatch, "hello", {"ok": False, "error": {
            "type": "SystemExit", "message": "\x1b[2Jgone", "hint": "\x1b[8mhidden"}})
    assert e.value.message == "on host-b: gone" and e.value.hint == "hidden"
    with pytest.raises(ProtocolError, match="pools"):
        request_with_reply(monkeypatch, "hello", {**GOOD_HELLO, "pools": 3})
    # an unasked call (the far side pretending this is a pull) is refused too
    with pytest.raises(errors.NetworkError, match="unexpected call"):
        request_with_reply(monkeypatch, "hello", {"call": "receive"}, GOOD_HELLO)


def test_events_are_cleaned_before_anyone_shows_them() -> None:
    from migrator.transport.replies import clean_event

    ev = clean_event({"event": "failed", "name": "c1\x1b[2J", "message": "\x1b]0;x\x07bad",
                      "result": {"notes": ["\x1b[31mred"], "bytes": 5}, "done": 3})
    assert ev == {"event": "failed", "name": "c1", "message": "bad",
                  "result": {"notes": ["red"], "bytes": 5}, "done": 3}
