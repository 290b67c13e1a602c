"""The state store: one SQLite database per host, under the host's state root.

SQLite in WAL mode so readers (``list``) never block a writer; the schema is versioned with
``PRAGMA user_version`` and upgraded by an ordered list of migrations, each in a transaction,
so an old state root opens with a new program and a newer one is refused rather than damaged.
JSON columns hold open-ended key/value config (LXD-style ``security.privileged`` keys).

The database and its ``-wal`` and ``-shm`` files are 0600: they hold the inventory and
``user.*`` config. Commits run with ``synchronous=NORMAL`` (durable at the next checkpoint);
the few commits after which a source copy is deleted go through ``durable()`` (``FULL``:
the WAL is fsynced before COMMIT returns).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator.core.errors import AlreadyExists, InvalidInput, NotFound, StateStoreError
from migrator.core.names import SnapshotName

MIGRATIONS: list[str] = [
    # 1: the foundation
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE pools (
        name TEXT PRIMARY KEY, driver TEXT NOT NULL, source TEXT NOT NULL,
        config TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
    CREATE TABLE images (
        fingerprint TEXT PRIMARY KEY, alias TEXT UNIQUE, properties TEXT NOT NULL,
        size INTEGER NOT NULL, created REAL NOT NULL);
    CREATE TABLE containers (
        name TEXT PRIMARY KEY, pool TEXT NOT NULL REFERENCES pools(name),
        image TEXT, ipv4 TEXT UNIQUE, config TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL);
    CREATE TABLE volumes (
        pool TEXT NOT NULL REFERENCES pools(name), name TEXT NOT NULL, type TEXT NOT NULL,
        config TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
        PRIMARY KEY (pool, type, name));
    CREATE TABLE snapshots (
        container TEXT NOT NULL REFERENCES containers(name) ON DELETE CASCADE,
        name TEXT NOT NULL, created REAL NOT NULL, config TEXT NOT NULL DEFAULT '{}',
        expires REAL, PRIMARY KEY (container, name));
    CREATE TABLE operations (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL,
        stages TEXT NOT NULL DEFAULT '[]', detail TEXT NOT NULL DEFAULT '{}',
        error TEXT, created REAL NOT NULL, updated REAL NOT NULL);
    """,
    # 2: storage issue: snapshot identity across copies, custom volume snapshots, attachments
    """
    ALTER TABLE snapshots ADD COLUMN uuid TEXT NOT NULL DEFAULT '';
    CREATE TABLE volume_snapshots (
        pool TEXT NOT NULL, type TEXT NOT NULL, volume TEXT NOT NULL, name TEXT NOT NULL,
        created REAL NOT NULL, uuid TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (pool, type, volume, name),
        FOREIGN KEY (pool, type, volume) REFERENCES volumes(pool, type, name)
            ON DELETE CASCADE ON UPDATE CASCADE);
    CREATE TABLE attachments (
        container TEXT NOT NULL REFERENCES containers(name) ON DELETE CASCADE,
        pool TEXT NOT NULL, type TEXT NOT NULL DEFAULT 'custom', volume TEXT NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (container, path),
        FOREIGN KEY (pool, type, volume) REFERENCES volumes(pool, type, name)
            ON UPDATE CASCADE);
    """,
    # 3: hosts issue: the inventory of other hosts
    """
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY, address TEXT NOT NULL, port INTEGER NOT NULL DEFAULT 22,
        user TEXT NOT NULL DEFAULT 'root', key TEXT, root TEXT, command TEXT,
        created REAL NOT NULL);
    """,
    # 4: hosts issue: which data link to use, and the last measured upload rate
    """
    ALTER TABLE hosts ADD COLUMN data_link TEXT NOT NULL DEFAULT 'auto';
    ALTER TABLE hosts ADD COLUMN link_rate REAL;
    ALTER TABLE hosts ADD COLUMN link_checked REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class PoolRecord:
    name: str
    driver: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class ContainerRecord:
    name: str
    pool: str
    image: str | None
    ipv4: str | None
    config: dict[str, str] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class SnapshotRecord:
    """A container snapshot. ``uuid`` is its identity: it travels with every copy, so two
    hosts (or two containers) can tell a shared snapshot from one that merely has the
    same name."""

    container: str
    name: str
    created: float
    config: dict[str, str] = field(default_factory=dict)
    expires: float | None = None
    uuid: str = ""

    def to_wire(self) -> dict[str, Any]:
        """The snapshot as it crosses to another host or into a journal (JSON)."""
        return {"name": self.name, "created": self.created, "expires": self.expires,
                "config": dict(self.config), "uuid": self.uuid}

    @classmethod
    def from_wire(cls, container: str, obj: Any) -> SnapshotRecord:
        """Read back ``to_wire``'s form, checking it: it may come from another host. An
        automatic snapshot keeps its expiry, so it still expires where it arrives."""
        if not isinstance(obj, dict):
            raise InvalidInput("a snapshot must be an object")
        expires = obj.get("expires")
        if expires is not None and (isinstance(expires, bool)
                                    or not isinstance(expires, (int, float))):
            raise InvalidInput(f"snapshot expiry must be a number, not {expires!r}")
        try:
            return cls(container, SnapshotName(obj["name"]), float(obj["created"]),
                       {str(k): str(v) for k, v in dict(obj.get("config", {})).items()},
                       None if expires is None else float(expires), str(obj.get("uuid", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"bad snapshot record: {e}") from e


@dataclass
class OperationRecord:
    """A journaled multi-step operation: what it is doing, so an interrupted one can be
    rolled back or resumed (``migrate recover``)."""

    id: str
    kind: str
    status: str  # running, done, rolled-back, failed, recovered
    stages: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0


@dataclass
class HostRecord:
    """Another host: where its sshd listens, whom to log in as, and its state root there."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    root: str | None = None
    command: str | None = None  # the migrate program there [default: migrate]
    data_link: str = "auto"  # auto (direct TCP when it works), tcp, ssh (the channel only)
    link_rate: float | None = None  # bytes/s of the last `host check` upload, if any


@dataclass
class VolumeRecord:
    pool: str
    type: str
    name: str
    config: dict[str, str] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class VolumeSnapshotRecord:
    pool: str
    type: str
    volume: str
    name: str
    created: float
    uuid: str = ""


@dataclass
class AttachmentRecord:
    container: str
    pool: str
    volume: str
    path: str


@dataclass
class ImageRecord:
    fingerprint: str
    alias: str | None
    properties: dict[str, Any]
    size: int
    created: float


class StateStore:
    """Typed access to the host's database. One instance per process and host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            _private_files(path)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StateStoreError(f"cannot open state database {path}: {e}") from e
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateStoreError(
                f"state database {self.path} has schema {version}, newer than this program's "
                f"{SCHEMA_VERSION}",
                "upgrade the migrator package on this host",
            )
        for i in range(version, SCHEMA_VERSION):
            with self.transaction():
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version = {i + 1}")

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front so two writers queue, not deadlock.
        ``durable``: the commit is on disk when this returns (see ``durable``)."""
        if durable:
            with self.durable(), self.transaction() as db:
                yield db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    @contextmanager
    def durable(self) -> Iterator[None]:
        """Every commit inside is synced to disk before it returns (``synchronous=FULL``:
        the WAL, holding this commit and every earlier one, is fsynced at COMMIT).

        For the record a deletion relies on (a moved container's new pool, a restore's
        journal before the old container goes): with NORMAL a power cut could roll the
        record back to the copy that was just removed. Elsewhere NORMAL stays: it costs no
        fsync per commit, and a lost last commit there loses no data."""
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")

    def flush(self) -> None:
        """Make every transaction committed so far durable, whichever process committed it
        (an agent's commit ran in another one). A commit with ``synchronous=FULL`` fsyncs
        the WAL, which holds every commit not yet checkpointed; checkpoints sync what they
        copy. The commit rewrites the schema version with its own value: a page written,
        nothing changed. (No fsync through a descriptor of our own: closing it would drop
        this process's locks on the database.)"""
        with self.transaction(durable=True):
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            self.db.execute(f"PRAGMA user_version = {version}")

    # settings ---------------------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with ``prefix``, the prefix removed."""
        rows = self.db.execute("SELECT key, value FROM settings WHERE substr(key, 1, ?) = ?",
                               (len(prefix), prefix)).fetchall()
        return {r[0][len(prefix):]: r[1] for r in rows}

    def delete_setting(self, key: str) -> None:
        self.db.execute("DELETE FROM settings WHERE key=?", (key,))

    # pools ------------------------------------------------------------------------------
    def add_pool(self, rec: PoolRecord) -> None:
        try:
            self.db.execute(
                "INSERT INTO pools(name, driver, source, config, created) VALUES(?,?,?,?,?)",
                (rec.name, rec.driver, rec.source, json.dumps(rec.config), time.time()),
            )
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"storage pool {rec.name!r} already exists") from e

    def get_pool(self, name: str) -> PoolRecord:
        row = self.db.execute("SELECT * FROM pools WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"storage pool {name!r} not found", "see `migrate pool list`")
        return PoolRecord(
            row["name"], row["driver"], row["source"], json.loads(row["config"]), row["created"]
        )

    def list_pools(self) -> list[PoolRecord]:
        rows = self.db.execute("SELECT name FROM pools ORDER BY name").fetchall()
        return [self.get_pool(r[0]) for r in rows]

    def delete_pool(self, name: str) -> None:
        self.db.execute("DELETE FROM pools WHERE name=?", (name,))

    def pool_users(self, name: str) -> list[str]:
        rows = self.db.execute(
            "SELECT name FROM containers WHERE pool=? UNION "
            "SELECT type || '/' || name FROM volumes WHERE pool=? AND type != 'container'",
            (name, name),
        ).fetchall()
        return [r[0] for r in rows]

    # containers -------------------------------------------------------------------------
    def add_container(self, rec: ContainerRecord) -> None:
        try:
            self.db.execute(
                "INSERT INTO containers(name, pool, image, ipv4, config, created) "
                "VALUES(?,?,?,?,?,?)",
                (rec.name, rec.pool, rec.image, rec.ipv4, json.dumps(rec.config), time.time()),
            )
        except sqlite3.IntegrityError as e:
            if "FOREIGN KEY" in str(e):
                raise NotFound(f"storage pool {rec.pool!r} not found") from e
            if "ipv4" in str(e):
                raise AlreadyExists(f"address {rec.ipv4} is already in use") from e
            raise AlreadyExists(f"container {rec.name!r} already exists") from e

    def get_container(self, name: str) -> ContainerRecord:
        row = self.db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"container {name!r} not found", "see `migrate list`")
        return self._container(row)

    @staticmethod
    def _container(row: sqlite3.Row) -> ContainerRecord:
        return ContainerRecord(
            row["name"],
            row["pool"],
            row["image"],
            row["ipv4"],
            json.loads(row["config"]),
            row["created"],
        )

    def list_containers(self) -> list[ContainerRecord]:
        rows = self.db.execute("SELECT * FROM containers ORDER BY name").fetchall()
        return [self._container(r) for r in rows]

    def has_container(self, name: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM containers WHERE name=?", (name,)).fetchone() is not None
        )

    def update_container_config(self, name: str, config: dict[str, str]) -> None:
        self.db.execute("UPDATE containers SET config=? WHERE name=?", (json.dumps(config), name))

    def delete_container(self, name: str) -> None:
        self.db.execute("DELETE FROM containers WHERE name=?", (name,))

    def used_ipv4(self) -> set[str]:
        rows = self.db.execute("SELECT ipv4 FROM containers WHERE ipv4 IS NOT NULL").fetchall()
        return {r[0] for r in rows}

    # snapshots --------------------------------------------------------------------------
    def add_snapshot(self, rec: SnapshotRecord) -> None:
        if not rec.uuid:
            rec.uuid = uuidlib.uuid4().hex
        try:
            self.db.execute(
                "INSERT INTO snapshots(container, name, created, config, expires, uuid) "
                "VALUES(?,?,?,?,?,?)",
                (rec.container, rec.name, rec.created, json.dumps(rec.config), rec.expires,
                 rec.uuid),
            )
        except sqlite3.IntegrityError as e:
            if "FOREIGN KEY" in str(e):
                raise NotFound(f"container {rec.container!r} not found") from e
            raise AlreadyExists(
                f"snapshot {rec.container}/{rec.name} already exists", "pick another name"
            ) from e

    def list_snapshots(self, container: str) -> list[SnapshotRecord]:
        rows = self.db.execute(
            "SELECT * FROM snapshots WHERE container=? ORDER BY created, name", (container,)
        ).fetchall()
        return [_snapshot(r) for r in rows]

    def expired_snapshots(self, at: float) -> list[SnapshotRecord]:
        """Snapshots of every container whose expiry is at or before ``at`` (one query)."""
        rows = self.db.execute(
            "SELECT * FROM snapshots WHERE expires IS NOT NULL AND expires <= ? "
            "ORDER BY container, created, name", (at,)).fetchall()
        return [_snapshot(r) for r in rows]

    def get_snapshot(self, container: str, name: str) -> SnapshotRecord:
        for s in self.list_snapshots(container):
            if s.name == name:
                return s
        raise NotFound(
            f"snapshot {container}/{name} not found", f"see `migrate snapshot list {container}`"
        )

    def delete_snapshot(self, container: str, name: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE container=? AND name=?", (container, name))

    def set_container_pool(self, name: str, pool: str) -> None:
        self.db.execute("UPDATE containers SET pool=? WHERE name=?", (pool, name))

    def rename_container(self, old: str, new: str) -> None:
        """Rename a container with its snapshots and attachments, in one transaction."""
        with self.transaction():
            self.db.execute("PRAGMA defer_foreign_keys=ON")
            try:
                self.db.execute("UPDATE containers SET name=? WHERE name=?", (new, old))
            except sqlite3.IntegrityError as e:
                raise AlreadyExists(f"container {new!r} already exists") from e
            self.db.execute("UPDATE snapshots SET container=? WHERE container=?", (new, old))
            self.db.execute("UPDATE attachments SET container=? WHERE container=?", (new, old))

    # operations -------------------------------------------------------------------------
    def add_operation(self, rec: OperationRecord) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO operations(id, kind, status, stages, detail, error, created, updated) "
            "VALUES(?,?,?,?,?,?,?,?)",
            (rec.id, rec.kind, rec.status, json.dumps(rec.stages), json.dumps(rec.detail),
             rec.error, now, now),
        )

    def update_operation(self, rec: OperationRecord) -> None:
        self.db.execute(
            "UPDATE operations SET status=?, stages=?, detail=?, error=?, updated=? WHERE id=?",
            (rec.status, json.dumps(rec.stages), json.dumps(rec.detail), rec.error,
             time.time(), rec.id),
        )

    def _operation(self, r: sqlite3.Row) -> OperationRecord:
        return OperationRecord(r["id"], r["kind"], r["status"], json.loads(r["stages"]),
                               json.loads(r["detail"]), r["error"], r["created"], r["updated"])

    def get_operation(self, op_id: str) -> OperationRecord:
        rows = self.db.execute("SELECT * FROM operations WHERE id LIKE ? || '%'",
                               (op_id,)).fetchall()
        if len(rows) != 1:
            raise NotFound(f"operation {op_id!r} not found" if not rows else
                           f"operation id {op_id!r} is ambiguous", "see `migrate operations`")
        return self._operation(rows[0])

    def list_operations(self, status: str | None = None) -> list[OperationRecord]:
        rows = self.db.execute(
            "SELECT * FROM operations WHERE (? IS NULL OR status=?) ORDER BY created",
            (status, status)).fetchall()
        return [self._operation(r) for r in rows]

    # hosts ------------------------------------------------------------------------------
    def add_host(self, rec: HostRecord) -> None:
        try:
            self.db.execute(
                "INSERT INTO hosts(name, address, port, user, key, root, command, data_link, "
                "created) VALUES(?,?,?,?,?,?,?,?,?)",
                (rec.name, rec.address, rec.port, rec.user, rec.key, rec.root, rec.command,
                 rec.data_link, time.time()),
            )
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"host {rec.name!r} already exists",
                                "remove it first: `migrate host remove NAME`") from e

    def get_host(self, name: str) -> HostRecord:
        row = self.db.execute("SELECT * FROM hosts WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"host {name!r} is not in the inventory", "see `migrate host list`")
        return HostRecord(row["name"], row["address"], row["port"], row["user"], row["key"],
                          row["root"], row["command"], row["data_link"], row["link_rate"])

    def update_host(self, name: str, **values: Any) -> None:
        """Change inventory fields (``data_link``, ``link_rate``...) of an existing host."""
        allowed = {"address", "port", "user", "key", "root", "command", "data_link",
                   "link_rate", "link_checked"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"not host fields: {sorted(bad)}")
        self.get_host(name)
        for k, v in values.items():  # column names come from the fixed set above
            self.db.execute(f"UPDATE hosts SET {k}=? WHERE name=?", (v, name))  # noqa: S608

    def list_hosts(self) -> list[HostRecord]:
        rows = self.db.execute("SELECT name FROM hosts ORDER BY name").fetchall()
        return [self.get_host(r[0]) for r in rows]

    def delete_host(self, name: str) -> None:
        self.db.execute("DELETE FROM hosts WHERE name=?", (name,))

    # custom volumes ---------------------------------------------------------------------
    def add_volume(self, rec: VolumeRecord) -> None:
        try:
            self.db.execute(
                "INSERT INTO volumes(pool, name, type, config, created) VALUES(?,?,?,?,?)",
                (rec.pool, rec.name, rec.type, json.dumps(rec.config), time.time()),
            )
        except sqlite3.IntegrityError as e:
            if "FOREIGN KEY" in str(e):
                raise NotFound(f"storage pool {rec.pool!r} not found") from e
            raise AlreadyExists(f"volume {rec.pool}/{rec.name} already exists") from e

    def get_volume(self, pool: str, name: str, type: str = "custom") -> VolumeRecord:
        row = self.db.execute(
            "SELECT * FROM volumes WHERE pool=? AND type=? AND name=?", (pool, type, name)
        ).fetchone()
        if row is None:
            raise NotFound(f"volume {name!r} not found in pool {pool!r}",
                           "see `migrate volume list`")
        return VolumeRecord(row["pool"], row["type"], row["name"], json.loads(row["config"]),
                            row["created"])

    def list_volumes(self, pool: str | None = None, type: str = "custom") -> list[VolumeRecord]:
        rows = self.db.execute(
            "SELECT * FROM volumes WHERE type=? AND (? IS NULL OR pool=?) ORDER BY pool, name",
            (type, pool, pool),
        ).fetchall()
        return [VolumeRecord(r["pool"], r["type"], r["name"], json.loads(r["config"]),
                             r["created"]) for r in rows]

    def delete_volume(self, pool: str, name: str, type: str = "custom") -> None:
        self.db.execute("DELETE FROM volumes WHERE pool=? AND type=? AND name=?",
                        (pool, type, name))

    def move_volume(self, pool: str, name: str, new_pool: str, new_name: str,
                    type: str = "custom") -> None:
        """Point the record (and its snapshots and attachments) at a new pool and/or name."""
        try:
            self.db.execute(
                "UPDATE volumes SET pool=?, name=? WHERE pool=? AND type=? AND name=?",
                (new_pool, new_name, pool, type, name),
            )
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"volume {new_pool}/{new_name} already exists") from e

    def add_volume_snapshot(self, rec: VolumeSnapshotRecord) -> None:
        if not rec.uuid:
            rec.uuid = uuidlib.uuid4().hex
        try:
            self.db.execute(
                "INSERT INTO volume_snapshots(pool, type, volume, name, created, uuid) "
                "VALUES(?,?,?,?,?,?)",
                (rec.pool, rec.type, rec.volume, rec.name, rec.created, rec.uuid),
            )
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"snapshot {rec.volume}/{rec.name} already exists") from e

    def list_volume_snapshots(self, pool: str, volume: str,
                              type: str = "custom") -> list[VolumeSnapshotRecord]:
        rows = self.db.execute(
            "SELECT * FROM volume_snapshots WHERE pool=? AND type=? AND volume=? "
            "ORDER BY created, name", (pool, type, volume),
        ).fetchall()
        return [VolumeSnapshotRecord(r["pool"], r["type"], r["volume"], r["name"], r["created"],
                                     r["uuid"]) for r in rows]

    def delete_volume_snapshot(self, pool: str, volume: str, name: str,
                               type: str = "custom") -> None:
        self.db.execute(
            "DELETE FROM volume_snapshots WHERE pool=? AND type=? AND volume=? AND name=?",
            (pool, type, volume, name),
        )

    def add_attachment(self, rec: AttachmentRecord) -> None:
        try:
            self.db.execute(
                "INSERT INTO attachments(container, pool, volume, path) VALUES(?,?,?,?)",
                (rec.container, rec.pool, rec.volume, rec.path),
            )
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"{rec.container!r} already has a volume at {rec.path}") from e

    def list_attachments(self, container: str | None = None, pool: str | None = None,
                         volume: str | None = None) -> list[AttachmentRecord]:
        rows = self.db.execute(
            "SELECT * FROM attachments WHERE (? IS NULL OR container=?) AND "
            "(? IS NULL OR pool=?) AND (? IS NULL OR volume=?) ORDER BY container, path",
            (container, container, pool, pool, volume, volume),
        ).fetchall()
        return [AttachmentRecord(r["container"], r["pool"], r["volume"], r["path"]) for r in rows]

    def delete_attachment(self, container: str, pool: str, volume: str) -> None:
        self.db.execute("DELETE FROM attachments WHERE container=? AND pool=? AND volume=?",
                        (container, pool, volume))

    # images -----------------------------------------------------------------------------
    def add_image(self, rec: ImageRecord) -> None:
        with self.transaction():
            if rec.alias:
                # an alias moves to the newest image, as in LXD
                self.db.execute("UPDATE images SET alias=NULL WHERE alias=?", (rec.alias,))
            self.db.execute(
                "INSERT INTO images(fingerprint, alias, properties, size, created) "
                "VALUES(?,?,?,?,?) ON CONFLICT(fingerprint) "
                "DO UPDATE SET alias=coalesce(excluded.alias, images.alias)",
                (rec.fingerprint, rec.alias, json.dumps(rec.properties), rec.size, rec.created),
            )

    def find_image(self, ref: str) -> ImageRecord:
        row = self.db.execute(
            "SELECT * FROM images WHERE alias=? OR fingerprint=?", (ref, ref)
        ).fetchone()
        if row is None and len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
            rows = self.db.execute(
                "SELECT * FROM images WHERE substr(fingerprint, 1, ?) = ?", (len(ref), ref)
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise NotFound(
                f"image {ref!r} not found",
                "see `migrate image list`, or build one: `migrate image build busybox`",
            )
        return ImageRecord(
            row["fingerprint"],
            row["alias"],
            json.loads(row["properties"]),
            row["size"],
            row["created"],
        )

    def list_images(self) -> list[ImageRecord]:
        rows = self.db.execute("SELECT fingerprint FROM images ORDER BY created").fetchall()
        return [self.find_image(r[0]) for r in rows]

    def delete_image(self, fingerprint: str) -> None:
        self.db.execute("DELETE FROM images WHERE fingerprint=?", (fingerprint,))


def _private_files(path: Path) -> None:
    """Create the database 0600 before SQLite does (SQLite gives its ``-wal`` and ``-shm``
    the database's mode), and take group and other access from files an older version
    left readable.

    Existing files are changed by path (``chmod``), never opened here: closing any
    descriptor of a database file drops every POSIX lock this process holds on it, which
    would silently release the locks of another ``StateStore`` open in the same process."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = path.with_name(path.name + suffix)
        if os.path.islink(p):
            raise OSError(f"{p} is a symbolic link, refused")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)  # a file that did not exist: nothing in this process has it open
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = path.with_name(path.name + suffix)
        try:
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            continue


def _snapshot(r: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(r["container"], r["name"], r["created"], json.loads(r["config"]),
                          r["expires"], r["uuid"])
