"""A local backup repository: a directory of backups, each complete or absent.

Layout (``REPO`` defaults to ``<state root>/backups``)::

    REPO/repo.json                {"format": "migrator-backup", "version": 1}
    REPO/lock                     flock'ed by a writer; holds the writer's pid
    REPO/backups/ID/index.json    written last: a backup exists only once its index does
    REPO/backups/ID/PARTS         rootfs.tar.zst, snapshots/NAME.tar.zst, container.btrfs.zst...
    REPO/backups/.partial-ID/     a backup being written; removed on failure and by the
                                  next writer (an interrupted one)

Files are 0600 and directories 0700: a backup holds whole root filesystems. Every file is
written under a temporary name, fsync'ed, renamed, and its directory fsync'ed, so a crash
leaves either the old state or the new one. A backup directory is assembled as
``.partial-ID`` and renamed to ``ID`` only after its index is on disk; deletion renames it
to ``.deleting-ID`` first, so a half-deleted backup is never listed.

The public methods (``list``, ``get``, ``writer``, ``open_part``, ``part_size``,
``set_protected``, ``delete``, ``lock``) are the whole interface the backup pipelines use,
so a remote repository (through the agent) can offer the same ones.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from migrator.backup.model import FORMAT, MAX_INDEX_BYTES, VERSION, BackupIndex, PartInfo, valid_id
from migrator.core.errors import BackupError, CorruptBackup, NotFound

LOCK_WAIT = 10.0  # seconds a second writer waits for the first before giving up
CHUNK = 1 << 20


def new_backup_id(container: str, now: float | None = None) -> str:
    """``NAME-YYYYmmddTHHMMSSZ-hex6``: sorts by time within a container, never collides."""
    t = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
    return f"{container}-{t.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def valid_part_path(rel: str) -> bool:
    """A part's path inside its backup directory: relative, no ``..``, not the index."""
    return bool(rel) and not rel.startswith(("/", ".")) and ".." not in rel \
        and "\0" not in rel and rel != "index.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Temp name (``tmp``, else a hidden one beside ``path``), fsync, rename over ``path``,
    fsync the directory; mode 0600. Every atomic file of a repository is written here: a
    crash leaves the old file or the new one, never a part of it."""
    tmp = tmp or path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# the interface ------------------------------------------------------------------------------
# The backup pipelines (create, restore, verify, prune, copy) run unchanged against a local
# ``Repository`` and a ``backup.remote.RemoteRepository`` on another host; these Protocols are
# what they may use of either, so a call that only one of them offers is a type error.
class PartSink(Protocol):
    """One part being stored: counted and hashed on the way; ``finish`` seals it and says
    what was stored, ``abort`` drops it."""

    def write(self, data: bytes | memoryview) -> int: ...

    def flush(self) -> None: ...

    def finish(self) -> tuple[int, str]:
        """(size, sha256) of what was stored."""
        ...

    def abort(self) -> None: ...


class BackupSink(Protocol):
    """One backup being written: its parts, then ``commit`` (it exists) or ``abort``
    (nothing of it is left)."""

    def part(self, rel: str) -> PartSink: ...

    def commit(self, index: BackupIndex) -> None: ...

    def abort(self) -> None: ...


class PartSource(Protocol):
    """A stored part read like a file (a local file or a download); the caller checks it
    against the index."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> PartSource: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> None: ...


class ReadsInto:
    """``readinto`` for a reader that defines ``read``: file-like consumers may fill a
    buffer instead of taking new bytes (the part readers and downloads share this)."""

    def read(self, n: int = -1, /) -> bytes:
        raise NotImplementedError

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class BackupRepository(Protocol):
    """What the backup pipelines use of a repository, local (``Repository``) or on another
    host (``backup.remote.RemoteRepository``): set-up, the writer's lock, reading indexes
    and parts, writing, protecting and deleting backups. ``str()`` names it for messages."""

    def init(self) -> BackupRepository:
        """Create it if missing, then ``check``."""
        ...

    def check(self) -> BackupRepository:
        """Refuse what is not a repository of this format and version."""
        ...

    def lock(self, wait: float | None = None) -> AbstractContextManager[None]:
        """The one-writer lock, held for the ``with`` block."""
        ...

    def ids(self) -> list[str]: ...

    def get(self, backup_id: str) -> BackupIndex: ...

    def list(self) -> list[BackupIndex]: ...

    def part_size(self, backup_id: str, rel: str) -> int | None: ...

    def open_part(self, backup_id: str, rel: str) -> PartSource: ...

    def writer(self, backup_id: str) -> BackupSink: ...

    def set_protected(self, backup_id: str, protected: bool) -> BackupIndex: ...

    def delete(self, backup_id: str) -> None: ...


class PartWriter:
    """A part being written: counts and hashes what goes to disk; ``finish`` seals it."""

    def __init__(self, path: Path, rel: str) -> None:
        self.rel = rel
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._f: BinaryIO = open(  # noqa: SIM115 - closed by finish/abort
            os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()

    def finish(self) -> tuple[int, str]:
        """fsync and rename into place; returns (size, sha256)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()


class BackupWriter:
    """Builds one backup in ``.partial-ID``; ``commit`` makes it exist, ``abort`` removes it."""

    def __init__(self, repo: Repository, backup_id: str, fresh: bool = True) -> None:
        """``fresh``: start the partial directory anew; else continue one that exists (a
        remote writer's parts arrive in separate agent requests)."""
        if not valid_id(backup_id):
            raise BackupError(f"invalid backup id {backup_id!r}")
        self.repo = repo
        self.id = backup_id
        self.dir = repo.backups_dir / f".partial-{backup_id}"
        if (repo.backups_dir / backup_id).exists():
            raise BackupError(f"backup {backup_id} already exists")
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(mode=0o700)
        elif not self.dir.is_dir():
            raise BackupError(f"backup {backup_id} is not being written (no partial directory)",
                              "the writer was interrupted; start the backup again")
        self.parts: list[PartInfo] = []

    def part(self, rel: str) -> PartWriter:
        if not valid_part_path(rel):
            raise ValueError(f"bad part path {rel!r}")
        return PartWriter(self.dir / rel, rel)

    def commit(self, index: BackupIndex) -> None:
        """Write the index (atomically) and move the backup into place."""
        if index.id != self.id:
            raise ValueError("index of another backup")
        BackupIndex.from_json(index.to_json(), self.id)  # never write an index we'd refuse
        for sub in [self.dir, *[p for p in self.dir.rglob("*") if p.is_dir()]]:
            fsync_dir(sub)
        write_atomic(self.dir / "index.json", index.to_json().encode())
        os.rename(self.dir, self.repo.backups_dir / self.id)
        fsync_dir(self.repo.backups_dir)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Repository:
    """A local repository directory (see the module docstring for the layout)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self.backups_dir = self.path / "backups"

    def __str__(self) -> str:
        return str(self.path)

    # set-up ----------------------------------------------------------------------------
    def init(self) -> Repository:
        """Create the repository if it does not exist; check its format if it does."""
        marker = self.path / "repo.json"
        if not marker.exists():
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            self.backups_dir.mkdir(mode=0o700, exist_ok=True)
            write_atomic(marker, json.dumps({"format": FORMAT, "version": VERSION}).encode())
        return self.check()

    def check(self) -> Repository:
        marker = self.path / "repo.json"
        try:
            doc = json.loads(marker.read_text())
        except FileNotFoundError as e:
            raise NotFound(f"no backup repository at {self.path}",
                           "create a backup there first, or give the right --repo") from e
        except (OSError, ValueError) as e:
            raise BackupError(f"{marker} is unreadable: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BackupError(f"{self.path} is not a migrator backup repository")
        if doc.get("version") != VERSION:
            raise BackupError(f"repository {self.path} has format version "
                              f"{doc.get('version')}, this program reads {VERSION}",
                              "use the migrator version that wrote it")
        self.backups_dir.mkdir(mode=0o700, exist_ok=True)
        return self

    @contextlib.contextmanager
    def lock(self, wait: float | None = None) -> Iterator[None]:
        """Exclusive writer lock (flock on ``REPO/lock``); waits up to ``wait`` seconds
        (default ``LOCK_WAIT``), then ``BackupError`` naming the holder's pid."""
        wait = LOCK_WAIT if wait is None else wait
        path = self.path / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                        raise BackupError(
                            f"backup repository {self.path} is locked by another writer "
                            f"(pid {holder or 'unknown'})",
                            "wait for it to finish; if that process is gone, the lock is "
                            "released by itself (it is an flock)") from e
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._clean_partials()
            yield
        finally:
            os.close(fd)  # releases the flock

    def _clean_partials(self) -> None:
        """Remove what an interrupted writer left (only called under the lock)."""
        for p in self.backups_dir.iterdir():
            if p.name.startswith((".partial-", ".deleting-")):
                shutil.rmtree(p, ignore_errors=True)

    # reading ---------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every backup directory (complete or not: ``get`` says which are readable)."""
        if not self.backups_dir.is_dir():
            return []
        return sorted(p.name for p in self.backups_dir.iterdir()
                      if not p.name.startswith(".") and valid_id(p.name))

    def get(self, backup_id: str) -> BackupIndex:
        if not valid_id(backup_id):
            raise NotFound(f"no backup {backup_id!r} in {self.path}",
                           "see `migrate backup list`")
        path = self.backups_dir / backup_id / "index.json"
        try:
            with open(path, "rb") as f:  # no more than from_json accepts, +1 to refuse it
                data = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError as e:
            if (self.backups_dir / backup_id).is_dir():
                raise CorruptBackup(f"backup {backup_id}: index.json is missing") from e
            raise NotFound(f"no backup {backup_id!r} in {self.path}",
                           "see `migrate backup list`") from e
        return BackupIndex.from_json(data, backup_id)

    def list(self) -> list[BackupIndex]:
        """Readable backups, oldest first (unreadable ones are for ``verify`` to report)."""
        out = []
        for i in self.ids():
            with contextlib.suppress(CorruptBackup):
                out.append(self.get(i))
        return sorted(out, key=lambda b: (b.created, b.id))

    def _part_path(self, backup_id: str, rel: str) -> Path:
        return self.backups_dir / backup_id / rel

    def part_size(self, backup_id: str, rel: str) -> int | None:
        """Bytes on disk of a part, or None when it is missing."""
        try:
            return os.stat(self._part_path(backup_id, rel)).st_size
        except FileNotFoundError:
            return None

    def open_part(self, backup_id: str, rel: str) -> BinaryIO:
        try:
            return open(self._part_path(backup_id, rel), "rb")  # noqa: SIM115
        except FileNotFoundError as e:
            raise CorruptBackup(f"backup {backup_id}: missing part {rel}") from e

    # writing (under ``lock``) ----------------------------------------------------------
    def writer(self, backup_id: str, fresh: bool = True) -> BackupWriter:
        return BackupWriter(self, backup_id, fresh)

    def set_protected(self, backup_id: str, protected: bool) -> BackupIndex:
        idx = self.get(backup_id)
        idx.protected = protected
        write_atomic(self.backups_dir / backup_id / "index.json", idx.to_json().encode())
        return idx

    def delete(self, backup_id: str) -> None:
        if not valid_id(backup_id) or not (self.backups_dir / backup_id).is_dir():
            raise NotFound(f"no backup {backup_id!r} in {self.path}",
                           "see `migrate backup list`")  # a corrupt one may be deleted
        doomed = self.backups_dir / f".deleting-{backup_id}"
        os.rename(self.backups_dir / backup_id, doomed)
        fsync_dir(self.backups_dir)
        shutil.rmtree(doomed)
