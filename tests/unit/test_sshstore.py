"""``SshObjectStore`` and its far end (``serve_objects``) over an in-process channel: the
session protocol, the checks on both sides, a hostile client and a hostile far end. (Over
real SSH between test hosts: tests/integration/test_sshstore.py.)"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migrator.agent import serve
from migrator.backup import sshstore
from migrator.backup.sshstore import SshObjectStore
from migrator.core.errors import CorruptBackup, InvalidInput, NetworkError, NotFound
from migrator.transport.frames import (
    DATA,
    ProtocolError,
    pack,
    read_json,
    write_end,
    write_json,
)
from migrator.transport.local import LocalTransport


class Agents(LocalTransport):
    """This process as the far host: each ``open_raw`` is an agent's ``serve`` in a thread
    (as ``migrate agent`` on its channel), counted."""

    def __init__(self, root: Path) -> None:
        cts = SimpleNamespace(host=SimpleNamespace(root=root), state=None)
        self.started = 0

        def serve_here(read: Any, write: Any) -> int:
            self.started += 1
            return serve(lambda: cts, read, write)  # type: ignore[arg-type,return-value]

        super().__init__(lambda op, req, read: {}, serve_here)
        self.name = "far"


@pytest.fixture
def far(tmp_path: Path) -> Iterator[tuple[SshObjectStore, Path, Agents]]:
    repo = tmp_path / "repo"
    t = Agents(tmp_path)
    store = SshObjectStore(t, str(repo))
    store.create()
    yield store, repo, t
    store.close()


def test_contract_through_sessions(far) -> None:  # type: ignore[no-untyped-def]
    store, repo, t = far
    assert store.url == f"ssh://far{repo}"
    assert oct(repo.stat().st_mode & 0o777) == "0o700"
    store.put("config", b"v1")
    assert store.get("config", 2) == b"v1" and store.exists("config")
    assert (repo / "config").read_bytes() == b"v1"
    big = os.urandom(9 << 20)  # several DATA frames
    store.put("data/ab/" + "c" * 64, big)
    assert store.get("data/ab/" + "c" * 64, len(big)) == big
    store.put("config", b"")  # an empty object, replaced
    assert store.get("config", 0) == b""
    with pytest.raises(CorruptBackup):
        store.get("data/ab/" + "c" * 64, len(big) - 1)
    with pytest.raises(NotFound):
        store.get("index/none", 10)
    assert not store.exists("index/none")
    keys = [f"data/{i % 3:02x}/{i:064x}" for i in range(1800)]
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda k: store.put(k, k[-4:].encode()), keys))
    assert sorted(store.list("data/0")) == sorted(k for k in keys if k.startswith("data/0"))
    assert len(list(store.list(""))) == 1802
    assert store.missing([keys[0], "data/ff/none", keys[5]]) == {"data/ff/none"}
    assert store.missing(keys + ["data/zz/1"]) == {"data/zz/1"}  # batched
    store.delete(keys[0])
    store.delete(keys[0])
    assert not store.exists(keys[0])
    # errors came back as replies: the sessions are reused, never more than the cap
    assert t.started <= sshstore.MAX_SESSIONS


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "", "a/../../b", "x\0y"])
def test_bad_keys_are_refused_on_this_side(far, key: str) -> None:  # type: ignore[no-untyped-def]
    store, _repo, _t = far
    for op in (lambda: store.put(key, b"x"), lambda: store.get(key, 1),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(InvalidInput):
            op()


def _raw_session(t: Agents, path: Path) -> socket.socket:
    chan = t.open_raw("objects", {"path": str(path)})
    assert isinstance(chan, socket.socket)
    return chan


def test_a_hostile_client_is_refused_on_the_far_side(far, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, repo, t = far
    chan = _raw_session(t, repo)
    # keys that escape: refused by the far end itself, and the session goes on
    for msg in ({"a": "put", "key": "../../etc/x", "size": 1},
                {"a": "get", "key": "../config", "limit": 10},
                {"a": "exists", "key": "/etc/passwd"}, {"a": "delete", "key": "a/../.."},
                {"a": "missing", "keys": ["ok", "../x"]}, {"a": "nonsense"},
                {"a": "get", "key": "config", "limit": -1}):
        write_json(chan.sendall, msg)
        if msg["a"] == "put":
            chan.sendall(pack(DATA, b"x"))
            write_end(chan.sendall, {"bytes": 1})
        reply = read_json(chan.recv)
        assert reply["ok"] is False and reply["error"]["type"] == "InvalidInput", (msg, reply)
    assert not (tmp_path / "etc").exists()
    # a put larger than announced, or above the limit: the session ends
    write_json(chan.sendall, {"a": "put", "key": "k", "size": sshstore.MAX_OBJECT + 1})
    reply = read_json(chan.recv)
    assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError"
    assert chan.recv(1) == b""  # the agent is gone
    chan.close()
    chan = _raw_session(t, repo)
    write_json(chan.sendall, {"a": "put", "key": "k", "size": 2})
    chan.sendall(pack(DATA, b"xyz"))
    assert read_json(chan.recv)["ok"] is False
    chan.close()
    assert not (repo / "k").exists()
    # a relative or unnormalised path is refused before anything is opened
    for bad in ("rel/path", str(repo) + "/../x"):
        with pytest.raises(InvalidInput):
            t.open_raw("objects", {"path": bad})


class HostileFar:
    """A far end that answers each operation with ``answer(msg, chan)``."""

    def __init__(self, answer: Any) -> None:
        self.name, self.answer = "evil", answer

    def open_raw(self, op: str, args: dict[str, Any]) -> socket.socket:
        mine, theirs = socket.socketpair()

        def run() -> None:
            with theirs:
                try:
                    while True:
                        self.answer(read_json(theirs.recv), theirs)
                except (ProtocolError, OSError):
                    pass

        threading.Thread(target=run, daemon=True).start()
        return mine


def test_a_far_end_that_hangs_is_a_network_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sshstore, "SESSION_TIMEOUT", 0.3)
    store = SshObjectStore(HostileFar(lambda msg, chan: None), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(NetworkError, match="broke"):
        store.exists("config")


def test_a_hostile_far_end_is_caught(tmp_path: Path) -> None:
    def oversize(msg: dict[str, Any], chan: socket.socket) -> None:
        write_json(chan.sendall, {"ok": True, "size": 1 << 30})

    store = SshObjectStore(HostileFar(oversize), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(NetworkError, match="announced"):
        store.get("config", 100)

    def more_than_said(msg: dict[str, Any], chan: socket.socket) -> None:
        write_json(chan.sendall, {"ok": True, "size": 3})
        chan.sendall(pack(DATA, b"abcdef"))

    store = SshObjectStore(HostileFar(more_than_said), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(NetworkError):
        store.get("config", 100)

    def planted_listing(msg: dict[str, Any], chan: socket.socket) -> None:
        write_json(chan.sendall, {"ok": True})
        chan.sendall(pack(DATA, b"index/a\n../../etc/passwd"))
        write_end(chan.sendall, {"count": 2})

    store = SshObjectStore(HostileFar(planted_listing), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(NetworkError, match="listing"):
        list(store.list("index/"))

    def odd_missing(msg: dict[str, Any], chan: socket.socket) -> None:
        write_json(chan.sendall, {"ok": True, "missing": ["data/not-asked"], "exists": "yes"})

    store = SshObjectStore(HostileFar(odd_missing), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(NetworkError):
        store.missing(["data/a"])
    with pytest.raises(NetworkError):
        store.exists("data/a")

    def unknown_error(msg: dict[str, Any], chan: socket.socket) -> None:
        write_json(chan.sendall, {"ok": False, "error": {"type": "SystemExit",
                                                         "message": "x" * 10000}})

    store = SshObjectStore(HostileFar(unknown_error), "/srv/r")  # type: ignore[arg-type]
    with pytest.raises(Exception) as e:
        store.delete("data/a")
    assert type(e.value).__name__ == "RemoteError"
    assert len(str(e.value)) < 2100  # capped by the gate

