"""Faults between hosts (the agent killed, the SSH connection cut, the client killed) and
a stateless move of a running Debian container.

Each must end with a clear error, the source container intact and running as before, the
target cleaned up (at once, or by `migrate recover` when the link itself was gone), and a
second attempt succeeding. Own test hosts (prefix ``mt4``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import AGENT, MIGRATE, host_pair, m, rootfs

BASE = Path("/var/tmp/migrator-tests/remote-faults")
PREFIX = "mt4"


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("btrfs", "dir"), ("busybox", "debian/bookworm")) as (a, b):
        (a.root / "ssh").mkdir(exist_ok=True)
        shutil.copy(a.known_hosts, a.root / "ssh" / "known_hosts")
        m(a, "host", "add", "b", b.link_ip, "--key", str(a.client_key), "--remote-root",
          str(b.root), "--command", AGENT)
        yield a, b


@pytest.fixture
def fat(pair):  # type: ignore[no-untyped-def]
    """A running container on a with 400 MiB of incompressible data; cleaned after."""
    a, b = pair
    m(a, "launch", "busybox", "fat", "-p", "btrfs")
    with open(rootfs(a, "fat") / "blob", "wb") as f:
        for _ in range(4):
            f.write(os.urandom(100 << 20))
    m(a, "snapshot", "create", "fat", "s0")
    yield a, b
    for spec in (a, b):
        _rc, out, _e = m(spec, "list", "--format", "json")
        for c in json.loads(out):
            m(spec, "delete", "--force", c["name"])


def _pids(pattern: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _kill_during_transfer(p: subprocess.Popen, find, sig=signal.SIGKILL) -> bool:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        pids = find()
        if pids:
            time.sleep(0.5)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            return True
        time.sleep(0.05)
    return False


def _b_is_clean(b: TestHostSpec) -> None:
    _rc, out, _e = m(b, "list", "--format", "json")
    assert json.loads(out) == []
    vols = b.root / "storage-pools" / "btrfs" / "containers"
    assert not (vols / "fat").exists()
    snaps = b.root / "storage-pools" / "btrfs" / "containers-snapshots" / "fat"
    assert not snaps.exists() or not any(snaps.iterdir())


def _a_is_intact(a: TestHostSpec) -> None:
    _rc, out, _e = m(a, "info", "fat", "--format", "json")
    info = json.loads(out)
    assert info["state"] == "RUNNING" and info["snapshots"] == ["s0"]
    assert (rootfs(a, "fat") / "blob").stat().st_size == 400 << 20


def _move(a: TestHostSpec) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen([*MIGRATE, "--root", str(a.root), "move", "fat", "b", "-p",
                             "btrfs", "--compress", "none"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def test_agent_killed_mid_transfer(fat) -> None:  # type: ignore[no-untyped-def]
    a, b = fat
    p = _move(a)
    assert _kill_during_transfer(p, lambda: _pids(f"btrfs receive.*{b.root}"))
    _out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "Error:" in err and "Traceback" not in err, err
    _a_is_intact(a)
    _b_is_clean(b)
    m(a, "move", "fat", "b", "-p", "btrfs")
    _rc, out, _e = m(b, "info", "fat", "--format", "json")
    assert json.loads(out)["state"] == "RUNNING"


def test_ssh_connection_cut_mid_transfer(fat) -> None:  # type: ignore[no-untyped-def]
    a, b = fat

    def sshd_sessions() -> list[int]:
        # the per-connection sshd processes of b's daemon (children of the listener)
        listener = int(b.pid_file.read_text())
        r = subprocess.run(["pgrep", "-P", str(listener)], capture_output=True, text=True)
        busy = _pids(f"btrfs receive.*{b.root}")
        return [int(x) for x in r.stdout.split()] if busy else []

    p = _move(a)
    assert _kill_during_transfer(p, sshd_sessions)
    _out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "Error:" in err and "Traceback" not in err, err
    _a_is_intact(a)
    # the link was gone, so the undo on b may be left for recover; after it, b is clean
    m(a, "recover")
    _b_is_clean(b)
    _rc, out, _e = m(a, "operations", "--format", "json")
    assert json.loads(out) == []
    m(a, "move", "fat", "b", "-p", "btrfs")
    _rc, out, _e = m(b, "exec", "fat", "--", "ls", "-l", "/blob")
    assert str(400 << 20) in out


def test_client_killed_mid_move_is_recovered(fat) -> None:  # type: ignore[no-untyped-def]
    a, b = fat
    p = _move(a)
    assert _kill_during_transfer(
        p, lambda: [p.pid] if _pids(f"btrfs receive.*{b.root}") else [])
    p.communicate(timeout=60)
    _rc, out, _e = m(a, "operations", "--format", "json")
    ops = json.loads(out)
    assert [(o["kind"], o["status"]) for o in ops] == [("move-remote", "interrupted")]
    _rc, _o, err = m(a, "recover")
    assert "rolled back" in err, err
    _a_is_intact(a)
    _b_is_clean(b)
    m(a, "move", "fat", "b", "-p", "btrfs")
    _rc, out, _e = m(a, "list", "--format", "json")
    assert json.loads(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("dst_pool", ["btrfs", "dir"])
def test_debian_stateless_move_keeps_data_address_and_snapshots(pair, dst_pool) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    m(a, "launch", "debian/bookworm", "deb", "-p", "btrfs", "--wait")
    try:
        m(a, "exec", "deb", "--", "sh", "-c", "echo kept > /root/marker")
        m(a, "snapshot", "create", "deb", "s0")
        _rc, out, _e = m(a, "info", "deb", "--format", "json")
        ip = json.loads(out)["ipv4"]
        _rc, out, _e = m(a, "move", "deb", "b", "-p", dst_pool, "--format", "json")
        res = json.loads(out)
        assert res["downtime"] is not None and "running on b" in res["verified"]
        _rc, out, _e = m(b, "info", "deb", "--format", "json")
        info = json.loads(out)
        assert (info["state"], info["ipv4"], info["snapshots"]) == ("RUNNING", ip, ["s0"])
        _rc, out, _e = m(b, "exec", "deb", "--", "systemctl", "is-system-running", "--wait",
                         check=False)
        assert out.strip() == "running", out
        _rc, out, _e = m(b, "exec", "deb", "--", "cat", "/root/marker")
        assert out.strip() == "kept"
    finally:
        for spec in (a, b):
            m(spec, "delete", "--force", "deb", check=False)
