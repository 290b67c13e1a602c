"""Backups of real containers into a chunked, encrypted repository on a local directory.

One test host; containers ``ck1-*``. Through the real command line: ``backup init``, two
containers holding the same data backed up (the second stores almost nothing), no plaintext
anywhere in the repository, a byte-exact restore, an optimized (btrfs send) backup round
trip, a wrong passphrase refused, and ``verify --deep`` naming a flipped byte and a missing
chunk.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from migrator.backup.chunkrepo import ChunkedRepository
from migrator.backup.chunks import chunk_key
from migrator.backup.dirstore import DirStore
from migrator.backup.keys import WrongPassphrase
from migrator.core.errors import CorruptBackup
from tests.integration.treecmp import populate, signature

PASSPHRASE = "correct horse battery staple"


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def created(th, *args: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(th.cli("backup", "create", *args, "--format", "json", check=True).stdout)


def test_chunked_repository_dedups_encrypts_restores_and_names_damage(
        host, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", PASSPHRASE)
    repo = host.root / "chunked"
    init = json.loads(host.cli("backup", "init", str(repo), "--format", "json",
                               check=True).stdout)
    assert init["encryption"] == "repokey"

    marker = f"CHUNKED-PLAINTEXT-{uuid.uuid4().hex}".encode()
    host.cts.create("busybox", "ck1-a", "dir", {"security.privileged": "true"})
    srv = rootfs(host, "ck1-a") / "srv"
    populate(srv)
    (srv / "data.bin").write_bytes(os.urandom(24 << 20))
    (srv / "marker.txt").write_bytes(marker * 1000)
    host.cts.create("busybox", "ck1-b", "dir", {"security.privileged": "true"})
    subprocess.run(["cp", "-a", str(srv), str(rootfs(host, "ck1-b"))], check=True)

    a = created(host, "ck1-a", "--repo", str(repo))
    b = created(host, "ck1-b", "--repo", str(repo))
    assert a["compression"] == "none" and a["raw_bytes"] > 24 << 20
    assert a["stored_bytes"] > 20 << 20 and a["new_chunks"] > 20
    assert b["stored_bytes"] < 0.10 * a["stored_bytes"], (a, b)
    assert b["new_chunks"] < b["chunks"] // 5, b
    print(f"dedup: first {a['stored_bytes']} B stored of {a['raw_bytes']} raw, "
          f"second {b['stored_bytes']} B ({b['new_chunks']}/{b['chunks']} new chunks)")

    # no plaintext of the container anywhere: not in chunks, indexes or anything else
    files = [p for p in repo.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        content = p.read_bytes()
        assert marker not in content and b"ck1-a" not in content and b"shadow" not in content, p

    # a byte-exact restore of the second (whose data is mostly the first's chunks)
    host.cli("backup", "restore", b["id"], "--name", "ck1-r", "--pool", "btrfs",
             "--allow-privileged", "--repo", str(repo), check=True)
    assert signature(rootfs(host, "ck1-r")) == signature(rootfs(host, "ck1-b"))

    # native streams land in it too: an optimized backup of a btrfs container, restored
    host.cts.create("busybox", "ck1-n", "btrfs", {"security.privileged": "true"})
    populate(rootfs(host, "ck1-n") / "srv")
    n = created(host, "ck1-n", "--optimized", "--repo", str(repo))
    host.cli("backup", "restore", n["id"], "--name", "ck1-n2", "--pool", "btrfs",
             "--allow-privileged", "--repo", str(repo), check=True)
    assert signature(rootfs(host, "ck1-n2")) == signature(rootfs(host, "ck1-n"))

    # a wrong passphrase is refused, with its own message, and writes nothing
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", "wrong")
    res = host.cli("backup", "create", "ck1-a", "--repo", str(repo))
    assert res.returncode == WrongPassphrase.exit_code and "wrong passphrase" in res.stderr
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", PASSPHRASE)

    # damage: a flipped byte in one chunk, another chunk gone; verify --deep names both
    assert host.cli("backup", "verify", a["id"], "--deep", "--repo", str(repo)
                    ).returncode == 0
    r = ChunkedRepository(DirStore(repo), lambda _c: PASSPHRASE)
    chunks = [c for c, _ in r.chunks_of(a["id"], "container.tar")]
    flipped, gone = chunks[len(chunks) // 2], chunks[-1]
    victim = repo / chunk_key(flipped)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 3] ^= 0x01
    victim.write_bytes(bytes(blob))
    (repo / chunk_key(gone)).unlink()
    quick = host.cli("backup", "verify", a["id"], "--repo", str(repo))
    assert quick.returncode == CorruptBackup.exit_code
    assert gone in quick.stderr and flipped not in quick.stderr  # quick: presence only
    deep = host.cli("backup", "verify", a["id"], "--deep", "--repo", str(repo))
    assert deep.returncode == CorruptBackup.exit_code
    assert f"chunk {flipped}: fails authentication" in deep.stderr, deep.stderr
    assert gone in deep.stderr and "missing" in deep.stderr, deep.stderr
