"""An ``ObjectStore`` on another host (``ssh://HOST/PATH``): a directory there, reached
through that host's agent.

The chunked repository's logic runs here, on the client; the far host only keeps objects,
with ``DirStore``'s guarantees (temporary name, fsync, rename; 0600 files; no symlink
followed; size limits). Only the objects cross the link, already compressed and sealed by
the client, so the far host never sees a key or plaintext, and a writer that asks which
chunks exist first (``list("data/")``, or ``missing``) sends only those the far side lacks.

**Sessions.** Each agent request costs an SSH channel and a fresh agent process (~0.3 s),
far too much per chunk. So one request, ``objects``, opens a *session*: after its "ready"
reply the channel carries any number of operations, each a JSON frame answered by a JSON
frame, an object's bytes riding as DATA frames with an END trailer (its byte count, so a
cut stream is never stored). The store keeps up to ``MAX_SESSIONS`` sessions open and lends
one to each thread, so the repository's parallel uploads and downloads run in parallel on
the far host too (sshd allows 10 channels per connection by default; this leaves room).
A session that fails on the wire is closed, never reused; an operation's own error (a
missing object, a refused key) comes back as a typed error and the session goes on.

**The far end** (``serve_objects``, the agent's ``objects`` handler) checks the path as the
directory repository's handler does (absolute, normalised; none means ``<root>/backups``),
every key with ``check_key`` (through ``DirStore``), and every size before reading: a put
declares its size, at most ``MAX_OBJECT``, and the bytes that arrive must match it.
Replies pass ``transport/replies.py``'s gate here, and their shapes are checked (a key
listed must be a key under the prefix asked for, a size within the limit asked for).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from migrator.backup.dirstore import DirStore
from migrator.backup.objectstore import MAX_KEY, check_key, check_path, valid_key
from migrator.core.errors import InvalidInput, MigratorError, NetworkError, StorageError
from migrator.pipelines.remote_target import RemoteTarget
from migrator.transport.base import Transport
from migrator.transport.frames import (
    DATA,
    END,
    MAX_DATA,
    ProtocolError,
    Reader,
    pack,
    read_frame,
    read_json,
    write_end,
    write_json,
)
from migrator.transport.replies import error_reply, remote_error

SCHEME = "ssh://"
OP = "objects"
#: sessions (SSH channels, agents) one store keeps open at most
MAX_SESSIONS = 6
#: the largest object either side moves: above the chunked repository's biggest (an index
#: of MAX_INDEX, 256 MiB, sealed); a put is held in memory on the far host until stored
MAX_OBJECT = 320 << 20
#: keys asked about in one ``missing`` message (each up to MAX_KEY: within MAX_JSON)
MISSING_BATCH = 1500
#: seconds a session waits for the far side (a chunk's round trip, a listing's first frame
#: on a large repository): a far agent or link that hangs ends as a NetworkError, not a hang
SESSION_TIMEOUT = 600.0
LIST_FRAME = 256 << 10  # bytes of newline-separated keys per DATA frame of a listing
MAX_LISTED = 20_000_000  # keys one listing may bring (about 1.5 GiB of names: a bound)


class _Session:
    """One open ``objects`` request: a channel, used by one thread at a time."""

    def __init__(self, chan: Any, where: str) -> None:
        self.chan, self.where = chan, where
        self.broken = False
        #: the last operation failed by the far side's own error reply: still in step
        self.refused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.broken:
                write_json(self.chan.sendall, {"a": "end"})
                read_json(self.chan.recv)  # the request's own final reply
        with contextlib.suppress(Exception):
            self.chan.close()

    def send(self, msg: dict[str, Any], data: bytes | None = None) -> None:
        self.refused = False
        write_json(self.chan.sendall, msg)
        if data is not None:
            view = memoryview(data)
            for i in range(0, len(view), MAX_DATA):
                self.chan.sendall(pack(DATA, bytes(view[i:i + MAX_DATA])))
            write_end(self.chan.sendall, {"bytes": len(view)})

    def reply(self) -> dict[str, Any]:
        """The operation's JSON reply; a far error is raised as its own class."""
        reply = read_json(self.chan.recv)
        if reply.get("ok") is not True:
            self.refused = True
            raise remote_error(self.where, reply.get("error"))
        return reply

    def data(self, size: int) -> bytes:
        """``size`` bytes of DATA frames and their END trailer; anything else is a
        protocol error (the session is then dropped)."""
        parts: list[bytes] = []
        got = 0
        while True:
            kind, payload = read_frame(self.chan.recv)
            if kind == DATA:
                got += len(payload)
                if got > size:
                    raise ProtocolError(f"{self.where}: more data than the {size} bytes "
                                        "announced")
                parts.append(payload)
            elif kind == END:
                if json.loads(payload).get("bytes") != got or got != size:
                    raise ProtocolError(f"{self.where}: an object ended after {got} of "
                                        f"{size} bytes")
                return b"".join(parts)
            else:
                raise ProtocolError(f"{self.where}: unexpected frame {kind!r} in an object")


class SshObjectStore:
    """Objects in directory ``path`` on the host ``transport`` reaches (see the module
    docstring); ``path`` None: that host's ``<root>/backups``."""

    def __init__(self, transport: Transport, path: str | None,
                 sessions: int = MAX_SESSIONS, owns_transport: bool = False) -> None:
        self.t = transport
        #: ``close`` also closes the transport (``open_repository`` connected it for us)
        self.owns_transport = owns_transport
        self.path = None if path is None else check_path(path)
        self.url = f"{SCHEME}{transport.name}{self.path or ''}"
        self.max_sessions = max(1, sessions)
        self._idle: list[_Session] = []
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False

    def __str__(self) -> str:
        return self.url

    @contextlib.contextmanager
    def _session(self) -> Iterator[_Session]:
        with self._cond:
            while not self._idle and self._open >= self.max_sessions:
                self._cond.wait()
            if self._closed:
                raise InvalidInput(f"{self.url}: the store was closed")
            s = self._idle.pop() if self._idle else None
            if s is None:
                self._open += 1
        if s is None:
            try:
                chan = self.t.open_raw(OP, {"path": self.path})
                chan.settimeout(SESSION_TIMEOUT)
                s = _Session(chan, self.t.name)
            except BaseException:
                with self._cond:
                    self._open -= 1
                    self._cond.notify()
                raise
        try:
            yield s
        except MigratorError:
            # a far error came as a reply: the session is in step; anything else (a
            # dropped channel, a malformed frame) leaves it out of step
            if not s.refused:
                s.broken = True
            raise
        except Exception as e:  # paramiko's, OSError, EOFError, a malformed trailer
            s.broken = True
            raise NetworkError(f"{self.url}: the session with the agent broke: "
                               f"{type(e).__name__}: {e}",
                               "the link or the far agent died; retry") from e
        except BaseException:
            s.broken = True
            raise
        finally:
            with self._cond:
                if s.broken or self._closed:
                    s.close()
                    self._open -= 1
                else:
                    self._idle.append(s)
                self._cond.notify()

    # the contract ------------------------------------------------------------------------
    def create(self) -> None:
        """Make the directory (0700) on the far host if it is missing."""
        with self._session() as s:
            s.send({"a": "create"})
            s.reply()

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        if len(data) > MAX_OBJECT:
            raise InvalidInput(f"object {key} of {len(data)} bytes is above the "
                               f"{MAX_OBJECT}-byte limit of an ssh:// store")
        with self._session() as s:
            s.send({"a": "put", "key": key, "size": len(data)}, data)
            s.reply()

    def get(self, key: str, limit: int) -> bytes:
        check_key(key)
        if limit < 0:
            raise ValueError("negative limit")
        with self._session() as s:
            s.send({"a": "get", "key": key, "limit": min(limit, MAX_OBJECT)})
            size = s.reply().get("size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
                s.broken = True
                raise ProtocolError(f"{self.url}: object {key} announced as {size!r} bytes, "
                                    f"at most {limit} were asked for")
            return s.data(size)

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._session() as s:
            s.send({"a": "exists", "key": key})
            found = s.reply().get("exists")
        if not isinstance(found, bool):
            raise ProtocolError(f"{self.url}: malformed exists reply {found!r}")
        return found

    def missing(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` the far side does not hold, asked in batches (one round trip
        per ``MISSING_BATCH`` keys instead of one per key)."""
        wanted = [check_key(k) for k in keys]
        out: set[str] = set()
        for i in range(0, len(wanted), MISSING_BATCH):
            batch = wanted[i:i + MISSING_BATCH]
            with self._session() as s:
                s.send({"a": "missing", "keys": batch})
                lacking = s.reply().get("missing")
            if not isinstance(lacking, list) or not set(lacking) <= set(batch):
                raise ProtocolError(f"{self.url}: malformed missing reply")
            out.update(lacking)
        return out

    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, read whole before the first is yielded (a listing
        holds its session only for as long as it streams)."""
        if not isinstance(prefix, str) or len(prefix) > MAX_KEY or "\0" in prefix:
            raise InvalidInput(f"invalid object key prefix {prefix!r}")
        keys: list[str] = []
        with self._session() as s:
            s.send({"a": "list", "prefix": prefix})
            s.reply()
            while True:
                kind, payload = read_frame(s.chan.recv)
                if kind == END:
                    if json.loads(payload).get("count") != len(keys):
                        s.broken = True
                        raise ProtocolError(f"{self.url}: a listing lost keys on the way")
                    break
                if kind != DATA:
                    s.broken = True
                    raise ProtocolError(f"{self.url}: unexpected frame {kind!r} in a listing")
                for name in payload.decode().split("\n"):
                    if not valid_key(name) or not name.startswith(prefix):
                        s.broken = True
                        raise ProtocolError(f"{self.url}: the listing of {prefix!r} named "
                                            f"{name[:100]!r}")
                    keys.append(name)
                if len(keys) > MAX_LISTED:
                    s.broken = True
                    raise ProtocolError(f"{self.url}: a listing of more than {MAX_LISTED} "
                                        "keys")
        yield from keys

    def delete(self, key: str) -> None:
        check_key(key)
        with self._session() as s:
            s.send({"a": "delete", "key": key})
            s.reply()

    def close(self) -> None:
        """End every idle session (each agent exits); sessions in use end when returned."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for s in idle:
            s.close()
        if self.owns_transport:
            self.t.close()


# the agent side ----------------------------------------------------------------------------
def serve_objects(agent: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """The ``objects`` request: a session of store operations on a directory of this host
    (see the module docstring), until the client says ``end`` or its channel closes."""
    path = req.get("path")
    store = DirStore(agent.host.root / "backups" if path is None
                     else Path(check_path(str(path))))
    write_json(agent.write, {"ok": True, "ready": True})
    while True:
        msg = _next_message(read)
        if msg is None:  # the client closed the channel between two operations
            return {}
        action = msg.get("a")
        if action == "end":
            return {}
        # a put's bytes are read before anything is checked, so the session stays in step
        # whatever the answer; their size is bounded first
        data = _receive(read, msg.get("size")) if action == "put" else None
        try:
            reply = _one(store, agent, action, msg, data)
        except MigratorError as e:
            write_json(agent.write, error_reply(e))
            continue
        except OSError as e:
            write_json(agent.write, error_reply(StorageError(
                f"{store.url}: {action}: {e.strerror or e}", "check the disk on this host")))
            continue
        if reply is not None:
            write_json(agent.write, {"ok": True, **reply})


def _next_message(read: Reader) -> dict[str, Any] | None:
    """The next operation, or None when the channel ends cleanly before it."""
    first = bytes(read(1))
    if not first:
        return None
    pending = [first]

    def again(n: int) -> bytes | memoryview:
        return pending.pop() if pending else read(n)

    return read_json(again)


def _receive(read: Reader, size: object) -> bytes:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT:
        raise ProtocolError(f"a put of {size!r} bytes (at most {MAX_OBJECT})")
    parts: list[bytes] = []
    got = 0
    while True:
        kind, payload = read_frame(read)
        if kind == DATA:
            got += len(payload)
            if got > size:
                raise ProtocolError(f"a put sent more than the {size} bytes it announced")
            parts.append(payload)
        elif kind == END:
            if json.loads(payload).get("bytes") != got or got != size:
                raise ProtocolError(f"a put ended after {got} of {size} bytes")
            return b"".join(parts)
        else:
            raise ProtocolError(f"unexpected frame {kind!r} in a put")


def _key(msg: dict[str, Any]) -> str:
    key = msg.get("key")
    if not isinstance(key, str):
        raise InvalidInput(f"invalid object key {key!r}")
    return check_key(key)


def _one(store: DirStore, agent: RemoteTarget, action: object, msg: dict[str, Any],
         data: bytes | None) -> dict[str, Any] | None:
    """One operation; its reply (None: it wrote its own, a listing or an object)."""
    if action == "create":
        store.create()
        return {}
    if action == "put":
        assert data is not None
        store.put(_key(msg), data)
        return {}
    if action == "get":
        limit = msg.get("limit")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidInput(f"invalid limit {limit!r}")
        blob = store.get(_key(msg), min(limit, MAX_OBJECT))
        write_json(agent.write, {"ok": True, "size": len(blob)})
        view = memoryview(blob)
        for i in range(0, len(view), MAX_DATA):
            agent.write(pack(DATA, bytes(view[i:i + MAX_DATA])))
        write_end(agent.write, {"bytes": len(view)})
        return None
    if action == "exists":
        return {"exists": store.exists(_key(msg))}
    if action == "missing":
        keys = msg.get("keys")
        if not isinstance(keys, list) or len(keys) > MISSING_BATCH \
                or not all(isinstance(k, str) for k in keys):
            raise InvalidInput("invalid missing request")
        return {"missing": [k for k in keys if not store.exists(check_key(k))]}
    if action == "list":
        prefix = msg.get("prefix")
        if not isinstance(prefix, str) or len(prefix) > MAX_KEY or "\0" in prefix:
            raise InvalidInput(f"invalid object key prefix {prefix!r}")
        keys = [k for k in store.list(prefix) if valid_key(k)]
        write_json(agent.write, {"ok": True})
        batch: list[str] = []
        size = 0
        for k in keys:
            if batch and size + len(k) + 1 > LIST_FRAME:
                agent.write(pack(DATA, "\n".join(batch).encode()))
                batch, size = [], 0
            batch.append(k)
            size += len(k) + 1
        if batch:
            agent.write(pack(DATA, "\n".join(batch).encode()))
        write_end(agent.write, {"count": len(keys)})
        return None
    if action == "delete":
        store.delete(_key(msg))
        return {}
    raise InvalidInput(f"unknown objects request {action!r}")
