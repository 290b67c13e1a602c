"""The chunked repository: keys, chunks, the directory store, and the repository over it.

Real crypto, real zstd, a real directory; the streams are synthetic (random bytes), so the
dedup figures are exact and quick. Scrypt runs at a low cost here (the envelope says which),
except where the default cost is the subject.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from migrator.backup import chunkrepo
from migrator.backup.chunkrepo import ChunkedRepository, is_chunked
from migrator.backup.chunks import Chunker, Codec, chunk_key
from migrator.backup.dirstore import DirStore
from migrator.backup.keys import RepoKey, WrongPassphrase, unwrap, wrap
from migrator.backup.model import BackupIndex, PartInfo
from migrator.core.errors import BackupError, CorruptBackup, InvalidInput, NetworkError, NotFound

CHEAP = (1024, 8, 1)  # scrypt cost for tests
SMALL = (64 << 10, 128 << 10, 512 << 10)  # chunker for small synthetic streams
BID = "web-20261201T000000Z-abcdef"
BID2 = "db-20261201T000001Z-abcdef"


@pytest.fixture(autouse=True)
def _no_passphrase_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests give passphrases themselves; the caller's environment must not."""
    for name in ("MIGRATOR_PASSPHRASE", "MIGRATOR_PASSPHRASE_FILE", "MIGRATOR_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# keys ------------------------------------------------------------------------------------
def test_key_roundtrip_and_wrong_passphrase() -> None:
    key = RepoKey.generate()
    env = wrap(key, "right", "r" * 32, CHEAP)
    assert unwrap(env, "right", "r" * 32) == key
    with pytest.raises(WrongPassphrase):
        unwrap(env, "wrong", "r" * 32)
    assert "right" not in env.decode() and base64.b64encode(key.enc_key).decode() \
        not in env.decode()


def test_default_cost_is_scrypt_2_15() -> None:
    doc = json.loads(wrap(RepoKey.generate(), "pw", "x" * 32))
    assert (doc["kdf"]["n"], doc["kdf"]["r"], doc["kdf"]["p"]) == (2 ** 15, 8, 1)


@pytest.mark.parametrize("field,value", [("n", 2048), ("salt", base64.b64encode(b"s" * 16)
                                                       .decode())])
def test_tampered_envelope_fails_authentication(field: str, value: object) -> None:
    env = json.loads(wrap(RepoKey.generate(), "pw", "r" * 32, CHEAP))
    env["kdf"][field] = value
    with pytest.raises(WrongPassphrase):  # the KDF parameters are under the seal
        unwrap(json.dumps(env).encode(), "pw", "r" * 32)


def test_tampered_ciphertext_and_other_repository() -> None:
    env = json.loads(wrap(RepoKey.generate(), "pw", "r" * 32, CHEAP))
    ct = bytearray(base64.b64decode(env["ciphertext"]))
    ct[5] ^= 1
    bad = {**env, "ciphertext": base64.b64encode(bytes(ct)).decode()}
    with pytest.raises(WrongPassphrase):
        unwrap(json.dumps(bad).encode(), "pw", "r" * 32)
    with pytest.raises(CorruptBackup, match="belongs to repository"):
        unwrap(json.dumps(env).encode(), "pw", "s" * 32)


@pytest.mark.parametrize("kdf", [
    {"n": 2 ** 24, "r": 8, "p": 1},  # 16 GiB of memory
    {"n": 2 ** 20, "r": 8, "p": 1},  # 1 GiB: above the memory bound
    {"n": 1000, "r": 8, "p": 1},  # not a power of two
    {"n": 2 ** 14, "r": 8, "p": 100},  # p out of bounds
    {"n": True, "r": 8, "p": 1},
    {"n": "16384", "r": 8, "p": 1},
])
def test_hostile_kdf_parameters_are_refused_before_use(kdf: dict[str, object]) -> None:
    env = json.loads(wrap(RepoKey.generate(), "pw", "r" * 32, CHEAP))
    env["kdf"].update(kdf)
    with pytest.raises(CorruptBackup, match="scrypt"):
        unwrap(json.dumps(env).encode(), "pw", "r" * 32)


def test_envelope_not_json_or_too_large() -> None:
    with pytest.raises(CorruptBackup):
        unwrap(b"{nope", "pw", "r" * 32)
    with pytest.raises(CorruptBackup, match="large"):
        unwrap(b" " * 10000, "pw", "r" * 32)


# chunks ----------------------------------------------------------------------------------
def test_push_chunker_cuts_like_the_whole_buffer() -> None:
    from pyfastcdc import FastCDC

    blob = data(9 << 20, 1)
    whole = [bytes(c.data) for c in FastCDC(SMALL[1], min_size=SMALL[0], max_size=SMALL[2])
             .cut_buf(blob)]
    ch, pushed = Chunker(*SMALL), []
    for i in range(0, len(blob), 100_003):  # odd piece sizes
        pushed += list(ch.feed(blob[i:i + 100_003]))
    pushed += list(ch.finish())
    assert pushed == whole and b"".join(pushed) == blob


def codec() -> Codec:
    return Codec(RepoKey.generate())


def test_chunk_roundtrip_and_flipped_byte() -> None:
    c = codec()
    plain = data(300_000, 2)
    cid = c.chunk_id(plain)
    blob = c.seal_chunk(cid, plain)
    assert c.open_chunk(cid, blob, len(plain)) == plain
    for pos in (0, 5, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptBackup, match=cid[:16]):
            c.open_chunk(cid, bytes(bad), len(plain))


def test_swapped_chunk_and_wrong_aad_are_refused() -> None:
    c = codec()
    a, b = data(1000, 3), data(1000, 4)
    ida, idb = c.chunk_id(a), c.chunk_id(b)
    with pytest.raises(CorruptBackup, match="authentication"):
        c.open_chunk(ida, c.seal_chunk(idb, b), 1000)  # the store answers a with b
    with pytest.raises(CorruptBackup, match="authentication"):
        c.open(c.seal(a, b"index:" + BID.encode()), b"index:" + BID2.encode(), 10_000, "x")
    with pytest.raises(CorruptBackup, match="authentication"):  # another repository's key
        codec().open_chunk(ida, c.seal_chunk(ida, a), 1000)


def test_chunk_sealed_under_its_own_id_but_other_content_is_refused() -> None:
    """Only the key holder can seal; with it, a chunk whose content has another name is
    still refused (the HMAC is checked after the tag)."""
    c = codec()
    a, b = data(1000, 5), data(1000, 6)
    with pytest.raises(CorruptBackup, match="does not match its name"):
        c.open_chunk(c.chunk_id(a), c.seal_chunk(c.chunk_id(a), b), 1000)
    # a part's reader skips the rehash (it hashes the whole part): only then is it let by
    assert c.open_chunk(c.chunk_id(a), c.seal_chunk(c.chunk_id(a), b), 1000, False) == b
    plain = Codec(None)  # unencrypted: the hash is the only check, never skipped
    with pytest.raises(CorruptBackup, match="does not match its name"):
        plain.open_chunk(plain.chunk_id(a), plain.seal_chunk(plain.chunk_id(a), b), 1000,
                         False)


def test_decompression_bomb_is_stopped_at_the_declared_size() -> None:
    c = codec()
    zeros = bytes(8 << 20)
    cid = c.chunk_id(zeros)
    blob = c.seal_chunk(cid, zeros)
    assert len(blob) < 10_000
    with pytest.raises(CorruptBackup, match="beyond"):
        c.open_chunk(cid, blob, 4096)


def test_unencrypted_codec_checks_the_hash() -> None:
    c = Codec(None)
    plain = data(5000, 7)
    cid = c.chunk_id(plain)
    import hashlib
    assert cid == hashlib.sha256(plain).hexdigest()
    blob = bytearray(c.seal_chunk(cid, plain))
    assert c.open_chunk(cid, bytes(blob), 5000) == plain
    blob[-3] ^= 1
    with pytest.raises(CorruptBackup):
        c.open_chunk(cid, bytes(blob), 5000)


# the directory store ---------------------------------------------------------------------
def test_dirstore_basics_and_modes(tmp_path: Path) -> None:
    s = DirStore(tmp_path / "repo")
    s.create()
    s.put("data/ab/abc", b"hello")
    assert s.get("data/ab/abc", 10) == b"hello" and s.exists("data/ab/abc")
    assert sorted(s.list("data/")) == ["data/ab/abc"] and list(s.list("index/")) == []
    assert (tmp_path / "repo/data/ab/abc").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "repo/data/ab").stat().st_mode & 0o777 == 0o700
    s.delete("data/ab/abc")
    s.delete("data/ab/abc")  # missing: not an error
    with pytest.raises(NotFound):
        s.get("data/ab/abc", 10)


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/./b", "", ".hidden/x",
                                 "a/b\0", "data/..", "x" * 600])
def test_dirstore_refuses_bad_keys(tmp_path: Path, key: str) -> None:
    s = DirStore(tmp_path)
    for op in (lambda: s.put(key, b"x"), lambda: s.get(key, 10), lambda: s.delete(key)):
        with pytest.raises(InvalidInput):
            op()


def test_dirstore_refuses_planted_symlinks(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    s = DirStore(tmp_path / "repo")
    s.create()
    (tmp_path / "repo/index").mkdir()
    os.symlink(secret, tmp_path / "repo/index/x")
    with pytest.raises(CorruptBackup, match="symbolic link"):
        s.get("index/x", 100)
    os.symlink(tmp_path, tmp_path / "repo/data")  # a directory link
    with pytest.raises(CorruptBackup, match="symbolic link"):
        s.get("data/secret", 100)
    assert list(s.list("")) == []  # links are no objects
    with pytest.raises(Exception, match="not a directory"):
        s.put("data/ab/new", b"x")  # a put does not write through the link either
    assert not (tmp_path / "ab").exists()


def test_dirstore_refuses_oversized_objects(tmp_path: Path) -> None:
    s = DirStore(tmp_path)
    s.put("big", b"x" * 1000)
    with pytest.raises(CorruptBackup, match="more than"):
        s.get("big", 999)
    assert len(s.get("big", 1000)) == 1000


# the repository --------------------------------------------------------------------------
def make_repo(tmp_path: Path, encryption: str = "repokey") -> ChunkedRepository:
    store = DirStore(tmp_path / "repo")
    store.create()
    return ChunkedRepository.create(store, encryption, "pw", cost=CHEAP, chunker=SMALL)


def index_for(bid: str, parts: list[tuple[str, int, str]]) -> BackupIndex:
    return BackupIndex(
        id=bid, container=bid.split("-")[0], created=1.0, kind="generic", driver="dir",
        parent=None, compression="none", image=None, privileged=False, final="final",
        parts=[PartInfo(rel, "tar", "final", None, size, sha, size) for rel, size, sha in
               parts])


def backup(repo: ChunkedRepository, bid: str, blob: bytes) -> chunkrepo.WriteStats:
    w = repo.writer(bid)
    part = w.part("container.tar")
    for i in range(0, len(blob), 1 << 20):
        part.write(blob[i:i + (1 << 20)])
    size, sha = part.finish()
    w.commit(index_for(bid, [("container.tar", size, sha)]))
    return w.stats


def read_back(repo: ChunkedRepository, bid: str) -> bytes:
    with repo.open_part(bid, "container.tar") as f:
        return b"".join(iter(lambda: f.read(1 << 20), b""))


def test_roundtrip_and_dedup_of_identical_streams(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert is_chunked(repo.store)
    blob = data(24 << 20, 10)
    first = backup(repo, BID, blob)
    second = backup(repo, BID2, blob)
    assert first.stored_bytes > 0.95 * len(blob) and first.new_chunks == first.chunks
    assert second.stored_bytes < 0.10 * first.stored_bytes and second.new_chunks == 0
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    assert read_back(fresh, BID2) == blob and fresh.ids() == sorted([BID, BID2])
    assert fresh.part_size(BID, "container.tar") == len(blob)


def test_a_one_percent_change_stores_about_one_percent(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    blob = bytearray(data(32 << 20, 11))
    first = backup(repo, BID, bytes(blob))
    change = len(blob) // 100
    blob[10 << 20:(10 << 20) + change] = data(change, 12)
    second = backup(repo, BID2, bytes(blob))
    ratio = second.stored_bytes / first.stored_bytes
    assert 0.01 <= ratio <= 0.03, ratio
    assert read_back(repo, BID2) == bytes(blob)


def test_no_plaintext_in_any_stored_file(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    marker = b"PLAINTEXT-MARKER-0123456789"
    blob = (marker + data(1000, 13)) * 3000  # compressible, repeated, and marked
    backup(repo, BID, blob)
    w = repo.writer(BID2)  # a backup being written: its entry in writers/ too
    files = [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert len(files) > 3 and any(p.parent.name == "writers" for p in files)
    for p in files:
        content = p.read_bytes()
        assert marker not in content and b"container.tar" not in content, p
        # the containers' names and the backups' times neither, in content or names (in
        # content, words long enough that random ciphertext does not hold them by chance)
        for word in (BID, BID2, "20261201T0000", f"{socket.gethostname()}:{os.getpid()}"):
            assert word.encode() not in content, (p, word)
        rel = str(p.relative_to(tmp_path / "repo"))
        assert re.fullmatch(r"config|keys/repokey|(data/[0-9a-f]{2}|index|writers)/"
                            r"[0-9a-f]{64}", rel), rel
    w.abort()


def test_wrong_passphrase_refused_before_anything_else_is_read(tmp_path: Path) -> None:
    make_repo(tmp_path)
    read: list[str] = []
    store = DirStore(tmp_path / "repo")
    orig_get = store.get

    def spy(key: str, limit: int) -> bytes:
        read.append(key)
        return orig_get(key, limit)
    store.get = spy  # type: ignore[method-assign]
    repo = ChunkedRepository(store, lambda _c: "nope")
    with pytest.raises(WrongPassphrase):
        repo.init()
    assert read == ["config", "keys/repokey"]
    with pytest.raises(WrongPassphrase):
        repo.writer(BID)
    assert not any(p.name.startswith(("writers", "locks")) for p in (tmp_path / "repo")
                   .iterdir())


def test_crash_before_the_index_leaves_nothing_visible(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    w = repo.writer(BID)
    part = w.part("container.tar")
    part.write(data(3 << 20, 14))
    part.finish()  # chunks are in the store, the index is not: a crash here
    assert repo.ids() == [] and repo.list() == []
    with pytest.raises(NotFound):
        repo.get(BID)
    assert list(repo.store.list("writers/")) == [repo.writer_key(BID)]  # it says it runs
    assert repo.writers() == [BID]
    w.abort()
    assert list(repo.store.list("writers/")) == []


def test_tampered_and_swapped_indexes_are_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    backup(repo, BID, data(1 << 20, 15))
    backup(repo, BID2, data(1 << 20, 16))
    root = tmp_path / "repo"
    (root / repo.index_key(BID)).write_bytes((root / repo.index_key(BID2)).read_bytes())
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    with pytest.raises(CorruptBackup, match="authentication"):
        fresh.get(BID)
    assert [b.id for b in fresh.list()] == [BID2]


def test_missing_and_flipped_chunks_are_named(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    backup(repo, BID, data(2 << 20, 17))
    chunks = repo.chunks_of(BID, "container.tar")
    assert len(chunks) >= 3
    repo.store.delete(chunk_key(chunks[0][0]))
    victim = tmp_path / "repo" / chunk_key(chunks[1][0])
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 1
    victim.write_bytes(bytes(blob))
    problems = repo.check_chunks(BID, "container.tar")
    assert any(chunks[0][0] in p and "missing" in p for p in problems), problems
    assert any(chunks[1][0] in p and "authentication" in p for p in problems), problems
    assert len(problems) == 2
    assert repo.missing_chunks(BID, "container.tar", repo.chunk_ids()) == [chunks[0][0]]
    with pytest.raises(CorruptBackup, match=chunks[0][0]):
        read_back(repo, BID)


def test_unencrypted_repository_needs_no_passphrase(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "none")
    blob = data(2 << 20, 18)
    backup(repo, BID, blob)
    assert not (tmp_path / "repo/keys").exists()
    assert read_back(ChunkedRepository(DirStore(tmp_path / "repo")), BID) == blob


def test_config_is_validated(tmp_path: Path) -> None:
    make_repo(tmp_path)
    conf = tmp_path / "repo/config"
    doc = json.loads(conf.read_text())
    for bad in ({"chunker": {"min": 1, "avg": 2, "max": 3}}, {"encryption": "rot13"},
                {"version": 99}, {"format": "other"}):
        conf.write_text(json.dumps({**doc, **bad}))
        with pytest.raises(BackupError):
            ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw").check()


def test_key_file_mode_and_change_passphrase(tmp_path: Path) -> None:
    store = DirStore(tmp_path / "repo")
    store.create()
    kf = tmp_path / "key"
    ChunkedRepository.create(store, "repokey", "pw", key_file=kf, cost=CHEAP, chunker=SMALL)
    assert not store.exists("keys/repokey") and kf.stat().st_mode & 0o777 == 0o600
    with pytest.raises(BackupError, match="key file"):
        ChunkedRepository(store, lambda _c: "pw").check()
    repo = ChunkedRepository(store, lambda _c: "pw", kf)
    backup(repo, BID, data(1 << 20, 19))
    repo.change_passphrase("new")
    with pytest.raises(WrongPassphrase):
        ChunkedRepository(store, lambda _c: "pw", kf).check()
    assert ChunkedRepository(store, lambda _c: "new", kf).get(BID).id == BID
    os.chmod(kf, 0o644)
    with pytest.raises(BackupError, match="readable by others"):
        ChunkedRepository(store, lambda _c: "new", kf).check()


def test_lock_excludes_a_second_locker(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    other = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    with repo.lock(), pytest.raises(BackupError, match="locked by"), other.lock(wait=0.5):
        pass
    with other.lock(wait=0.5):  # released
        pass
    assert list(repo.store.list("locks/")) == []


def test_garbage_collection_in_two_phases(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    keep, drop = data(2 << 20, 20), data(2 << 20, 21)
    backup(repo, BID, keep)
    backup(repo, BID2, drop)
    before = repo.chunk_ids()
    repo.delete(BID2)
    with repo.lock():
        first = repo.collect_garbage(grace=0)
    assert first.deleted == 0 and first.pending > 0 and repo.chunk_ids() == before
    w = repo.writer("x-20261201T000002Z-abcdef")  # a backup running: nothing goes
    with repo.lock():
        held = repo.collect_garbage(grace=0)
    assert held.deleted == 0 and held.postponed == first.pending
    assert held.writers == ["x-20261201T000002Z-abcdef"]  # its id, read from its entry
    w.abort()
    with repo.lock():
        second = repo.collect_garbage(grace=0)
    assert second.deleted == first.pending and second.pending == 0
    assert len(repo.chunk_ids()) == len(before) - first.pending
    assert read_back(repo, BID) == keep


def test_a_chunk_collected_under_a_writer_fails_its_commit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    blob = data(1 << 20, 22)
    backup(repo, BID, blob)
    w = repo.writer(BID2)  # knows BID's chunks: will reuse them
    part = w.part("container.tar")
    part.write(blob)
    size, sha = part.finish()
    for c, _ in repo.chunks_of(BID, "container.tar"):  # as a racing collection would
        repo.store.delete(chunk_key(c))
    repo.store.put("gc/epoch", b"a collection ran")
    with pytest.raises(BackupError, match="concurrent prune"):
        w.commit(index_for(BID2, [("container.tar", size, sha)]))
    w.abort()
    assert BID2 not in repo.ids()


def test_copy_between_a_directory_repository_and_a_chunked_one(tmp_path: Path) -> None:
    """``backup copy`` runs unchanged between the two formats, both ways, checked."""
    import hashlib

    from migrator.backup.replicate import copy_chain
    from migrator.backup.repository import Repository

    chunked = make_repo(tmp_path)
    blob = data(3 << 20, 23)
    backup(chunked, BID, blob)
    plain = Repository(tmp_path / "plain")
    assert copy_chain(chunked, plain, BID).copied == [BID]
    assert (tmp_path / "plain/backups" / BID / "container.tar").read_bytes() == blob
    again = make_repo(tmp_path / "second")
    assert copy_chain(plain, again, BID).copied == [BID]
    assert read_back(again, BID) == blob
    assert again.get(BID).parts[0].sha256 == hashlib.sha256(blob).hexdigest()
    assert copy_chain(plain, again, BID).present == [BID]  # already there: skipped


def test_passphrase_from_a_file_readable_by_its_owner_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_repo(tmp_path)
    pf = tmp_path / "pass"
    pf.write_text("pw\n")
    os.chmod(pf, 0o600)
    monkeypatch.delenv("MIGRATOR_PASSPHRASE", raising=False)
    monkeypatch.setenv("MIGRATOR_PASSPHRASE_FILE", str(pf))
    assert ChunkedRepository(DirStore(tmp_path / "repo")).check().ids() == []
    os.chmod(pf, 0o640)
    with pytest.raises(BackupError, match="readable by others"):
        ChunkedRepository(DirStore(tmp_path / "repo")).check()
    monkeypatch.delenv("MIGRATOR_PASSPHRASE_FILE")
    with pytest.raises(BackupError, match="no passphrase"):
        ChunkedRepository(DirStore(tmp_path / "repo")).check()


def test_a_config_rewritten_to_unencrypted_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config is plain: turning an encrypted repository's into ``none`` must not make a
    client write plaintext into it."""
    make_repo(tmp_path)
    conf = tmp_path / "repo/config"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "encryption": "none"}))
    with pytest.raises(CorruptBackup, match="holds a key"):
        ChunkedRepository(DirStore(tmp_path / "repo")).writer(BID)
    (tmp_path / "repo/keys/repokey").unlink()
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", "pw")
    with pytest.raises(BackupError, match="passphrase or key file was given"):
        ChunkedRepository(DirStore(tmp_path / "repo")).writer(BID)
    assert not (tmp_path / "repo/data").exists()


def test_a_commit_lists_the_store_again_only_after_a_collection(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    blob = data(1 << 20, 24)
    backup(repo, BID, blob)
    listings: list[str] = []
    orig = repo.store.list

    def spy(prefix: str):  # type: ignore[no-untyped-def]
        listings.append(prefix)
        return orig(prefix)
    repo.store.list = spy  # type: ignore[method-assign]
    backup(repo, BID2, blob)
    assert listings.count("data/") == 1  # the writer's start only
    with repo.lock():
        repo.collect_garbage(grace=0)
    listings.clear()
    w = repo.writer("x-20261201T000002Z-abcdef")
    part = w.part("container.tar")
    part.write(blob)
    size, sha = part.finish()
    repo.store.put("gc/epoch", b"a collection ran")
    w.commit(index_for(w.id, [("container.tar", size, sha)]))
    assert listings.count("data/") == 2  # and again before the commit


class DownStore(DirStore):
    """Chunk puts take 0.3 s and fail once ``down`` is set (a store whose volume servers
    died): each failure is paid in time, as with a real one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.failed_puts = 0
        self._count = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        if self.down and key.startswith("data/"):
            time.sleep(0.3)
            with self._count:
                self.failed_puts += 1
            raise NetworkError("put: the object store failed (InternalError)")
        super().put(key, data)


def test_after_a_failed_upload_the_queued_ones_are_not_tried(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    store = DownStore(repo.store.path)  # type: ignore[attr-defined]
    repo.store = store
    w = repo.writer(BID)
    part = w.part("container.tar")
    blob = data(24 << 20, 3)
    store.down = True
    t0 = time.monotonic()
    with pytest.raises(NetworkError, match="object store failed"):
        for i in range(0, len(blob), 1 << 20):
            part.write(blob[i:i + (1 << 20)])
        part.finish()
    w.abort()
    took = time.monotonic() - t0
    # the uploaders in flight when the store went down fail, the queued ones are not tried
    assert store.failed_puts <= 6 + 1, store.failed_puts
    assert took < 5, took  # not ~0.3 s for each of the 24 chunks, one after another
    assert list(store.list("index/")) == [] and list(store.list("writers/")) == []


# names: what a listing of the store shows ------------------------------------------------
def test_encrypted_names_are_keyed_hashes_learnt_by_opening_the_indexes(
        tmp_path: Path) -> None:
    """Index and writer names are keyed hashes of the id, different for each kind and each
    repository; ``get`` computes the name (no listing), ``ids`` opens each index once."""
    repo = make_repo(tmp_path)
    assert repo.config["version"] == 2 and repo.keyed_names
    backup(repo, BID, data(1 << 20, 30))
    backup(repo, BID2, data(1 << 20, 31))
    names = sorted(repo.store.list("index/"))
    assert names == sorted([repo.index_key(BID), repo.index_key(BID2)])
    assert all(re.fullmatch(r"index/[0-9a-f]{64}", n) for n in names), names
    assert repo.index_key(BID).split("/")[1] != repo.writer_key(BID).split("/")[1]
    other = make_repo(tmp_path / "other")
    assert other.index_key(BID) != repo.index_key(BID)  # a name depends on the key
    assert (tmp_path / "repo" / repo.index_key(BID)).stat().st_mode & 0o777 == 0o600

    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    gets: list[str] = []
    lists: list[str] = []
    orig_get, orig_list = fresh.store.get, fresh.store.list

    def get(key: str, limit: int) -> bytes:
        gets.append(key)
        return orig_get(key, limit)

    def lst(prefix: str):  # type: ignore[no-untyped-def]
        lists.append(prefix)
        return orig_list(prefix)
    fresh.store.get, fresh.store.list = get, lst  # type: ignore[method-assign]
    assert fresh.get(BID2).id == BID2 and lists == []  # the name computed, not listed
    assert fresh.ids() == sorted([BID, BID2]) and fresh.committed(BID)
    assert [b.id for b in fresh.list()] == sorted([BID, BID2], key=lambda i: i)
    opened = [k for k in gets if k.startswith("index/")]
    assert sorted(opened) == names  # each index read once, then cached
    fresh.delete(BID)
    assert fresh.ids() == [BID2] and not fresh.committed(BID)
    assert ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw").ids() == [BID2]
    with pytest.raises(ValueError):
        Codec(None).name("index", BID)


def test_entries_are_sealed_and_name_no_host(tmp_path: Path) -> None:
    """``locks/`` and ``writers/`` entries hold host:pid and the backup id: sealed, bound
    to their names; a lock's holder is still named to whoever has the key."""
    repo = make_repo(tmp_path)
    other = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    w = repo.writer(BID)
    with repo.lock():
        (lock,) = repo.store.list("locks/")
        for key in (lock, repo.writer_key(BID)):
            blob = (tmp_path / "repo" / key).read_bytes()
            assert blob[0] == 1 and b"owner" not in blob and b"web" not in blob, key
        holder = f"locked by {socket.gethostname()}:{os.getpid()}"
        with pytest.raises(BackupError, match=holder), other.lock(wait=0.2):
            pass
    assert other.writers() == [BID]
    # an entry copied to another name does not open there: unreadable, kept (alive)
    wk = repo.writer_key(BID)
    planted = f"writers/{'0' * 64}"
    repo.store.put(planted, repo.store.get(wk, 4096))
    assert other.writers() == sorted([BID, f"unknown ({planted})"])
    w.abort()
    repo.store.delete(planted)
    assert other.writers() == []


def test_a_planted_index_is_refused_and_hides_no_other(tmp_path: Path) -> None:
    """Objects under index/ that do not open with the key (random bytes, another
    repository's index, one of ours copied to a new name) are in no listing, named by
    ``unreadable_indexes`` and verify, and stop a collection; the others are listed."""
    from migrator.backup.verify import unreadable_reports

    repo = make_repo(tmp_path)
    backup(repo, BID, data(1 << 20, 32))
    other = make_repo(tmp_path / "other")
    backup(other, BID2, data(1 << 20, 33))
    planted = {
        f"index/{'a' * 64}": os.urandom(300),
        f"index/{'b' * 64}": other.store.get(other.index_key(BID2), 1 << 20),
        f"index/{'c' * 64}": repo.store.get(repo.index_key(BID), 1 << 20),
        "index/not-a-name": b"\x01" + os.urandom(100),
    }
    for key, blob in planted.items():
        repo.store.put(key, blob)
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    assert fresh.ids() == [BID] and [b.id for b in fresh.list()] == [BID]
    bad = fresh.unreadable_indexes()
    assert sorted(bad) == sorted(planted), bad
    assert all(why.startswith(f"index object {k}: ") and ("authentication" in why or
               "not a sealed object" in why) for k, why in bad.items()), bad
    reports = unreadable_reports(fresh)
    assert sorted(r.id for r in reports) == sorted(planted) and not any(r.ok for r in reports)
    with fresh.lock(), pytest.raises(CorruptBackup, match="no chunk was collected") as e:
        fresh.collect_garbage(grace=0)
    assert f"index/{'a' * 64}" in e.value.message and "remove it" in (e.value.hint or "")
    for key in planted:
        repo.store.delete(key)
    with fresh.lock():
        assert fresh.collect_garbage(grace=0).pending == 0
    assert read_back(fresh, BID) == data(1 << 20, 32)


def v1_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChunkedRepository:
    """An encrypted repository as this program wrote them before names were keyed (format
    version 1): made with VERSION 1, which is also what every name and entry follows."""
    with monkeypatch.context() as m:
        m.setattr(chunkrepo, "VERSION", 1)
        repo = make_repo(tmp_path)
        backup(repo, BID, data(1 << 20, 34))
    return repo


def test_a_version_1_repository_stays_readable_and_writable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain names and plain entries in, plain names and entries out (older programs keep
    reading it); its config is not upgraded behind its users' backs."""
    v1_repo(tmp_path, monkeypatch)
    root = tmp_path / "repo"
    assert (root / "index" / BID).is_file()
    repo = ChunkedRepository(DirStore(root), lambda _c: "pw")
    assert not repo.keyed_names and repo.ids() == [BID] and repo.committed(BID)
    w = repo.writer(BID2)
    assert json.loads((root / "writers" / BID2).read_bytes())["id"] == BID2  # plain JSON
    w.abort()
    backup(repo, BID2, data(1 << 20, 35))
    assert sorted(os.listdir(root / "index")) == sorted([BID, BID2])
    assert read_back(repo, BID) == data(1 << 20, 34)
    repo.delete(BID)
    with repo.lock():
        assert repo.collect_garbage(grace=0).pending > 0
    assert json.loads((root / "config").read_text())["version"] == 1


def test_a_config_rewritten_to_version_1_is_refused(tmp_path: Path) -> None:
    """The config is plain: turning a keyed repository's into version 1 must not make a
    client write plain names into it, nor a collection take the keyed backups' chunks for
    garbage (it would list no backup)."""
    repo = make_repo(tmp_path)
    backup(repo, BID, data(1 << 20, 36))
    chunks = repo.chunk_ids()
    conf = tmp_path / "repo/config"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "version": 1}))
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), lambda _c: "pw")
    with pytest.raises(CorruptBackup, match="config was altered"):
        fresh.writer(BID2)
    with fresh.lock(), pytest.raises(CorruptBackup, match="config was altered"):
        fresh.collect_garbage(grace=0)
    assert list(fresh.store.list("writers/")) == [] and repo.chunk_ids() == chunks
    assert not (tmp_path / "repo/gc/pending").exists()


def test_an_unencrypted_repository_keeps_readable_names(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "none")
    backup(repo, BID, data(1 << 20, 37))
    assert repo.config["version"] == 1 and not repo.keyed_names
    assert list(repo.store.list("index/")) == [f"index/{BID}"] and repo.ids() == [BID]


def test_committed_is_asked_without_the_key_by_the_name_its_writer_had(
        tmp_path: Path) -> None:
    """``recover`` has no passphrase: the journal keeps the index's name the writer had
    (``index_key``), and the store is asked about that name; the key stays closed."""
    repo = make_repo(tmp_path)
    w = repo.writer(BID)
    hint = w.index_key
    assert hint == repo.index_key(BID)
    w.abort()
    backup(repo, BID, data(1 << 20, 38))

    def no_passphrase(_c: bool) -> str:
        raise AssertionError("the key was opened")
    keyless = ChunkedRepository(DirStore(tmp_path / "repo"), no_passphrase)
    assert keyless.committed(BID, hint)
    assert not keyless.committed(BID2, f"index/{'0' * 64}")
    assert not keyless.committed("not an id", hint)
    for bad in (f"index/{BID}", "data/ab/cd", f"index/{'0' * 64}/x"):
        with pytest.raises(InvalidInput):
            keyless.committed(BID, bad)
    with pytest.raises(AssertionError, match="key was opened"):
        keyless.committed(BID)  # without the name, it must be computed: the key is needed


def test_a_chunk_sealed_with_other_bytes_fails_the_part_and_deep_verify_names_it(
        tmp_path: Path) -> None:
    """The reader does not rehash sealed chunks; the part's sha256 (every reader checks
    it) still finds other bytes sealed under a chunk's name, and ``verify --deep`` names
    that chunk (it rehashes each)."""
    from migrator.backup.parts import check_digest, open_decompressed
    from migrator.backup.verify import check_backup

    repo = make_repo(tmp_path)
    blob = data(2 << 20, 40)
    backup(repo, BID, blob)
    cid, size = repo.chunks_of(BID, "container.tar")[1]
    repo.store.put(chunk_key(cid), repo.codec.seal_chunk(cid, data(size, 41)))
    assert read_back(repo, BID) != blob  # the reader lets it by: the part's hash is next
    part = repo.get(BID).parts[0]
    reader, hashing = open_decompressed(repo, BID, part, "none")  # as restore reads it
    while reader.read(1 << 20):
        pass
    hashing.drain()
    hashing.f.close()
    with pytest.raises(CorruptBackup, match="checksum|sha256"):
        check_digest(hashing, BID, part)
    report = check_backup(repo, BID, deep=True)
    assert not report.ok and any(cid in p and "does not match its name" in p
                                 for p in report.problems), report.problems


def test_the_read_ahead_is_bounded_in_chunks_and_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path)
    blob = data(6 << 20, 42)
    backup(repo, BID, blob)
    chunks = repo.chunks_of(BID, "container.tar")
    assert len(chunks) > 12
    asked: list[str] = []
    orig = repo.read_chunk

    def spy(cid: str, size: int, rehash: bool = True) -> bytes:
        asked.append(cid)
        return orig(cid, size, rehash)
    repo.read_chunk = spy  # type: ignore[method-assign]
    monkeypatch.setattr(chunkrepo, "READ_AHEAD", 5)
    with repo.open_part(BID, "container.tar") as f:
        time.sleep(0.2)
        assert len(asked) == 5
        assert f.read(1) == blob[:1]
    asked.clear()
    monkeypatch.setattr(chunkrepo, "READ_AHEAD_BYTES", 2 * chunks[0][1] - 1)
    with repo.open_part(BID, "container.tar") as f:
        time.sleep(0.2)
        assert len(asked) == 2  # the second one crossed the bytes bound
    assert read_back(repo, BID) == blob


def test_the_passphrase_is_asked_once_when_the_indexes_are_opened_in_parallel(
        tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    for i, bid in enumerate((BID, BID2, "x-20261201T000002Z-abcdef")):
        backup(repo, bid, data(256 << 10, 50 + i))
    asked: list[bool] = []

    def passphrase(confirm: bool) -> str:
        asked.append(confirm)
        time.sleep(0.05)  # a prompt takes a while: threads racing to it would all ask
        return "pw"
    fresh = ChunkedRepository(DirStore(tmp_path / "repo"), passphrase)
    assert len(fresh.ids()) == 3 and asked == [False]
