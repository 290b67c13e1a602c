"""Where a chunked repository keeps its objects: one small interface, three kinds of store.

A chunked backup repository (issue: backups beyond one machine) is a set of named objects
(``config``, ``keys/...``, ``data/XX/ID`` chunks, ``index/NAME`` backup indexes, ``locks/...``;
an encrypted repository's NAMEs are keyed hashes, see ``migrator.backup.chunkrepo``).
Every store, a local directory, an ``ssh://`` host through its agent, or an ``s3://`` bucket,
offers the same few operations, so the repository logic is written once.

The contract every store keeps:

- ``put`` is atomic: a reader sees the whole object or none of it, never a prefix (a local
  directory writes a temporary name, fsyncs and renames; S3 PUT is atomic by itself).
- ``get`` returns at most ``limit`` bytes and raises ``CorruptBackup`` when the object is
  larger: a store is outside this process, and a lying or planted object must not make it
  read without bound.
- ``list`` yields the keys under a prefix, in no promised order.
- ``delete`` of a missing key is not an error (a prune that was interrupted runs again).
- Keys are made only by the repository (``valid_key``): relative, ``/``-separated, of
  ``[A-Za-z0-9._-]`` segments, never ``.`` or ``..``. A store refuses anything else, so a key
  can never name a path outside its root.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Protocol

from migrator.core.errors import InvalidInput

MAX_KEY = 512
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def valid_key(key: str) -> bool:
    """True for a key the repository may use: ``seg/seg/...``, no empty, ``.`` or ``..``."""
    if not key or len(key) > MAX_KEY:
        return False
    return all(_SEGMENT.fullmatch(seg) and seg not in (".", "..") for seg in key.split("/"))


def check_key(key: str) -> str:
    if not valid_key(key):
        raise InvalidInput(f"invalid object key {key!r}",
                           "keys are made by the repository: a bug or a hostile caller")
    return key


def check_path(path: str) -> str:
    """An absolute, normalised repository path (no ``..``, no ``//``, no NUL): the path of
    an ``ssh://HOST/PATH`` repository, checked on both sides (here, below the directory
    repository's client and the ssh:// object store, so neither imports the other)."""
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or str(p) != path.rstrip("/") or "\0" in path \
            or "//" in path:
        raise InvalidInput(f"repository path {path!r} must be absolute and normalised",
                           "e.g. ssh://host-b/srv/backups")
    return str(p)


class ObjectStore(Protocol):
    """A flat namespace of immutable-once-written objects (see the module docstring)."""

    #: how the store is shown to a user (``/srv/repo``, ``ssh://b/srv/repo``, ``s3://bkt/pfx``)
    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing an object of that name)."""
        ...

    def get(self, key: str, limit: int) -> bytes:
        """The object's bytes; ``NotFound`` when absent, ``CorruptBackup`` above ``limit``."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix`` (``""`` for all)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""
        ...

    def close(self) -> None: ...
