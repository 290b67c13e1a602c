"""A live migration whose processes die with ``kill -9`` still ends well (``mt16-a`` -> ``mt16-b``).

The kill matrix: the migrating client (``migrate live`` run on host a) at six points (in
post-copy during the rootfs sync, right after the dump, during the restore, during the
page transfer; in stop-and-copy during the image transfer and right after the restore),
and during the page transfer the target's ``criu lazy-pages``, the target's agent waiting
for it, and the source's criu serving the pages. Each case is followed by ``migrate
recover`` on host a and must end within 30 s with:

- the container running on exactly one host (going back while the target had not resumed
  whole, forward once it had: either is right, never both and never neither);
- its in-memory counter never going back (same process start, count above the last one
  seen before the kill, ``bad=0``: the memory came across, or stayed, intact);
- nothing left frozen or hanging on either host: no criu or lxc-checkpoint of these hosts,
  no agent still waiting, no task of the container in a stopped state.

The workload is ``tests/workloads/counter.c`` in a privileged busybox container holding
16 MB, on a dir pool: small, so the whole module stays near two minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migrator.checkpoint.lxc import container_tasks
from migrator.runtime.lxc import LxcDriver
from migrator.runtime.state import OperationRecord, StateStore
from testrigs.testhosts import TestHostSpec
from tests.integration.test_live import (
    launch_counting,
    names_on,
    state,
    wait_count,
)
from tests.integration.test_remote import (
    MIGRATE,
    add_to_inventory,
    build_workload,
    host_pair,
    m,
)

BASE = Path("/var/tmp/migrator-tests/live-kills")
PREFIX = "mt16"
MB = 16
PAGES_MB = 256  # the kills while pages flow
BUDGET = 30.0  # seconds from the kill to a container running on one host, recover included


@pytest.fixture(scope="module")
def counter(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return build_workload(tmp_path_factory, "counter")


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir",), ("busybox",)) as (a, b):
        for x, y in ((a, b), (b, a)):
            add_to_inventory(x, y)
        yield a, b


@pytest.fixture
def hosts(pair):  # type: ignore[no-untyped-def]
    a, b = pair
    yield a, b
    for spec in (a, b):
        _kill(_helpers(spec))  # a failed case must not leave the next one a stuck criu
        _rc, out, _e = m(spec, "list", "--format", "json")
        for c in json.loads(out):
            m(spec, "delete", "--force", c["name"])
    for spec in (a, b):
        _rc, out, _e = m(spec, "operations", "--format", "json")
        assert json.loads(out) == [], out  # nothing interrupted left behind


# processes -------------------------------------------------------------------------------
def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _stat_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _helpers(spec: TestHostSpec) -> list[int]:
    """Live criu, lxc-checkpoint and agent processes of ``spec`` (by its state root, or
    its images directories, named after a hash of that root)."""
    shm = "/dev/shm/migrator-checkpoint/" + \
        hashlib.sha256(str(spec.root.resolve()).encode()).hexdigest()[:10]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = _argv(int(entry))
        line = " ".join(argv)
        prog = os.path.basename(argv[0]) if argv else ""
        ours = str(spec.root) in line or shm in line
        helper = prog in ("criu", "lxc-checkpoint") or (" agent" in line and "migrator" in line)
        if ours and helper and _stat_state(int(entry)) != "Z":
            found.append(int(entry))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _operation(a: TestHostSpec) -> OperationRecord | None:
    st = StateStore(a.root / "state.db")
    try:
        ops = [o for o in st.list_operations() if o.kind == "live" and o.status == "running"]
    finally:
        st.close()
    return ops[-1] if ops else None


def _stopped_tasks(spec: TestHostSpec, name: str) -> list[int]:
    init = LxcDriver(spec.root / "lxc", spec.netns).init_pid(name)
    assert init is not None, f"{name} has no init on {spec.name}"
    return [t.pid for t in container_tasks(init) if t.state in ("T", "t")]


# the matrix ------------------------------------------------------------------------------
def _staged(stage: str, delay: float = 0.0) -> Callable[[OperationRecord], bool]:
    def due(op: OperationRecord) -> bool:
        if stage not in op.stages:
            return False
        time.sleep(delay)
        return True
    return due


def _pages_flowing(b: TestHostSpec) -> Callable[[OperationRecord], bool]:
    """Due when the target runs the restored container and fetches its pages (its restore
    mark, ``live_target.RestoreMark``, says "restored")."""
    def due(op: OperationRecord) -> bool:
        with contextlib.suppress(OSError, ValueError):
            mark = json.loads((b.root / "checkpoint" / f"live-{op.id}.json").read_text())
            return bool(mark.get("phase") == "restored")
        return False
    return due


# mode, when to kill, where the container must end up (None: either, by the race between
# the last pages and the kill)
def _restoring(b: TestHostSpec) -> Callable[[OperationRecord], bool]:
    """Due when the target's restore has started (its lxc-checkpoint announced): the case
    found by hand, a criu restore waiting for pages that will never come."""
    def due(op: OperationRecord) -> bool:
        return any(h.get("what") == "lxc-checkpoint"
                   for h in op.detail.get("target_helpers") or [])
    return due


CLIENT_CASES = [
    pytest.param("post-copy", lambda b: _staged("sync", 0.3), "a", id="post-copy-during-sync"),
    pytest.param("post-copy", lambda b: _staged("final-sync"), "a",
                 id="post-copy-right-after-dump"),
    pytest.param("post-copy", _restoring, None, id="post-copy-during-restore"),
    pytest.param("post-copy", _pages_flowing, None, id="post-copy-during-pages"),
    pytest.param("stop-and-copy", lambda b: _staged("images", 0.05), "a",
                 id="stop-and-copy-during-images"),
    # resumed whole on b before the kill: its state is newer, so recover goes forward
    pytest.param("stop-and-copy", lambda b: _staged("verify"), "b",
                 id="stop-and-copy-after-the-restore"),
]


def _migrate(a: TestHostSpec, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*MIGRATE, "--root", str(a.root), "live", "local", "b", "c1",
                             "--mode", mode, "--compress", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(a: TestHostSpec, p: subprocess.Popen[bytes],
               due: Callable[[OperationRecord], bool], victim: Callable[[OperationRecord], int]
               ) -> tuple[float, dict[str, int]]:
    """Poll host a's journal; when ``due``, SIGKILL ``victim``'s pid. Returns the time of
    the kill and the last counter state seen on host a before it."""
    deadline = time.monotonic() + 90
    seen = state(a, "c1")
    try:
        while time.monotonic() < deadline and p.poll() is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                seen = state(a, "c1")
            op = _operation(a)
            if op is not None and due(op):
                os.kill(victim(op), signal.SIGKILL)
                return time.monotonic(), seen
            time.sleep(0.01)
    except BaseException:
        p.kill()
        raise
    raise AssertionError(f"the migration ended (exit {p.poll()}) before the kill point")


def _ends_well(a: TestHostSpec, b: TestHostSpec, p: subprocess.Popen[bytes], killed_at: float,
               seen: dict[str, int], client_dies: bool) -> str:
    """``migrate recover`` on host a, then the three conditions; returns where it runs."""
    try:
        p.wait(timeout=BUDGET)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if client_dies:
        assert p.returncode == -signal.SIGKILL
    rc, out, err = m(a, "recover", check=False)
    assert rc == 0, err
    where = [s for s in (a, b) if names_on(s) == ["c1"]]
    assert len(where) == 1, (names_on(a), names_on(b), err)
    home, other = where[0], (b if where[0] is a else a)
    assert names_on(other) == []
    _rc, info, _e = m(home, "info", "c1", "--format", "json")
    assert json.loads(info)["state"] == "RUNNING", info
    now = wait_count(home, "c1", seen["count"], timeout=BUDGET)
    elapsed = time.monotonic() - killed_at
    assert elapsed < BUDGET, f"ended {elapsed:.1f}s after the kill ({err.strip()})"
    assert (now["start"], now["bad"]) == (seen["start"], 0), (seen, now)
    later = wait_count(home, "c1", now["count"])
    assert later["bad"] == 0
    assert _stopped_tasks(home, "c1") == []
    leftovers = {s.name: _helpers(s) for s in (a, b)}
    assert leftovers == {"a": [], "b": []}, leftovers
    return home.name


@pytest.mark.parametrize(("mode", "due", "home"), CLIENT_CASES)
def test_client_killed(hosts, counter, mode, due, home) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    launch_counting(a, counter, "c1", mb=MB, pool="dir")
    p = _migrate(a, mode)
    killed_at, seen = _kill_when(a, p, due(b), lambda op: p.pid)
    where = _ends_well(a, b, p, killed_at, seen, client_dies=True)
    assert home in (None, where)


def _lazy_pages(op: OperationRecord) -> int:
    return next(int(h["pid"]) for h in op.detail["target_helpers"]
                if h["what"] == "criu lazy-pages")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _source_criu(op: OperationRecord) -> int:
    """The source's criu serving pages: in the process group of the recorded dump."""
    group = int(op.detail["source_helpers"][0]["pid"])
    for entry in os.listdir("/proc"):
        argv = _argv(int(entry)) if entry.isdigit() else []
        if argv and os.path.basename(argv[0]) == "criu" and os.getpgid(int(entry)) == group:
            return int(entry)
    raise AssertionError("no criu serving pages on the source")


# while the pages flow: the target's lazy-pages daemon or the source's page server leave
# the target's copy short of memory (dead), so the migration goes back by itself (the
# client lives) and recover finds nothing left. The agent that started the lazy-pages
# daemon is another matter: the daemon lives on in its own session and delivers every
# page, so the target's copy is whole, has run, and is newer than the source: the
# migration goes forward (the settle reads the daemon's log, as nobody is left to hear
# its exit status) and the client ends well, with a warning
TARGET_CASES = [
    pytest.param(_lazy_pages, "a", id="target-lazy-pages"),
    pytest.param(lambda op: _ppid(_lazy_pages(op)), "b", id="target-agent"),
    pytest.param(_source_criu, "a", id="source-page-server"),
]


@pytest.mark.parametrize(("victim", "ends_on"), TARGET_CASES)
def test_helper_killed_during_pages(hosts, counter, victim, ends_on) -> None:  # type: ignore[no-untyped-def]
    a, b = hosts
    # enough memory that the pages still flow when the kill lands: criu to criu over the
    # direct link, 16 MB can be across before the restore mark is even read
    launch_counting(a, counter, "c1", mb=PAGES_MB, pool="dir")
    p = _migrate(a, "post-copy")
    killed_at, seen = _kill_when(a, p, _pages_flowing(b), victim)
    assert _ends_well(a, b, p, killed_at, seen, client_dies=False) == ends_on
    if ends_on == "a":
        assert p.returncode != 0
    else:
        assert p.returncode == 0  # forward, the cut noted as a warning
