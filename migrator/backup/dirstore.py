"""``DirStore``: the ``ObjectStore`` of a local directory (a chunked repository on a disk).

An object is a file under the root, its key the relative path (``data/ab/abcd...``). The
store keeps the ``ObjectStore`` contract with the file system's means:

- ``put`` writes a temporary name (``.tmp-*``, which ``list`` never shows), fsyncs it,
  renames it over the key and fsyncs the directory: a crash leaves the old object or the
  new one, never a prefix.
- Files are 0600 and directories 0700: the objects of an unencrypted repository are whole
  root filesystems.
- ``get`` opens with ``O_NOFOLLOW`` below directories it checks are not symlinks: a link
  planted in the repository cannot make it read a file elsewhere. It refuses an object
  above ``limit`` from ``fstat`` and reads at most ``limit + 1`` bytes (the file may grow).
- Every key passes ``check_key`` first, so no key names a path outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from migrator.backup.objectstore import check_key
from migrator.backup.repository import write_atomic
from migrator.core.errors import CorruptBackup, NotFound, StorageError

TMP_PREFIX = ".tmp-"


class DirStore:
    """Objects as files under ``path`` (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()
        self.url = str(self.path)
        self._made: set[Path] = set()

    def __str__(self) -> str:
        return self.url

    def create(self) -> None:
        """Make the root directory (0700) if it is missing."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def _file(self, key: str) -> Path:
        return self.path / check_key(key)

    def _dir(self, d: Path) -> None:
        """``d`` and its parents up to the root, made 0700 (each once per store)."""
        if d in self._made:
            return
        if d != self.path:
            self._dir(d.parent)
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(d).st_mode):
                    raise StorageError(f"{d} is not a directory (a planted link?)",
                                       "the repository was altered: check it") from None
        self._made.add(d)

    def put(self, key: str, data: bytes) -> None:
        path = self._file(key)
        self._dir(path.parent)
        write_atomic(path, data,
                     path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}"))

    def _open(self, key: str) -> int:
        """A read descriptor on the object, no symlink followed at any level."""
        path = self._file(key)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            parts = key.split("/")
            for seg in parts[:-1]:
                nxt = os.open(seg, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            obj = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError as e:
            raise NotFound(f"object {key} is missing from {self.url}") from e
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptBackup(f"object {key} in {self.url} is a symbolic link or "
                                    "below one", "a link was planted in the repository") from e
            raise StorageError(f"cannot read {path}: {e}") from e
        finally:
            os.close(fd)
        return obj

    def get(self, key: str, limit: int) -> bytes:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptBackup(f"object {key} in {self.url} is not a regular file")
            if st.st_size > limit:
                raise CorruptBackup(f"object {key} in {self.url} has {st.st_size} bytes, "
                                    f"more than the {limit} it may have")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise CorruptBackup(f"object {key} in {self.url} grew beyond {limit} bytes")
        return data

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._file(key)).st_mode)
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (regular files only; temporaries and links are skipped)."""
        top = self.path
        for dirpath, dirnames, filenames in os.walk(top):  # os.walk follows no links
            rel = os.path.relpath(dirpath, top)
            base = "" if rel == "." else rel + "/"
            # prune directories that cannot hold a key under prefix
            dirnames[:] = [d for d in dirnames if not d.startswith(".")
                           and ((base + d + "/").startswith(prefix)
                                or prefix.startswith(base + d + "/"))]
            for name in filenames:
                key = base + name
                if name.startswith(TMP_PREFIX) or not key.startswith(prefix):
                    continue
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(os.path.join(dirpath, name)).st_mode):
                        yield key

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(key))

    def close(self) -> None:
        """Nothing is held open between calls."""
