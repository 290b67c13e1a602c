"""``S3Store`` on a real S3 store: a SeaweedFS cluster on 127.0.0.1 (master, two volume
servers, filer, S3 gateway with its credentials enforced), reached the standard AWS way
(AWS_ENDPOINT_URL and the key variables, nothing else).

What SeaweedFS does when a volume server dies (recorded by the last test): writes go on
(the master grows new volumes on the server left, and botocore's retries absorb the few
500s meanwhile); objects stored on the dead server answer InternalError (500), which the
store reports as a retryable ``NetworkError``, until the server is back. With every volume
server gone a PUT hangs 30 s, then InternalError.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from migrator.backup.s3store import S3Store
from migrator.core.errors import AuthenticationFailed, CorruptBackup, NetworkError, NotFound
from testrigs.seaweed import SeaweedCluster, free_ports

pytestmark = pytest.mark.integration


@pytest.fixture
def aws_env(seaweed: SeaweedCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The cluster in the AWS_* variables, and no file of this machine's in the way."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return seaweed.env()


@pytest.fixture
def store(seaweed: SeaweedCluster, aws_env: dict[str, str],
          request: pytest.FixtureRequest) -> Iterator[S3Store]:
    s = S3Store.from_url(f"s3://{seaweed.bucket}/{request.node.name[:60]}")
    yield s
    s.close()


def test_the_store_contract_on_a_real_bucket(store: S3Store, seaweed: SeaweedCluster) -> None:
    store.put("config", b"v1")
    assert store.get("config", 2) == b"v1" and store.exists("config")
    assert not store.exists("data/00/none")
    with pytest.raises(NotFound):
        store.get("data/00/none", 10)
    store.put("config", b"v2 longer")  # replaced
    assert store.get("config", 100) == b"v2 longer"
    with pytest.raises(CorruptBackup, match="9 bytes"):
        store.get("config", 8)  # refused by its length, before reading
    # more keys than one ListObjectsV2 page (1000), written by 16 threads on one client
    keys = [f"data/{i % 7:02x}/{i:064x}" for i in range(1100)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, k[-8:].encode()), keys))
    put_s = time.monotonic() - t0
    assert sorted(store.list("data/")) == sorted(keys)
    assert sorted(store.list("data/03/")) == sorted(k for k in keys if k.startswith("data/03/"))
    assert set(store.list("")) == {*keys, "config"}
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda k: store.get(k, 8), keys[:200])) == \
            [k[-8:].encode() for k in keys[:200]]
    # another prefix of the bucket is another store: nothing of this one shows there
    other = S3Store(seaweed.bucket, store.prefix + "other", store.client)
    assert list(other.list("")) == []
    store.delete("config")
    store.delete("config")  # a missing key: not an error
    assert not store.exists("config")
    print(f"1100 puts by 16 threads: {put_s:.2f}s")


def test_an_overwrite_is_seen_whole_or_not_at_all(store: S3Store) -> None:
    a, b = b"A" * (1 << 20), b"B" * (1 << 20)
    store.put("index/x", a)
    stop = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get("index/x", 2 << 20))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(20):
            store.put("index/x", b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join()
    assert seen and all(x in (a, b) for x in seen), {len(x) for x in seen}


def test_a_wrong_secret_is_refused(seaweed: SeaweedCluster, aws_env: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "not-" + seaweed.secret_key[:20]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s = S3Store.from_url(f"s3://{seaweed.bucket}/wrong")
    for op in (lambda: s.put("config", b"x"), lambda: s.get("config", 10),
               lambda: list(s.list("")), lambda: s.exists("config")):
        with pytest.raises(AuthenticationFailed) as e:
            op()
        assert "AWS_SECRET_ACCESS_KEY" in e.value.hint
        assert wrong not in str(e.value) and seaweed.secret_key not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKNOBODY")
    with pytest.raises(AuthenticationFailed):
        S3Store.from_url(f"s3://{seaweed.bucket}/wrong").put("config", b"x")


def test_a_missing_bucket_is_not_found_with_a_hint(seaweed: SeaweedCluster,
                                                   aws_env: dict[str, str]) -> None:
    s = S3Store.from_url("s3://no-such-bucket-here/repo")
    for op in (lambda: s.get("config", 10), lambda: s.exists("config"),
               lambda: list(s.list("index/")), lambda: s.put("config", b"x"),
               lambda: s.delete("config")):
        with pytest.raises(NotFound) as e:
            op()
        assert "no-such-bucket-here" in e.value.message and "create it" in e.value.hint


def test_an_endpoint_that_is_down_is_a_retryable_network_error(
        seaweed: SeaweedCluster, aws_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s = S3Store.from_url(f"s3://{seaweed.bucket}/down")
    t0 = time.monotonic()
    with pytest.raises(NetworkError) as e:
        s.put("config", b"x")
    assert e.value.retryable and "AWS_ENDPOINT_URL" in e.value.hint
    assert not isinstance(e.value, AuthenticationFailed)
    assert time.monotonic() - t0 < 15


def test_a_volume_server_killed_mid_upload(seaweed: SeaweedCluster,
                                           aws_env: dict[str, str]) -> None:
    """Its own cluster: this one is broken on purpose, and its end is checked by PID."""
    with SeaweedCluster(base=seaweed.dir.parent if seaweed.dir else None) as c:
        s = S3Store(c.bucket, "repo", c.client())
        before = [f"data/{i:04d}" for i in range(60)]
        for k in before:
            s.put(k, os.urandom(2048))
        failed: list[BaseException] = []
        after = [f"data/{i:04d}" for i in range(60, 200)]

        def put(k: str) -> None:
            try:
                s.put(k, k.encode())
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                failed.append(e)

        assert c.dir is not None
        # the server holding most of the data goes
        victim = max(range(2), key=lambda i: sum(
            p.stat().st_size for p in (c.dir / f"volume{i}").glob("*.dat")))
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(put, k) for k in after[:40]]
            killed = c.kill_volume(victim)
            futures += [pool.submit(put, k) for k in after[40:]]
            for f in futures:
                f.result()
        assert not os.path.exists(f"/proc/{killed}")
        # what SeaweedFS does: the writes went on, on the volume server left
        assert not failed, failed
        assert all(s.get(k, 100) == k.encode() for k in after[40:])  # put after the kill
        # what was stored on the dead server cannot be read: a clear, retryable error
        lost = []
        for k in before + after[:40]:
            try:
                s.get(k, 4096)
            except NetworkError as e:
                assert e.retryable and "object store failed" in e.message, e
                lost.append(k)
        assert lost, "no object was on the killed volume server"
        c.restart_volume(victim)
        assert all(s.get(k, 4096) for k in before + after)  # back with its server
        pids, where = list(c.pids.values()), c.dir
    assert where is not None and not where.exists()
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


def test_a_chunked_repository_in_the_bucket_dedups_and_hides_the_data(
        store: S3Store, seaweed: SeaweedCluster) -> None:
    from migrator.backup.chunkrepo import ChunkedRepository
    from tests.unit.test_chunkrepo import CHEAP, SMALL, backup, read_back

    repo = ChunkedRepository.create(store, "repokey", "pw", cost=CHEAP, chunker=SMALL)
    marker = b"PLAINTEXT-MARKER-of-the-container-"
    blob = (marker * 20000) + os.urandom(8 << 20)
    first = backup(repo, "c1-20261207T000000Z-aaaaaa", blob)
    second = backup(repo, "c2-20261207T000001Z-bbbbbb", blob)
    assert first.new_chunks == first.chunks and second.new_chunks == 0
    assert second.stored_bytes < 0.10 * first.stored_bytes
    fresh = ChunkedRepository(S3Store.from_url(store.url), lambda _c: "pw")
    assert read_back(fresh, "c2-20261207T000001Z-bbbbbb") == blob
    # nothing of the data in the clear anywhere in the bucket (every object of the store)
    client = seaweed.client()
    names = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=seaweed.bucket) for o in page.get("Contents", [])]
    assert len(names) > first.chunks
    for name in names:
        body = client.get_object(Bucket=seaweed.bucket, Key=name)["Body"].read()
        assert marker[:16] not in body, name
