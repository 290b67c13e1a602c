"""CRIU checkpoint/restore of real LXC containers on test hosts (migrator.checkpoint).

The workload (tests/workloads/counter.c, built static at test time) holds a known pattern in
RAM and counts every 50 ms into /root/state: a restored or rolled-back container must keep
counting from where it stopped (same start stamp and pid, count never back) with bad=0.

Containers are privileged: on this kernel CRIU 4.1.1 cannot restore an unprivileged
container's veth (see migrator/checkpoint/lxc.py); that case is checked by preflight.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from migrator.checkpoint import LxcCheckpointer, images_dir, remove_images_dir
from migrator.checkpoint.lxc import container_tasks
from migrator.core.errors import CheckpointError
from migrator.core.netns import call_in_netns, socket_in_netns
from tests.conftest import IN_CI

pytestmark = pytest.mark.integration

COUNTER_SRC = Path(__file__).resolve().parents[1] / "workloads" / "counter.c"
PRIV = {"security.privileged": "true"}
MB = 256


@pytest.fixture(scope="module")
def counter_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        if IN_CI:
            pytest.fail("gcc is not installed (scripts/setup-host.sh installs it)")
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("workload") / "counter"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(COUNTER_SRC)], check=True)
    return out


@pytest.fixture
def scratch() -> Iterator[list[Path]]:
    """Images directories made by a test, removed after it whatever happened."""
    made: list[Path] = []
    yield made
    for d in made:
        remove_images_dir(d)


@pytest.fixture
def procs() -> Iterator[list[object]]:
    """LazyDump/LazyPages a test started: killed (by their own pid) after it."""
    started: list[object] = []
    yield started
    for p in started:
        p.abort()  # type: ignore[attr-defined]


def launch(th, name: str, counter_bin: Path, mb: int = MB, uid: int | None = None) -> Path:  # type: ignore[no-untyped-def]
    th.cts.launch("busybox", name, pool="dir", config=PRIV)
    rootfs = th.cts.rootfs(th.cts.get(name))
    shutil.copy(counter_bin, rootfs / "usr/bin/counter")
    # a non-root counter cannot write /root: it counts into /tmp (not waited for)
    target = "/root/state" if uid is None else "/tmp/state"
    args = f"counter {mb} {target} 50" + (f" {uid}" if uid is not None else "")
    # setsid: a session led from outside the container (lxc-attach's) cannot be dumped
    rc, _, err = th.exec(name, "sh", "-c", f"setsid {args} >/dev/null 2>&1 </dev/null &")
    assert rc == 0, err
    if uid is None:
        wait_count(rootfs, 3)
    return rootfs


def state(rootfs: Path) -> dict[str, int]:
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):
            text = (rootfs / "root/state").read_text()
            return {k: int(v) for k, v in (f.split("=") for f in text.split())}
        time.sleep(0.01)
    raise AssertionError(f"no state file in {rootfs}")


def wait_count(rootfs: Path, above: int, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        st = state(rootfs)
        if st["count"] > above:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"counter stuck at {st} (wanted > {above})")
        time.sleep(0.02)


def assert_stopped_source(th, name: str, rootfs: Path) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The dumped source is stopped, not killed: tasks exist in state T, counter still."""
    init = th.cts.lxc.init_pid(name)
    assert init is not None, "source tasks were killed"
    tasks = container_tasks(init)
    assert tasks and all(t.state in ("T", "t") for t in tasks), tasks
    before = state(rootfs)
    time.sleep(0.3)
    assert state(rootfs) == before
    return before


def assert_continues(rootfs: Path, before: dict[str, int]) -> dict[str, int]:
    after = wait_count(rootfs, before["count"])
    assert after["start"] == before["start"] and after["pid"] == before["pid"], (before, after)
    assert after["bad"] == 0, after
    return after


class Relay:
    """A TCP relay from a port in one namespace to a port in another, able to cut the
    stream after a number of bytes (the page stream of a post-copy migration)."""

    def __init__(self, listen_netns: str, target_netns: str, target_port: int,
                 cut_after: int | None = None) -> None:
        self.server = call_in_netns(
            listen_netns, lambda: socket.create_server(("127.0.0.1", 0)))
        self.port = self.server.getsockname()[1]
        self.target = (target_netns, target_port)
        self.cut_after = cut_after
        self.forwarded = 0
        self.cut = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.server.accept()
            upstream = socket_in_netns(self.target[0], ("127.0.0.1", self.target[1]), 10)
            self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            self._pump(upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if counted:
                    if self.cut_after is not None and self.forwarded + len(data) > self.cut_after:
                        self.cut.set()
                        self.close()
                        return
                    self.forwarded += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in [self.server, *self.socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def free_port(netns: str) -> int:
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    return call_in_netns(netns, pick)


# features and preflight ---------------------------------------------------------------------
def test_check_reports_criu_features(host) -> None:  # type: ignore[no-untyped-def]
    f = LxcCheckpointer(host.cts).check()
    assert f.criu_version and f.criu_version.startswith("4.")
    assert f.lazy_pages
    if not f.pre_dump:
        assert "soft-dirty" in f.pre_dump_reason
    assert set(f.as_dict()) >= {"criu_version", "lazy_pages", "pre_dump", "pre_dump_reason"}


def test_preflight_names_what_criu_cannot_dump(host, counter_bin) -> None:  # type: ignore[no-untyped-def]
    ck = LxcCheckpointer(host.cts)
    launch(host, "ok", counter_bin, mb=4)
    assert ck.preflight("ok") == []

    launch(host, "bad", counter_bin, mb=4, uid=1000)
    rc, _, err = host.exec("bad", "sh", "-c", "unshare -u sleep 600 >/dev/null 2>&1 </dev/null &")
    assert rc == 0, err
    time.sleep(0.3)
    problems = ck.preflight("bad")
    whats = "\n".join(p.what for p in problems)
    assert "non-root user" in whats and "(counter)" in whats
    assert "UTS" in whats
    # `unshare` was started by lxc-attach without setsid: its session leader is outside
    assert "session" in whats
    assert all(p.hint and p.pid > 0 for p in problems)

    host.cts.stop("ok", force=True)
    assert "not running" in ck.preflight("ok")[0].what


def test_unprivileged_with_a_veth_restores_its_network(host, scratch) -> None:  # type: ignore[no-untyped-def]
    """criu 4.1 cannot create an unprivileged container's veth here; the host makes it and
    criu moves it in: the restored container answers on its address, with its MAC."""
    ck = LxcCheckpointer(host.cts)
    host.cts.launch("busybox", "u1", pool="dir")
    assert ck.preflight("u1") == []
    rc, before, _ = host.exec("u1", "ip", "-o", "link", "show", "eth0")
    assert rc == 0
    mac = before.split("link/ether ")[1].split()[0]
    images = images_dir(host.root, "u1-same")
    scratch.append(images)
    ck.dump("u1", images)
    ck.release_source("u1")
    ck.restore("u1", images)
    assert host.cts.run_state("u1") == "RUNNING"
    rc, after, _ = host.exec("u1", "ip", "-o", "link", "show", "eth0")
    assert rc == 0 and f"link/ether {mac}" in after
    ip = host.cts.get("u1").ipv4
    rc, _, err = host.exec("u1", "ping", "-c", "1", "-W", "3", host.host.network_config().gateway)
    assert rc == 0, err
    # the restore config named the host-made device; the config left behind is the usual one
    config = (host.root / "lxc" / "u1" / "config").read_text()
    assert "lxc.net.0.type = veth" in config and "phys" not in config
    assert f"lxc.net.0.ipv4.address = {ip}/" in config
    host.cts.stop("u1", force=True)
    links = subprocess.run(["ip", "-n", host.netns, "-o", "link", "show"], capture_output=True,
                           text=True, check=True).stdout
    assert "mgr" not in links and "veth" not in links  # gone with the container


# stop-and-copy ------------------------------------------------------------------------------
def test_dump_restore_same_host_counter_continues(host, counter_bin, scratch) -> None:  # type: ignore[no-untyped-def]
    ck = LxcCheckpointer(host.cts)
    rootfs = launch(host, "c1", counter_bin)
    assert ck.preflight("c1") == []
    images = images_dir(host.root, "c1-same")
    scratch.append(images)
    assert (images.stat().st_mode & 0o777) == 0o700

    d = ck.dump("c1", images)
    assert d.mode == "stop-and-copy" and d.image_bytes > MB * 1024 * 1024
    before = assert_stopped_source(host, "c1", rootfs)

    ck.release_source("c1")
    assert host.cts.status("c1") == "STOPPED"
    assert state(rootfs) == before

    r = ck.restore("c1", images)
    assert host.cts.status("c1") == "RUNNING"
    after = assert_continues(rootfs, before)
    print(f"\nstop-and-copy {MB} MB: dump {d.seconds:.2f}s ({d.image_bytes / 1e6:.0f} MB), "
          f"restore {r.seconds:.2f}s, counter {before['count']} -> {after['count']}")
    # the restored container is a normal one: it answers exec and stops
    assert host.exec("c1", "cat", "/root/state")[0] == 0


def test_dump_then_rollback_keeps_running(host, counter_bin, scratch) -> None:  # type: ignore[no-untyped-def]
    ck = LxcCheckpointer(host.cts)
    rootfs = launch(host, "c1", counter_bin)
    images = images_dir(host.root, "c1-rollback")
    scratch.append(images)
    ck.dump("c1", images)
    before = assert_stopped_source(host, "c1", rootfs)

    t0 = time.monotonic()
    ck.resume_source("c1", images)
    rollback = time.monotonic() - t0
    assert host.cts.status("c1") == "RUNNING"
    assert_continues(rootfs, before)
    # CRIU's network lock is gone: the container reaches its gateway again
    rc, out, _ = host.exec("c1", "ping", "-c", "1", "-W", "2", "192.0.2.1")
    assert rc == 0, out
    print(f"\nrollback (thaw) {rollback:.3f}s")


def test_rollback_restores_from_images_when_source_was_killed(host, counter_bin, scratch) -> None:  # type: ignore[no-untyped-def]
    ck = LxcCheckpointer(host.cts)
    rootfs = launch(host, "c1", counter_bin, mb=16)
    images = images_dir(host.root, "c1-killed")
    scratch.append(images)
    ck.dump("c1", images)
    before = state(rootfs)
    ck.release_source("c1")
    ck.resume_source("c1", images)
    assert_continues(rootfs, before)


# post-copy between two test hosts -----------------------------------------------------------
def _postcopy(a, b, counter_bin, scratch, procs, cut_after: int | None) -> SimpleNamespace:  # type: ignore[no-untyped-def]
    """Start a post-copy migration of c1 from a to b through a relay; return everything."""
    src, dst = LxcCheckpointer(a.cts), LxcCheckpointer(b.cts)
    rootfs_a = launch(a, "c1", counter_bin)
    b.cts.create("busybox", "c1", pool="dir", config=PRIV)
    rootfs_b = b.cts.rootfs(b.cts.get("c1"))
    img_a = images_dir(a.root, "c1-src")
    img_b = images_dir(b.root, "c1-dst")
    scratch += [img_a, img_b]

    port = free_port(a.netns)
    t0 = time.monotonic()
    dump = src.start_lazy_dump("c1", img_a, "127.0.0.1", port)
    procs.append(dump)
    serving = dump.wait_serving(60)
    before = assert_stopped_source(a, "c1", rootfs_a)
    # the target gets the non-memory images and the rootfs as it is now (frozen)
    subprocess.run(["rsync", "-aHAX", "--delete", f"{rootfs_a}/", f"{rootfs_b}/"], check=True)
    for f in img_a.iterdir():
        shutil.copy2(f, img_b / f.name)
    relay = Relay(b.netns, a.netns, port, cut_after)
    lazy = dst.start_lazy_pages(img_b, "127.0.0.1", relay.port)
    procs.append(lazy)
    r = dst.restore("c1", img_b, lazy=True)
    downtime = time.monotonic() - t0
    return SimpleNamespace(src=src, dst=dst, dump=dump, lazy=lazy, relay=relay, img_a=img_a,
                           rootfs_a=rootfs_a, rootfs_b=rootfs_b, before=before,
                           serving=serving, restore=r, downtime=downtime)


def test_postcopy_between_hosts_counter_continues(make_host, counter_bin, scratch, procs) -> None:  # type: ignore[no-untyped-def]
    a, b = make_host(pools=("dir",)), make_host(pools=("dir",))
    m = _postcopy(a, b, counter_bin, scratch, procs, None)
    assert b.cts.status("c1") == "RUNNING"
    after = assert_continues(m.rootfs_b, m.before)
    m.lazy.wait(120)  # every page arrived
    stats = m.dump.finish(120)
    assert stats.mode == "post-copy" and stats.image_bytes < 16 * 1024 * 1024
    assert m.relay.forwarded > MB * 1024 * 1024
    # the source was kept stopped until now; release it
    assert_stopped_source(a, "c1", m.rootfs_a)
    m.src.release_source("c1")
    assert a.cts.status("c1") == "STOPPED"
    final = wait_count(m.rootfs_b, after["count"])
    assert final["bad"] == 0
    print(f"\npost-copy {MB} MB: serving after {m.serving:.2f}s, restore "
          f"{m.restore.seconds:.2f}s, downtime {m.downtime:.2f}s, all pages after "
          f"{stats.seconds:.2f}s, images {stats.image_bytes / 1e3:.0f} kB, pages "
          f"{m.relay.forwarded / 1e6:.0f} MB")


def test_postcopy_cut_stream_rolls_back_source(make_host, counter_bin, scratch, procs) -> None:  # type: ignore[no-untyped-def]
    """THE HAZARD: the page stream breaks mid-transfer -> the source resumes, nothing lost."""
    a, b = make_host(pools=("dir",)), make_host(pools=("dir",))
    m = _postcopy(a, b, counter_bin, scratch, procs, 16 * 1024 * 1024)
    assert m.relay.cut.wait(60), "the stream was never cut"
    with pytest.raises(CheckpointError, match="lazy-pages daemon failed"):
        m.lazy.wait(120)
    # the dump side may or may not notice; either way the source must still be there
    dump_error = None
    try:
        m.dump.finish(120)
    except CheckpointError as e:
        dump_error = e
    print(f"\ncut after {m.relay.forwarded / 1e6:.0f} MB; dump side reported: "
          f"{dump_error or 'success'}")
    if dump_error is None:
        assert_stopped_source(a, "c1", m.rootfs_a)
    else:
        # CRIU noticed the broken pipe and, its dump having failed, let the tasks go on
        # itself: the same tasks, memory intact (checked by assert_continues below)
        assert "Lazy pages transfer FAILED" in str(dump_error), dump_error
        init = a.cts.lxc.init_pid("c1")
        assert init is not None, "source tasks were killed"
        assert container_tasks(init), "source has no tasks"
    # the target is broken: stop it (the pipeline deletes it)
    if b.cts.status("c1") != "STOPPED":
        b.cts.stop("c1", force=True)

    m.src.resume_source("c1", m.img_a)
    assert a.cts.status("c1") == "RUNNING"
    assert_continues(m.rootfs_a, m.before)


def test_aborted_lazy_dump_rolls_back(host, counter_bin, scratch, procs) -> None:  # type: ignore[no-untyped-def]
    """The pipeline aborts a post-copy dump (e.g. the link failed before the restore)."""
    ck = LxcCheckpointer(host.cts)
    rootfs = launch(host, "c1", counter_bin, mb=64)
    images = images_dir(host.root, "c1-abort")
    scratch.append(images)
    dump = ck.start_lazy_dump("c1", images, "127.0.0.1", free_port(host.netns))
    procs.append(dump)
    dump.wait_serving(60)
    before = assert_stopped_source(host, "c1", rootfs)
    dump.abort()
    assert dump.popen.poll() is not None
    ck.resume_source("c1", images)
    assert_continues(rootfs, before)
    rc, out, _ = host.exec("c1", "ping", "-c", "1", "-W", "2", "192.0.2.1")
    assert rc == 0, out
