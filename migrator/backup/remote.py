"""A backup repository on another host (``--repo ssh://HOST/PATH``), through its agent.

``RemoteRepository`` offers the same methods as the local ``Repository`` (``init``,
``check``, ``lock``, ``ids``, ``get``, ``list``, ``part_size``, ``open_part``, ``writer``,
``set_protected``, ``delete``), so create, verify, restore, prune and protect run unchanged
against it. On the far host the agent serves each call with a local ``Repository`` on the
same path, so the on-disk guarantees are the local ones: 0600 files, temporary names,
fsync, rename, a backup complete or absent.

- **Small calls** (ids, index, sizes, protect, delete) are one agent request each.
- **Parts** travel as the agent protocol's data frames on a channel of their own: an
  upload ends with a trailer (byte count) and the agent answers with the size and sha256 of
  what it wrote, which the client compares with what it sent, so a part altered in transit
  is caught before the index naming it is committed. A download is checked the same way,
  and the caller then checks the sha256 against the index as for a local part.
- **The lock** is an agent holding the repository's flock for as long as the client keeps
  its channel open. A client that dies closes the channel (or the connection), the agent
  exits and the flock goes with it: no stale lock to clear by hand.

``serve_repository`` and ``serve_restore`` are the agent's side. Every name that arrives is
checked (an absolute normalised path, a backup id, a part path) before it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from migrator.backup.model import BackupIndex, valid_id
from migrator.backup.objectstore import check_path
from migrator.backup.replicate import copy_chain
from migrator.backup.repository import (
    CHUNK,
    BackupRepository,
    ReadsInto,
    Repository,
    valid_part_path,
)
from migrator.backup.restore import restore_backup
from migrator.backup.sshstore import SshObjectStore
from migrator.core import errors
from migrator.core.errors import CorruptBackup, InvalidInput
from migrator.pipelines.remote_target import RemoteTarget
from migrator.runtime.host import Host
from migrator.streams import Progress, ProgressEvent
from migrator.transport.base import EventHandler, Transport
from migrator.transport.frames import (
    DATA,
    END,
    JSON,
    MAX_DATA,
    ProtocolError,
    Reader,
    pack,
    read_frame,
    read_json,
    write_end,
    write_json,
)
from migrator.transport.replies import remote_error

SCHEME = "ssh://"


def parse_url(url: str) -> tuple[str, str | None]:
    """``ssh://HOST/ABS/PATH`` -> (HOST, "/ABS/PATH"); ``ssh://HOST`` -> (HOST, None), the
    host's default repository (``<its state root>/backups``)."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname or parts.username or parts.port \
            or parts.query or parts.fragment:
        raise InvalidInput(f"bad repository address {url!r}",
                           "use ssh://HOST/PATH with HOST from `migrate host list` (its "
                           "address, user and port come from the inventory), e.g. "
                           "ssh://host-b/srv/backups")
    path = parts.path or None
    if path in ("/", None):
        return parts.netloc, None
    return parts.netloc, check_path(path)


def _check_id(backup_id: object) -> str:
    if not isinstance(backup_id, str) or not valid_id(backup_id):
        raise InvalidInput(f"invalid backup id {backup_id!r}")
    return backup_id


def _check_rel(rel: object) -> str:
    if not isinstance(rel, str) or not valid_part_path(rel):
        raise InvalidInput(f"invalid part path {rel!r}")
    return rel


# the client side ---------------------------------------------------------------------------
class RemotePartWriter:
    """One part being uploaded: ``write`` sends data frames; ``finish`` ends the stream and
    compares the far side's size and sha256 with what was sent."""

    def __init__(self, chan: Any, rel: str, where: str) -> None:
        self.chan, self.rel, self.where = chan, rel, where
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        for i in range(0, len(view), MAX_DATA):
            piece = view[i:i + MAX_DATA]
            self.chan.sendall(pack(DATA, bytes(piece)))
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        """Frames go out as they are written; nothing is buffered here."""

    def finish(self) -> tuple[int, str]:
        try:
            write_end(self.chan.sendall, {"bytes": self.size})
            reply = read_json(self.chan.recv)
        except (OSError, EOFError) as e:
            raise errors.NetworkError(f"{self.where}: the upload of {self.rel} broke: {e}",
                                      "the backup was not committed; retry") from e
        finally:
            self.chan.close()
        if not reply.get("ok"):
            raise remote_error(self.where, reply.get("error") or {})
        digest = self._hash.hexdigest()
        if reply.get("size") != self.size or reply.get("sha256") != digest:
            raise CorruptBackup(f"{self.where}: part {self.rel} arrived as "
                                f"{reply.get('size')} bytes sha256 {reply.get('sha256')}, "
                                f"sent {self.size} bytes sha256 {digest}",
                                "the link altered the data; the backup was not committed")
        return self.size, digest

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()


class RemotePartReader(ReadsInto):
    """A part being downloaded, read like a file; the byte count is checked at the end."""

    def __init__(self, chan: Any, rel: str, where: str) -> None:
        self.chan, self.rel, self.where = chan, rel, where
        self._buf = b""
        self._pos = 0
        self._count = 0
        self._ended = False

    def _more(self) -> bool:
        """Read the next frame into the buffer; False at the (checked) end."""
        if self._ended:
            return False
        try:
            kind, payload = read_frame(self.chan.recv)
        except (OSError, EOFError, ProtocolError) as e:
            raise errors.NetworkError(f"{self.where}: the download of {self.rel} broke after "
                                      f"{self._count} bytes: {e}", "retry") from e
        if kind == DATA:
            self._buf, self._pos = payload, 0
            self._count += len(payload)
            return True
        if kind == END:
            sent = json.loads(payload).get("bytes")
            if sent != self._count:
                raise errors.NetworkError(f"{self.where}: {self.rel} ended after "
                                          f"{self._count} bytes, {sent} were sent", "retry")
            self._ended = True
            with contextlib.suppress(Exception):
                read_json(self.chan.recv)  # the request's own reply: all went well
            return False
        if kind == JSON:  # an error instead of the rest of the data
            raise remote_error(self.where, json.loads(payload).get("error") or {})
        raise errors.NetworkError(f"{self.where}: unexpected frame {kind!r} in {self.rel}")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        while self._pos >= len(self._buf):
            if not self._more():
                return b""
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()

    def __enter__(self) -> RemotePartReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteBackupWriter:
    """A backup being written on the far host: parts upload in their own channels into its
    ``.partial-ID`` directory; ``commit`` writes the index there and renames it into place."""

    def __init__(self, repo: RemoteRepository, backup_id: str) -> None:
        self.repo, self.id = repo, backup_id
        repo.call("begin", id=backup_id)

    def part(self, rel: str) -> RemotePartWriter:
        if not valid_part_path(rel):
            raise ValueError(f"bad part path {rel!r}")
        chan = self.repo.open("put", id=self.id, rel=rel)
        return RemotePartWriter(chan, rel, self.repo.host)

    def commit(self, index: BackupIndex) -> None:
        if index.id != self.id:
            raise ValueError("index of another backup")
        self.repo.call("commit", id=self.id, index=index.to_json())

    def abort(self) -> None:
        """Undo: remove the partial backup (the next writer's lock also removes it, should
        the far host be unreachable now)."""
        self.repo.call("abort", id=self.id)


class RemoteRepository:
    """A repository on an inventory host, reached through ``transport`` (its agent)."""

    def __init__(self, transport: Transport, path: str | None) -> None:
        self.t = transport
        self.host = transport.name
        self.path = path  # None: the far host's default, <its root>/backups

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}{self.path or ''}"

    def call(self, action: str, **args: Any) -> dict[str, Any]:
        reply: dict[str, Any] = self.t.request(
            "repository", {"action": action, "path": self.path, **args})
        return reply

    def open(self, action: str, **args: Any) -> Any:
        return self.t.open_raw("repository", {"action": action, "path": self.path, **args})

    def init(self) -> RemoteRepository:
        self.path = self.call("init")["path"]
        return self

    def check(self) -> RemoteRepository:
        self.path = self.call("check")["path"]
        return self

    @contextlib.contextmanager
    def lock(self, wait: float | None = None) -> Iterator[None]:
        chan = self.open("lock", wait=wait)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                write_json(chan.sendall, {"release": True})
                read_json(chan.recv)
            chan.close()

    def ids(self) -> list[str]:
        return [_check_id(i) for i in self.call("ids")["ids"]]

    def get(self, backup_id: str) -> BackupIndex:
        reply = self.call("get", id=backup_id)
        return BackupIndex.from_json(str(reply["index"]).encode(), backup_id)

    def list(self) -> list[BackupIndex]:
        out = []
        for bid, text in self.call("list")["indexes"]:
            with contextlib.suppress(CorruptBackup):
                out.append(BackupIndex.from_json(str(text).encode(), _check_id(bid)))
        return sorted(out, key=lambda b: (b.created, b.id))

    def part_size(self, backup_id: str, rel: str) -> int | None:
        size = self.call("part_size", id=backup_id, rel=rel)["size"]
        return None if size is None else int(size)

    def open_part(self, backup_id: str, rel: str) -> RemotePartReader:
        return RemotePartReader(self.open("get_part", id=backup_id, rel=rel), rel,
                                f"{self.host}:{backup_id}")

    def writer(self, backup_id: str) -> RemoteBackupWriter:
        return RemoteBackupWriter(self, backup_id)

    def set_protected(self, backup_id: str, protected: bool) -> BackupIndex:
        reply = self.call("protect", id=backup_id, protected=bool(protected))
        return BackupIndex.from_json(str(reply["index"]).encode(), backup_id)

    def delete(self, backup_id: str) -> None:
        self.call("delete", id=backup_id)

    def close(self) -> None:
        """Close the connection (``open_repository`` made it for this repository)."""
        self.t.close()


def open_repository(host: Host, spec: str | None,
                    passphrase: Callable[[bool], str] | None = None,
                    key_file: Path | None = None) -> BackupRepository:
    """``spec`` as given to ``--repo`` or ``backups.repo``: a directory, ``ssh://HOST/PATH``
    on one of ``host``'s inventory hosts, ``s3://BUCKET/PREFIX``, or None for
    ``<state root>/backups``.

    A directory holding a chunked repository's ``config``, every ``s3://`` address, and an
    ``ssh://`` directory holding such a ``config`` (asked through the far agent's object
    session) are ``ChunkedRepository``s (``passphrase``: how to ask for one when
    ``MIGRATOR_PASSPHRASE`` is not set; ``key_file``, else ``MIGRATOR_KEY_FILE``: where the
    key envelope is kept when not in the repository). Any other ``ssh://`` repository is
    the directory format, served by the far agent. ``close_repository`` releases what this
    opened (an ssh:// repository's connection)."""
    if key_file is None and os.environ.get("MIGRATOR_KEY_FILE"):
        key_file = Path(os.environ["MIGRATOR_KEY_FILE"])
    if spec and spec.startswith("ssh:"):
        # paramiko only here, for an ssh:// repository: the agent imports this module for
        # its dispatch table, and ~0.3 s more on each agent's start-up would be paid by all
        from migrator.runtime.peers import inventory_transport

        name, path = parse_url(spec)
        t = inventory_transport(host, name).connect()  # one connection, whichever format
        try:
            store = SshObjectStore(t, path, owns_transport=True)
            try:
                chunked = store.exists("config")
            except InvalidInput as e:  # an agent from before chunked repositories
                if "unknown agent request" not in e.message:
                    raise
                chunked = False
            if chunked:
                from migrator.backup.chunkrepo import ChunkedRepository

                return ChunkedRepository(store, passphrase, key_file)
            store.owns_transport = False  # the transport stays open for the repository
            store.close()  # only its session's agent exits
        except BaseException:
            t.close()
            raise
        return RemoteRepository(t, path)
    if spec and spec.startswith("s3:"):
        # boto3 (slow to import) and the chunked format's crypto only for such a repository
        from migrator.backup.chunkrepo import ChunkedRepository
        from migrator.backup.s3store import S3Store

        return ChunkedRepository(S3Store.from_url(spec), passphrase, key_file)
    where = Path(spec) if spec else host.root / "backups"
    if (where / "config").is_file() and not (where / "repo.json").exists():
        from migrator.backup.chunkrepo import ChunkedRepository
        from migrator.backup.dirstore import DirStore

        return ChunkedRepository(DirStore(where), passphrase, key_file)
    return Repository(where)


def close_repository(repo: BackupRepository) -> None:
    """Release what ``open_repository`` opened: an ssh:// repository's connection (and its
    sessions' agents), an S3 client's pool; nothing for a directory."""
    close = getattr(repo, "close", None)
    if close is not None:
        close()


# the agent side ----------------------------------------------------------------------------
def _local_repo(agent: RemoteTarget, req: dict[str, Any]) -> Repository:
    path = req.get("path")
    if path is None:
        return Repository(agent.host.root / "backups")
    return Repository(Path(check_path(str(path))))


def _ready(agent: RemoteTarget) -> None:
    """The first reply of a request whose channel then carries data (``open_raw``)."""
    write_json(agent.write, {"ok": True, "ready": True})


def serve_repository(agent: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """One repository call from a client (see ``RemoteRepository``)."""
    repo = _local_repo(agent, req)
    action = str(req.get("action"))
    if action == "init":
        return {"path": str(repo.init().path)}
    repo.check()
    if action == "check":
        return {"path": str(repo.path)}
    if action == "ids":
        return {"ids": repo.ids()}
    if action == "get":
        return {"index": repo.get(_check_id(req["id"])).to_json()}
    if action == "list":
        return {"indexes": [[b.id, b.to_json()] for b in repo.list()]}
    if action == "part_size":
        return {"size": repo.part_size(_check_id(req["id"]), _check_rel(req["rel"]))}
    if action == "protect":
        idx = repo.set_protected(_check_id(req["id"]), bool(req["protected"]))
        return {"index": idx.to_json()}
    if action == "delete":
        repo.delete(_check_id(req["id"]))
        return {}
    if action == "begin":
        repo.writer(_check_id(req["id"]))
        return {}
    if action == "commit":
        bid = _check_id(req["id"])
        repo.writer(bid, fresh=False).commit(BackupIndex.from_json(str(req["index"]).encode(),
                                                                   bid))
        return {}
    if action == "abort":
        shutil.rmtree(repo.backups_dir / f".partial-{_check_id(req['id'])}",
                      ignore_errors=True)
        return {}
    if action == "lock":
        return _hold_lock(agent, repo, req, read)
    if action == "put":
        return _receive_part(agent, repo, req, read)
    if action == "get_part":
        return _send_part(agent, repo, req)
    raise InvalidInput(f"unknown repository request {action!r}")


def _hold_lock(agent: RemoteTarget, repo: Repository, req: dict[str, Any],
               read: Reader) -> dict[str, Any]:
    wait = req.get("wait")
    with repo.lock(None if wait is None else float(wait)):
        _ready(agent)
        # held until the client releases it, or its channel closes (the client died)
        with contextlib.suppress(ProtocolError, OSError):
            read_json(read)
    return {}


def _receive_part(agent: RemoteTarget, repo: Repository, req: dict[str, Any],
                  read: Reader) -> dict[str, Any]:
    part = repo.writer(_check_id(req["id"]), fresh=False).part(_check_rel(req["rel"]))
    try:
        _ready(agent)
        while True:
            kind, payload = read_frame(read)
            if kind == DATA:
                part.write(payload)
            elif kind == END:
                sent = json.loads(payload).get("bytes")
                if sent != part.size:
                    raise ProtocolError(f"part {part.rel}: {part.size} bytes arrived, the "
                                        f"client sent {sent}")
                break
            else:
                raise ProtocolError(f"unexpected frame {kind!r} in an upload")
        size, digest = part.finish()
    except BaseException:
        part.abort()
        raise
    return {"size": size, "sha256": digest}


def _send_part(agent: RemoteTarget, repo: Repository, req: dict[str, Any]) -> dict[str, Any]:
    f = repo.open_part(_check_id(req["id"]), _check_rel(req["rel"]))
    with f:
        _ready(agent)
        count = 0
        while chunk := f.read(min(CHUNK, MAX_DATA)):
            agent.write(pack(DATA, chunk))
            count += len(chunk)
        write_end(agent.write, {"bytes": count})
    return {"bytes": count}


def serve_restore(agent: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """``backup restore --host THIS-HOST`` from a repository on this host; progress goes to
    the client as events."""
    repo = _local_repo(agent, req)

    def progress(event: ProgressEvent) -> None:
        agent.notify({"event": "progress", "phase": event.phase, "done": event.done,
                      "total": event.total, "rate": event.rate, "eta": event.eta})

    config = {str(k): str(v) for k, v in dict(req.get("config") or {}).items()}
    # the operator's --allow-privileged, relayed by a client that logged in as root here
    r = restore_backup(agent.cts, repo, _check_id(req["id"]), req.get("name"),
                       req.get("pool"), config, bool(req.get("force")), progress,
                       bool(req.get("verify_first", True)),
                       bool(req.get("allow_privileged")) and agent.allow_privileged)
    return {"result": r.as_dict()}


def progress_relay(progress: Progress) -> EventHandler:
    """An ``on_event`` callback that turns the agent's progress events back into
    ``ProgressEvent``s for this side's bars."""
    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("event") == "progress":
            progress(ProgressEvent(str(ev.get("phase")), int(ev.get("done") or 0),
                                   ev.get("total"), float(ev.get("rate") or 0),
                                   ev.get("eta")))
    return on_event


def restore_on_host(transport: Transport, repo: BackupRepository, backup_id: str, name: str | None,
                    pool: str | None, config: dict[str, str], force: bool,
                    progress: Progress, verify_first: bool = True, allow_privileged: bool = False
                    ) -> tuple[dict[str, Any], list[str]]:
    """``backup restore --host H``: the restore runs on H, by H's agent, from a repository
    on H. A backup held elsewhere (this host, or a third one) is first copied with its chain
    into H's default repository (checked part by part on the way) and those copies are
    removed again afterwards. Returns the restore's result and the ids staged on H."""
    args = {"id": backup_id, "name": name, "pool": pool, "config": config, "force": force,
            "verify_first": verify_first, "allow_privileged": allow_privileged}
    if isinstance(repo, RemoteRepository) and repo.host == transport.name:
        reply = transport.request("backup_restore", {"path": repo.path, **args},
                                  on_event=progress_relay(progress))
        return dict(reply["result"]), []
    there = RemoteRepository(transport, None)
    staged = copy_chain(repo, there, backup_id, progress).copied
    try:
        reply = transport.request("backup_restore", {"path": None, **args},
                                  on_event=progress_relay(progress))
    finally:
        with there.lock():
            for bid in reversed(staged):
                there.delete(bid)
    return dict(reply["result"]), staged
