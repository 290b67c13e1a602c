"""migrator.runtime.state.StateStore on a real SQLite file in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.core.errors import AlreadyExists, NotFound, StateStoreError
from migrator.runtime.state import (
    SCHEMA_VERSION,
    ContainerRecord,
    ImageRecord,
    PoolRecord,
    SnapshotRecord,
    StateStore,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "s.db")
    yield s
    s.close()


@pytest.fixture
def pooled(db: StateStore) -> StateStore:
    db.add_pool(PoolRecord("default", "dir", "", {"path": "/srv/pool"}))
    return db


def user_version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()


# schema ---------------------------------------------------------------------------------------
def test_fresh_db_gets_schema_version(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.db")
    s.close()
    assert SCHEMA_VERSION >= 1
    assert user_version(tmp_path / "s.db") == SCHEMA_VERSION
    assert {
        "settings",
        "pools",
        "images",
        "containers",
        "volumes",
        "snapshots",
        "operations",
    } <= tables(tmp_path / "s.db")


def test_pragmas(db: StateStore) -> None:
    assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.db")
    s.add_pool(PoolRecord("default", "dir", ""))
    s.set_setting("network.subnet", "192.0.2.1/24")
    s.close()
    for _ in range(2):
        s = StateStore(tmp_path / "s.db")
        assert [p.name for p in s.list_pools()] == ["default"]
        assert s.get_setting("network.subnet") == "192.0.2.1/24"
        s.close()
    assert user_version(tmp_path / "s.db") == SCHEMA_VERSION


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    StateStore(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StateStoreError) as ei:
        StateStore(path)
    assert "newer" in str(ei.value)
    assert ei.value.hint
    assert user_version(path) == SCHEMA_VERSION + 1  # left untouched


def test_unreadable_path_refused(tmp_path: Path) -> None:
    with pytest.raises(StateStoreError):
        StateStore(tmp_path / "no" / "such" / "dir" / "s.db")


# settings ---------------------------------------------------------------------------------------
def test_settings(db: StateStore) -> None:
    assert db.get_setting("x") is None
    assert db.get_setting("x", "d") == "d"
    db.set_setting("x", "1")
    db.set_setting("x", "2")
    assert db.get_setting("x") == "2"


# pools ------------------------------------------------------------------------------------------
def test_pools_crud(db: StateStore) -> None:
    db.add_pool(PoolRecord("zz", "btrfs", "/dev/x", {"size": "1GiB"}))
    db.add_pool(PoolRecord("default", "dir", ""))
    assert [p.name for p in db.list_pools()] == ["default", "zz"]
    p = db.get_pool("zz")
    assert (p.driver, p.source, p.config) == ("btrfs", "/dev/x", {"size": "1GiB"})
    assert p.created > 0
    with pytest.raises(AlreadyExists):
        db.add_pool(PoolRecord("zz", "dir", ""))
    db.delete_pool("zz")
    with pytest.raises(NotFound) as ei:
        db.get_pool("zz")
    assert ei.value.hint
    assert [p.name for p in db.list_pools()] == ["default"]


def test_pool_users(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("c1", "default", None, None))
    pooled.db.execute(
        "INSERT INTO volumes(pool, name, type, created) VALUES('default', 'v1', 'custom', 0)"
    )
    pooled.db.execute(
        "INSERT INTO volumes(pool, name, type, created) VALUES('default', 'c1', 'container', 0)"
    )
    assert sorted(pooled.pool_users("default")) == ["c1", "custom/v1"]
    assert pooled.pool_users("other") == []


def test_pool_in_use_cannot_be_deleted(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("c1", "default", None, None))
    with pytest.raises(sqlite3.IntegrityError):
        pooled.delete_pool("default")
    assert pooled.get_pool("default").name == "default"


# containers -------------------------------------------------------------------------------------
def test_containers_crud(pooled: StateStore) -> None:
    pooled.add_container(
        ContainerRecord("web-2", "default", "abc", "192.0.2.11", {"security.privileged": "true"})
    )
    pooled.add_container(ContainerRecord("web-1", "default", None, "192.0.2.10"))
    pooled.add_container(ContainerRecord("noip", "default", None, None))
    pooled.add_container(ContainerRecord("noip2", "default", None, None))  # NULLs don't clash
    assert [c.name for c in pooled.list_containers()] == ["noip", "noip2", "web-1", "web-2"]
    c = pooled.get_container("web-2")
    assert (c.pool, c.image, c.ipv4, c.config) == (
        "default",
        "abc",
        "192.0.2.11",
        {"security.privileged": "true"},
    )
    assert c.created > 0
    assert pooled.has_container("web-1") and not pooled.has_container("web-3")
    assert pooled.used_ipv4() == {"192.0.2.10", "192.0.2.11"}
    pooled.update_container_config("web-2", {"user.a": "b"})
    assert pooled.get_container("web-2").config == {"user.a": "b"}
    pooled.delete_container("web-2")
    with pytest.raises(NotFound):
        pooled.get_container("web-2")
    assert pooled.used_ipv4() == {"192.0.2.10"}


def test_duplicate_container_name(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("web-1", "default", None, "192.0.2.10"))
    with pytest.raises(AlreadyExists) as ei:
        pooled.add_container(ContainerRecord("web-1", "default", None, "192.0.2.11"))
    assert "container 'web-1'" in str(ei.value)
    assert pooled.used_ipv4() == {"192.0.2.10"}


def test_duplicate_ipv4(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("web-1", "default", None, "192.0.2.10"))
    with pytest.raises(AlreadyExists) as ei:
        pooled.add_container(ContainerRecord("web-2", "default", None, "192.0.2.10"))
    assert "192.0.2.10" in str(ei.value)
    assert not pooled.has_container("web-2")


def test_container_in_unknown_pool(db: StateStore) -> None:
    with pytest.raises(NotFound):
        db.add_container(ContainerRecord("web-1", "nopool", None, None))


def test_container_in_unknown_pool_is_not_stored(db: StateStore) -> None:
    with pytest.raises(NotFound):
        db.add_container(ContainerRecord("web-1", "nopool", None, None))
    assert not db.has_container("web-1")


# snapshots --------------------------------------------------------------------------------------
def test_snapshots(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("c1", "default", None, None))
    pooled.add_snapshot(SnapshotRecord("c1", "snap1", 20.0, {"k": "v"}))
    pooled.add_snapshot(SnapshotRecord("c1", "snap0", 10.0, expires=99.0))
    assert [s.name for s in pooled.list_snapshots("c1")] == ["snap0", "snap1"]
    s = pooled.get_snapshot("c1", "snap1")
    assert (s.config, s.expires) == ({"k": "v"}, None)
    assert pooled.get_snapshot("c1", "snap0").expires == 99.0
    with pytest.raises(AlreadyExists):
        pooled.add_snapshot(SnapshotRecord("c1", "snap1", 30.0))
    pooled.delete_snapshot("c1", "snap1")
    with pytest.raises(NotFound):
        pooled.get_snapshot("c1", "snap1")


def test_snapshot_of_unknown_container_refused(db: StateStore) -> None:
    with pytest.raises(NotFound):
        db.add_snapshot(SnapshotRecord("ghost", "snap0", 1.0))
    assert db.list_snapshots("ghost") == []


def test_snapshots_cascade_with_container(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("c1", "default", None, None))
    pooled.add_container(ContainerRecord("c2", "default", None, None))
    for n in ("snap0", "snap1"):
        pooled.add_snapshot(SnapshotRecord("c1", n, 1.0))
    pooled.add_snapshot(SnapshotRecord("c2", "snap0", 1.0))
    pooled.delete_container("c1")
    assert pooled.list_snapshots("c1") == []
    assert (
        pooled.db.execute("SELECT count(*) FROM snapshots WHERE container='c1'").fetchone()[0] == 0
    )
    assert [s.name for s in pooled.list_snapshots("c2")] == ["snap0"]
    # a new container of the same name starts without the old snapshots
    pooled.add_container(ContainerRecord("c1", "default", None, None))
    assert pooled.list_snapshots("c1") == []


# images -----------------------------------------------------------------------------------------
FP1, FP2, FP3 = "a1" * 32, "b2" * 32, "a1b3" * 16


def img(fp: str, alias: str | None, created: float) -> ImageRecord:
    return ImageRecord(fp, alias, {"os": "busybox"}, 1234, created)


def test_image_add_find_list_delete(db: StateStore) -> None:
    db.add_image(img(FP1, "busybox", 1.0))
    db.add_image(img(FP2, None, 2.0))
    r = db.find_image("busybox")
    assert (r.fingerprint, r.alias, r.properties, r.size) == (
        FP1,
        "busybox",
        {"os": "busybox"},
        1234,
    )
    assert db.find_image(FP2).alias is None
    assert db.find_image(FP2[:8]).fingerprint == FP2  # unique prefix
    assert [i.fingerprint for i in db.list_images()] == [FP1, FP2]
    db.delete_image(FP1)
    with pytest.raises(NotFound) as ei:
        db.find_image("busybox")
    assert ei.value.hint


def test_image_prefix_must_be_unique_and_long(db: StateStore) -> None:
    db.add_image(img(FP1, None, 1.0))
    db.add_image(img(FP3, None, 2.0))
    with pytest.raises(NotFound):
        db.find_image("a1a1a1a")  # shorter than 8
    with pytest.raises(NotFound):
        db.find_image("a1")
    assert db.find_image("a1a1a1a1").fingerprint == FP1
    with pytest.raises(NotFound):  # "a1b3..." and "a1a1..." share only "a1"
        db.find_image("a1c3c3c3")


def test_image_alias_moves_to_newest(db: StateStore) -> None:
    db.add_image(img(FP1, "busybox", 1.0))
    db.add_image(img(FP2, "busybox", 2.0))
    assert db.find_image("busybox").fingerprint == FP2
    assert db.find_image(FP1).alias is None
    assert len(db.list_images()) == 2


def test_image_reimport_updates_alias(db: StateStore) -> None:
    db.add_image(img(FP1, "old", 1.0))
    db.add_image(img(FP1, "new", 5.0))
    assert len(db.list_images()) == 1
    r = db.find_image("new")
    assert r.fingerprint == FP1 and r.created == 1.0
    with pytest.raises(NotFound):
        db.find_image("old")


def test_image_reimport_without_alias_keeps_alias(db: StateStore) -> None:
    db.add_image(img(FP1, "busybox", 1.0))
    db.add_image(img(FP1, None, 2.0))
    assert db.find_image(FP1).alias == "busybox"


def test_image_prefix_is_not_a_pattern(db: StateStore) -> None:
    db.add_image(img(FP1, None, 1.0))
    with pytest.raises(NotFound):
        db.find_image("________")


# transactions -----------------------------------------------------------------------------------
def test_transaction_commits(db: StateStore) -> None:
    with db.transaction():
        db.add_pool(PoolRecord("p1", "dir", ""))
        db.set_setting("k", "v")
    assert db.get_pool("p1").name == "p1"
    assert db.get_setting("k") == "v"


def test_transaction_rollback_leaves_nothing(tmp_path: Path, db: StateStore) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.add_pool(PoolRecord("p1", "dir", ""))
        db.add_container(ContainerRecord("c1", "p1", None, "192.0.2.10"))
        db.set_setting("k", "v")
        raise RuntimeError("boom")
    assert db.list_pools() == []
    assert db.list_containers() == []
    assert db.get_setting("k") is None
    assert not db.db.in_transaction
    # and from a second connection too
    other = StateStore(tmp_path / "s.db")
    try:
        assert other.list_pools() == []
    finally:
        other.close()


def test_transaction_rollback_on_library_error(pooled: StateStore) -> None:
    pooled.add_container(ContainerRecord("c1", "default", None, "192.0.2.10"))
    with pytest.raises(AlreadyExists), pooled.transaction():
        pooled.add_container(ContainerRecord("c2", "default", None, "192.0.2.11"))
        pooled.add_container(ContainerRecord("c3", "default", None, "192.0.2.10"))
    assert [c.name for c in pooled.list_containers()] == ["c1"]
    # the store is usable afterwards
    pooled.add_container(ContainerRecord("c2", "default", None, "192.0.2.11"))
    assert pooled.used_ipv4() == {"192.0.2.10", "192.0.2.11"}


def test_writes_visible_to_a_second_connection(tmp_path: Path, db: StateStore) -> None:
    db.add_pool(PoolRecord("p1", "dir", ""))
    other = StateStore(tmp_path / "s.db")
    try:
        assert [p.name for p in other.list_pools()] == ["p1"]
    finally:
        other.close()


# schema 2: snapshot identity, custom volumes, attachments ------------------------------------
def test_snapshot_uuid_assigned_and_kept(pooled: StateStore) -> None:
    from migrator.runtime.state import ContainerRecord, SnapshotRecord

    pooled.add_container(ContainerRecord("c", "default", None, "10.0.0.2", {}))
    pooled.add_snapshot(SnapshotRecord("c", "s0", 1.0))
    pooled.add_snapshot(SnapshotRecord("c", "s1", 2.0, uuid="given"))
    got = {s.name: s.uuid for s in pooled.list_snapshots("c")}
    assert len(got["s0"]) == 32 and got["s1"] == "given"


def test_rename_container_moves_snapshots_and_attachments(pooled: StateStore) -> None:
    from migrator.runtime.state import (
        AttachmentRecord,
        ContainerRecord,
        SnapshotRecord,
        VolumeRecord,
    )

    pooled.add_container(ContainerRecord("old", "default", None, "10.0.0.2", {}))
    pooled.add_container(ContainerRecord("other", "default", None, "10.0.0.3", {}))
    pooled.add_snapshot(SnapshotRecord("old", "s0", 1.0))
    pooled.add_volume(VolumeRecord("default", "custom", "v"))
    pooled.add_attachment(AttachmentRecord("old", "default", "v", "/srv"))
    pooled.rename_container("old", "new")
    assert not pooled.has_container("old") and pooled.get_container("new").ipv4 == "10.0.0.2"
    assert [s.name for s in pooled.list_snapshots("new")] == ["s0"]
    assert pooled.list_attachments("new")[0].path == "/srv"
    with pytest.raises(AlreadyExists):
        pooled.rename_container("new", "other")
    assert pooled.has_container("new")  # the failed rename changed nothing


def test_volume_move_cascades_to_snapshots_and_attachments(pooled: StateStore) -> None:
    from migrator.runtime.state import (
        AttachmentRecord,
        ContainerRecord,
        PoolRecord,
        VolumeRecord,
        VolumeSnapshotRecord,
    )

    pooled.add_pool(PoolRecord("q", "dir", "", {"path": "/q"}))
    pooled.add_container(ContainerRecord("c", "default", None, None, {}))
    pooled.add_volume(VolumeRecord("default", "custom", "v"))
    pooled.add_volume_snapshot(VolumeSnapshotRecord("default", "custom", "v", "s0", 1.0))
    pooled.add_attachment(AttachmentRecord("c", "default", "v", "/srv"))
    pooled.move_volume("default", "v", "q", "w")
    assert [v.name for v in pooled.list_volumes("q")] == ["w"]
    assert [s.name for s in pooled.list_volume_snapshots("q", "w")] == ["s0"]
    att = pooled.list_attachments("c")[0]
    assert (att.pool, att.volume) == ("q", "w")
    pooled.delete_container("c")
    assert pooled.list_attachments() == []
    pooled.delete_volume("q", "w")
    assert pooled.list_volume_snapshots("q", "w") == []


def test_snapshot_wire_form_round_trips_and_is_checked() -> None:
    from migrator.core.errors import InvalidInput
    from migrator.runtime.state import SnapshotRecord

    s = SnapshotRecord("c1", "auto-1", 100.5, {"limits.cpu": "1"}, 700.0, "u-1")
    assert SnapshotRecord.from_wire("c2", s.to_wire()) == \
        SnapshotRecord("c2", "auto-1", 100.5, {"limits.cpu": "1"}, 700.0, "u-1")
    manual = SnapshotRecord("c1", "s0", 1.0)
    assert SnapshotRecord.from_wire("c1", manual.to_wire()).expires is None
    for bad in ({**s.to_wire(), "expires": "soon"}, {**s.to_wire(), "expires": True},
                {**s.to_wire(), "name": "../x"}, {"name": "s1"}, ["s1"]):
        with pytest.raises(InvalidInput):
            SnapshotRecord.from_wire("c1", bad)


# file modes and durability --------------------------------------------------------------------
def _mode(p: Path) -> int:
    import stat

    return stat.S_IMODE(p.stat().st_mode)


def test_database_files_private_even_under_open_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        s = StateStore(tmp_path / "s.db")
        with s.transaction():
            s.set_setting("k", "v")
        names = {p.name: _mode(p) for p in tmp_path.iterdir()}
        s.close()
    finally:
        os.umask(old)
    assert {"s.db", "s.db-wal", "s.db-shm"} <= set(names)
    assert all(m == 0o600 for m in names.values()), names


def test_readable_files_of_an_older_version_made_private(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = StateStore(path)
    with s.transaction():
        s.set_setting("secret", "x")
    # an older version left them 0644 (and a reader keeps the WAL from being removed)
    reader = sqlite3.connect(path)
    reader.execute("SELECT 1 FROM settings").fetchall()
    for p in tmp_path.iterdir():
        p.chmod(0o644)
    other = StateStore(path)
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
        "s.db": 0o600, "s.db-wal": 0o600, "s.db-shm": 0o600}
    assert other.get_setting("secret") == "x"
    other.close()
    reader.close()
    s.close()


def test_planted_link_at_database_path_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o644)
    (tmp_path / "s.db").symlink_to(victim)
    with pytest.raises(StateStoreError):
        StateStore(tmp_path / "s.db")
    assert victim.read_text() == "keep" and _mode(victim) == 0o644


def test_durable_commit_is_full_then_normal_again(db: StateStore) -> None:
    def level() -> int:
        return int(db.db.execute("PRAGMA synchronous").fetchone()[0])

    assert level() == 1  # NORMAL
    with db.transaction(durable=True):
        assert level() == 2  # FULL for this commit
        db.set_setting("k", "v")
    assert level() == 1 and db.get_setting("k") == "v"
    with pytest.raises(RuntimeError), db.transaction(durable=True):
        db.set_setting("k", "w")
        raise RuntimeError("cut")
    assert level() == 1 and db.get_setting("k") == "v"  # rolled back, level restored
    db.flush()
    assert db.get_setting("k") == "v"
