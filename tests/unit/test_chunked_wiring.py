"""Chunked repositories wired in everywhere the directory format works: ``open_repository``
over ssh:// (a chunked one found by its config through the far agent's object session),
``recover`` asking without the key, a backup's stats kept in its index, the schedule's
``backups.repo`` syntax and the scheduler's garbage collection after retention."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migrator import recover
from migrator.backup import catalog, remote
from migrator.backup.chunkrepo import ChunkedRepository
from migrator.backup.dirstore import DirStore
from migrator.backup.remote import RemoteRepository, close_repository, open_repository
from migrator.backup.scheduler import Scheduler
from migrator.backup.sshstore import SshObjectStore
from migrator.core.errors import BackupError, CorruptBackup, InvalidInput
from migrator.runtime.config import validate
from tests.unit.test_chunkrepo import BID, BID2, CHEAP, SMALL, backup, data, make_repo
from tests.unit.test_sshstore import Agents


@pytest.fixture(autouse=True)
def _no_passphrase_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MIGRATOR_PASSPHRASE", "MIGRATOR_PASSPHRASE_FILE", "MIGRATOR_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


class Peer:
    """``inventory_transport(host, name)``'s stand-in: connects to this process as the far
    host (its agents serve ``objects`` and ``repository`` requests in threads)."""

    def __init__(self, t: Agents) -> None:
        self.t = t
        self.closed = 0
        t.close = self._count_close  # type: ignore[method-assign]

    def _count_close(self) -> None:
        self.closed += 1

    def connect(self) -> Agents:
        return self.t


@pytest.fixture
def peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Peer:
    import migrator.runtime.peers as peers

    p = Peer(Agents(tmp_path))
    monkeypatch.setattr(peers, "inventory_transport", lambda host, name: p)
    return p


def test_ssh_address_opens_a_chunked_repository_when_its_config_is_there(
        tmp_path: Path, peer: Peer) -> None:
    where = tmp_path / "far-repo"
    store = SshObjectStore(peer.t, str(where))
    store.create()
    made = ChunkedRepository.create(store, "repokey", "pw", cost=CHEAP, chunker=SMALL)
    blob = data(3 << 20, 7)
    stats = backup(made, BID, blob)
    store.close()
    host: Any = SimpleNamespace(root=tmp_path)

    repo = open_repository(host, f"ssh://far{where}", lambda _c: "pw")
    assert isinstance(repo, ChunkedRepository) and str(repo) == f"ssh://far{where}"
    assert repo.ids() == [BID]
    got = repo.stats_of(BID)  # the stats went into the sealed index, and came back
    assert got is not None and got.raw_bytes == len(blob) == stats.raw_bytes
    assert got.new_chunks == got.chunks == stats.chunks > 3
    with repo.open_part(BID, "container.tar") as f:
        assert f.read() == blob
    close_repository(repo)
    assert peer.closed == 1  # the store owned the connection open_repository made

    # recover asks about the index's name the journal kept: no passphrase is needed (none
    # is set here)
    cts: Any = SimpleNamespace(host=host)
    assert recover._backup_committed(cts, f"ssh://far{where}", BID, made.index_key(BID))
    assert not recover._backup_committed(cts, f"ssh://far{where}", BID2,
                                         made.index_key(BID2))
    assert peer.closed == 3

    # a directory-format repository there (no config): the far agent's repository, over
    # the same connection (the object session's agent ended)
    plain = open_repository(host, f"ssh://far{tmp_path / 'plain'}")
    assert isinstance(plain, RemoteRepository) and plain.t is peer.t and peer.closed == 3
    close_repository(plain)
    assert peer.closed == 4


def test_recover_reads_a_local_chunked_repository_without_its_key(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    backup(repo, BID, data(1 << 20, 1))
    cts: Any = SimpleNamespace(host=SimpleNamespace(root=tmp_path))
    # no MIGRATOR_PASSPHRASE: opening the key would raise; asking about the index's name
    # the journal kept (its keyed hash) does not
    spec = str(tmp_path / "repo")
    assert recover._backup_committed(cts, spec, BID, repo.index_key(BID))
    assert not recover._backup_committed(cts, spec, BID2, repo.index_key(BID2))
    with pytest.raises(BackupError, match="no passphrase"):  # a journal without the name
        recover._backup_committed(cts, spec, BID)


def test_stats_survive_protect_and_a_fresh_reader(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    backup(repo, BID, data(2 << 20, 3))
    second = backup(repo, BID2, data(2 << 20, 3))  # the same data: nothing new
    repo.set_protected(BID2, True)
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    got = fresh.stats_of(BID2)
    assert fresh.get(BID2).protected and got == second
    assert got is not None and got.new_chunks == 0 and got.stored_bytes == 0


def test_backups_repo_takes_s3_addresses() -> None:
    assert validate("backups.repo", "s3://backups/host-a") == "s3://backups/host-a"
    assert validate("backups.repo", "s3://my.bucket-1") == "s3://my.bucket-1"
    assert validate("backups.repo", " ssh://b/srv/chunked ") == "ssh://b/srv/chunked"
    for bad in ("s3://", "s3://Upper/x", "s3://bk/../x", "s3://bk//x", "s3://bk/x/",
                "s3://ab", "s3://user@bucket/x", "s3://bucket:9000/x", "s3:bucket/x"):
        with pytest.raises(InvalidInput):
            validate("backups.repo", bad)


def test_a_tick_collects_the_garbage_of_a_chunked_repository_its_retention_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path)
    backup(repo, BID, data(2 << 20, 4))
    backup(repo, BID2, data(2 << 20, 5))
    with repo.lock():
        repo.delete(BID)
    spec = str(tmp_path / "repo")
    plain = tmp_path / "plain"
    sched = Scheduler.__new__(Scheduler)  # only what _collect_garbage uses
    sched._repos = {spec: repo, str(plain): remote.Repository(plain).init()}
    sched._pruned = {spec, str(plain)}
    first = sched._collect_garbage()
    assert [(r.job, r.result) for r in first] == [("collect", "ok")]  # the directory: none
    assert "0 unreferenced" in first[0].detail and "recorded" in first[0].detail
    pending = repo.collect_garbage(grace=3600, dry_run=True).pending
    assert pending >= 2  # BID's chunks, recorded for a later run
    assert sched._pruned == set()
    sched._pruned = {spec}
    before = len(repo.chunk_ids())
    monkeypatch.setattr(catalog, "GC_GRACE", 0.0)  # a later tick, past the grace period
    later = sched._collect_garbage()
    assert later[0].result == "ok" and f"deleted {pending} " in later[0].detail
    assert len(repo.chunk_ids()) == before - pending


def test_schedule_install_passes_where_the_secrets_are_never_the_secrets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from migrator.backup.schedule_install import install

    monkeypatch.setenv("MIGRATOR_PASSPHRASE_FILE", "/root/.backup-passphrase")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    unit = install(tmp_path, "systemd", unit_dir=tmp_path, dry_run=True)
    service = unit.files[str(tmp_path / "migrate-schedule.service")]
    assert "Environment=MIGRATOR_PASSPHRASE_FILE=/root/.backup-passphrase\n" in service
    assert "Environment=AWS_ENDPOINT_URL=http://127.0.0.1:8333\n" in service
    assert "hunter2" not in service and "s3cr3t" not in service
    assert any("MIGRATOR_PASSPHRASE, AWS_SECRET_ACCESS_KEY not written" in s
               for s in unit.next_steps), unit.next_steps
    cron = install(tmp_path, "cron", cron_dir=tmp_path, dry_run=True)
    text = cron.files[str(tmp_path / "migrate-schedule")]
    assert "\nMIGRATOR_PASSPHRASE_FILE=/root/.backup-passphrase\n" in text
    assert "hunter2" not in text and text.rstrip().splitlines()[-1].split()[5] == "root"
    monkeypatch.setenv("MIGRATOR_KEY_FILE", "/root/my key")
    with pytest.raises(InvalidInput, match="MIGRATOR_KEY_FILE"):
        install(tmp_path, "cron", cron_dir=tmp_path, dry_run=True)


class Asking(SshObjectStore):
    """An ssh:// store that counts what the writer asks and sends."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.listed: list[str] = []
        self.asked = 0
        self.sent = 0

    def list(self, prefix: str) -> Any:
        self.listed.append(prefix)
        return super().list(prefix)

    def missing(self, keys: Any) -> set[str]:
        self.asked += 1
        return super().missing(keys)

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("data/"):
            self.sent += len(data)
        super().put(key, data)


def test_a_writer_over_ssh_asks_which_chunks_the_far_side_lacks(tmp_path: Path) -> None:
    store = Asking(Agents(tmp_path), str(tmp_path / "far"))
    store.create()
    repo = ChunkedRepository.create(store, "repokey", "pw", cost=CHEAP, chunker=SMALL)
    blob = data(6 << 20, 11)
    first = backup(repo, BID, blob)
    assert first.new_chunks == first.chunks > 8 and store.sent > len(blob) * 0.95
    sent = store.sent
    half = blob[: 3 << 20] + data(3 << 20, 12)  # the first half known, the rest new
    second = backup(repo, BID2, half)
    assert "data/" not in store.listed  # never listed whole: asked
    assert store.asked >= second.chunks // 4
    assert 0 < second.new_chunks < second.chunks and store.sent - sent < 0.7 * len(half)
    fresh = ChunkedRepository(SshObjectStore(Agents(tmp_path), str(tmp_path / "far")),
                              lambda _c: "pw")
    with fresh.open_part(BID2, "container.tar") as f:
        assert f.read() == half
    # a concurrent collection meanwhile: the chunks it reused are asked about again, and a
    # removed one fails the backup instead of committing an index naming it
    w = repo.writer("web-20261203T000000Z-cccccc")
    p = w.part("container.tar")
    p.write(blob[: 2 << 20])
    size, sha = p.finish()
    assert w.reused
    repo.store.put("gc/epoch", b"another")
    repo.store.delete(f"data/{next(iter(w.reused))[:2]}/{next(iter(w.reused))}")
    from tests.unit.test_chunkrepo import index_for

    with pytest.raises(BackupError, match="removed by a concurrent prune"):
        w.commit(index_for("web-20261203T000000Z-cccccc", [("container.tar", size, sha)]))
    w.abort()
    fresh.close()
    store.close()


def test_verify_over_ssh_asks_about_the_backups_chunks_only(tmp_path: Path) -> None:
    from migrator.backup.verify import check_backup, verify_chain

    store = Asking(Agents(tmp_path), str(tmp_path / "far"))
    store.create()
    repo = ChunkedRepository.create(store, "repokey", "pw", cost=CHEAP, chunker=SMALL)
    backup(repo, BID, data(2 << 20, 21))
    assert check_backup(repo, BID).ok
    gone = repo.chunks_of(BID, "container.tar")[1][0]
    store.delete(f"data/{gone[:2]}/{gone}")
    report = check_backup(repo, BID)
    assert not report.ok and gone in report.problems[0] and "missing" in report.problems[0]
    with pytest.raises(CorruptBackup, match=gone):
        verify_chain(repo, repo.get(BID), read=False)  # restore's check before it streams
    assert "data/" not in store.listed
    store.close()


def test_an_agent_without_object_sessions_serves_the_directory_format(
        tmp_path: Path, peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.agent as agent

    monkeypatch.delitem(agent.OPS, "objects")  # a far host of an older version
    host: Any = SimpleNamespace(root=tmp_path)
    repo = open_repository(host, f"ssh://far{tmp_path / 'old'}")
    assert isinstance(repo, RemoteRepository) and peer.closed == 0
    close_repository(repo)
