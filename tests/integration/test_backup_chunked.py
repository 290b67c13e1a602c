"""Backups of real containers into a chunked, encrypted repository: a directory, and S3.

One test host per case; containers ``ck1-*``. Through the real command line: ``backup
init``, two containers holding the same data backed up (the second stores almost nothing),
no plaintext anywhere in the repository (every file, or every object of the bucket), a
byte-exact restore, a wrong passphrase refused before anything is written, and ``verify
--deep`` naming a flipped byte and a missing chunk. On the directory, also an optimized
(btrfs send) backup round trip. The S3 case runs on the SeaweedFS cluster of
``testrigs/seaweed.py`` (the ``seaweed`` fixture), reached the standard AWS way.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrator.backup.chunkrepo import ChunkedRepository
from migrator.backup.chunks import chunk_key
from migrator.backup.dirstore import DirStore
from migrator.backup.keys import WrongPassphrase
from migrator.backup.objectstore import ObjectStore
from migrator.core.errors import BackupError, CorruptBackup
from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import b_in_inventory, host_pair, m
from tests.integration.test_remote import rootfs as rootfs_of
from tests.integration.treecmp import populate, signature

PASSPHRASE = "correct horse battery staple"


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def created(th, *args: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(th.cli("backup", "create", *args, "--format", "json", check=True).stdout)


@dataclass
class Where:
    """A repository's address and raw access to what is stored there (for the checks)."""

    url: str
    store: Callable[[], ObjectStore]
    objects: Callable[[], dict[str, bytes]]  # every stored thing, by name

    def flip(self, key: str) -> None:
        s = self.store()
        blob = bytearray(s.get(key, 64 << 20))
        blob[len(blob) // 3] ^= 0x01
        s.put(key, bytes(blob))


def local_repo(th) -> Where:  # type: ignore[no-untyped-def]
    path = th.root / "chunked"

    def objects() -> dict[str, bytes]:
        return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*")
                if p.is_file()}
    return Where(str(path), lambda: DirStore(path), objects)


def s3_repo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Where:
    from migrator.backup.s3store import S3Store

    cluster: Any = request.getfixturevalue("seaweed")
    for k, v in cluster.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    prefix = f"chunked-{uuid.uuid4().hex[:8]}"
    client = cluster.client()

    def objects() -> dict[str, bytes]:  # everything in the bucket, not only the prefix
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = client.get_object(Bucket=cluster.bucket,
                                                  Key=o["Key"])["Body"].read()
        return out
    url = f"s3://{cluster.bucket}/{prefix}"
    return Where(url, lambda: S3Store.from_url(url), objects)


@pytest.mark.parametrize("kind", ["dir", "s3"])
def test_chunked_repository_dedups_encrypts_restores_and_names_damage(
        host, kind: str, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", PASSPHRASE)
    where = local_repo(host) if kind == "dir" else s3_repo(request, monkeypatch)
    repo = where.url
    init = json.loads(host.cli("backup", "init", repo, "--format", "json", check=True).stdout)
    assert init["encryption"] == "repokey"

    marker = f"CHUNKED-PLAINTEXT-{uuid.uuid4().hex}".encode()
    host.cts.create("busybox", "ck1-a", "dir", {"security.privileged": "true"})
    srv = rootfs(host, "ck1-a") / "srv"
    populate(srv)
    # what the second container differs in (its name in /etc/hostname, a few directory
    # times) makes the chunks around each difference new: ~1 MiB each, at most 4, a few
    # MiB in all whatever the size; 80 MiB of data puts that well under 10%, as for any
    # real container, where it stayed near the line with 40
    (srv / "data.bin").write_bytes(os.urandom(80 << 20))
    (srv / "marker.txt").write_bytes(marker * 1000)
    host.cts.create("busybox", "ck1-b", "dir", {"security.privileged": "true"})
    subprocess.run(["cp", "-a", str(srv), str(rootfs(host, "ck1-b"))], check=True)

    a = created(host, "ck1-a", "--repo", repo)
    b = created(host, "ck1-b", "--repo", repo)
    assert a["compression"] == "none" and a["raw_bytes"] > 40 << 20
    assert a["stored_bytes"] > 40 << 20 and a["new_chunks"] > 30
    assert b["stored_bytes"] < 0.10 * a["stored_bytes"], (a, b)
    assert b["new_chunks"] < b["chunks"] // 5, b
    print(f"{kind} dedup: first {a['stored_bytes']} B stored of {a['raw_bytes']} raw, "
          f"second {b['stored_bytes']} B ({b['new_chunks']}/{b['chunks']} new chunks)")

    # no plaintext of the container anywhere: not in chunks, indexes or anything else
    stored = where.objects()
    assert len(stored) > 20
    for name, content in stored.items():
        assert marker not in content and b"ck1-a" not in content \
            and b"shadow" not in content, name
    # nor in any object's name: neither the containers' names nor the backups' times (an
    # encrypted repository names indexes and writers by keyed hashes of the backup ids)
    times = {x["id"].rsplit("-", 2)[1] for x in (a, b)}  # YYYYmmddTHHMMSSZ
    assert all(re.fullmatch(r"\d{8}T\d{6}Z", t) for t in times), times
    for name in stored:
        assert "ck1" not in name and not any(t in name or t[:13] in name for t in times), \
            name
    assert len([n for n in stored if "/index/" in f"/{n}"]) >= 2

    # a byte-exact restore of the second (whose data is mostly the first's chunks)
    host.cli("backup", "restore", b["id"], "--name", "ck1-r", "--pool", "btrfs",
             "--allow-privileged", "--repo", repo, check=True)
    assert signature(rootfs(host, "ck1-r")) == signature(rootfs(host, "ck1-b"))
    # info shows what each backup stored when it was written
    info = json.loads(host.cli("backup", "info", b["id"], "--repo", repo, "--format",
                               "json", check=True).stdout)
    assert {k: info[k] for k in ("raw_bytes", "stored_bytes", "chunks", "new_chunks")} == \
        {k: b[k] for k in ("raw_bytes", "stored_bytes", "chunks", "new_chunks")}, info
    # single files out of it, without a restore
    out = host.root / f"extract-{kind}"
    host.cli("backup", "extract", b["id"], "/srv/data.bin", "/srv/marker.txt", "--to",
             str(out), "--repo", repo, check=True)
    assert (out / "srv" / "data.bin").read_bytes() == (srv / "data.bin").read_bytes()
    assert sorted(p.name for p in (out / "srv").iterdir()) == ["data.bin", "marker.txt"]

    if kind == "dir":  # native streams land in it too: an optimized btrfs backup, restored
        host.cts.create("busybox", "ck1-n", "btrfs", {"security.privileged": "true"})
        populate(rootfs(host, "ck1-n") / "srv")
        n = created(host, "ck1-n", "--optimized", "--repo", repo)
        host.cli("backup", "restore", n["id"], "--name", "ck1-n2", "--pool", "btrfs",
                 "--allow-privileged", "--repo", repo, check=True)
        assert signature(rootfs(host, "ck1-n2")) == signature(rootfs(host, "ck1-n"))

    # a wrong passphrase is refused, with its own message, and writes nothing
    before = sorted(where.objects())
    if kind == "dir":  # optimized backups cannot be read file by file: said so
        res = host.cli("backup", "extract", n["id"], "/srv", "--to", str(out / "n"),
                       "--repo", repo)
        assert res.returncode == BackupError.exit_code and "send streams" in res.stderr
        assert not (out / "n").exists()
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", "wrong")
    res = host.cli("backup", "create", "ck1-a", "--repo", repo)
    assert res.returncode == WrongPassphrase.exit_code and "wrong passphrase" in res.stderr
    assert sorted(where.objects()) == before
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", PASSPHRASE)

    # damage: a flipped byte in one chunk, another chunk gone; verify --deep names both
    assert host.cli("backup", "verify", a["id"], "--deep", "--repo", repo).returncode == 0
    r = ChunkedRepository(where.store(), lambda _c: PASSPHRASE)
    chunks = [c for c, _ in r.chunks_of(a["id"], "container.tar")]
    flipped, gone = chunks[len(chunks) // 2], chunks[-1]
    where.flip(chunk_key(flipped))
    r.store.delete(chunk_key(gone))
    quick = host.cli("backup", "verify", a["id"], "--repo", repo)
    assert quick.returncode == CorruptBackup.exit_code
    assert gone in quick.stderr and flipped not in quick.stderr  # quick: presence only
    deep = host.cli("backup", "verify", a["id"], "--deep", "--repo", repo)
    assert deep.returncode == CorruptBackup.exit_code
    assert f"chunk {flipped}: fails authentication" in deep.stderr, deep.stderr
    assert gone in deep.stderr and "missing" in deep.stderr, deep.stderr
    # and a restore of it is refused whole, before anything is made
    res = host.cli("backup", "restore", a["id"], "--name", "ck1-bad", "--allow-privileged",
                   "--repo", repo)
    assert res.returncode == CorruptBackup.exit_code and gone in res.stderr
    assert not host.cts.state.has_container("ck1-bad")

    # a planted index object (not sealed with the key) hides no backup, and verify --all
    # names it
    planted = "index/" + "5a" * 32
    r.store.put(planted, b"not an index")
    listed = json.loads(host.cli("backup", "list", "--repo", repo, "--format", "json",
                                 check=True).stdout)
    assert b["id"] in {x["id"] for x in listed}, listed
    every = host.cli("backup", "verify", "--all", "--repo", repo)
    assert every.returncode == CorruptBackup.exit_code
    assert planted.split("/")[1] in every.stderr + every.stdout, every.stderr


# ssh:// ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssh_pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    """Hosts a and b (``mt17r-*``), b in a's inventory; containers ``ck2-*`` on a."""
    with host_pair(Path("/var/tmp/migrator-tests/backup-chunked-ssh"), "mt17r", ("dir",),
                   ("busybox",)) as (a, b), b_in_inventory(a, b):
        yield a, b


def test_chunked_repository_over_ssh_and_on_a_schedule(  # type: ignore[no-untyped-def]
        ssh_pair, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = ssh_pair
    monkeypatch.setenv("MIGRATOR_PASSPHRASE", PASSPHRASE)
    where = b.root / "chunked-ssh"
    url = f"ssh://b{where}"
    _rc, out, _e = m(a, "backup", "init", url, "--format", "json")
    assert json.loads(out)["encryption"] == "repokey"
    rc, _o, err = m(a, "backup", "init", url, check=False)  # not over an existing one
    assert rc != 0 and "not empty" in err, err
    m(a, "create", "busybox", "ck2-a", "-p", "dir")
    srv = rootfs_of(a, "ck2-a") / "srv"
    srv.mkdir(exist_ok=True)
    marker = f"SSH-PLAINTEXT-{uuid.uuid4().hex}".encode()
    (srv / "data.bin").write_bytes(os.urandom(24 << 20))
    (srv / "marker.txt").write_bytes(marker * 1000)

    first = json.loads(m(a, "backup", "create", "ck2-a", "--repo", url, "--format",
                         "json")[1])
    second = json.loads(m(a, "backup", "create", "ck2-a", "--repo", url, "--format",
                          "json")[1])
    assert first["new_chunks"] > 10 and second["new_chunks"] <= 2, (first, second)
    assert second["stored_bytes"] < 0.02 * first["stored_bytes"], second
    print(f"ssh: first {first['stored_bytes']} B, second {second['stored_bytes']} B "
          f"({second['new_chunks']}/{second['chunks']} new chunks)")
    # on b: only sealed objects, 0600 files (DirStore's), no plaintext of the container
    files = [p for p in where.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "data" for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not [p for p in files if marker in p.read_bytes()]
    info = json.loads(m(a, "backup", "info", second["id"], "--repo", url, "--format",
                        "json")[1])
    assert info["new_chunks"] == second["new_chunks"] and info["raw_bytes"] > 24 << 20
    # restore here from there (read once: each chunk authenticated as it streams)
    m(a, "backup", "restore", second["id"], "--name", "ck2-r", "--repo", url)
    assert signature(rootfs_of(a, "ck2-r")) == signature(rootfs_of(a, "ck2-a"))
    out = tmp_path / "files"
    m(a, "backup", "extract", second["id"], "/srv/marker.txt", "--to", str(out), "--repo",
      url)
    assert (out / "srv" / "marker.txt").read_bytes() == marker * 1000

    # a schedule into it, the passphrase from a 0600 file; its retention prunes the two
    # backups above and the tick then collects the repository's garbage
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    monkeypatch.delenv("MIGRATOR_PASSPHRASE")
    monkeypatch.setenv("MIGRATOR_PASSPHRASE_FILE", str(secret))
    m(a, "config", "set", "ck2-a", "backups.schedule=@daily", f"backups.repo={url}",
      "backups.retention=keep-last=1")
    (srv / "data.bin").write_bytes(os.urandom(8 << 20))  # the old data becomes garbage
    m(a, "schedule", "tick", "--now", "2027-01-01T12:00:00")  # the schedule is first seen
    _rc, out_json, _e = m(a, "schedule", "tick", "--now", "2027-01-02T00:05:00", "--format",
                          "json")
    jobs = {j["job"]: j for j in json.loads(out_json)["jobs"]}
    assert jobs["backup"]["result"] == "ok" and "pruned 2" in jobs["backup"]["detail"], jobs
    assert jobs["collect"]["result"] == "ok" and url in jobs["collect"]["container"], jobs
    recorded = re.search(r"(\d+) recorded for a later tick", jobs["collect"]["detail"])
    assert recorded and int(recorded.group(1)) > 10, jobs  # the old data.bin's chunks
    _rc, listed, _e = m(a, "backup", "list", "--repo", url, "--format", "json")
    kept = json.loads(listed)
    assert len(kept) == 1 and kept[0]["id"] not in (first["id"], second["id"]), kept
    m(a, "backup", "verify", kept[0]["id"], "--deep", "--repo", url)
    m(a, "config", "unset", "ck2-a", "backups.schedule")
