"""Archives made by a real LXD 5.0.2 (``tests/fixtures/lxd``, made by
``bench/lxd_fixtures.py``; see its README) import here, start, and keep their snapshots.

Why fixtures: the hand-made archives of ``test_exchange.py`` did not show what LXD really
writes (an unprivileged rootfs stored at its on-disk ids 100000+N with the map recorded,
0100 volume tops in send streams), and the suite must not need LXD itself. The rootfs is a
tiny one (an init of a few kB that exits on a halt signal, a user's home owned 1000:1000,
/etc/shadow group 42, a symlink, a hard link); each container got ``/etc/motd`` after its
snapshot ``s0``, so snapshot and container differ. The ``mixed`` ones also have a
snapshot ``before`` taken before the first start, which LXD leaves unshifted (0+N, map
``[]``) while the container is at 100000+N: each section is held to its own recorded map.

One module-scoped host (pools dir and btrfs, no image); containers ``lxf-*``, deleted after
each case, pass or fail; the host torn down after the module.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.runtime.containers import Containers
from migrator.runtime.host import Host
from migrator.runtime.idmap import default_idmap
from migrator.runtime.teardown import teardown
from tests.integration.conftest import POOL_SIZES, TEST_BASE, _require_environment
from tests.integration.conftest import TestHost as FixtureHost

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lxd"
MOTD = "written after s0\n"

# file, privileged, optimized (btrfs streams: a btrfs pool), snapshots
CASES = [
    ("dir-unpriv-gzip.tar.gz", False, False, ["s0"]),
    ("dir-unpriv-zstd.tar.zst", False, False, ["s0"]),
    ("dir-unpriv-none.tar", False, False, ["s0"]),
    ("dir-unpriv-instance-only.tar.gz", False, False, []),
    ("dir-priv-gzip.tar.gz", True, False, ["s0"]),
    ("btrfs-unpriv-gzip.tar.gz", False, False, ["s0"]),
    ("btrfs-unpriv-optimized.tar.gz", False, True, ["s0"]),
    ("btrfs-priv-optimized.tar.gz", True, True, ["s0"]),
    # "before" was taken before the first start: stored at 0+N, its own map "[]"
    ("dir-unpriv-mixed.tar.gz", False, False, ["before", "s0"]),
    ("btrfs-unpriv-mixed-optimized.tar.gz", False, True, ["before", "s0"]),
]


@pytest.fixture(scope="module")
def lxd_host() -> Iterator[FixtureHost]:
    _require_environment()
    tag = uuid.uuid4().hex[:8]
    root = TEST_BASE / f"host-{tag}"
    h = Host(root)
    try:
        h.init(f"mt-{tag}", "192.0.2.1/24", None)
        for driver in ("dir", "btrfs"):
            h.create_pool(driver, driver, None, POOL_SIZES.get(driver))
        yield FixtureHost(root, f"mt-{tag}", h, Containers(h))
    finally:
        problems = teardown(h, purge=True)
        assert not problems, problems


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def _host_uid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("Uid:"))
    return int(line.split()[1])


def _check_tree(root: Path, base: int, motd: bool) -> None:
    """The fixture's rootfs as this host must store it: every owner at ``base`` + N."""
    assert _owner(root) == (base, base)
    assert _owner(root / "sbin/init") == (base, base)
    assert _owner(root / "home/user/notes.txt") == (base + 1000, base + 1000)
    assert _owner(root / "etc/shadow") == (base, base + 42)
    assert os.lstat(root / "sbin/init").st_ino == os.lstat(root / "sbin/halt").st_ino
    assert os.readlink(root / "bin/init") == "../sbin/init"
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "etc/motd").exists() == motd


@pytest.mark.parametrize(("file", "privileged", "optimized", "snapshots"), CASES,
                         ids=[c[0].split(".")[0] for c in CASES])
def test_lxd_made_archive_imports_and_starts(lxd_host: FixtureHost, file: str, privileged: bool,
                                             optimized: bool, snapshots: list[str]) -> None:
    th, cts = lxd_host, lxd_host.cts
    name = f"lxf-{uuid.uuid4().hex[:6]}"
    args = ["import", str(FIXTURES / file), name, "--pool", "btrfs" if optimized else "dir"]
    if privileged:
        r = th.cli(*args)  # refused without the operator's flag, nothing written
        assert r.returncode != 0 and "privileged" in r.stderr, r.stderr
        assert not th.host.state.has_container(name)
        args.append("--allow-privileged")
    r = th.cli(*args)
    try:
        assert r.returncode == 0, r.stderr
        rec = cts.get(name)
        base = 0 if privileged else default_idmap().base
        _check_tree(cts.rootfs(rec), base, motd=True)
        assert [s.name for s in th.host.state.list_snapshots(name)] == snapshots
        backend = th.host.backend(rec.pool)
        for snap in backend.list_snapshots(cts.volume(rec)):
            with backend.mount_snapshot(snap) as path:
                _check_tree(path / "rootfs", base, motd=False)
        cts.start(name)
        pid = cts.lxc.init_pid(name)
        assert pid is not None and cts.run_state(name) == "RUNNING"
        assert _host_uid(pid) == base  # the container's root is this host's map base
        if snapshots:  # the snapshot is a container again: restored (restarted), no motd
            cts.snapshot_restore(name, snapshots[0])
            assert cts.run_state(name) == "RUNNING"
            _check_tree(cts.rootfs(cts.get(name)), base, motd=False)
        cts.stop(name, timeout=10)
        assert cts.run_state(name) == "STOPPED"
    finally:
        th.cli("delete", "--force", name)
    assert not th.host.state.has_container(name)
