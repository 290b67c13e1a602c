"""Live migration with CRIU between two test hosts over real SSH (``mt5-a`` -> ``mt5-b``).

Each container runs ``tests/workloads/counter.c``: MB megabytes of a known pattern in RAM
and a counter, written to /root/state. A live-migrated copy keeps counting from where it
was (same ``start``, count never drops) with ``bad=0``: the memory came across intact.
Some also run ``tests/workloads/tcpstream.c``: one TCP connection inside the container
carrying a sequence number every 20 ms, never reconnected; it must keep flowing with no
gap after a migration and after a rollback (CRIU's tcp-established).
Fault tests break the pipeline at each stage and check that the container still runs on
host a with its memory state and that nothing is left on host b.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrator.core import errors
from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import (
    AGENT,
    MIGRATE,
    add_to_inventory,
    build_workload,
    host_pair,
    m,
    rootfs,
)

BASE = Path("/var/tmp/migrator-tests/live")
PREFIX = "mt5"
WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "counter.c"


@pytest.fixture(scope="module")
def counter_bin(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = build_workload(tmp_path_factory, "counter")
    # the TCP workload beside it (launch_counting(..., tcp=True) copies it in)
    shutil.copy(build_workload(tmp_path_factory, "tcpstream"), out.with_name("tcpstream"))
    return out


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("btrfs", "dir"), ("busybox", "debian/bookworm")) as (a, b):
        for x, y in ((a, b), (b, a)):  # each knows the other: migrations go both ways
            add_to_inventory(x, y)
        yield a, b


@pytest.fixture
def hosts(pair):  # type: ignore[no-untyped-def]
    a, b = pair
    yield a, b
    for spec in (a, b):
        _rc, out, _e = m(spec, "list", "--format", "json")
        for c in json.loads(out):
            m(spec, "delete", "--force", c["name"])
    for spec in (a, b):
        _rc, out, _e = m(spec, "operations", "--format", "json")
        assert json.loads(out) == [], out  # nothing interrupted left behind


def state(spec: TestHostSpec, name: str) -> dict[str, int]:
    text = (rootfs(spec, name) / "root" / "state").read_text()
    return {k: int(v) for k, v in (f.split("=") for f in text.split())}


def wait_count(spec: TestHostSpec, name: str, above: int, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            s = state(spec, name)
            if s["count"] > above:
                return s
        time.sleep(0.1)
    raise AssertionError(f"{name} on {spec.name} stopped counting above {above}")


def launch_counting(spec: TestHostSpec, counter_bin: Path, name: str, mb: int = 64,
                    image: str = "busybox", pool: str = "btrfs",
                    privileged: bool = True, tcp: bool = False) -> dict[str, int]:
    m(spec, "launch", image, name, "-p", pool,
      *(["-c", "security.privileged=true"] if privileged else []),
      *(["--wait"] if image != "busybox" else []))
    for prog in ("counter", *(["tcpstream"] if tcp else [])):
        dest = rootfs(spec, name) / prog
        shutil.copy(counter_bin.with_name(prog), dest)
        dest.chmod(0o755)
    m(spec, "exec", name, "--", "/bin/sh", "-c",
      f"setsid /counter {mb} /root/state 50 </dev/null >/dev/null 2>&1 &")
    if tcp:
        m(spec, "exec", name, "--", "/bin/sh", "-c",
          "setsid /tcpstream 7070 /root/tcp </dev/null >/dev/null 2>&1 &")
        wait_stream(spec, name, 3)
    return wait_count(spec, name, 3, timeout=60)


def stream(spec: TestHostSpec, name: str) -> dict[str, int]:
    text = (rootfs(spec, name) / "root" / "tcp").read_text()
    return {k: int(v) for k, v in (f.split("=") for f in text.split())}


def wait_stream(spec: TestHostSpec, name: str, above: int, timeout: float = 30) -> dict[str, int]:
    """The TCP workload's state once its sequence passed ``above``; fails at once when its
    connection broke (errors=1: it never reconnects)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            s = stream(spec, name)
            assert s["errors"] == 0, f"the TCP connection in {name} broke: {s}"
            if s["seq"] > above:
                return s
        time.sleep(0.1)
    raise AssertionError(f"the TCP stream in {name} on {spec.name} stopped above {above}")


def assert_kept_stream(spec: TestHostSpec, name: str, before: dict[str, int]) -> None:
    """The same connection, still flowing, nothing lost: seq went on past ``before`` with
    no gap, in the same process."""
    now = wait_stream(spec, name, before["seq"] + 10)
    assert (now["pid"], now["gaps"]) == (before["pid"], 0), (before, now)


def assert_kept_memory(spec: TestHostSpec, name: str, before: dict[str, int]) -> None:
    now = wait_count(spec, name, before["count"])
    assert now["start"] == before["start"], (before, now)  # the same process, not a restart
    assert now["bad"] == 0, now
    later = wait_count(spec, name, now["count"])
    assert later["bad"] == 0


def ping(spec: TestHostSpec, ip: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", spec.netns, "busybox", "ping", "-c", "1", "-W",
                        "3", ip], capture_output=True, text=True)
    return r.returncode == 0


def names_on(spec: TestHostSpec) -> list[str]:
    _rc, out, _e = m(spec, "list", "--format", "json")
    return sorted(c["name"] for c in json.loads(out))


@pytest.mark.parametrize("mode", ["stop-and-copy", "post-copy"])
def test_busybox_there_and_back(hosts, counter_bin, mode) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    launch_counting(a, counter_bin, "c1", tcp=True)
    m(a, "snapshot", "create", "c1", "s0")
    _rc, out, _e = m(a, "info", "c1", "--format", "json")
    ip = json.loads(out)["ipv4"]
    before, tcp = state(a, "c1"), stream(a, "c1")
    _rc, out, err = m(a, "live", "local", "b", "c1", "--mode", mode, "--format", "json")
    res = json.loads(out)
    assert res["mode"] == mode and res["downtime"] is not None, res
    assert set(res["stages"]) >= {"sync", "dump", "final-sync", "images", "restore", "verify"}
    # the rootfs delta went beside the dump, once criu held the container still
    assert not [n for n in res["notes"] if "final sync ran after the dump" in n], res
    assert names_on(a) == []
    _rc, out, _e = m(b, "info", "c1", "--format", "json")
    info = json.loads(out)
    assert (info["state"], info["ipv4"], info["snapshots"]) == ("RUNNING", ip, ["s0"])
    assert_kept_memory(b, "c1", before)
    assert_kept_stream(b, "c1", tcp)  # the connection crossed with the container
    assert ping(b, ip)
    # and back again, driven from b
    before, tcp = state(b, "c1"), stream(b, "c1")
    _rc, out, _e = m(b, "live", "local", "a", "c1", "--mode", mode, "--format", "json")
    assert names_on(b) == []
    assert_kept_memory(a, "c1", before)
    assert_kept_stream(a, "c1", tcp)
    assert ping(a, ip)


@contextlib.contextmanager
def unprivileged_userfaultfd(on: bool) -> Iterator[None]:
    """vm.unprivileged_userfaultfd set for the test, put back as it was after."""
    knob = Path("/proc/sys/vm/unprivileged_userfaultfd")
    old = knob.read_text().strip()
    knob.write_text("1" if on else "0")
    try:
        yield
    finally:
        knob.write_text(old)


def host_devices(spec: TestHostSpec) -> list[str]:
    r = subprocess.run(["ip", "-n", spec.netns, "-o", "link", "show"], capture_output=True,
                       text=True, check=True)
    return [line.split(": ")[1].split("@")[0] for line in r.stdout.splitlines()]


def uid_map(spec: TestHostSpec, name: str) -> list[str]:
    _rc, out, _e = m(spec, "exec", name, "--", "cat", "/proc/self/uid_map")
    return out.split()


# the matrix: each pool once, each mode once (post-copy needs the target's sysctl)
@pytest.mark.parametrize(("pool", "mode"), [("dir", "stop-and-copy"), ("btrfs", "post-copy")])
def test_unprivileged_there_and_back(hosts, counter_bin, pool, mode) -> None:  # type: ignore[no-untyped-def]
    """An unprivileged container keeps its NIC, address, memory and id map both ways: the
    target makes the veth and CRIU moves it in (criu 4.1 cannot create it there)."""
    a, b = hosts
    launch_counting(a, counter_bin, "u1", mb=16, pool=pool, privileged=False)
    _rc, out, _e = m(a, "info", "u1", "--format", "json")
    info = json.loads(out)
    assert info["privileged"] is False
    ip, ids = info["ipv4"], uid_map(a, "u1")
    assert ids[0] == "0" and ids[1] != "0", ids  # root inside is not root outside
    with unprivileged_userfaultfd(mode == "post-copy"):
        for src, dst, target in ((a, b, "b"), (b, a, "a")):
            before = state(src, "u1")
            _rc, out, _e = m(src, "live", "local", target, "u1", "--format", "json")
            res = json.loads(out)
            assert res["mode"] == mode, res
            assert names_on(src) == []
            assert_kept_memory(dst, "u1", before)
            assert ping(dst, ip)
            assert uid_map(dst, "u1") == ids
            _rc, out, _e = m(dst, "info", "u1", "--format", "json")
            assert json.loads(out)["privileged"] is False
            # the pair the target made is the container's now: nothing left beside it
            assert not [d for d in host_devices(dst) if d.startswith("mgr")]
            assert not [d for d in host_devices(src) if d.startswith(("mgr", "veth"))]


def test_unprivileged_post_copy_is_refused_without_the_sysctl(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    launch_counting(a, counter_bin, "u2", mb=8, pool="dir", privileged=False)
    before = state(a, "u2")
    with unprivileged_userfaultfd(False):
        rc, _out, err = m(a, "live", "local", "b", "u2", "--mode", "post-copy", check=False)
        assert rc != 0 and "vm.unprivileged_userfaultfd" in err, err
        _rc, out, _e = m(a, "live", "local", "b", "u2", "--format", "json")
    res = json.loads(out)
    assert res["mode"] == "stop-and-copy"
    assert any("unprivileged" in n and "userfaultfd" in n for n in res["notes"]), res
    assert_kept_memory(b, "u2", before)


def launch_debian(spec: TestHostSpec, counter_bin: Path, name: str, pool: str,
                  privileged: bool) -> dict[str, int]:
    before = launch_counting(spec, counter_bin, name, mb=16, image="debian/bookworm",
                             pool=pool, privileged=privileged)
    assert (rootfs(spec, name) / "etc" / "localtime").is_symlink()  # what systemd watches
    return before


def assert_systemd_moved(spec: TestHostSpec, name: str, ip: str,
                         before: dict[str, int]) -> None:
    assert_kept_memory(spec, name, before)
    _rc, out, _e = m(spec, "exec", name, "--", "systemctl", "is-system-running", check=False)
    assert out.strip() in ("running", "degraded"), out
    assert ping(spec, ip)
    # the link swapped for the dump on btrfs (checkpoint/base.py) is a link again
    assert (rootfs(spec, name) / "etc" / "localtime").is_symlink()


def test_debian_systemd_unprivileged_btrfs_there_dir_back(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    """systemd watches /etc/localtime, a symlink CRIU cannot resolve on btrfs: the dump
    swaps it for a copy and the restore puts it back. a -> b stays on btrfs (stop-and-copy),
    b -> a goes to a dir pool (post-copy: the target allows unprivileged userfaultfd)."""
    a, b = hosts
    before = launch_debian(a, counter_bin, "deb", "btrfs", privileged=False)
    _rc, out, _e = m(a, "info", "deb", "--format", "json")
    ip = json.loads(out)["ipv4"]
    _rc, out, _e = m(a, "live", "local", "b", "deb", "-p", "btrfs", "--format", "json")
    res = json.loads(out)
    assert (res["pool"], res["mode"]) == ("btrfs", "stop-and-copy"), res
    assert names_on(a) == []
    assert_systemd_moved(b, "deb", ip, before)
    before = state(b, "deb")
    with unprivileged_userfaultfd(True):
        _rc, out, _e = m(b, "live", "local", "a", "deb", "-p", "dir", "--format", "json")
    res = json.loads(out)
    assert (res["pool"], res["mode"]) == ("dir", "post-copy"), res
    assert names_on(b) == []
    assert_systemd_moved(a, "deb", ip, before)
    _rc, out, _e = m(a, "info", "deb", "--format", "json")
    assert json.loads(out)["privileged"] is False


def test_debian_systemd_privileged_on_btrfs(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    before = launch_debian(a, counter_bin, "debp", "btrfs", privileged=True)
    _rc, out, _e = m(a, "info", "debp", "--format", "json")
    ip = json.loads(out)["ipv4"]
    _rc, out, _e = m(a, "live", "local", "b", "debp", "--format", "json")
    assert json.loads(out)["pool"] == "btrfs"
    assert names_on(a) == []
    assert_systemd_moved(b, "debp", ip, before)


def test_evacuation_and_dry_run(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    befores = {n: launch_counting(a, counter_bin, n, mb=16) for n in ("e1", "e2", "e3")}
    m(a, "create", "busybox", "idle")  # stopped: not part of an evacuation
    _rc, out, _e = m(a, "live", "local", "b", "--dry-run", "--format", "json")
    plans = json.loads(out)
    assert sorted(p["container"] for p in plans) == ["e1", "e2", "e3"]
    assert all(p["mode"] in ("post-copy", "stop-and-copy") and p["rootfs_bytes"] > 0
               for p in plans)
    assert names_on(b) == []  # a dry run changes nothing
    _rc, out, _e = m(a, "live", "local", "b", "--parallel", "2", "--format", "json")
    assert sorted(r["container"] for r in json.loads(out)) == ["e1", "e2", "e3"]
    assert names_on(a) == ["idle"] and names_on(b) == ["e1", "e2", "e3"]
    for n, before in befores.items():
        assert_kept_memory(b, n, before)


# faults ----------------------------------------------------------------------------------
def _live_in_process(a: TestHostSpec, name: str, mode: str, data_link: str | None = None
                     ) -> Any:
    """Run the pipeline in this process (so a test can break it at a chosen point);
    ``data_link`` "ssh" keeps every byte, pages too, in the SSH connection."""
    from migrator.pipelines.live import live_migrate
    from migrator.runtime.containers import Containers
    from migrator.runtime.host import Host
    from migrator.transport.ssh import SshTransport

    host = Host(a.root)
    cts = Containers(host)
    rec = host.state.get_host("b")
    t = SshTransport("b", rec.address, rec.port, rec.user, rec.key, rec.root, rec.command,
                     known_hosts=a.root / "ssh" / "known_hosts", netns=host.netns)
    t.data_link = data_link or rec.data_link
    try:
        with t:
            return live_migrate(cts, t, name, mode=mode, compress="none")
    finally:
        host.close()


def _pids(pattern: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _sshd_sessions(b: TestHostSpec) -> list[int]:
    """Every process under b's sshd listener: a session's monitor and its network child
    (which holds the connection: killing the monitor alone leaves open channels working)."""
    found: list[int] = []
    parents = [int(b.pid_file.read_text())]
    while parents:
        r = subprocess.run(["pgrep", "-P", ",".join(map(str, parents))], capture_output=True,
                           text=True)
        parents = [int(x) for x in r.stdout.split()]
        found += parents
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _still_on_a(a: TestHostSpec, b: TestHostSpec, name: str, before: dict[str, int]) -> None:
    _rc, out, _e = m(a, "info", name, "--format", "json")
    assert json.loads(out)["state"] == "RUNNING"
    assert_kept_memory(a, name, before)
    m(a, "recover")  # finishes an undo the broken link left on b, if any
    assert names_on(b) == []
    assert not list((b.root / "storage-pools" / "btrfs" / "containers").iterdir())


def test_agent_killed_during_image_transfer(hosts, counter_bin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from migrator.transport.ssh import SshTransport

    a, b = hosts
    before = launch_counting(a, counter_bin, "f1", mb=256)
    real = SshTransport.request

    def request(self, op, args=None, **kw):  # type: ignore[no-untyped-def]
        if op == "receive_images":
            def killer() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    pids = _pids(f"{b.root} agent")
                    if pids and _pids("tar --extract"):
                        _kill(pids)
                        return
                    time.sleep(0.01)
            threading.Thread(target=killer, daemon=True).start()
        return real(self, op, args, **kw)

    monkeypatch.setattr(SshTransport, "request", request)
    with pytest.raises(errors.MigratorError):
        _live_in_process(a, "f1", "stop-and-copy")
    monkeypatch.undo()
    _still_on_a(a, b, "f1", before)
    m(a, "live", "local", "b", "f1")  # a second attempt succeeds
    assert_kept_memory(b, "f1", before)


def test_link_cut_during_final_sync(hosts, counter_bin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from migrator.pipelines.remote_copy import RemoteCopy

    a, b = hosts
    before = launch_counting(a, counter_bin, "f2")
    real = RemoteCopy.send_snapshot
    calls: list[bool] = []

    def send_snapshot(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(True)
        if len(calls) == 2:  # the first sent the running rootfs; this is the final sync
            _kill(_sshd_sessions(b))
        return real(self, *args, **kw)

    monkeypatch.setattr(RemoteCopy, "send_snapshot", send_snapshot)
    with pytest.raises(errors.NetworkError):
        _live_in_process(a, "f2", "post-copy")
    monkeypatch.undo()
    _still_on_a(a, b, "f2", before)


def test_restore_failing_on_target(hosts, counter_bin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from migrator.transport.ssh import SshTransport

    a, b = hosts
    before = launch_counting(a, counter_bin, "f3", tcp=True)
    tcp = stream(a, "f3")
    real = SshTransport.request

    def request(self, op, args=None, **kw):  # type: ignore[no-untyped-def]
        if op == "checkpoint_restore":  # the images lose their process tree on b
            from migrator.checkpoint.base import images_dir

            (images_dir(b.root, args["tag"]) / "pstree.img").unlink()
        return real(self, op, args, **kw)

    monkeypatch.setattr(SshTransport, "request", request)
    with pytest.raises(errors.MigratorError):
        _live_in_process(a, "f3", "stop-and-copy")
    monkeypatch.undo()
    _still_on_a(a, b, "f3", before)
    # the dump left its TCP sockets in repair mode: the rollback takes them out of it
    assert_kept_stream(a, "f3", tcp)


@pytest.mark.parametrize("path", ["direct", "ssh"])
def test_page_stream_cut_keeps_the_source(hosts, counter_bin, monkeypatch, path) -> None:  # type: ignore[no-untyped-def]
    """The post-copy hazard: pages stop mid-way. The source must resume, not be lost.
    Both paths: criu to criu over the direct link (its TCP connection reset with ``ss -K``
    once pages flow) and the SSH forward (cut in the relay after 8 MB)."""
    from migrator.pipelines import live
    from migrator.transport import tunnel

    a, b = hosts
    name = f"f4{path[0]}"
    before = launch_counting(a, counter_bin, name, mb=256)
    used: list[str] = []
    real_down, real_address = tunnel.PageTunnel._down, live.page_server_address

    def down(self, chan, sock):  # type: ignore[no-untyped-def]
        used.append("ssh")

        def cutter() -> None:
            while self.to_target < 8 << 20:
                time.sleep(0.001)
            self.cut()
        threading.Thread(target=cutter, daemon=True).start()
        return real_down(self, chan, sock)

    def address(transport):  # type: ignore[no-untyped-def]
        where = real_address(transport)
        used.append("direct")

        def reset() -> None:  # once the target's criu is connected and pages flow
            flt = ["sport", "=", f":{where[1]}"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = subprocess.run(["ip", "netns", "exec", a.netns, "ss", "-Htn", "state",
                                    "established", *flt], capture_output=True, text=True)
                if r.stdout.strip():
                    time.sleep(0.3)
                    subprocess.run(["ip", "netns", "exec", a.netns, "ss", "-K", *flt],
                                   capture_output=True)
                    return
                time.sleep(0.01)
        threading.Thread(target=reset, daemon=True).start()
        return where

    monkeypatch.setattr(tunnel.PageTunnel, "_down", down)
    monkeypatch.setattr(live, "page_server_address", address)
    with pytest.raises(errors.MigratorError):
        _live_in_process(a, name, "post-copy", data_link="ssh" if path == "ssh" else None)
    monkeypatch.undo()
    assert used == [path]
    _still_on_a(a, b, name, before)


def test_target_pool_full_is_refused_before_freezing(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    m(b, "pool", "create", "tiny", "--driver", "btrfs", "--size", "150MiB")
    try:
        before = launch_counting(a, counter_bin, "f5")
        with open(rootfs(a, "f5") / "blob", "wb") as f:
            f.write(os.urandom(200 << 20))
        rc, _o, err = m(a, "live", "local", "b", "f5", "-p", "tiny", check=False)
        assert rc == errors.NoSpace.exit_code and "free" in err, err
        _still_on_a(a, b, "f5", before)
    finally:
        m(b, "pool", "delete", "tiny")


def test_client_killed_after_the_dump_is_recovered(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    """The migrating process dies with the source stopped by CRIU: `migrate operations`
    shows the interrupted migration and `migrate recover` resumes the source from memory."""
    from migrator.runtime.state import StateStore

    a, b = hosts
    before = launch_counting(a, counter_bin, "f6", mb=256)
    p = subprocess.Popen([*MIGRATE, "--root", str(a.root), "live", "local", "b", "f6",
                          "--mode", "stop-and-copy", "--compress", "none"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not killed:
            st = StateStore(a.root / "state.db")
            try:
                ops = [o for o in st.list_operations()
                       if o.kind == "live" and o.status == "running"]
            finally:
                st.close()
            if ops and {"images", "restore"} & set(ops[-1].stages):
                p.kill()
                killed = True
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert killed, "the migration ended before it could be interrupted"
    _rc, out, _e = m(a, "operations", "--format", "json")
    ops = json.loads(out)
    assert [o["status"] for o in ops] == ["interrupted"], ops
    _rc, _out, err = m(a, "recover")
    assert "resumed here with its memory state" in err or "rolled back" in err, err
    _still_on_a(a, b, "f6", before)


def test_driven_through_the_source_hosts_agent(hosts, counter_bin) -> None:  # type: ignore[no-untyped-def]
    """`migrate live host-a host-b` and `migrate copy host-a:c1 host-b:c1` from a client
    that is not the source: host a's CLI names host a through its own sshd (`self`), so the
    migration runs in a's agent, which pushes to b with the host key the client verified."""
    a, b = hosts
    before = launch_counting(a, counter_bin, "d1", mb=16)
    m(a, "host", "add", "self", a.link_ip, "--key", str(a.client_key), "--remote-root",
      str(a.root), "--command", AGENT)
    try:
        _rc, out, _e = m(a, "live", "self", "b", "d1", "--format", "json")
        res = json.loads(out)
        assert (res["source"], res["target"], res["container"]) == ("self", "b", "d1"), res
        assert names_on(b) == ["d1"]
        assert_kept_memory(b, "d1", before)
        m(a, "create", "busybox", "cp1", "-p", "btrfs")
        _rc, out, _e = m(a, "copy", "self:cp1", "b:cp1", "--format", "json")
        assert json.loads(out)["target"] == "b:cp1"
        assert names_on(b) == ["cp1", "d1"] and names_on(a) == ["cp1"]
        m(a, "host", "remove", "b")  # the client must know b's key to vouch for it
        try:
            rc, _o, err = m(a, "copy", "self:cp1", "b:cp2", check=False)
            assert rc == 3 or "not in the inventory" in err, err
        finally:
            m(a, "host", "add", "b", b.link_ip, "--key", str(a.client_key), "--remote-root",
              str(b.root), "--command", AGENT)
    finally:
        m(a, "host", "remove", "self")
