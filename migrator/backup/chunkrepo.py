"""``ChunkedRepository``: backups as lists of deduplicated, sealed chunks in an object store.

It offers the ``BackupRepository`` interface of the directory ``Repository``, so create,
restore, verify, prune and copy run on it unchanged; a part is stored as the list of chunks
its stream was cut into (``migrator.backup.chunks``), and a chunk already in the store is
never stored twice, whichever container, backup or host it came from.

Layout in the store (any ``ObjectStore``: a directory, S3)::

    config              plain JSON: format, version, repository id, encryption, chunker
                        (read first, validated; nothing secret)
    keys/repokey        the key envelope (``migrator.backup.keys``), unless kept in a key file
    data/ab/ab12...     chunks, named by keyed hash, sealed (``migrator.backup.chunks``)
    index/NAME          a backup: sealed JSON {"index": BackupIndex, "chunks": {part: [[id,
                        size], ...]}, "stats": {...}}; writing it is the commit
    writers/NAME        a backup being written (prune's garbage collection waits for it)
    locks/TOKEN         the exclusive lock of prune, delete and protect
    gc/pending          sealed: unreferenced chunks and when they were first seen so
    gc/running, gc/epoch  a collection under way; the token of the last one

Names (format version 2, encrypted): a backup id names a container and a time, so NAME is
not the id but its keyed hash (``Codec.name``: ``index:ID`` and ``writer:ID`` hashed apart,
so a writer's entry cannot be matched to the index it becomes); the id is inside the sealed
object, which is bound to NAME (its AEAD's associated data) and checked to hash to it. The
entries of ``writers/``, ``locks/`` and ``gc/running`` (owner ``host:pid``, time, the id)
are sealed too: a listing of the store shows how many objects there are, nothing of whose.
``ids()`` learns the ids by opening the indexes (in parallel, cached; ``list`` reads them
anyway), ``get(ID)`` computes the name. An index object that does not open with the key is
left out of ``ids()`` and ``list()`` (planted, damaged, or another repository's: it hides
nothing else), named by ``unreadable_indexes()``, and stops a garbage collection (its chunks
are unknown). A version-1 repository (written before names were keyed) and an unencrypted
one (``--encryption none``: nothing to hide it from) name both by the plain id, with plain
JSON entries, and stay so: a version-1 repository is read and written as before, by this
program and by older ones; a new encrypted repository is version 2, which older programs
refuse by its version instead of missing its indexes (and collecting their chunks).

Several writers at once: chunks are content-addressed and index names unique, so backups
take no lock; each announces itself in ``writers/`` while it runs. Deleting a backup
removes its index only; ``collect_garbage`` (prune) removes chunks in two phases: a chunk
unreferenced in one run is recorded in ``gc/pending``, and deleted by a later run only if
still unreferenced after a grace period and with no writer running. Each collection leaves
a new ``gc/epoch``; a writer waits for a collection under way before it lists the chunks it
will reuse, and if the epoch changed by the time it commits it lists the store again, so a
chunk deleted under it fails that backup, cleanly, instead of committing an index that
names a missing chunk. ``locks/``, ``writers/`` and ``gc/running`` are refreshed every
minute while their owner works; one not refreshed for ``STALE`` is a dead process's.

A crash leaves no half-visible backup: without its index a backup does not exist; its
chunks are garbage the next collection removes, and its ``writers/`` entry goes stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from migrator.backup.chunks import (
    AVG_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    Chunker,
    Codec,
    chunk_key,
    object_limit,
)
from migrator.backup.keys import RepoKey, WrongPassphrase, unwrap, wrap
from migrator.backup.model import BackupIndex, valid_id
from migrator.backup.objectstore import ObjectStore
from migrator.backup.repository import ReadsInto, valid_part_path, write_atomic
from migrator.core.errors import BackupError, CorruptBackup, InvalidInput, NotFound

ChunkList = list[tuple[str, int]]  # a part: (chunk id, size) in order
Names = list[str]

FORMAT = "migrator-chunked"
#: version 2: an encrypted repository's indexes and writers have keyed names (see above)
VERSION = 2
VERSIONS = (1, 2)
ENCRYPTIONS = ("repokey", "none")
MAX_CONFIG = 64 << 10
MAX_INDEX = 256 << 20  # chunk lists of a few TiB of parts
UPLOADERS = 6
IN_FLIGHT = 12  # chunks handed to uploaders and not yet stored: bounds the memory
PREFETCH = 8  # verify's and the index scan's parallel reads
#: a part read back (``ChunkReader``): chunks fetched at once, and how far ahead it reads,
#: in chunks and in bytes (what bounds its memory: plaintext waiting to be read)
FETCHERS = 8
READ_AHEAD = 32
READ_AHEAD_BYTES = 48 << 20
ASK_BATCH = 4  # new chunks asked about at once (at most IN_FLIGHT)
LOCK_WAIT = 10.0
#: a lock, writer or collection entry not refreshed (every ``HEARTBEAT``) for this long is a
#: dead process's: it is ignored and removed
STALE = 5 * 60.0
HEARTBEAT = 60.0
GC_GRACE = 24 * 3600.0

PassphraseSource = Callable[[bool], str]  # (confirm) -> passphrase
_KEYED = re.compile(r"[0-9a-f]{64}")  # a keyed name (``Codec.name``)


def env_passphrase() -> str | None:
    """``MIGRATOR_PASSPHRASE``, else the first line of the file ``MIGRATOR_PASSPHRASE_FILE``
    names (refused when others may read it: what a timer's unit points at), else None."""
    value = os.environ.get("MIGRATOR_PASSPHRASE")
    if value is not None:
        return value
    path = os.environ.get("MIGRATOR_PASSPHRASE_FILE")
    if not path:
        return None
    text = read_key_file(Path(path), "passphrase file").decode(errors="strict")
    return text.splitlines()[0] if text else ""


def passphrase_from_env(confirm: bool) -> str:
    """``env_passphrase``, or ``BackupError`` (no prompt: not on a terminal here)."""
    value = env_passphrase()
    if value is None:
        raise BackupError("this repository is encrypted and no passphrase was given",
                          "set MIGRATOR_PASSPHRASE or MIGRATOR_PASSPHRASE_FILE (a 0600 file "
                          "holding it), or run the command on a terminal")
    return value


@dataclass
class WriteStats:
    """What one backup stored: ``stored_bytes`` is what dedup and compression left new."""

    raw_bytes: int = 0
    stored_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0


def _read_stats(doc: Any) -> WriteStats | None:
    """An index's ``stats`` (sealed with it, so authentic; still shape-checked)."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise TypeError("stats is not an object")
    vals = {k: doc.get(k) for k in ("raw_bytes", "stored_bytes", "chunks", "new_chunks")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in vals.values()):
        raise ValueError(f"stats {vals!r} are not counts")
    return WriteStats(**vals)  # type: ignore[arg-type]


def _check_config(doc: Any, where: str) -> dict[str, Any]:
    """The config object, validated (it is plain and comes from the store)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError(f"{where} is not a chunked migrator repository")
    if doc.get("version") not in VERSIONS:
        raise BackupError(f"repository {where} has chunked format version "
                          f"{doc.get('version')!r}, this program reads "
                          f"{', '.join(map(str, VERSIONS))}",
                          "use the migrator version that wrote it")
    rid = doc.get("id")
    if not isinstance(rid, str) or len(rid) != 32 or any(c not in "0123456789abcdef"
                                                        for c in rid):
        raise CorruptBackup(f"repository {where}: config has no valid id")
    if doc.get("encryption") not in ENCRYPTIONS:
        raise CorruptBackup(f"repository {where}: unknown encryption "
                            f"{doc.get('encryption')!r}")
    if doc.get("key", "repo") not in ("repo", "keyfile"):
        raise CorruptBackup(f"repository {where}: unknown key location {doc.get('key')!r}")
    ch = doc.get("chunker")
    if not isinstance(ch, dict):
        raise CorruptBackup(f"repository {where}: config has no chunker parameters")
    vals = [ch.get(k) for k in ("min", "avg", "max")]
    nums = [v for v in vals if isinstance(v, int) and not isinstance(v, bool)]
    if len(nums) != 3 or not 64 << 10 <= nums[0] <= nums[1] <= nums[2] <= 16 << 20:
        raise CorruptBackup(f"repository {where}: chunker parameters {ch!r} out of bounds")
    level = doc.get("level", 3)
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 19:
        raise CorruptBackup(f"repository {where}: zstd level {level!r} out of bounds")
    return doc


def is_chunked(store: ObjectStore) -> bool:
    """Whether ``store`` holds a chunked repository (its ``config`` object)."""
    return store.exists("config")


class ChunkedRepository:
    """A chunked repository in ``store`` (see the module docstring)."""

    #: create writes uncompressed streams into it: the chunks are compressed one by one,
    #: and a compressed stream would cut differently each time (no dedup)
    compresses_chunks = True
    #: backups are written without the exclusive lock (see the module docstring)
    concurrent_writers = True

    def __init__(self, store: ObjectStore, passphrase: PassphraseSource | None = None,
                 key_file: Path | None = None) -> None:
        self.store = store
        self._passphrase = passphrase or passphrase_from_env
        self.key_file = key_file
        self._config: dict[str, Any] | None = None
        self._codec: Codec | None = None
        self._indexes: dict[str, tuple[BackupIndex, dict[str, ChunkList]]] = {}
        self._stats: dict[str, WriteStats | None] = {}
        #: keyed names: backup id -> its index's key, as learnt by opening the indexes
        self._names: dict[str, str] = {}
        self._unreadable: dict[str, str] = {}  # index key -> why it does not open
        self.last_stats: WriteStats | None = None

    def __str__(self) -> str:
        return self.store.url

    def close(self) -> None:
        """Release the store (an ssh:// store's sessions and connection, S3's pool)."""
        self.store.close()

    # set-up ----------------------------------------------------------------------------
    @classmethod
    def create(cls, store: ObjectStore, encryption: str, passphrase: str | None,
               key_file: Path | None = None, cost: tuple[int, int, int] | None = None,
               chunker: tuple[int, int, int] = (MIN_SIZE, AVG_SIZE, MAX_SIZE),
               ) -> ChunkedRepository:
        """A new repository in ``store`` (``AlreadyExists``-like ``BackupError`` if there is
        one). ``key_file``: the key envelope is written there (0600) instead of the store."""
        if encryption not in ENCRYPTIONS:
            raise InvalidInput(f"unknown encryption {encryption!r}", "use repokey or none")
        if store.exists("config"):
            raise BackupError(f"{store.url} already holds a chunked repository")
        rid = secrets.token_hex(16)
        if encryption == "repokey":
            if not passphrase:
                raise BackupError("an encrypted repository needs a passphrase",
                                  "set MIGRATOR_PASSPHRASE or type one")
            env = wrap(RepoKey.generate(), passphrase, rid, *([cost] if cost else []))
            if key_file is not None:
                write_key_file(key_file, env)
            else:
                store.put("keys/repokey", env)
        # unencrypted: plain names, and version 1, which older programs read as well
        doc = {"format": FORMAT, "version": VERSION if encryption == "repokey" else 1,
               "id": rid, "encryption": encryption,
               "key": "keyfile" if key_file is not None and encryption == "repokey"
               else "repo", "chunker": dict(zip(("min", "avg", "max"), chunker, strict=True)),
               "level": 3}
        _check_config(doc, store.url)
        store.put("config", (json.dumps(doc, indent=1) + "\n").encode())  # last: the marker
        repo = cls(store, (lambda _c: passphrase or ""), key_file)
        return repo.check()

    def init(self) -> ChunkedRepository:
        """Check it (a chunked repository is made by ``migrate backup init``, which asks for
        the encryption and passphrase; nothing makes one implicitly)."""
        return self.check()

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                raw = self.store.get("config", MAX_CONFIG)
            except NotFound as e:
                raise NotFound(f"no chunked repository at {self.store.url}",
                               f"create one: `migrate backup init {self.store.url}`") from e
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptBackup(f"repository {self.store.url}: config is not JSON") from e
            self._config = _check_config(doc, self.store.url)
        return self._config

    def check(self) -> ChunkedRepository:
        """The config is valid and the key opens (a wrong passphrase stops here, before any
        other object is read or written)."""
        self.codec  # noqa: B018 - opens the key
        return self

    def _envelope(self) -> bytes:
        if self.key_file is not None:
            return read_key_file(self.key_file)
        if self.config.get("key") == "keyfile":
            raise BackupError(f"the key of {self.store.url} is kept in a key file",
                              "give it: --key-file FILE (or MIGRATOR_KEY_FILE)")
        try:
            return self.store.get("keys/repokey", 4096)
        except NotFound as e:
            raise CorruptBackup(f"repository {self.store.url}: its key (keys/repokey) is "
                                "missing", "give an exported key with --key-file") from e

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            conf = self.config
            if conf["encryption"] == "none":
                self._refuse_downgrade()
                self._codec = Codec(None, conf.get("level", 3))
            else:
                key = unwrap(self._envelope(), self._passphrase(False), conf["id"])
                self._codec = Codec(key, conf.get("level", 3))
        return self._codec

    def _refuse_downgrade(self) -> None:
        """The config is plain: one rewritten to ``none`` (and its key removed) must not
        make a client that holds a passphrase write plaintext into the repository."""
        if self.store.exists("keys/repokey"):
            raise CorruptBackup(f"repository {self.store.url} says it is unencrypted, but "
                                "it holds a key: its config was altered",
                                "restore the config from a copy; nothing was written")
        if self.key_file is not None or env_passphrase() is not None:
            raise BackupError(f"repository {self.store.url} is unencrypted, but a "
                              "passphrase or key file was given",
                              "unset MIGRATOR_PASSPHRASE / the key file for it, or check "
                              "that its config was not altered")

    def key_envelope(self) -> bytes:
        """The key envelope, after checking that the passphrase opens it (key export)."""
        if self.config["encryption"] == "none":
            raise BackupError(f"{self.store.url} is not encrypted: it has no key")
        self.check()
        return self._envelope()

    def change_passphrase(self, new: str) -> None:
        """Re-wrap the key under ``new`` (where it is kept: the store or the key file)."""
        self.key_envelope()  # the current passphrase must open it
        key = self.codec.key
        assert key is not None
        env = wrap(key, new, self.config["id"])
        if self.key_file is not None:
            write_key_file(self.key_file, env)
        else:
            self.store.put("keys/repokey", env)
        self._passphrase = lambda _c: new

    def _chunker_args(self) -> tuple[int, int, int]:
        ch = self.config["chunker"]
        return ch["min"], ch["avg"], ch["max"]

    # the exclusive lock (prune, delete, protect; not backups) --------------------------
    @contextlib.contextmanager
    def lock(self, wait: float | None = None) -> Iterator[None]:
        """Exclusive among lockers: each writes ``locks/TOKEN`` and holds the lock when it
        then sees no other live one (the store's list is strongly consistent); two that
        see each other both step back and try again after a random pause."""
        self.check()
        wait = LOCK_WAIT if wait is None else wait
        mine = f"locks/{secrets.token_hex(8)}"
        deadline = time.monotonic() + wait
        while True:
            self.store.put(mine, self._stamp(mine))
            others = [k for k in self._live("locks/") if k != mine]
            if not others:
                break
            self.store.delete(mine)
            if time.monotonic() >= deadline:
                raise BackupError(f"backup repository {self.store.url} is locked by "
                                  f"{self._owner(others[0])}",
                                  "wait for it to finish; a lock of a process that died "
                                  f"goes stale after {int(STALE // 60)} minutes")
            time.sleep(random.uniform(0.1, 0.4))  # noqa: S311 - a pause, not a secret
        with _Heartbeat(self, mine):
            yield

    # entries: locks/, writers/, gc/running ---------------------------------------------
    def _stamp(self, key: str, backup_id: str | None = None) -> bytes:
        """The entry ``key`` says: who (``host:pid``), when (refreshed by its heartbeat),
        for which backup; sealed under keyed names (a host name and a backup id are what
        the names hide), plain JSON otherwise (older programs read those)."""
        doc: dict[str, Any] = {"owner": f"{socket.gethostname()}:{os.getpid()}",
                               "time": time.time()}
        if backup_id is not None:
            doc["id"] = backup_id
        raw = json.dumps(doc).encode()
        return self.codec.seal(raw, b"entry:" + key.encode()) if self.keyed_names else raw

    def _entry(self, key: str) -> dict[str, Any]:
        """An entry's content; ``NotFound``, or ``CorruptBackup``/``ValueError`` when it
        does not open or parse."""
        blob = self.store.get(key, 4096)
        raw = self.codec.open(blob, b"entry:" + key.encode(), 4096, key) \
            if self.keyed_names else blob
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError(f"{key} is not an object")
        return doc

    def _live(self, prefix: str) -> dict[str, dict[str, Any] | None]:
        """Entries under ``prefix`` refreshed within ``STALE`` (key -> content, None when
        unreadable); stale ones are removed."""
        live: dict[str, dict[str, Any] | None] = {}
        for key in list(self.store.list(prefix)):
            doc: dict[str, Any] | None
            try:
                doc = self._entry(key)
                fresh = time.time() - float(doc["time"]) < STALE
            except NotFound:
                continue
            except (CorruptBackup, ValueError, KeyError, TypeError, UnicodeDecodeError):
                doc, fresh = None, True  # unreadable: assume alive (its owner removes it)
            if fresh:
                live[key] = doc
            else:
                self.store.delete(key)
        return live

    def _owner(self, key: str) -> str:
        with contextlib.suppress(Exception):
            return str(self._entry(key)["owner"])
        return key

    def writers(self) -> Names:
        """The ids of the backups being written now (an entry that does not open is shown
        by its key)."""
        return sorted(self._writer_id(k, d) for k, d in self._live("writers/").items())

    def _writer_id(self, key: str, doc: dict[str, Any] | None) -> str:
        bid = doc.get("id") if doc else None
        if isinstance(bid, str) and valid_id(bid):
            return bid
        name = key.split("/", 1)[1]
        return name if valid_id(name) else f"unknown ({key})"

    # names -----------------------------------------------------------------------------
    @property
    def keyed_names(self) -> bool:
        """Whether indexes and writers are named by keyed hashes of the backup ids (format
        version 2, encrypted; see the module docstring)."""
        conf = self.config
        return bool(conf["version"] >= 2 and conf["encryption"] != "none")

    def index_key(self, backup_id: str) -> str:
        """Where backup ``backup_id``'s index is, or will be, in the store."""
        if self.keyed_names:
            return f"index/{self.codec.name('index', backup_id)}"
        return f"index/{backup_id}"

    def writer_key(self, backup_id: str) -> str:
        """The ``writers/`` entry of backup ``backup_id`` while it is written."""
        if self.keyed_names:
            return f"writers/{self.codec.name('writer', backup_id)}"
        return f"writers/{backup_id}"

    def _index_aad(self, key: str, backup_id: str | None) -> bytes:
        """What an index's seal binds it to: its name under keyed names (the id is learnt
        by opening it, then checked to hash to that name), else its id."""
        if self.keyed_names:
            return b"index:" + key.split("/", 1)[1].encode()
        assert backup_id is not None
        return b"index:" + backup_id.encode()

    def committed(self, backup_id: str, index_key: str | None = None) -> bool:
        """Whether backup ``backup_id`` is in the repository: one question to the store (its
        name computed, not listed). Under keyed names computing it needs the key, unless
        ``index_key`` says it: the name its writer had (``ChunkedBackupWriter.index_key``,
        which ``backup create`` keeps in its journal so that ``recover`` asks without the
        key)."""
        if not valid_id(backup_id):
            return False
        if index_key is not None and self.keyed_names:
            name = index_key.split("/", 1)[1] if index_key.startswith("index/") else ""
            if not _KEYED.fullmatch(name):
                raise InvalidInput(f"{index_key!r} is not an index's name",
                                   "it comes from the journal: was it edited?")
            return self.store.exists(index_key)
        return self.store.exists(self.index_key(backup_id))

    def _refuse_keyed_under_plain(self, names: Iterable[str], doing: str) -> None:
        """A version-1 encrypted config over indexes with keyed names: the config was
        rewritten (it is plain). Reading as version 1 would miss those backups; a collection
        would take their chunks for garbage, and new names would be plain again."""
        if self.config["encryption"] == "none":
            return
        keyed = [n for n in names if _KEYED.fullmatch(n.split("/", 1)[1])]
        if keyed:
            raise CorruptBackup(f"repository {self.store.url}: its config says format "
                                f"version 1, but {keyed[0]} has a keyed name (version 2): "
                                f"the config was altered; nothing was {doing}",
                                "restore the config from a copy (version 2)")

    # reading ---------------------------------------------------------------------------
    def ids(self) -> Names:
        """The committed backups' ids: their index names, or, under keyed names, what the
        indexes say once opened (see the module docstring; needs the key)."""
        if not self.keyed_names:
            return sorted(k.split("/", 1)[1] for k in self.store.list("index/")
                          if valid_id(k.split("/", 1)[1]))
        self._scan()
        return sorted(self._names)

    def unreadable_indexes(self) -> dict[str, str]:
        """Objects under ``index/`` that do not open with the key (keyed names): key ->
        why. They are in no listing; ``verify`` and a collection name them."""
        if not self.keyed_names:
            return {}
        self._scan()
        return dict(self._unreadable)

    def _scan(self) -> None:
        """Keyed names: list ``index/`` and open, in parallel, each index not opened before
        (a deleted one is forgotten); one that does not open goes to ``_unreadable``."""
        self.check()  # the key opened here, once, not by each of the threads below
        listed = set(self.store.list("index/"))
        self._names = {i: k for i, k in self._names.items() if k in listed}
        for bid in [i for i in self._indexes if i not in self._names]:
            self._indexes.pop(bid, None)
            self._stats.pop(bid, None)
        known = set(self._names.values())
        todo = sorted(listed - known)
        self._unreadable = {}
        if not todo:
            return
        with ThreadPoolExecutor(min(PREFETCH, len(todo)), thread_name_prefix="index") as pool:
            futs = [(k, pool.submit(self._read_index, k, None)) for k in todo]
            for key, fut in futs:
                try:
                    bid, idx, chunks, stats = fut.result()
                except NotFound:
                    continue  # deleted since the listing
                except CorruptBackup as e:
                    self._unreadable[key] = e.message
                    continue
                self._names[bid] = key
                self._indexes[bid] = (idx, chunks)
                self._stats[bid] = stats

    def _read_index(self, key: str, backup_id: str | None
                    ) -> tuple[str, BackupIndex, dict[str, ChunkList], WriteStats | None]:
        """Index object ``key`` opened and checked: (id, index, chunk lists, stats).
        ``backup_id`` None: learnt from the index (keyed names), which must hash to
        ``key``. ``NotFound`` when absent, ``CorruptBackup`` when it does not open."""
        where = f"backup {backup_id}" if backup_id else f"index object {key}"
        blob = self.store.get(key, object_limit(MAX_INDEX))
        raw = self.codec.open(blob, self._index_aad(key, backup_id), MAX_INDEX,
                              f"{where}: index" if backup_id else where)
        try:
            doc = json.loads(raw)
            bid = backup_id or str(doc["index"]["id"])
            idx = BackupIndex.from_json(json.dumps(doc["index"]), bid)
            chunks = {str(rel): [(str(c), int(s)) for c, s in lst]
                      for rel, lst in doc["chunks"].items()}
            stats = _read_stats(doc.get("stats"))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CorruptBackup(f"{where}: index malformed: {e}") from e
        if self.index_key(bid) != key:  # sealed under this name, but not this id's name
            raise CorruptBackup(f"{where}: holds backup {bid}, which is not named so",
                                "it was copied under another name; remove it")
        top = self._chunker_args()[2]
        for part in idx.parts:
            lst = chunks.get(part.path)
            if lst is None:
                raise CorruptBackup(f"backup {bid}: index lists no chunks for "
                                    f"part {part.path}")
            if any(len(c) != 64 or s <= 0 or s > top for c, s in lst) \
                    or sum(s for _, s in lst) != part.size:
                raise CorruptBackup(f"backup {bid}: the chunks of part {part.path} "
                                    f"do not add up to its {part.size} bytes")
        return bid, idx, chunks, stats

    def _load(self, backup_id: str) -> tuple[BackupIndex, dict[str, ChunkList]]:
        if backup_id in self._indexes:
            return self._indexes[backup_id]
        if not valid_id(backup_id):
            raise NotFound(f"no backup {backup_id!r} in {self}", "see `migrate backup list`")
        key = self.index_key(backup_id)
        try:
            _bid, idx, chunks, stats = self._read_index(key, backup_id)
        except NotFound as e:
            raise NotFound(f"no backup {backup_id!r} in {self}",
                           "see `migrate backup list`") from e
        self._indexes[backup_id] = (idx, chunks)
        self._stats[backup_id] = stats
        if self.keyed_names:
            self._names[backup_id] = key
        return idx, chunks

    def stats_of(self, backup_id: str) -> WriteStats | None:
        """What the backup stored when it was written (``raw_bytes``, ``stored_bytes``: new
        after dedup and compression, ``chunks``, ``new_chunks``); None for an index that
        carries none (its protection changed since, or another writer)."""
        self._load(backup_id)
        return self._stats.get(backup_id)

    def get(self, backup_id: str) -> BackupIndex:
        return self._load(backup_id)[0]

    def chunks_of(self, backup_id: str, rel: str) -> ChunkList:
        """The chunks part ``rel`` of a backup is made of, in order: (id, size)."""
        _, chunks = self._load(backup_id)
        if rel not in chunks:
            raise CorruptBackup(f"backup {backup_id}: missing part {rel}")
        return chunks[rel]

    def list(self) -> list[BackupIndex]:
        out = []
        for i in self.ids():
            with contextlib.suppress(CorruptBackup):
                out.append(self.get(i))
        return sorted(out, key=lambda b: (b.created, b.id))

    def part_size(self, backup_id: str, rel: str) -> int | None:
        """The part's length as its index records it (the chunks' presence is
        ``missing_chunks``' business)."""
        try:
            return sum(s for _, s in self.chunks_of(backup_id, rel))
        except CorruptBackup:
            return None

    def open_part(self, backup_id: str, rel: str) -> ChunkReader:
        return ChunkReader(self, self.chunks_of(backup_id, rel), f"backup {backup_id}: "
                           f"part {rel}")

    def chunk_ids(self) -> set[str]:
        """Every chunk in the store (one listing)."""
        return {k.rsplit("/", 1)[1] for k in self.store.list("data/")}

    def present(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are in the store: asked about (a store that answers that,
        ssh://: only these names cross the link), else one listing."""
        wanted = set(ids)
        ask = getattr(self.store, "missing", None)
        if callable(ask):
            lacking = ask([chunk_key(c) for c in wanted])
            return {c for c in wanted if chunk_key(c) not in lacking}
        return self.chunk_ids() & wanted

    def missing_chunks(self, backup_id: str, rel: str, have: set[str]) -> Names:
        return [c for c, _ in self.chunks_of(backup_id, rel) if c not in have]

    def check_chunks(self, backup_id: str, rel: str) -> Names:
        """Every problem of every chunk of one part, each read and authenticated (in
        parallel): ``verify --deep`` names each bad chunk."""
        problems: Names = []
        where = f"backup {backup_id}: part {rel}"
        def check(c: str, s: int) -> None:  # the bytes dropped at once: a part's memory
            self.read_chunk(c, s)

        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="verify") as pool:
            futs = [(c, pool.submit(check, c, s))
                    for c, s in self.chunks_of(backup_id, rel)]
            for c, f in futs:
                try:
                    f.result()
                except CorruptBackup as e:
                    problems.append(f"{where}: {e.message}" if c in e.message
                                    else f"{where}: chunk {c}: {e.message}")
        return problems

    def read_chunk(self, chunk_id: str, size: int, rehash: bool = True) -> bytes:
        """A chunk, authenticated (``rehash``: see ``Codec.open_chunk``)."""
        try:
            blob = self.store.get(chunk_key(chunk_id), object_limit(size))
        except NotFound as e:
            raise CorruptBackup(f"chunk {chunk_id} is missing") from e
        return self.codec.open_chunk(chunk_id, blob, size, rehash)

    # writing ---------------------------------------------------------------------------
    def writer(self, backup_id: str, fresh: bool = True) -> ChunkedBackupWriter:
        return ChunkedBackupWriter(self, backup_id)

    def _put_index(self, idx: BackupIndex, chunks: dict[str, ChunkList],
                   stats: WriteStats | None) -> None:
        BackupIndex.from_json(idx.to_json(), idx.id)  # never write an index we'd refuse
        doc = {"index": json.loads(idx.to_json()),
               "chunks": {rel: [list(c) for c in lst] for rel, lst in chunks.items()},
               "stats": asdict(stats) if stats else None}
        key = self.index_key(idx.id)
        blob = self.codec.seal(json.dumps(doc, separators=(",", ":")).encode(),
                               self._index_aad(key, idx.id))
        self.store.put(key, blob)
        self._indexes[idx.id] = (BackupIndex.from_json(idx.to_json(), idx.id), chunks)
        self._stats[idx.id] = stats
        if self.keyed_names:
            self._names[idx.id] = key

    def set_protected(self, backup_id: str, protected: bool) -> BackupIndex:
        idx, chunks = self._load(backup_id)
        idx.protected = protected
        self._put_index(idx, chunks, self._stats.get(backup_id))  # the stats stay
        return idx

    def delete(self, backup_id: str) -> None:
        """Remove the backup's index: it no longer exists. Its chunks go at the next
        ``collect_garbage`` that finds them unreferenced."""
        if not self.committed(backup_id):
            raise NotFound(f"no backup {backup_id!r} in {self}", "see `migrate backup list`")
        self.store.delete(self.index_key(backup_id))
        self._indexes.pop(backup_id, None)
        self._names.pop(backup_id, None)

    # garbage collection ----------------------------------------------------------------
    def collect_garbage(self, grace: float = GC_GRACE, dry_run: bool = False) -> GcResult:
        """Delete chunks no backup references, in two phases (see the module docstring).
        Call it under ``lock``."""
        result = GcResult()
        self.check()
        if not self.keyed_names:
            self._refuse_keyed_under_plain(self.store.list("index/"), "collected")
        with _Heartbeat(self, "gc/running"):
            self.store.put("gc/epoch", secrets.token_hex(8).encode())  # writers re-check
            referenced: set[str] = set()
            self._indexes.clear()  # every index read afresh
            self._names.clear()
            bad = self.unreadable_indexes()
            if bad:  # an unreadable index stops it: its chunks are unknown
                key, why = sorted(bad.items())[0]
                raise CorruptBackup(f"{why}; no chunk was collected while an index does "
                                    f"not open ({len(bad)} such: {', '.join(sorted(bad))})",
                                    f"if {key} is not a backup of this repository (planted, "
                                    "or copied from another), remove it, then prune again")
            for bid in self.ids():
                for lst in self._load(bid)[1].values():
                    referenced.update(c for c, _ in lst)
            unref = self.chunk_ids() - referenced
            now = time.time()
            pending = self._pending()
            writers = self._live("writers/")
            due = {c for c in unref if c in pending and now - pending[c] >= grace}
            if writers and due:
                result.postponed = len(due)
                result.writers = sorted(self._writer_id(k, d) for k, d in writers.items())
                due = set()
            keep = {c: pending.get(c, now) for c in unref if c not in due}
            result.pending, result.deleted = len(keep), len(due)
            if not dry_run:
                blob = self.codec.seal(json.dumps(keep).encode(), b"gc:pending")
                self.store.put("gc/pending", blob)
                for c in due:
                    self.store.delete(chunk_key(c))
        return result

    def _pending(self) -> dict[str, float]:
        try:
            blob = self.store.get("gc/pending", object_limit(MAX_INDEX))
        except NotFound:
            return {}
        try:
            doc = json.loads(self.codec.open(blob, b"gc:pending", MAX_INDEX, "gc/pending"))
            return {str(k): float(v) for k, v in doc.items()}
        except (CorruptBackup, ValueError, AttributeError, TypeError):
            return {}  # start the grace period anew: nothing is deleted on its word

    def wait_for_collection(self, wait: float = STALE) -> str | None:
        """Until no garbage collection is running; then the epoch of the last one (None:
        there never was one). A writer reads it when it starts and again before it commits:
        a change means a collection ran meanwhile, so it checks its reused chunks."""
        deadline = time.monotonic() + wait
        while self._live("gc/running") and time.monotonic() < deadline:
            time.sleep(0.5)
        try:
            return self.store.get("gc/epoch", 64).decode(errors="replace")
        except NotFound:
            return None


@dataclass
class GcResult:
    deleted: int = 0
    pending: int = 0
    postponed: int = 0
    writers: list[str] | None = None


class _Heartbeat:
    """Refreshes an entry (``locks/...``, ``writers/...``) while its holder works, so it does
    not go stale; removes it at the end."""

    def __init__(self, repo: ChunkedRepository, key: str, backup_id: str | None = None
                 ) -> None:
        self.store, self.key = repo.store, key
        self._stamp = lambda: repo._stamp(key, backup_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(Exception):
                self.store.put(self.key, self._stamp())

    def __enter__(self) -> _Heartbeat:
        self.store.put(self.key, self._stamp())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.store.delete(self.key)


class ChunkReader(ReadsInto):
    """A part read back: its chunks fetched in order, ``PREFETCH`` ahead on ``FETCHERS``
    threads, each authenticated before a byte of it is returned.

    A sealed chunk's id is not recomputed here (``rehash=False``): its AEAD tag binds it to
    the id already, and every reader of a part hashes the whole part against its index's
    sha256 (restore, extract, verify, copy), which finds a chunk sealed with other bytes
    under its name; the recomputation was a second SHA-256 pass over every byte in a
    restore that is CPU-bound on small machines (``verify --deep`` still rehashes each
    chunk to name a bad one: ``check_chunks``)."""

    def __init__(self, repo: ChunkedRepository, chunks: ChunkList, where: str
                 ) -> None:
        self.repo, self.where = repo, where
        self._todo = iter(chunks)
        self._pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="fetch")
        self._window: list[tuple[Future[bytes], int]] = []
        self._ahead = 0  # bytes in the window
        self._buf = memoryview(b"")
        self._fill()

    def _fill(self) -> None:
        """Keep up to ``READ_AHEAD`` chunks and ``READ_AHEAD_BYTES`` in flight or waiting
        (at least one): an object store's latency is hidden behind many requests at once,
        and a part's memory stays bounded whatever its chunks' sizes."""
        while len(self._window) < READ_AHEAD and (
                not self._window or self._ahead < READ_AHEAD_BYTES):
            nxt = next(self._todo, None)
            if nxt is None:
                return
            self._window.append((self._pool.submit(self.repo.read_chunk, *nxt, False),
                                 nxt[1]))
            self._ahead += nxt[1]

    def _next(self) -> bool:
        if not self._window:
            return False
        fut, size = self._window.pop(0)
        self._ahead -= size
        try:
            self._buf = memoryview(fut.result())
        except CorruptBackup as e:
            raise CorruptBackup(f"{self.where}: {e.message}", e.hint) from e
        self._fill()
        return True

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            out = bytearray()
            while chunk := self.read(MAX_SIZE):
                out += chunk
            return bytes(out)
        while not self._buf:
            if not self._next():
                return b""
        data = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return data

    def close(self) -> None:
        for f, _ in self._window:
            f.cancel()
        self._window = []
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkedPartWriter:
    """One part: cut into chunks as it is written; new chunks sealed and uploaded by the
    backup's uploaders, known ones only listed."""

    def __init__(self, backup: ChunkedBackupWriter, rel: str) -> None:
        self.backup, self.rel = backup, rel
        self._chunker = Chunker(*backup.repo._chunker_args())
        self._hash = hashlib.sha256()
        self.size = 0
        self.chunks: ChunkList = []

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        for chunk in self._chunker.feed(data):
            self.chunks.append(self.backup.add_chunk(chunk))
        return len(data)

    def flush(self) -> None:
        """Chunks are cut as data arrives; the last is cut by ``finish``."""

    def finish(self) -> tuple[int, str]:
        for chunk in self._chunker.finish():
            self.chunks.append(self.backup.add_chunk(chunk))
        self.backup.drain()
        self.backup.parts[self.rel] = self.chunks
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        self.chunks = []


class ChunkedBackupWriter:
    """One backup being written (see the module docstring: no lock, an entry in
    ``writers/`` while it runs, the index written last)."""

    def __init__(self, repo: ChunkedRepository, backup_id: str) -> None:
        if not valid_id(backup_id):
            raise BackupError(f"invalid backup id {backup_id!r}")
        repo.check()
        if not repo.keyed_names:  # names would be plain where they were keyed
            repo._refuse_keyed_under_plain(repo.store.list("index/"), "written")
        if repo.committed(backup_id):
            raise BackupError(f"backup {backup_id} already exists")
        self.repo, self.id = repo, backup_id
        self.codec = repo.codec
        #: where the index will be: kept in the journal, ``committed`` asks about it
        self.index_key = repo.index_key(backup_id)
        self._beat = _Heartbeat(repo, repo.writer_key(backup_id), backup_id).__enter__()
        #: a store that answers "which of these do you lack" (ssh://) is asked per batch of
        #: new chunks instead of listed whole: a large repository's listing crosses the link
        #: every backup, a question about this backup's chunks costs one round trip per
        #: ``ASK_BATCH``
        missing = getattr(repo.store, "missing", None)
        self._ask: Callable[[list[str]], set[str]] | None = \
            missing if callable(missing) else None
        try:  # in this order: see collect_garbage and commit
            self._epoch = repo.wait_for_collection()
            self.known = set() if self._ask is not None else repo.chunk_ids()
        except BaseException:
            self._beat.__exit__(None, None, None)
            raise
        self.reused: set[str] = set()
        self.parts: dict[str, ChunkList] = {}
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(IN_FLIGHT)
        self._pool = ThreadPoolExecutor(UPLOADERS, thread_name_prefix="upload")
        self._futures: list[Future[None]] = []
        self._batch: list[tuple[str, bytes]] = []  # new here, not yet asked about
        self._failed = threading.Event()
        self._closed = False

    def part(self, rel: str) -> ChunkedPartWriter:
        if not valid_part_path(rel):
            raise ValueError(f"bad part path {rel!r}")
        return ChunkedPartWriter(self, rel)

    def add_chunk(self, data: bytes) -> tuple[str, int]:
        """Name the chunk; hand it to an uploader unless the store (or this backup) has it."""
        cid = self.codec.chunk_id(data)
        self.stats.chunks += 1
        self.stats.raw_bytes += len(data)
        if cid in self.known:
            self.reused.add(cid)
            return cid, len(data)
        self.known.add(cid)
        self._check_failed()
        self._slots.acquire()
        if self._ask is not None:
            self._batch.append((cid, data))
            if len(self._batch) >= ASK_BATCH:
                self._flush_batch()
            return cid, len(data)
        try:
            fut = self._pool.submit(self._upload, cid, data)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.append(fut)
        return cid, len(data)

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            fut = self._pool.submit(self._ask_then_upload, batch)
        except BaseException:
            for _ in batch:
                self._slots.release()
            raise
        with self._lock:
            self._futures.append(fut)

    def _ask_then_upload(self, batch: list[tuple[str, bytes]]) -> None:
        """Ask the store which of ``batch`` it lacks; hand those to the uploaders (each
        releases its slot), the rest are reused."""
        assert self._ask is not None
        try:
            lacking = self._ask([chunk_key(c) for c, _ in batch])
        except BaseException:
            for _ in batch:
                self._slots.release()
            raise
        for cid, data in batch:
            if chunk_key(cid) in lacking:
                fut = self._pool.submit(self._upload, cid, data)
                with self._lock:
                    self._futures.append(fut)
            else:
                with self._lock:
                    self.reused.add(cid)
                self._slots.release()

    def _upload(self, cid: str, data: bytes) -> None:
        """Seal and store one chunk; after a failed one, the uploads still queued end at
        once (the backup is failing: a store that is down would make each of them wait its
        own timeout before the error reaches the command)."""
        try:
            if self._failed.is_set():
                raise BackupError(f"backup {self.id}: not uploaded after an earlier failure")
            blob = self.codec.seal_chunk(cid, data)
            self.repo.store.put(chunk_key(cid), blob)
            with self._lock:
                self.stats.stored_bytes += len(blob)
                self.stats.new_chunks += 1
        except BaseException:
            self._failed.set()
            raise
        finally:
            self._slots.release()

    def _check_failed(self) -> None:
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()  # raises the upload's error

    def drain(self) -> None:
        """Wait for every upload handed out so far (and those a batch's question hands out
        meanwhile); raise the first failure."""
        self._flush_batch()
        while True:
            with self._lock:
                futures, self._futures = self._futures, []
            if not futures:
                return
            for f in futures:
                f.result()

    def commit(self, index: BackupIndex) -> None:
        if index.id != self.id:
            raise ValueError("index of another backup")
        self.drain()
        chunks = {p.path: self.parts[p.path] for p in index.parts if p.path in self.parts}
        missing = [p.path for p in index.parts if p.path not in self.parts]
        if missing:
            raise BackupError(f"backup {self.id}: parts {missing} were never written")
        if self.repo.wait_for_collection() != self._epoch:  # a collection ran meanwhile
            if self._ask is not None:
                lacking = self._ask([chunk_key(c) for c in self.reused])
                gone = {c for c in self.reused if chunk_key(c) in lacking}
            else:
                gone = self.reused - self.repo.chunk_ids()
        else:
            gone = set()
        if gone:
            raise BackupError(f"backup {self.id}: {len(gone)} chunk(s) it reuses were "
                              "removed by a concurrent prune while it ran",
                              "run the backup again (its new chunks are kept for it until "
                              "the next prune's grace period ends)")
        self.repo._put_index(index, chunks, self.stats)
        self.repo.last_stats = self.stats
        self._close()

    def abort(self) -> None:
        """Nothing becomes visible; the chunks stored so far are garbage for the next
        collection (another backup may already reuse them)."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._beat.__exit__(None, None, None)


def write_key_file(path: Path, envelope: bytes) -> None:
    """The key envelope into ``path``, 0600, atomically."""
    write_atomic(Path(path), envelope)


def read_key_file(path: Path, what: str = "key file") -> bytes:
    """A key envelope (or passphrase) from ``path``; refused when others may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise BackupError(f"cannot read {what} {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise BackupError(f"{what} {path} is readable by others "
                              f"(mode {st.st_mode & 0o777:o})", f"chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(4097)
    finally:
        os.close(fd)


__all__ = ["ChunkedRepository", "GcResult", "WriteStats", "WrongPassphrase", "env_passphrase",
           "is_chunked", "passphrase_from_env"]
