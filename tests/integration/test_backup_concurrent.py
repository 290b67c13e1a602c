"""Several writers, a prune and a failing object store on one chunked repository in S3.

The issue's last three promises for the chunked format, on real components: two test hosts
(``mt17c-a``, ``mt17c-b``: their own network namespaces and state roots, dir pools, busybox)
back up at the same time into ONE repository in a bucket of a SeaweedFS cluster
(``testrigs/seaweed.py``: master, two volume servers, filer, S3 gateway with its key
enforced) while a prune removes a backup whose chunks they reuse; a volume server dies under
a running backup; a wrong passphrase meets the repository.

Where the commands run: the cluster listens on 127.0.0.1 of the root network namespace, and
a test host's namespace has a loopback of its own and no route out, so nothing in it can
reach the cluster. Each host's ``migrate`` is therefore run as ``migrate --root HOST_ROOT``
from the root namespace, as the bench scripts do: the host's state, pools and containers are
its own (its LXC commands still enter its namespace through ``core/nsexec.py``); only the
S3 client is the machine's. The store is reached the standard AWS way (``AWS_ENDPOINT_URL``
and the key variables; no profile or config file of the machine's).

Containers are named ``cc-*``; every test deletes the containers of both hosts after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrator.backup.chunkrepo import ChunkedRepository
from migrator.backup.keys import WrongPassphrase
from migrator.backup.s3store import S3Store
from migrator.core.errors import NetworkError
from testrigs.seaweed import SeaweedCluster
from testrigs.testhosts import TestHostSpec
from tests.integration.conftest import MIGRATE, TEST_BASE
from tests.integration.test_remote import host_pair, rootfs
from tests.integration.treecmp import populate, signature

pytestmark = pytest.mark.integration

BASE = TEST_BASE / "backup-concurrent"
PREFIX = "mt17c"
PASSPHRASE = "two hosts, one bucket"
CWD = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture(scope="module")
def pair(image_cache: Path) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:
    with host_pair(BASE, PREFIX, ("dir",), ("busybox",)) as hosts:
        yield hosts


@pytest.fixture
def hosts(pair: tuple[TestHostSpec, TestHostSpec]
          ) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:
    """The pair; every container of both hosts deleted after the test, pass or fail."""
    yield pair
    for spec in pair:
        out = run(spec, {}, "list", "--format", "json").stdout
        for c in json.loads(out):
            run(spec, {}, "delete", "--force", c["name"])


def aws_env(cluster: SeaweedCluster, passphrase: str = PASSPHRASE) -> dict[str, str]:
    """The environment of a ``migrate`` that reaches ``cluster``: the AWS_* variables only,
    no file or profile of this machine's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MIGRATOR_ROOT", "MIGRATOR_KEY_FILE",
                                                     "MIGRATOR_PASSPHRASE_FILE")}
    env.update(cluster.env())
    env.update({"AWS_CONFIG_FILE": "/nonexistent/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
                "MIGRATOR_PASSPHRASE": passphrase})
    return env


def run(spec: TestHostSpec, env: dict[str, str], *args: str, check: bool = True,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``migrate --root <spec's root> ARGS`` from the root namespace (see the docstring)."""
    r = subprocess.run([*MIGRATE, "--root", str(spec.root), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=CWD, env=env or None)
    if check and r.returncode != 0:
        raise AssertionError(f"migrate {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r


def start(spec: TestHostSpec, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``migrate ARGS`` in the background, in a session (process group) of its own."""
    return subprocess.Popen([*MIGRATE, "--root", str(spec.root), *args], cwd=CWD, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(p: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{p.args!r} still ran after {timeout}s\n{err}") from None
    return p.returncode, out, err


def make(spec: TestHostSpec, name: str, files: dict[str, bytes]) -> Path:
    """A privileged busybox container on the dir pool (``populate``'s device node and
    setuid file are a privileged container's) with ``files`` under /srv; its rootfs."""
    run(spec, {}, "create", "busybox", name, "-p", "dir", "-c", "security.privileged=true")
    root = rootfs(spec, name)
    (root / "srv").mkdir(exist_ok=True)
    for rel, data in files.items():
        (root / "srv" / rel).write_bytes(data)
    return root


def created(out: str) -> dict[str, Any]:
    return json.loads(out)  # type: ignore[no-any-return]


def bucket_state(cluster: SeaweedCluster, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Every object of the bucket under ``prefix``: key -> (size, ETag, last modified)."""
    client = cluster.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket,
                                                                 Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["Size"], o["ETag"], o["LastModified"])
    return out


def keys(cluster: SeaweedCluster, prefix: str) -> list[str]:
    return sorted(bucket_state(cluster, prefix))


def new_repo(spec: TestHostSpec, cluster: SeaweedCluster) -> tuple[str, str]:
    """A new chunked, encrypted repository in the cluster's bucket: (url, object prefix)."""
    prefix = f"cc-{uuid.uuid4().hex[:8]}"
    url = f"s3://{cluster.bucket}/{prefix}"
    run(spec, aws_env(cluster), "backup", "init", url)
    return url, prefix


def watcher(cluster: SeaweedCluster, url: str) -> ChunkedRepository:
    """The repository at ``url``, opened here to see who writes: the ``writers/`` entries
    are named by keyed hashes and sealed, so only the key tells whose they are."""
    return ChunkedRepository(S3Store.from_url(url, client=cluster.client()),
                             lambda _c: PASSPHRASE)


def wait_for(what: str, cond: Any, timeout: float, *alive: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in alive:
            if p.poll() is not None:
                raise AssertionError(f"{p.args!r} ended before {what}: {p.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


def test_two_hosts_back_up_at_once_while_a_prune_runs_and_nothing_is_lost(
        hosts: tuple[TestHostSpec, TestHostSpec], seaweed: SeaweedCluster) -> None:
    """Host a and host b write into one repository at the same time; both store the same
    new data at once (``n.bin``), and both reuse chunks (``g.bin``) that only a backup the
    prune removes meanwhile references. The prune must not collect them: it records them
    as garbage, and its second phase is postponed while a backup is being written. Host
    b's backup is paused (SIGSTOP, mid-upload) while the prune runs, so the prune overlaps
    a writer on any machine; host a's runs freely. Afterwards every backup restores
    byte-exact on the other host, ``verify --deep`` passes, and a last prune deletes only
    the chunks nothing references."""
    a, b = hosts
    env = aws_env(seaweed)
    url, prefix = new_repo(a, seaweed)
    g, u, n = os.urandom(16 * MIB), os.urandom(8 * MIB), os.urandom(8 * MIB)
    # "gone" is backed up with g and u, then without them: prune --keep-last 1 removes the
    # first, after which g's chunks are referenced only by the running backups
    gone = make(a, "cc-gone", {"g.bin": g, "u.bin": u})
    populate(gone / "srv" / "tree")
    g1 = created(run(a, env, "backup", "create", "cc-gone", "--repo", url,
                     "--format", "json").stdout)
    (gone / "srv" / "g.bin").unlink()
    (gone / "srv" / "u.bin").unlink()
    g2 = created(run(a, env, "backup", "create", "cc-gone", "--repo", url,
                     "--format", "json").stdout)
    ra = make(a, "cc-a", {"g.bin": g, "n.bin": n, "a.bin": os.urandom(48 * MIB)})
    # b's own data is large enough that its uploads outlast the polling below on a busy
    # machine: paused any later, it may already have committed and left writers/
    rb = make(b, "cc-b", {"g.bin": g, "n.bin": n, "b.bin": os.urandom(80 * MIB)})
    populate(rb / "srv" / "tree")

    watch = watcher(seaweed, url).check()  # the key opened before the clock starts
    t0 = time.monotonic()
    pa = start(a, env, "backup", "create", "cc-a", "--repo", url, "--format", "json")
    pb = start(b, env, "backup", "create", "cc-b", "--repo", url, "--format", "json")
    try:
        def both_writing() -> bool:
            """Both backups announced in writers/ in one listing: at once."""
            names = watch.writers()
            return all(any(n.startswith(ct + "-") for n in names) for ct in ("cc-a", "cc-b"))
        wait_for("both writers at once", both_writing, 60, pa, pb)
        data0 = len(keys(seaweed, f"{prefix}/data/"))
        wait_for("new chunks", lambda: len(keys(seaweed, f"{prefix}/data/")) > data0 + 2,
                 60, pb)
        os.killpg(pb.pid, signal.SIGSTOP)
        t_stop = time.monotonic() - t0
        # the premise of what follows: b is paused while still a writer (a prune that
        # finds no writer may delete what is due, and rightly so)
        assert any(n.startswith("cc-b-") for n in watch.writers()), \
            "host b's backup ended before it could be paused: the test missed its window"
        p1 = json.loads(run(a, env, "backup", "prune", "--container", "cc-gone",
                            "--keep-last", "1", "--gc-grace", "0", "--repo", url,
                            "--format", "json").stdout)
        p2 = json.loads(run(a, env, "backup", "prune", "--gc-grace", "0", "--repo", url,
                            "--format", "json").stdout)
        a_running = pa.poll() is None
        os.killpg(pb.pid, signal.SIGCONT)
        rc_a, out_a, err_a = finish(pa)
        rc_b, out_b, err_b = finish(pb)
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        watch.close()
    assert rc_a == 0, err_a
    assert rc_b == 0, err_b
    ba, bb = created(out_a), created(out_b)
    print(f"backups ran {time.monotonic() - t0:.1f}s; b paused at {t_stop:.1f}s; a "
          f"{'still ran' if a_running else 'had finished'} when the prune ended; "
          f"a: {ba['stored_bytes']}/{ba['raw_bytes']} B stored, b: "
          f"{bb['stored_bytes']}/{bb['raw_bytes']} B; prune 1 {p1['gc']}, prune 2 {p2['gc']}")
    # the first prune removed g1 and recorded its unreferenced chunks; the second found
    # them due (grace 0) but deleted nothing while backups were being written
    assert p1["remove"] == [g1["id"]] and p1["gc"]["deleted"] == 0, p1
    assert p2["remove"] == [] and p2["gc"]["deleted"] == 0, p2
    assert p2["gc"]["postponed"] > 0 and any(w.startswith("cc-b-")
                                             for w in p2["gc"]["writers"]), p2
    # g's chunks were reused by both, not stored again: g is 16 MiB, and the chunk at
    # each of its edges may straddle a neighbouring file's bytes (a chunk is at most
    # 4 MiB), so at least 8 MiB of it is reused whenever it is reused at all
    assert ba["stored_bytes"] < ba["raw_bytes"] - 8 * MIB, ba
    assert bb["stored_bytes"] < bb["raw_bytes"] - 8 * MIB, bb

    # nothing lost: the list, a deep verify, every backup restored on the other host
    listed = json.loads(run(a, env, "backup", "list", "--repo", url,
                            "--format", "json").stdout)
    assert sorted(x["id"] for x in listed) == sorted([g2["id"], ba["id"], bb["id"]]), listed
    assert keys(seaweed, f"{prefix}/writers/") == []
    run(b, env, "backup", "verify", "--all", "--deep", "--repo", url)
    for spec, bk, name, src in ((b, ba, "cc-a-r", ra), (a, bb, "cc-b-r", rb),
                                (b, g2, "cc-gone-r", gone)):
        run(spec, env, "backup", "restore", bk["id"], "--name", name, "--pool", "dir",
            "--allow-privileged", "--repo", url)
        assert signature(rootfs(spec, name)) == signature(src), name

    # with no writer left, a last prune deletes what only g1 held (u), and keeps g and n
    chunks_before = len(keys(seaweed, f"{prefix}/data/"))
    p3 = json.loads(run(a, env, "backup", "prune", "--gc-grace", "0", "--repo", url,
                        "--format", "json").stdout)
    assert p3["gc"]["deleted"] >= 4 and p3["gc"]["postponed"] == 0, p3  # u: 8 MiB
    assert len(keys(seaweed, f"{prefix}/data/")) == chunks_before - p3["gc"]["deleted"]
    run(a, env, "backup", "verify", "--all", "--deep", "--repo", url)
    print(f"last prune deleted {p3['gc']['deleted']} chunks of {chunks_before}")


def test_a_volume_server_killed_mid_backup_fails_cleanly_and_a_retry_succeeds(
        hosts: tuple[TestHostSpec, TestHostSpec]) -> None:
    """Both volume servers die while a backup uploads (one alone is survivable: the
    cluster writes on the other, see test_s3store). With one attempt per request
    (``AWS_MAX_ATTEMPTS=1``) the backup ends with NetworkError's exit code and a message
    naming the object store; no index of it is in the bucket and ``backup list`` shows only
    the backup made before. With the servers back, the same backup runs again and verifies.
    Its own cluster: this one is broken on purpose."""
    a, _b = hosts
    with SeaweedCluster(base=TEST_BASE) as cluster:
        env = aws_env(cluster)
        url, prefix = new_repo(a, cluster)
        make(a, "cc-k0", {"small.bin": os.urandom(MIB)})
        before = created(run(a, env, "backup", "create", "cc-k0", "--repo", url,
                             "--format", "json").stdout)
        src = make(a, "cc-k", {"big.bin": os.urandom(96 * MIB)})
        index0 = keys(cluster, f"{prefix}/index/")
        data0 = len(keys(cluster, f"{prefix}/data/"))
        env1 = {**env, "AWS_MAX_ATTEMPTS": "1"}
        t0 = time.monotonic()
        p = start(a, env1, "backup", "create", "cc-k", "--repo", url, "--format", "json")
        try:
            wait_for("uploads", lambda: len(keys(cluster, f"{prefix}/data/")) >= data0 + 4,
                     60, p)
            assert p.poll() is None, "the backup ended before the kill"
            killed = [cluster.kill_volume(i) for i in range(2)]
            t_kill = time.monotonic() - t0
            rc, out, err = finish(p, timeout=200)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        took = time.monotonic() - t0
        print(f"volume servers killed at {t_kill:.1f}s; the backup failed at {took:.1f}s "
              f"with exit {rc}: {err.strip()[-300:]}")
        assert not [pid for pid in killed if os.path.exists(f"/proc/{pid}")]
        assert rc == NetworkError.exit_code, (rc, out, err)
        assert "object store failed" in err and "Hint:" in err, err
        assert out.strip() == "", out
        # nothing half-committed: no index of it (the listing needs no volume server)
        assert keys(cluster, f"{prefix}/index/") == index0
        for i in range(2):
            cluster.restart_volume(i)
        listed = json.loads(run(a, env, "backup", "list", "--repo", url,
                                "--format", "json").stdout)
        assert [x["id"] for x in listed] == [before["id"]], listed
        assert keys(cluster, f"{prefix}/writers/") == []  # the failed writer took its entry
        # the retry: chunks the failed run stored are reused, the rest uploaded
        retry = created(run(a, env, "backup", "create", "cc-k", "--repo", url,
                            "--format", "json").stdout)
        assert retry["raw_bytes"] > 96 * MIB and retry["new_chunks"] < retry["chunks"], retry
        listed = json.loads(run(a, env, "backup", "list", "--repo", url,
                                "--format", "json").stdout)
        assert sorted(x["id"] for x in listed) == sorted([before["id"], retry["id"]])
        run(a, env, "backup", "verify", "--all", "--deep", "--repo", url)
        run(a, env, "backup", "restore", retry["id"], "--name", "cc-k-r", "--pool", "dir",
            "--allow-privileged", "--repo", url)
        assert signature(rootfs(a, "cc-k-r")) == signature(src)
        print(f"retry: {retry['new_chunks']}/{retry['chunks']} chunks new, "
              f"{retry['stored_bytes']} B stored")


def test_a_wrong_passphrase_is_refused_before_anything_is_read_or_written(
        hosts: tuple[TestHostSpec, TestHostSpec], seaweed: SeaweedCluster) -> None:
    """Every command that opens the repository refuses a wrong passphrase with its own exit
    code and message, before it reads a backup or the container or writes anything: the
    bucket's objects are unchanged (keys, sizes, ETags, times), no container is made, no
    operation is journaled."""
    a, _b = hosts
    url, prefix = new_repo(a, seaweed)
    make(a, "cc-w", {"w.bin": os.urandom(2 * MIB)})
    bk = created(run(a, aws_env(seaweed), "backup", "create", "cc-w", "--repo", url,
                     "--format", "json").stdout)
    whole = bucket_state(seaweed)
    ops = json.loads(run(a, {}, "operations", "--all", "--format", "json").stdout)
    wrong = aws_env(seaweed, "not the passphrase")
    for args in (("backup", "create", "cc-w"), ("backup", "list"),
                 ("backup", "verify", bk["id"], "--deep"),
                 ("backup", "restore", bk["id"], "--name", "cc-w-r", "--allow-privileged"),
                 ("backup", "prune", "--keep-last", "1", "--gc-grace", "0"),
                 ("backup", "protect", bk["id"]), ("backup", "copy", bk["id"], "--to",
                                                   str(a.root / "cc-copy"))):
        r = run(a, wrong, *args, "--repo", url, check=False)
        assert r.returncode == WrongPassphrase.exit_code, (args, r.returncode, r.stderr)
        assert "wrong passphrase" in r.stderr and "nothing in the repository" in r.stderr, \
            (args, r.stderr)
    assert bucket_state(seaweed) == whole
    assert json.loads(run(a, {}, "operations", "--all", "--format", "json").stdout) == ops
    names = [c["name"] for c in json.loads(run(a, {}, "list", "--format", "json").stdout)]
    assert names == ["cc-w"], names
    assert not (a.root / "cc-copy").exists()
    snaps = json.loads(run(a, {}, "snapshot", "list", "cc-w", "--format", "json").stdout)
    assert snaps == [], snaps
    # and the right one still opens it, the backup intact
    run(a, aws_env(seaweed), "backup", "verify", bk["id"], "--deep", "--repo", url)
    assert prefix
