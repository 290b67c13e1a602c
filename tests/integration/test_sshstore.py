"""``SshObjectStore`` over real SSH: host a's client keeps objects in a directory on test
host b through b's agent (``objects`` sessions), as a chunked ``ssh://`` repository will.

Two test hosts (``mt17-a``, ``mt17-b``, dir pools only, no image): a reaches b by its
inventory entry, from its own network namespace.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from migrator.backup.sshstore import MAX_SESSIONS, SshObjectStore
from migrator.core.errors import CorruptBackup, NetworkError, NotFound
from migrator.runtime.host import Host
from migrator.runtime.peers import inventory_transport
from migrator.transport.ssh import SshTransport
from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import add_to_inventory, host_pair, m

pytestmark = pytest.mark.integration

BASE = Path("/var/tmp/migrator-tests/sshstore")
PREFIX = "mt17"


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir",), ()) as hosts:
        a, b = hosts
        add_to_inventory(a, b)
        yield a, b
        m(a, "host", "remove", "b")


def _agents_of(spec: TestHostSpec) -> list[int]:
    """PIDs of ``migrate ... agent`` processes serving host ``spec``'s state root."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"agent" in argv and str(spec.root).encode() in argv:
                found.append(int(d.name))
    return found


@pytest.fixture
def transport(pair) -> Iterator[SshTransport]:  # type: ignore[no-untyped-def]
    a, _b = pair
    h = Host(a.root)
    t = inventory_transport(h, "b").connect()
    yield t
    t.close()
    h.close()


def test_objects_on_another_host_through_its_agent(pair, transport: SshTransport) -> None:  # type: ignore[no-untyped-def]
    _a, b = pair
    where = b.root / "objects-1"
    store = SshObjectStore(transport, str(where))
    try:
        store.create()
        store.put("config", b"v1")
        assert store.get("config", 10) == b"v1" and store.exists("config")
        chunks = {f"data/{i % 4:02x}/{i:064x}": os.urandom(64 << 10) for i in range(48)}
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: store.put(*kv), chunks.items()))
        put_s = time.monotonic() - t0
        assert sorted(store.list("data/")) == sorted(chunks)
        assert store.missing([*chunks, "data/ff/" + "0" * 64]) == {"data/ff/" + "0" * 64}
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(chunks, pool.map(lambda k: store.get(k, 64 << 10), chunks),
                           strict=True))
        assert got == chunks
        with pytest.raises(CorruptBackup):
            store.get("config", 1)
        with pytest.raises(NotFound):
            store.get("index/none", 10)
        store.delete("config")
        assert not store.exists("config")
        # on b: DirStore's files, 0600 in 0700 directories, no temporary left
        files = list(where.rglob("*"))
        assert len([p for p in files if p.is_file()]) == 48
        assert all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)
                   for p in files)
        assert not [p for p in files if p.name.startswith(".tmp-")]
        # the sessions were reused: at most MAX_SESSIONS agents serve this store on b
        assert 1 <= len(_agents_of(b)) <= MAX_SESSIONS
        print(f"48 x 64 KiB over ssh by 8 threads: {put_s:.2f}s")
    finally:
        store.close()
    deadline = time.monotonic() + 10
    while _agents_of(b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _agents_of(b) == []  # each session's agent exited with its channel


def test_a_dropped_link_is_a_network_error_and_a_retry_works(  # type: ignore[no-untyped-def]
        pair, transport: SshTransport) -> None:
    _a, b = pair
    where = b.root / "objects-2"
    store = SshObjectStore(transport, str(where))
    store.create()
    store.put("config", b"x")
    assert transport.client is not None
    link = transport.client.get_transport()
    assert link is not None
    link.sock.close()  # the link drops under an idle session
    with pytest.raises(NetworkError):
        store.put("data/00/1", b"lost")
    store.close()
    # a retry (a new run: a new connection) finds the store as it was, nothing half-written
    transport.close()
    store = SshObjectStore(transport.connect(), str(where))
    assert sorted(store.list("")) == ["config"]
    store.put("data/00/1", b"kept")
    assert store.get("data/00/1", 10) == b"kept"
    assert not [p for p in where.rglob(".tmp-*")]
    store.close()
    with pytest.raises(Exception):  # noqa: B017 - a relative path never reaches b
        SshObjectStore(transport, "relative/path")


class CountingStore(SshObjectStore):
    """An ``SshObjectStore`` that counts the bytes it sends to the far host."""

    sent = 0

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        self.sent += len(data)


def test_a_chunked_repository_over_ssh_sends_only_what_the_far_side_lacks(  # type: ignore[no-untyped-def]
        pair, transport: SshTransport) -> None:
    from migrator.backup.chunkrepo import ChunkedRepository
    from tests.unit.test_chunkrepo import CHEAP, SMALL, backup, read_back

    _a, b = pair
    where = b.root / "chunked"
    store = CountingStore(transport, str(where))
    store.create()
    repo = ChunkedRepository.create(store, "repokey", "pw", cost=CHEAP, chunker=SMALL)
    blob = os.urandom(12 << 20)
    first = backup(repo, "c1-20261207T000000Z-aaaaaa", blob)
    after_first = store.sent
    second = backup(repo, "c2-20261207T000001Z-bbbbbb", blob)  # the same data again
    assert first.new_chunks == first.chunks > 10 and after_first > len(blob)
    assert second.new_chunks == 0
    assert store.sent - after_first < 0.02 * len(blob)  # the index and the writer entry
    store.close()
    fresh = ChunkedRepository(SshObjectStore(transport, str(where)), lambda _c: "pw")
    assert read_back(fresh, "c2-20261207T000001Z-bbbbbb") == blob
    fresh.store.close()
