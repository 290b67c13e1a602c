"""Durable before destructive, private files and pinned host keys, shown on real runs.

The commands run under ``strace -f`` (``-ttt`` absolute times, ``-y`` the path behind every
file descriptor). From the trace: the target volume's ``syncfs`` and the durable commit of
the record (a write to ``state.db-wal``, then an fsync/fdatasync of ``state.db`` or its
``-wal``) must come before the first removal under the source (an unlink/rmdir there, a
btrfs subvolume destroy ioctl, or an ``rm``/``btrfs subvolume delete`` run on it).

Covered: a local ``move --pool`` (dir -> btrfs), a ``backup restore --force``, a stateless
move to another host and the release of a live migration (stop-and-copy, CRIU), whose target
side (the agent on host b, traced through its agent command) must sync and commit before
host a removes its copy. Traces of both hosts are merged by time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrator.backends import VolumeRef
from testrigs.testhosts import TestHostSpec
from tests.conftest import IN_CI
from tests.integration.test_live import WORKLOAD, assert_kept_memory, launch_counting
from tests.integration.test_remote import host_pair

MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
TRACED = ("syncfs,fsync,fdatasync,unlink,unlinkat,rmdir,rename,renameat,renameat2,execve,"
          "pwrite64,ioctl")
BASE = Path("/var/tmp/migrator-tests/durability")
PREFIX = "mt14"
REPO = Path(__file__).resolve().parents[2]


def strace_argv(out: Path, per_process: bool = False, exec_untraced: bool = False) -> list[str]:
    """``exec_untraced``: follow forks and threads but let go of every process that runs
    another program (``-b execve``), which is then printed, arguments and all, but not
    traced further (see the live migration test for why)."""
    strace = shutil.which("strace")
    if strace is None:
        msg = "strace is not installed (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return [strace, "-ff" if per_process else "-f", *(["-b", "execve"] if exec_untraced else []),
            "-ttt", "-y", "-s", "256", "-e", f"trace={TRACED}", "-o", str(out)]


# reading a trace ----------------------------------------------------------------------------
@dataclass
class Call:
    ts: float
    pid: int
    name: str
    text: str  # the call as strace printed it, resumed part joined

    @property
    def ok(self) -> bool:
        return re.search(r"\)\s+=\s+-1\b", self.text) is None

    def fd_path(self) -> str | None:
        """The path behind the first file descriptor argument (``-y``)."""
        m = re.match(r"\w+\(-?\d+<([^>]*)>", self.text)
        return m.group(1) if m else None

    def strings(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.text)


LINE = re.compile(r"^(?:(\d+)\s+)?(\d+\.\d+)\s+(.*)$")


def read_trace(files: list[Path]) -> list[Call]:
    """Every call of every traced process, in time order (``-ttt`` is the wall clock, so
    traces of processes on two test hosts of this machine interleave correctly)."""
    calls: list[Call] = []
    for f in files:
        file_pid = int(f.suffix[1:]) if f.suffix[1:].isdigit() else 0
        pending: dict[int, Call] = {}
        for line in f.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            if not m:
                continue
            pid = int(m.group(1)) if m.group(1) else file_pid
            ts, rest = float(m.group(2)), m.group(3)
            resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
            if resumed:
                start = pending.pop(pid, None)
                if start is not None:
                    start.text += resumed.group(2)
                    calls.append(start)
                continue
            name = re.match(r"(\w+)\(", rest)
            if not name:
                continue  # signals, exits
            if rest.endswith("<unfinished ...>"):
                pending[pid] = Call(ts, pid, name.group(1), rest[:-len("<unfinished ...>")])
            else:
                calls.append(Call(ts, pid, name.group(1), rest))
        calls.extend(pending.values())  # never resumed (killed): still counted
    return sorted(calls, key=lambda c: c.ts)


def _under(path: str, roots: list[Path]) -> bool:
    return any(path == str(r) or path.startswith(f"{r}/") for r in roots)


def removes_under(c: Call, roots: list[Path]) -> bool:
    """Whether the call removes something under one of ``roots``. A failed call removed
    nothing; an unfinished one counts (stricter)."""
    if c.name in ("unlink", "rmdir"):
        return c.ok and _under(os.path.normpath(c.strings()[0]), roots)
    if c.name == "unlinkat":
        base, name = c.fd_path(), c.strings()[0]
        full = name if name.startswith("/") or base is None else f"{base}/{name}"
        return c.ok and _under(os.path.normpath(full), roots)
    if c.name == "ioctl" and "SNAP_DESTROY" in c.text:
        base, names = c.fd_path(), re.findall(r'name="([^"]*)"', c.text)
        return c.ok and base is not None and bool(names) and \
            _under(f"{base}/{names[0]}", roots)
    if c.name == "execve" and c.ok:
        argv = c.strings()[1:]
        removing = (argv[:1] and os.path.basename(argv[0]) == "rm") or \
            "subvolume" in argv and "delete" in argv
        return bool(removing) and any(_under(os.path.normpath(a), roots) for a in argv[1:])
    return False


def assert_durable_first(calls: list[Call], targets: list[Path], db_root: Path,
                         sources: list[Path], record_write_after_sync: bool = True) -> str:
    """The target's syncfs, then the durable record commit, then the first removal under a
    source; returns a one-line summary for the test's log."""
    first_rm = next((i for i, c in enumerate(calls) if removes_under(c, sources)), None)
    assert first_rm is not None, f"no removal under {sources} was traced"
    i_sync = next((i for i, c in enumerate(calls) if c.name == "syncfs" and c.ok
                   and _under(c.fd_path() or "", targets)), None)
    assert i_sync is not None, f"no syncfs of {targets} was traced: " + \
        "; ".join(c.text for c in calls if c.name == "syncfs")
    assert i_sync < first_rm, (f"the source was removed ({calls[first_rm].text}) before the "
                               f"target was synced ({calls[i_sync].text})")
    db = (str(db_root / "state.db"), str(db_root / "state.db-wal"))
    start = i_sync
    if record_write_after_sync:
        i_write = next((i for i in range(i_sync, first_rm) if calls[i].name == "pwrite64"
                        and calls[i].fd_path() == db[1]), None)
        assert i_write is not None, "no record written to the WAL between the sync and the " \
            f"removal: {calls[first_rm].text}"
        start = i_write
    i_commit = next((i for i in range(start, first_rm) if calls[i].name in ("fsync",
                     "fdatasync") and calls[i].ok and calls[i].fd_path() in db), None)
    assert i_commit is not None, (f"no fsync of {db_root}/state.db* between the record write "
                                  f"and the first removal ({calls[first_rm].text})")
    return (f"syncfs {calls[i_sync].ts:.6f} < {calls[i_commit].name} of "
            f"{Path(calls[i_commit].fd_path() or '').name} {calls[i_commit].ts:.6f} < first "
            f"removal {calls[first_rm].ts:.6f} ({calls[first_rm].name})")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


# one host: modes, move, restore --force --------------------------------------------------------
def test_move_and_restore_force_sync_and_commit_before_removing(host, tmp_path) -> None:  # type: ignore[no-untyped-def]
    th = host
    th.cli("create", "busybox", "c1", "-p", "dir", check=True)
    (th.cts.rootfs(th.cts.get("c1")) / "data").write_bytes(os.urandom(1 << 20))
    th.cli("snapshot", "create", "c1", "s0", check=True)
    dir_b, btrfs_b = th.host.backend("dir"), th.host.backend("btrfs")
    vol = VolumeRef("container", "c1")
    # the source: its volume and its snapshots (not the move's own temporary snapshot)
    sources = [dir_b.volume_path(vol)] + [s.path for s in dir_b.list_snapshots(vol)
                                          if s.path is not None]
    assert len(sources) == 2

    trace = tmp_path / "move.trace"
    r = subprocess.run([*strace_argv(trace), *MIGRATE, "--root", str(th.root), "move", "c1",
                        "--pool", "btrfs", "--format", "json"], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert th.cts.get("c1").pool == "btrfs" and not dir_b.volume_exists(vol)
    print("move:", assert_durable_first(read_trace([trace]), [btrfs_b.volume_path(vol)],
                                        th.root, sources))

    # restore --force over a container that exists: the restored volume is synced and the
    # journal entry recover completes from is durable before the old one is deleted
    th.cli("create", "busybox", "c2", "-p", "dir", check=True)
    repo = tmp_path / "repo"
    out = th.cli("backup", "create", "c2", "--repo", str(repo), "--format", "json",
                 check=True).stdout
    bid = json.loads(out)["id"]
    (th.cts.rootfs(th.cts.get("c2")) / "after-backup").write_text("goes with the restore")
    old = dir_b.volume_path(VolumeRef("container", "c2"))
    trace = tmp_path / "restore.trace"
    r = subprocess.run([*strace_argv(trace), *MIGRATE, "--root", str(th.root), "backup",
                        "restore", bid, "--repo", str(repo), "--force"], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert not (th.cts.rootfs(th.cts.get("c2")) / "after-backup").exists()
    op = next(o for o in reversed(th.host.state.list_operations()) if o.kind == "restore")
    scratch = th.host.backend(op.detail["pool"]).volume_path(
        VolumeRef("container", op.detail["scratch"]))
    print("restore --force:", assert_durable_first(read_trace([trace]), [scratch], th.root,
                                                   [old]))

    # modes, from the outside, after those real commands (the test's own connection keeps
    # the WAL and shared-memory files in place)
    export = tmp_path / "c1.tar.zst"
    old_umask = os.umask(0o022)
    try:
        th.cli("export", "c1", str(export), check=True)
    finally:
        os.umask(old_umask)
    assert mode(export) == 0o600
    db_files = [p for p in th.root.iterdir() if p.name.startswith("state.db")]
    assert {p.name for p in db_files} >= {"state.db", "state.db-wal", "state.db-shm"}
    assert {p.name: mode(p) for p in db_files} == {p.name: 0o600 for p in db_files}
    assert mode(th.root) == 0o711  # traversable (unprivileged rootfs), not listable


def test_trace_reader_catches_a_removal_before_the_sync(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The order check can fail: a trace where the source goes first is refused."""
    t = tmp_path / "bad.trace"
    t.write_text(
        '10 100.000001 unlinkat(4</p/dir/containers/c1/rootfs>, "data", 0) = 0\n'
        '10 100.000002 syncfs(5</p/btrfs/containers/c1>) = 0\n'
        '10 100.000003 pwrite64(6</r/state.db-wal>, "x", 1, 0) = 1\n'
        '10 100.000004 fdatasync(6</r/state.db-wal>) = 0\n')
    with pytest.raises(AssertionError, match="before the target was synced"):
        assert_durable_first(read_trace([t]), [Path("/p/btrfs/containers/c1")], Path("/r"),
                             [Path("/p/dir/containers/c1")])
    t.write_text(
        '10 100.000002 syncfs(5</p/btrfs/containers/c1>) = 0\n'
        '10 100.000003 pwrite64(6</r/state.db-wal>, "x", 1, 0) = 1\n'
        '11 100.000004 execve("/usr/bin/rm", ["rm", "-rf", "/p/dir/containers/c1"], '
        '0x7ffd /* 3 vars */) = 0\n'
        '10 100.000005 fdatasync(6</r/state.db-wal>) = 0\n')
    with pytest.raises(AssertionError, match="no fsync"):
        assert_durable_first(read_trace([t]), [Path("/p/btrfs/containers/c1")], Path("/r"),
                             [Path("/p/dir/containers/c1")])


# two hosts: pinned host key, the agent's side of a move ------------------------------------------
@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir", "btrfs"), ("busybox",)) as hosts:
        yield hosts


def m(spec: TestHostSpec, *args: str, check: bool = True,
      trace: list[str] | None = None) -> tuple[int, str, str]:
    r = subprocess.run([*(trace or []), *MIGRATE, "--root", str(spec.root), *args],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"migrate {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r.returncode, r.stdout, r.stderr


def host_fingerprint(spec: TestHostSpec) -> str:
    """What the operator reads on the host itself."""
    out = subprocess.run(["ssh-keygen", "-lf", f"{spec.host_key}.pub"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


def test_host_trust_accepts_only_the_given_fingerprint(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    known = a.root / "ssh" / "known_hosts"
    known.unlink(missing_ok=True)
    m(a, "host", "add", "pinned", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", " ".join(MIGRATE))
    right = host_fingerprint(b)
    wrong = "SHA256:" + base64.b64encode(os.urandom(32)).decode().rstrip("=")
    try:
        rc, _o, err = m(a, "host", "trust", "pinned", "--fingerprint", wrong, check=False)
        assert rc == 17, err
        assert right in err and wrong in err and "refused" in err, err
        assert not known.exists() or b.link_ip not in known.read_text()
        rc, _o, err = m(a, "host", "trust", "pinned", "--fingerprint", "SHA256:short",
                        check=False)
        assert rc != 0 and "not a SHA-256 key fingerprint" in err, err
        assert not known.exists() or b.link_ip not in known.read_text()
        # the key the operator checked: accepted and recorded, 0600
        _rc, _o, err = m(a, "host", "trust", "pinned", "--fingerprint", right)
        assert right in err and "matches" in err, err
        assert b.link_ip in known.read_text() and mode(known) == 0o600
        # a key already recorded is still checked against the fingerprint given
        rc, _o, err = m(a, "host", "trust", "pinned", "--fingerprint", wrong, check=False)
        assert rc == 17 and right in err, err
        m(a, "host", "check", "pinned", "--probe-mib", "0")  # the recorded key works
        assert mode(a.client_key) == 0o600 and mode(b.host_key) == 0o600
    finally:
        m(a, "host", "remove", "pinned")
        known.unlink(missing_ok=True)


@contextlib.contextmanager
def agent_traced(a: TestHostSpec, b: TestHostSpec, tmp_path: Path,
                 exec_untraced: bool = False) -> Iterator[Path]:
    """Host b known to a, its agent run under ``strace -ff`` (one file per process in the
    directory yielded); every container on both deleted after, and b forgotten."""
    (a.root / "ssh").mkdir(exist_ok=True)
    shutil.copy(a.known_hosts, a.root / "ssh" / "known_hosts")
    traces = tmp_path / "agent"
    traces.mkdir()
    agent = [*strace_argv(traces / "agent", per_process=True, exec_untraced=exec_untraced),
             *MIGRATE]
    m(a, "host", "add", "b", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", " ".join(agent))
    try:
        yield traces
    finally:
        for spec in (a, b):
            _rc, out, _e = m(spec, "list", "--format", "json")
            for c in json.loads(out):
                with contextlib.suppress(AssertionError):
                    m(spec, "delete", "--force", c["name"])
        m(a, "host", "remove", "b")


def test_remote_move_target_syncs_and_commits_before_the_source_goes(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    ct = "dur1"
    with agent_traced(a, b, tmp_path) as traces:
        m(a, "launch", "busybox", ct, "-p", "dir")
        m(a, "exec", ct, "--", "sh", "-c", "echo kept > /root/v")
        m(a, "snapshot", "create", ct, "s0")
        source = a.root / "storage-pools" / "dir" / "containers" / ct
        assert source.is_dir()
        client = tmp_path / "client.trace"
        m(a, "move", ct, "b", "-p", "btrfs", trace=strace_argv(client))
        _rc, out, _e = m(b, "exec", ct, "--", "cat", "/root/v")
        assert out.strip() == "kept" and not source.exists()
        calls = read_trace([client, *traces.iterdir()])
        target = b.root / "storage-pools" / "btrfs" / "containers" / ct
        # the record was written by commit_container before the final sync; sync_container
        # then syncs the volume and flushes every commit (fsync of state.db) before replying
        print("remote move:", assert_durable_first(calls, [target], b.root, [source],
                                                   record_write_after_sync=False))
        assert any(c.name == "pwrite64" and c.fd_path() == f"{b.root}/state.db-wal"
                   for c in calls), "the agent's record commit was not traced"


@pytest.fixture(scope="module")
def counter_bin(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The live tests' workload: a known pattern in memory and a counter in /root/state."""
    out = tmp_path_factory.mktemp("workload") / "counter"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(WORKLOAD)], check=True)
    return out


def test_live_release_target_syncs_and_commits_before_the_source_goes(pair, counter_bin,
                                                                      tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A running busybox container (the counter workload in its memory) migrated live,
    stop-and-copy, from a to b: b's ``sync_container`` must have synced the target volume
    and committed b's record before a's release removes anything of the source.

    CRIU and strace both use ptrace. Followed into criu (``-f``), strace would own the tasks
    ``criu restore`` forks on b, so criu could not seize them, and it would go on tracing
    the restored container (its agent call would never end). So both ends are traced with
    ``-b execve``: every process of the client and of b's agents (threads and forks too) is
    followed until it runs another program; that execve is still printed with its
    arguments (a ``btrfs subvolume delete`` or ``rm`` of the source would be seen), then
    the process is let go, so lxc-checkpoint and criu run untraced. Every syscall the
    order is decided on (syncfs, the WAL write and fdatasync, the removals through
    libbtrfsutil's ioctl or unlinkat) is made by the Python processes themselves.
    (``--seccomp-bpf`` must not be added: the filter stays on a process that is let go,
    and its traced syscalls would then fail with ENOSYS.)"""
    a, b = pair
    ct = "dur2"
    with agent_traced(a, b, tmp_path, exec_untraced=True) as traces:
        before = launch_counting(a, counter_bin, ct, mb=8, pool="btrfs")
        m(a, "snapshot", "create", ct, "s0")
        source = a.root / "storage-pools" / "btrfs" / "containers" / ct
        snap = a.root / "storage-pools" / "btrfs" / "containers-snapshots" / ct / "s0"
        assert source.is_dir() and snap.is_dir()
        client = tmp_path / "client.trace"
        _rc, out, _e = m(a, "live", "local", "b", ct, "--mode", "stop-and-copy", "-p",
                         "btrfs", "--format", "json",
                         trace=strace_argv(client, exec_untraced=True))
        res = json.loads(out)
        assert res["mode"] == "stop-and-copy" and "release" in res["stages"], res
        assert not source.exists() and not snap.exists()
        _rc, out, _e = m(b, "info", ct, "--format", "json")
        info = json.loads(out)
        assert (info["state"], info["snapshots"]) == ("RUNNING", ["s0"]), info
        assert_kept_memory(b, ct, before)  # the same process, memory intact
        calls = read_trace([client, *traces.iterdir()])
        target = b.root / "storage-pools" / "btrfs" / "containers" / ct
        # sync_container on b: syncfs of the volume, then a commit of b's state store with
        # synchronous=FULL (a WAL write and its fdatasync), then the reply lets a release
        print("live release:", assert_durable_first(calls, [target], b.root, [source, snap]))
        # criu ran, untraced: the dump started on a, the restore on b (each through the
        # network namespace helper, whose execve carries the whole command)
        runs = [c.strings()[1:] for c in calls if c.name == "execve"]
        for mode in ("-s", "-r"):
            assert any("lxc-checkpoint" in argv and mode in argv for argv in runs), runs


# recover checks the copy that stays ---------------------------------------------------------------
def test_recover_keeps_both_when_the_source_is_not_whole(host) -> None:  # type: ignore[no-untyped-def]
    """An interrupted move (journaled ``copy``, a dead owner) whose source lost a snapshot
    on disk: recover must not remove the partial target, the only other copy; once the
    source is whole again it rolls back as before."""
    from migrator.runtime.state import OperationRecord

    th = host
    th.cli("create", "busybox", "r1", "-p", "dir", check=True)
    th.cli("snapshot", "create", "r1", "s0", check=True)
    dir_b, btrfs_b = th.host.backend("dir"), th.host.backend("btrfs")
    vol = VolumeRef("container", "r1")
    partial = btrfs_b.create_volume(vol)
    (partial / "kept").write_text("the partial copy")
    dead = subprocess.Popen(["true"])
    dead.wait()
    with th.host.state.transaction():
        th.host.state.add_operation(OperationRecord(
            "0123456789ab", "move", "running", ["copy"],
            {"container": "r1", "from_pool": "dir", "to_pool": "btrfs", "was_running": False,
             "pid": dead.pid, "pid_start": "0"}))
    snap = next(s.path for s in dir_b.list_snapshots(vol))
    assert snap is not None
    moved = snap.with_name(".s0-aside")
    snap.rename(moved)  # the source lacks its recorded snapshot
    r = th.cli("recover")
    assert r.returncode == 6, r.stderr
    assert "kept both" in r.stderr and "s0" in r.stderr, r.stderr
    assert (partial / "kept").read_text() == "the partial copy"  # not removed
    assert dir_b.volume_exists(vol) and th.cts.get("r1").pool == "dir"
    ops = json.loads(th.cli("operations", "--format", "json", check=True).stdout)
    assert [o["status"] for o in ops] == ["interrupted"]  # still there to recover
    moved.rename(snap)  # whole again: the partial target goes
    r = th.cli("recover", check=True)
    assert "rolled back" in r.stderr, r.stderr
    assert not btrfs_b.volume_exists(vol) and dir_b.volume_exists(vol)
