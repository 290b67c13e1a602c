"""Host to host over real SSH (paramiko -> OpenSSH sshd in a network namespace).

Two test hosts (``mt3-a``, ``mt3-b``) on a private TEST-NET link, each with its own sshd,
state root and dir/btrfs/zfs pools. Host a's CLI pushes to host b through ``migrate agent``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrigs import testhosts
from testrigs.testhosts import TestHostSpec
from tests.conftest import IN_CI
from tests.integration.treecmp import signature

BASE = Path("/var/tmp/migrator-tests/remote")
PREFIX = "mt3"
AGENT = f"{sys.executable} -m migrator.cli.main"
MIGRATE = [sys.executable, "-m", "migrator.cli.main"]


@contextlib.contextmanager
def host_pair(base: Path, prefix: str, pools: tuple[str, ...],
              images: tuple[str, ...]) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:
    """Two test hosts a and b (own sshd each), torn down after, asserting nothing is left."""
    if os.geteuid() != 0 or shutil.which("/usr/sbin/sshd") is None:
        msg = "remote tests need root and sshd (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    testhosts.down(base, prefix)
    try:
        a, b = testhosts.up(("a", "b"), base, pools=pools, images=images, prefix=prefix)
        yield a, b
    finally:
        problems = testhosts.down(base, prefix)
        assert not problems, problems
        assert testhosts.leftovers(base, prefix) == []


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir", "btrfs", "zfs"), ("busybox",)) as hosts:
        yield hosts


def m(spec: TestHostSpec, *args: str, check: bool = True) -> tuple[int, str, str]:
    r = subprocess.run([*MIGRATE, "--root", str(spec.root), *args], capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    if check and r.returncode != 0:
        raise AssertionError(f"migrate {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r.returncode, r.stdout, r.stderr


WORKLOADS = Path(__file__).resolve().parents[1] / "workloads"


def build_workload(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """``tests/workloads/NAME.c`` built static (containers have no libc of ours to link)."""
    out = tmp_path_factory.mktemp("workload") / name
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(WORKLOADS / f"{name}.c")],
                   check=True)
    return out


def add_to_inventory(x: TestHostSpec, *others: TestHostSpec) -> None:
    """Each of ``others`` in host x's inventory, with the host keys x's client verified."""
    (x.root / "ssh").mkdir(exist_ok=True)
    shutil.copy(x.known_hosts, x.root / "ssh" / "known_hosts")
    for y in others:
        m(x, "host", "add", y.name, y.link_ip, "--key", str(x.client_key), "--remote-root",
          str(y.root), "--command", AGENT)


@contextlib.contextmanager
def b_in_inventory(a: TestHostSpec, b: TestHostSpec) -> Iterator[None]:
    """Host b in host a's inventory (trusted key); both hosts' containers deleted after."""
    add_to_inventory(a, b)
    yield
    for spec in (a, b):
        _rc, out, _e = m(spec, "list", "--format", "json")
        for c in json.loads(out):
            m(spec, "delete", "--force", c["name"])
    m(a, "host", "remove", "b")


@pytest.fixture
def hosts(pair):  # type: ignore[no-untyped-def]
    """Host a with host b in its inventory (trusted key); both emptied after the test."""
    a, b = pair
    with b_in_inventory(a, b):
        yield a, b


def rootfs(spec: TestHostSpec, name: str) -> Path:
    _rc, out, _e = m(spec, "info", name, "--format", "json")
    pool = json.loads(out)["pool"]
    return spec.root / "storage-pools" / pool / "containers" / name / "rootfs"


@pytest.mark.parametrize(("src_pool", "dst_pool"), [("btrfs", "btrfs"), ("zfs", "zfs"),
                                                    ("dir", "btrfs"), ("btrfs", "zfs")])
def test_copy_then_refresh_sends_only_the_delta(hosts, src_pool, dst_pool) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    m(a, "create", "busybox", "c1", "-p", src_pool)
    (rootfs(a, "c1") / "big").write_bytes(os.urandom(8 << 20))
    m(a, "snapshot", "create", "c1", "s0")
    _rc, out, _e = m(a, "copy", "c1", "b:c1", "-p", dst_pool, "--format", "json")
    full = json.loads(out)
    assert full["snapshots_added"] == ["s0"] and full["bytes"] > 8 << 20
    assert signature(rootfs(b, "c1")) == signature(rootfs(a, "c1"))
    (rootfs(a, "c1") / "small").write_text("delta")
    m(a, "snapshot", "create", "c1", "s1")
    _rc, out, _e = m(a, "copy", "c1", "b:c1", "--refresh", "--format", "json")
    inc = json.loads(out)
    assert inc["snapshots_added"] == ["s1"]
    # native incremental (same driver) or rsync over the agent (mixed): only the delta
    # crossed the wire, not the 8 MiB file again
    assert inc["bytes"] < 256 << 10, inc
    assert inc["method"].startswith("rsync" if src_pool != dst_pool else src_pool), inc
    assert inc["seconds"] < 20, inc  # no stall in the rsync relay (its waits are 30 s)
    assert signature(rootfs(b, "c1")) == signature(rootfs(a, "c1"))
    _rc, out, _e = m(b, "snapshot", "list", "c1", "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["s0", "s1"]


def test_pull_copy_and_refresh_from_another_host(hosts) -> None:  # type: ignore[no-untyped-def]
    """`copy b:c1 c1` on host a: host b sends through the same SSH channel (no way back
    from b to a is needed), natively incremental on the refresh."""
    a, b = hosts
    m(b, "create", "busybox", "pl1", "-p", "btrfs")
    (rootfs(b, "pl1") / "big").write_bytes(os.urandom(4 << 20))
    m(b, "snapshot", "create", "pl1", "s0")
    _rc, out, _e = m(a, "copy", "b:pl1", "pl1", "-p", "btrfs", "--format", "json")
    full = json.loads(out)
    assert full["snapshots_added"] == ["s0"] and full["bytes"] > 4 << 20, full
    assert full["source"] == "b:pl1" and full["target"] == "pl1"
    assert signature(rootfs(a, "pl1")) == signature(rootfs(b, "pl1"))
    rc, _o, err = m(a, "copy", "b:pl1", "pl1", check=False)
    assert rc == 5 and "already exists" in err, err  # AlreadyExists, nothing touched
    (rootfs(b, "pl1") / "small").write_text("delta")
    m(b, "snapshot", "create", "pl1", "s1")
    _rc, out, _e = m(a, "copy", "b:pl1", "pl1", "--refresh", "--format", "json")
    inc = json.loads(out)
    assert inc["snapshots_added"] == ["s1"] and inc["bytes"] < 256 << 10, inc
    assert signature(rootfs(a, "pl1")) == signature(rootfs(b, "pl1"))
    _rc, out, _e = m(a, "snapshot", "list", "pl1", "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["s0", "s1"]
    _rc, out, _e = m(a, "start", "pl1")
    _rc, out, _e = m(a, "exec", "pl1", "--", "cat", "/small")
    assert out.strip() == "delta"


def test_failed_pull_leaves_nothing_here_and_a_retry_works(hosts) -> None:  # type: ignore[no-untyped-def]
    """The receive fails on this side (zfs-fuse cannot store the source's xattr): clear
    error, no partial volume or record here, the source untouched, another pool works."""
    a, b = hosts
    m(b, "create", "busybox", "pl2", "-p", "btrfs")
    marked = rootfs(b, "pl2") / "marked"
    marked.write_text("x")
    os.setxattr(marked, "user.tag", b"keep")
    m(b, "snapshot", "create", "pl2", "s0")
    before = signature(rootfs(b, "pl2"))
    rc, _o, err = m(a, "copy", "b:pl2", "pl2", "-p", "zfs", check=False)
    assert rc == 11 and "xattrs" in err, (rc, err)  # StorageError, named
    _rc, out, _e = m(a, "list", "--format", "json")
    assert json.loads(out) == []
    assert not (a.root / "storage-pools" / "zfs" / "containers" / "pl2").exists()
    assert signature(rootfs(b, "pl2")) == before
    _rc, out, _e = m(b, "snapshot", "list", "pl2", "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["s0"]  # no temporary snapshot left
    m(a, "copy", "b:pl2", "pl2", "-p", "dir")
    assert signature(rootfs(a, "pl2")) == before


@pytest.mark.parametrize("dst_pool", ["btrfs", "zfs"])
def test_stateless_move_of_running_container(hosts, dst_pool) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    ct = f"mv-{dst_pool}"  # each run its own name: the schedulers remember names
    m(a, "launch", "busybox", ct, "-p", "btrfs")
    m(a, "config", "set", ct, "snapshots.schedule=0 6,18 * * *", "snapshots.expiry=2w")
    m(a, "exec", ct, "--", "sh", "-c", "echo before > /root/v")
    m(a, "snapshot", "create", ct, "s0")
    m(a, "schedule", "tick", "--now", "2026-11-01T05:00")  # first sight
    m(a, "schedule", "tick", "--now", "2026-11-01T07:00")  # the 06:00 snapshot, 2 weeks
    _rc, out, _e = m(a, "snapshot", "list", ct, "--format", "json")
    snaps_a = json.loads(out)
    auto = [s for s in snaps_a if s["expires"]]
    assert len(auto) == 1 and len(snaps_a) == 2, snaps_a
    m(a, "exec", ct, "--", "sh", "-c", "echo after > /root/v")
    _rc, out, _e = m(a, "info", ct, "--format", "json")
    ip = json.loads(out)["ipv4"]
    _rc, out, err = m(a, "move", ct, "b", "-p", dst_pool, "--format", "json")
    res = json.loads(out)
    assert res["downtime"] is not None and res["downtime"] < 20, res  # no relay stall
    assert "running on b" in res["verified"]
    _rc, out, _e = m(a, "list", "--format", "json")
    assert json.loads(out) == []  # gone from a
    _rc, out, _e = m(b, "info", ct, "--format", "json")
    info = json.loads(out)
    assert info["state"] == "RUNNING" and info["ipv4"] == ip and info["pool"] == dst_pool
    _rc, out, _e = m(b, "exec", ct, "--", "cat", "/root/v")
    assert out.strip() == "after"
    _rc, out, _e = m(b, "config", "get", ct, "snapshots.schedule")
    assert out.strip() == "0 6,18 * * *"  # its schedule moved with it
    _rc, out, _e = m(b, "schedule", "status", "--format", "json")
    assert [(r["container"], r["job"]) for r in json.loads(out)["jobs"]] == [(ct, "snapshot")]
    # the automatic snapshot kept its expiry on b, so b's scheduler expires it; s0 stays
    _rc, out, _e = m(b, "snapshot", "list", ct, "--format", "json")
    assert json.loads(out) == snaps_a
    _rc, out, _e = m(b, "schedule", "tick", "--now", "2026-11-16T00:00", "--format", "json")
    assert json.loads(out)["expired"] == [f"{ct}/{auto[0]['name']}"]
    _rc, out, _e = m(b, "snapshot", "list", ct, "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["s0"]


def test_unknown_host_key_is_refused_with_fingerprint(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    (a.root / "ssh" / "known_hosts").unlink(missing_ok=True)
    m(a, "host", "add", "stranger", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", AGENT)
    try:
        rc, _o, err = m(a, "host", "check", "stranger", "--probe-mib", "0", check=False)
        assert rc == 17 and "SHA256:" in err and "host trust" in err, err
        m(a, "host", "trust", "stranger")
        rc, out, err = m(a, "host", "check", "stranger", "--probe-mib", "8")
        assert "upload" in out and "pool zfs (zfs): zfs" in out
        assert "criu features: uffd " in out  # what live migration will negotiate
    finally:
        m(a, "host", "remove", "stranger")


def test_missing_agent_and_unreachable_host_are_clear(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    m(a, "host", "add", "noagent", b.link_ip, "--key", str(a.client_key),
      "--command", "/nonexistent/migrate")
    m(a, "host", "add", "nohost", "198.51.100.99", "--key", str(a.client_key))
    try:
        rc, _o, err = m(a, "host", "check", "noagent", "--probe-mib", "0", check=False)
        assert rc == 10 and "not installed on noagent" in err, err
        rc, _o, err = m(a, "host", "check", "nohost", "--probe-mib", "0", check=False)
        assert rc == 16 and "cannot reach nohost" in err, err
        # a failed copy leaves the source untouched and nothing on the target
        m(a, "create", "busybox", "keep", "-p", "dir")
        rc, _o, err = m(a, "copy", "keep", "noagent:keep", check=False)
        assert rc == 10, err
        _rc, out, _e = m(b, "list", "--format", "json")
        assert json.loads(out) == []
    finally:
        m(a, "host", "remove", "noagent")
        m(a, "host", "remove", "nohost")


def test_target_disk_full_leaves_source_running_and_target_clean(hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    m(b, "pool", "create", "tiny", "--driver", "btrfs", "--size", "150MiB")
    try:
        m(a, "launch", "busybox", "fat", "-p", "btrfs")
        with open(rootfs(a, "fat") / "blob", "wb") as f:
            f.write(os.urandom(220 << 20))
        rc, _o, err = m(a, "move", "fat", "b", "-p", "tiny", check=False)
        assert rc != 0 and "Error:" in err, err
        _rc, out, _e = m(a, "info", "fat", "--format", "json")
        assert json.loads(out)["state"] == "RUNNING"
        _rc, out, _e = m(b, "list", "--format", "json")
        assert json.loads(out) == []
        assert not (b.root / "storage-pools" / "tiny" / "containers" / "fat").exists()
        # and a second attempt to a pool with room succeeds
        m(a, "move", "fat", "b", "-p", "btrfs")
        _rc, out, _e = m(b, "info", "fat", "--format", "json")
        assert json.loads(out)["state"] == "RUNNING"
    finally:
        m(b, "delete", "--force", "fat", check=False)
        m(b, "pool", "delete", "tiny")


def test_negotiation_uses_the_measured_link(hosts) -> None:  # type: ignore[no-untyped-def]
    """host check measures the direct link and stores the rate; copies then pick their
    compression from it, say so with -v and keep it with the operation; --data-link ssh
    keeps the data on the SSH channel."""
    from migrator.pipelines.remote_copy import ZSTD_RATE
    from migrator.runtime.state import StateStore

    a, b = hosts
    _rc, out, _e = m(a, "host", "check", "b", "--probe-mib", "64", "--format", "json")
    info = json.loads(out)
    assert info["data_link"] == "tcp" and not info["data_link_problem"], info
    rate = info["upload_bytes_per_second"]
    assert rate > 10e6, info
    _rc, out, _e = m(a, "host", "list", "--format", "json")
    assert [h["data_link"] for h in json.loads(out) if h["name"] == "b"] == ["auto"]
    m(a, "create", "busybox", "n1", "-p", "dir")
    _rc, out, err = m(a, "-v", "copy", "n1", "b:n1", "--format", "json")
    res = json.loads(out)
    want = "none" if rate > ZSTD_RATE else "zstd"
    assert res["method"] == f"tar+{want}" and "link tcp" in res["negotiated"], res
    state = StateStore(a.root / "state.db")
    try:
        op = state.get_operation(res["operation"])
        assert op.detail["link"] == "tcp" and op.detail["compress"] == want, op.detail
    finally:
        state.close()
    m(a, "host", "set", "b", "--data-link", "ssh")
    _rc, _out, err = m(a, "-v", "copy", "n1", "b:n2")
    assert "negotiated: tar, link ssh" in err, err
    rc, _o, err = m(a, "host", "set", "b", "--data-link", "carrier-pigeon", check=False)
    assert rc != 0 and "auto, tcp, ssh" in err
