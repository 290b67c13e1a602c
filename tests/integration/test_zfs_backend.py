"""The zfs driver on real zfs-fuse pools (sparse files under the test host's state root).

Content is checked for real after every transfer: bytes, owners, modes, hard links,
symlinks, sparse files, device nodes and fifos.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends import zfs as zfs_driver
from migrator.backends.zfs import ZfsBackend, daemon_running
from migrator.core.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidState,
    MigratorError,
    NoSpace,
    StorageError,
)
from migrator.core.names import SnapshotName
from migrator.runtime.host import Host
from migrator.runtime.teardown import teardown
from migrator.streams import ProgressEvent, ProgressMeter, SendStream
from tests.conftest import IN_CI
from tests.integration.conftest import TEST_BASE

pytestmark = pytest.mark.integration

CT = VolumeRef("container", "c1")


@pytest.fixture(autouse=True)
def _zfs_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Needs the daemon; afterwards (hosts torn down) no zpool, file or mount of the test."""
    if not daemon_running():
        msg = "the zfs-fuse daemon is not running (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    made: list[tuple[str, Path, Path]] = []
    real = zfs_driver.create_loop_pool

    def recording(zpool: str, image: Path, size: int, mountpoint: Path) -> None:
        made.append((zpool, image, mountpoint))
        real(zpool, image, size, mountpoint)

    monkeypatch.setattr(zfs_driver, "create_loop_pool", recording)
    yield
    imported = imported_zpools()
    for zpool, image, mountpoint in made:
        assert zpool not in imported, f"{zpool} is still imported"
        assert not image.exists(), f"{image} was left behind"
        assert not zfs_mounts_under(mountpoint), f"mounts left under {mountpoint}"


def zfs(*args: str) -> str:
    return subprocess.run(["zfs", *args], capture_output=True, text=True, check=True).stdout


def datasets(b: ZfsBackend) -> list[str]:
    """Every dataset and snapshot of the pool (names relative to the base dataset)."""
    out = zfs("list", "-H", "-o", "name", "-t", "all", "-r", b.dataset).split()
    return sorted(n[len(b.dataset):] for n in out)


def imported_zpools() -> list[str]:
    r = subprocess.run(["zpool", "list", "-H", "-o", "name"], capture_output=True, text=True)
    return r.stdout.split()


def zfs_mounts_under(path: Path) -> list[str]:
    """zfs(-fuse) mounts below ``path`` (the state root's shared storage-pools bind mount,
    ext4, stays until teardown)."""
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f
                if ln.split()[1].startswith(str(path)) and ln.split()[2].endswith("zfs")]


def snap(name: str) -> SnapshotName:
    return SnapshotName(name)


def zfs_pool_of(h: Host, name: str) -> ZfsBackend:
    b = h.backend(name)
    assert isinstance(b, ZfsBackend)
    return b


def zfs_pool(th, name: str = "zfs") -> ZfsBackend:  # type: ignore[no-untyped-def]
    return zfs_pool_of(th.host, name)


# content ---------------------------------------------------------------------------------
def populate(root: Path, tag: str = "") -> None:
    """A tree with every kind of file a container rootfs has."""
    (root / "rootfs" / "etc").mkdir(parents=True)
    (root / "rootfs" / "etc" / "hostname").write_text(f"web-1{tag}\n")
    bin_ = root / "rootfs" / "bin"
    bin_.mkdir()
    (bin_ / "tool").write_bytes(os.urandom(300_000) + tag.encode())
    os.chmod(bin_ / "tool", 0o4755)
    os.link(bin_ / "tool", bin_ / "tool-hardlink")
    os.symlink("tool", bin_ / "tool-symlink")
    os.symlink("/nonexistent/target", bin_ / "dangling")
    home = root / "rootfs" / "home" / "user"
    home.mkdir(parents=True)
    (home / "notes").write_text("private " * 100)
    os.chown(home / "notes", 101000, 101001)
    os.chown(home, 101000, 101001)
    os.chmod(home, 0o700)
    with open(root / "rootfs" / "sparse.img", "wb") as f:
        f.truncate(64 * 2**20)
        f.seek(10 * 2**20)
        f.write(b"middle")
    dev = root / "rootfs" / "dev"
    dev.mkdir()
    os.mknod(dev / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(dev / "loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
    os.mkfifo(dev / "fifo", 0o600)
    (root / "rootfs" / "empty").mkdir(mode=0o1777)
    os.chmod(root / "rootfs" / "empty", 0o1777)
    os.lchown(bin_ / "tool-symlink", 100000, 100000)
    os.chown(root / "rootfs", 100000, 100000)


def digest(root: Path) -> dict[str, tuple]:
    """Everything that must survive a copy, per path (hard links as a shared group)."""
    out: dict[str, tuple] = {}
    first_path: dict[int, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    group = first_path.setdefault(st.st_ino, rel)
                    extra = (extra, "link-group", group)
            elif stat.S_ISLNK(kind):
                extra = os.readlink(p)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            size = st.st_size if not stat.S_ISDIR(kind) else 0
            nlink = st.st_nlink if not stat.S_ISDIR(kind) else 0
            # whole seconds: zfs-fuse keeps no sub-second timestamps
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, nlink, int(st.st_mtime), extra)
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    da, db = digest(a), digest(b)
    assert da.keys() == db.keys()
    for k in da:
        assert da[k] == db[k], k
    sparse = b / "rootfs" / "sparse.img"
    if sparse.exists():
        assert sparse.stat().st_blocks * 512 < 8 * 2**20, "sparse file was filled in"


def stream_through(src: StorageBackend, vol: VolumeRef, name: str, parent: str | None,
                   how: str, dst: StorageBackend, dst_vol: VolumeRef,
                   meter: ProgressMeter | None = None) -> None:
    s = {x.name: x for x in src.list_snapshots(vol)}
    stream = src.send(s[name], s[parent] if parent else None, how)
    dst.receive(dst_vol, name, stream, meter)


# volumes ---------------------------------------------------------------------------------
def test_create_and_delete_volume(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",), images=())
    b = zfs_pool(th)
    assert not b.supports_xattrs
    p = b.create_volume(CT)
    assert p == b.path / "containers" / "c1"
    assert os.path.ismount(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o711
    assert b.volume_exists(CT)
    with pytest.raises(AlreadyExists):
        b.create_volume(CT)
    (p / "f").write_text("x")
    custom = VolumeRef("custom", "data")
    assert b.create_volume(custom) == b.path / "customs" / "data"
    b.delete_volume(CT)
    b.delete_volume(CT)  # idempotent
    assert not b.volume_exists(CT)
    assert not p.exists()
    b.delete_volume(custom)
    assert datasets(b) == ["", "/containers", "/customs"]
    usage = b.usage()
    assert 0 < usage.used < usage.total <= 2 * 2**30


def test_snapshots_list_delete_identity(make_host) -> None:  # type: ignore[no-untyped-def]
    b = zfs_pool(make_host(pools=("zfs",), images=()))
    p = b.create_volume(CT)
    for i, name in enumerate(["zeta", "alpha", "mid.1"]):
        (p / "f").write_text(str(i))
        s = b.snapshot(CT, snap(name))
        assert s.path is None and s.name == name
    assert [s.name for s in b.list_snapshots(CT)] == ["zeta", "alpha", "mid.1"]  # oldest first
    with pytest.raises(AlreadyExists):
        b.snapshot(CT, snap("alpha"))
    ids = [b.snapshot_identity(s) for s in b.list_snapshots(CT)]
    assert all(i and i.isdigit() for i in ids) and len(set(ids)) == 3
    b.delete_snapshot(CT, snap("alpha"))
    b.delete_snapshot(CT, snap("alpha"))  # missing: no-op
    assert [s.name for s in b.list_snapshots(CT)] == ["zeta", "mid.1"]
    b.delete_volume(CT)
    assert b.list_snapshots(CT) == []
    assert not any("@" in d for d in datasets(b))


def test_restore_keeps_newer_snapshots(make_host) -> None:  # type: ignore[no-untyped-def]
    b = zfs_pool(make_host(pools=("zfs",), images=()))
    p = b.create_volume(CT)
    (p / "a").write_text("one")
    (p / "gone-later").write_text("x")
    b.snapshot(CT, snap("s1"))
    (p / "a").write_text("two")  # same size, same second: only a checksum tells
    (p / "gone-later").unlink()
    (p / "b").write_text("new")
    b.snapshot(CT, snap("s2"))
    (p / "a").write_text("333333")
    (p / "c").write_text("unsnapshotted")

    b.restore_snapshot(CT, snap("s1"))  # older than s2: synced, s2 kept
    assert sorted(os.listdir(p)) == ["a", "gone-later"]
    assert (p / "a").read_text() == "one"
    assert [s.name for s in b.list_snapshots(CT)] == ["s1", "s2"]
    assert not [d for d in datasets(b) if "tmp-" in d]

    b.restore_snapshot(CT, snap("s2"))  # the newest: native rollback
    assert sorted(os.listdir(p)) == ["a", "b"]
    assert (p / "a").read_text() == "two"
    assert [s.name for s in b.list_snapshots(CT)] == ["s1", "s2"]
    with pytest.raises(MigratorError):
        b.restore_snapshot(CT, snap("nope"))


def test_rename_volume(make_host) -> None:  # type: ignore[no-untyped-def]
    b = zfs_pool(make_host(pools=("zfs",), images=()))
    p = b.create_volume(CT)
    (p / "f").write_text("data")
    b.snapshot(CT, snap("s1"))
    new = VolumeRef("container", "c2")
    other = b.create_volume(VolumeRef("container", "c3"))
    with pytest.raises(AlreadyExists):
        b.rename_volume(CT, VolumeRef("container", "c3"))
    b.rename_volume(CT, new)
    assert not b.volume_exists(CT) and not p.exists()
    assert (b.volume_path(new) / "f").read_text() == "data"
    assert [s.name for s in b.list_snapshots(new)] == ["s1"]
    assert other.is_dir()


@pytest.mark.parametrize("delete_first", ["source", "clone"])
def test_clone_then_delete_either(make_host, delete_first: str) -> None:  # type: ignore[no-untyped-def]
    b = zfs_pool(make_host(pools=("zfs",), images=()))
    src = VolumeRef("image", "ab12cd")
    p = b.create_volume(src)
    populate(p)
    b.snapshot(src, snap("s1"))
    before = digest(p)
    clones = [VolumeRef("container", f"c{i}") for i in (1, 2)]
    for c in clones:
        cp = b.create_volume_from(c, src)
        assert cp == b.volume_path(c) and os.path.ismount(cp)
        assert digest(cp) == before
    (b.volume_path(clones[0]) / "rootfs" / "etc" / "hostname").write_text("changed\n")
    assert digest(p) == before  # copy on write: the source is untouched
    assert [s.name for s in b.list_snapshots(src)] == ["s1"]  # origins are hidden
    with pytest.raises(AlreadyExists):
        b.create_volume_from(clones[0], src)

    if delete_first == "source":
        b.delete_volume(src)
        assert not b.volume_exists(src) and not p.exists()
        assert digest(b.volume_path(clones[1])) == before  # clones live on
        b.delete_volume(clones[0])
        assert any(d.startswith("/deleted/") for d in datasets(b))  # still used by c2
        b.delete_volume(clones[1])
    else:
        for c in clones:
            b.delete_volume(c)
        assert [s.name for s in b.list_snapshots(src)] == ["s1"]
        assert not any("clone:" in d for d in datasets(b))
        b.delete_volume(src)
    assert datasets(b) in (["", "/containers", "/images"],
                           ["", "/containers", "/deleted", "/images"])
    assert not list((b.path / "containers").iterdir())


def test_mount_snapshot_reads_the_snapshot(make_host) -> None:  # type: ignore[no-untyped-def]
    b = zfs_pool(make_host(pools=("zfs",), images=()))
    p = b.create_volume(CT)
    populate(p)
    s1 = b.snapshot(CT, snap("s1"))
    expected = digest(p)
    (p / "rootfs" / "etc" / "hostname").write_text("later\n")
    (p / "rootfs" / "new").write_text("later")
    with b.mount_snapshot(s1) as path:
        assert digest(path) == expected
        with pytest.raises(OSError):
            (path / "x").write_text("read-only")
        mnt = path
    assert not mnt.exists()
    assert not [d for d in datasets(b) if "tmp-" in d]
    with pytest.raises(RuntimeError), b.mount_snapshot(s1) as path:
        mnt = path
        raise RuntimeError("boom")
    assert not mnt.exists() and not [d for d in datasets(b) if "tmp-" in d]


# streams ---------------------------------------------------------------------------------
def test_full_and_incremental_zfs_send_receive(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",), images=())
    src = zfs_pool(th)
    th.host.create_pool("zfs2", "zfs", None, "1GiB")
    dst = zfs_pool(th, "zfs2")
    assert src.zpool != dst.zpool
    assert src.migration_types() == ["zfs", "rsync", "tar"]
    p = src.create_volume(CT)
    populate(p)
    s1 = src.snapshot(CT, snap("s1"))
    target = VolumeRef("container", "copy")

    stream = src.send(s1, None, "zfs")
    assert stream.how == "zfs" and stream.parent is None and stream.size_hint
    dst.receive(target, "s1", stream, None)
    assert_same_tree(p, dst.volume_path(target))
    assert [s.name for s in dst.list_snapshots(target)] == ["s1"]
    assert src.snapshot_identity(s1) == dst.snapshot_identity(dst.list_snapshots(target)[0])

    with pytest.raises(AlreadyExists):  # a full stream never lands on an existing volume
        stream_through(src, CT, "s1", None, "zfs", dst, target)

    (p / "rootfs" / "etc" / "hostname").write_text("web-2\n")
    (p / "rootfs" / "bin" / "tool-symlink").unlink()
    (p / "rootfs" / "added").write_bytes(os.urandom(5000))
    os.chown(p / "rootfs" / "added", 100033, 100044)
    src.snapshot(CT, snap("s2"))
    (dst.volume_path(target) / "scribble").write_text("changed on the target")  # rolled back
    stream_through(src, CT, "s2", "s1", "zfs", dst, target)
    assert_same_tree(p, dst.volume_path(target))
    assert [s.name for s in dst.list_snapshots(target)] == ["s1", "s2"]
    ids = [dst.snapshot_identity(s) for s in dst.list_snapshots(target)]
    assert ids == [src.snapshot_identity(s) for s in src.list_snapshots(CT)]

    with pytest.raises(InvalidInput):
        src.send(s1, None, "btrfs")


def test_incremental_refused_over_newer_target_snapshot(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",), images=())
    src = zfs_pool(th)
    th.host.create_pool("zfs2", "zfs", None, "1GiB")
    dst = zfs_pool(th, "zfs2")
    p = src.create_volume(CT)
    (p / "f").write_text("one")
    src.snapshot(CT, snap("s1"))
    stream_through(src, CT, "s1", None, "zfs", dst, CT)
    (dst.volume_path(CT) / "local").write_text("target-only work")
    dst.snapshot(CT, snap("local"))
    (p / "f").write_text("two")
    src.snapshot(CT, snap("s2"))
    with pytest.raises(InvalidState, match="newest snapshot is local"):
        stream_through(src, CT, "s2", "s1", "zfs", dst, CT)
    assert [s.name for s in dst.list_snapshots(CT)] == ["s1", "local"]
    assert (dst.volume_path(CT) / "local").read_text() == "target-only work"
    assert (dst.volume_path(CT) / "f").read_text() == "one"
    # an incremental onto a missing volume is refused too
    with pytest.raises(MigratorError):
        stream_through(src, CT, "s2", "s1", "zfs", dst, VolumeRef("container", "none"))
    assert not dst.volume_exists(VolumeRef("container", "none"))


def test_tar_between_zfs_and_dir(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs", "dir"), images=())
    z = zfs_pool(th)
    d = th.host.backend("dir")
    p = z.create_volume(CT)
    populate(p)
    s1 = z.snapshot(CT, snap("s1"))

    stream = z.send(s1, None, "tar")
    assert stream.how == "tar"
    d.receive(CT, "s1", stream, None)
    assert_same_tree(p, d.volume_path(CT))
    assert not [x for x in datasets(z) if "tmp-" in x]  # the clone went with the stream

    back = VolumeRef("container", "back")
    dp = d.volume_path(CT)
    (dp / "rootfs" / "etc" / "hostname").write_text("from-dir\n")
    d.snapshot(CT, snap("s2"))
    stream_through(d, CT, "s2", None, "tar", z, back)
    assert_same_tree(dp, z.volume_path(back))
    assert [s.name for s in z.list_snapshots(back)] == ["s2"]

    # into an existing zfs volume: staged in a scratch volume, then synced over
    (dp / "rootfs" / "more").write_text("more")
    d.snapshot(CT, snap("s3"))
    stream_through(d, CT, "s3", None, "tar", z, back)
    assert_same_tree(dp, z.volume_path(back))
    assert [s.name for s in z.list_snapshots(back)] == ["s2", "s3"]
    assert not [x for x in datasets(z) if "-recv" in x]

    # an xattr zfs-fuse cannot store fails the receive; nothing is left on the target
    subprocess.run(["setfattr", "-n", "user.keep", "-v", "1", str(dp / "rootfs" / "more")],
                   check=True)
    d.snapshot(CT, snap("s4"))
    with pytest.raises(StorageError, match="xattrs"):
        stream_through(d, CT, "s4", None, "tar", z, VolumeRef("container", "xattr"))
    assert not z.volume_exists(VolumeRef("container", "xattr"))


def _children_named(argv0: str, sub: str) -> list[int]:
    """Our own child processes running ``argv0 ... sub ...`` (to kill one by pid)."""
    me = os.getpid()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if ppid == me and argv[0].endswith(argv0.encode()) and sub.encode() in argv:
                pids.append(int(d.name))
    return pids


# writes the first N bytes of a saved stream, then fails: a sender dying mid-stream
_TRUNCATED = "import sys; f = open(sys.argv[1], 'rb'); sys.stdout.buffer.write(f.read(int(sys.argv[2]))); sys.exit(3)"  # noqa: E501


def _interrupted_receive(
    src: ZfsBackend, dst: ZfsBackend, name: str, parent: str | None, how: str, tmp: Path
) -> None:
    """Receive ``name`` into ``dst`` and break it after 8 MiB in the way ``how`` says."""
    snaps = {x.name: x for x in src.list_snapshots(CT)}
    stream = src.send(snaps[name], snaps[parent] if parent else None, "zfs")
    after = 8 * 2**20
    if how == "sender":
        # zfs-fuse's daemon writes the stream itself: killing `zfs send` would not cut it,
        # so the stream is saved and replayed by a process that dies half way
        saved = tmp / f"{name}.zstream"
        with open(saved, "wb") as f:
            while chunk := os.read(stream.fileno(), 1 << 20):
                f.write(chunk)
        stream.close()
        assert saved.stat().st_size > 2 * after
        stream = SendStream([sys.executable, "-c", _TRUNCATED, str(saved), str(after)], "zfs",
                            name, parent)
        meter = None
    else:
        fired: list[int] = []

        def cb(ev: ProgressEvent) -> None:
            if ev.done >= after and not fired:
                fired.append(ev.done)
                if how == "interrupted":  # the transfer is aborted (Ctrl-C, lost transport)
                    raise KeyboardInterrupt
                for pid in _children_named("zfs", "receive"):  # the receiving command dies
                    os.kill(pid, signal.SIGKILL)

        meter = ProgressMeter(cb, "test", every=0)
    with pytest.raises((MigratorError, KeyboardInterrupt)):
        dst.receive(CT, name, stream, meter)


@pytest.mark.parametrize("how", ["sender", "receiver", "interrupted"])
def test_receive_killed_midstream_leaves_nothing(make_host, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",), images=())
    src = zfs_pool(th)
    th.host.create_pool("zfs2", "zfs", None, "1GiB")
    dst = zfs_pool(th, "zfs2")
    p = src.create_volume(CT)
    (p / "big").write_bytes(os.urandom(48 * 2**20))
    src.snapshot(CT, snap("s1"))

    _interrupted_receive(src, dst, "s1", None, how, tmp_path)
    assert not dst.volume_exists(CT)
    assert datasets(dst) == ["", "/containers"]  # the (empty) parent of volumes only
    assert not dst.volume_path(CT).exists()

    # incremental: no new snapshot, content as it was
    stream_through(src, CT, "s1", None, "zfs", dst, CT)
    old = hashlib.sha256((dst.volume_path(CT) / "big").read_bytes()).hexdigest()
    (p / "big").write_bytes(os.urandom(48 * 2**20))
    src.snapshot(CT, snap("s2"))
    _interrupted_receive(src, dst, "s2", "s1", how, tmp_path)
    assert [s.name for s in dst.list_snapshots(CT)] == ["s1"]
    assert hashlib.sha256((dst.volume_path(CT) / "big").read_bytes()).hexdigest() == old
    assert datasets(dst) == ["", "/containers", "/containers/c1", "/containers/c1@s1"]
    assert not _children_named("zfs", "receive") and not _children_named("zfs", "send")

    # and the next attempt goes through
    stream_through(src, CT, "s2", "s1", "zfs", dst, CT)
    assert_same_tree(p, dst.volume_path(CT))


def test_full_pool_raises_nospace(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",), images=())
    src = zfs_pool(th)
    with pytest.raises(InvalidInput, match="64MiB"):
        th.host.create_pool("tiny", "zfs", None, "32MiB")
    th.host.create_pool("tiny", "zfs", None, "64MiB")
    tiny = zfs_pool(th, "tiny")
    p = src.create_volume(CT)
    (p / "big").write_bytes(os.urandom(80 * 2**20))
    s1 = src.snapshot(CT, snap("s1"))
    with pytest.raises(NoSpace):
        tiny.receive(CT, "s1", src.send(s1, None, "zfs"), None)
    assert datasets(tiny) == ["", "/containers"]
    assert not tiny.volume_exists(CT) and not tiny.volume_path(CT).exists()


# pool lifecycle --------------------------------------------------------------------------
def test_pool_lifecycle_export_import_source_and_teardown(image_cache) -> None:  # type: ignore[no-untyped-def]
    root = TEST_BASE / f"zfs-{uuid.uuid4().hex[:8]}"
    h = Host(root)
    try:
        rec = h.create_pool("zp", "zfs", None, "256MiB")
        zpool = rec.config["zpool"]
        assert zpool in imported_zpools()
        b = zfs_pool_of(h, "zp")
        (b.create_volume(CT) / "f").write_text("kept")
        b.snapshot(CT, snap("s1"))

        # a pool inside an existing zfs dataset: only its own child dataset is ours
        with pytest.raises(InvalidInput):
            h.create_pool("bad", "zfs", "no-such-zpool/x")
        sub = h.create_pool("sub", "zfs", f"{zpool}/containers")
        assert sub.config["dataset"] == f"{zpool}/containers/mig-sub"
        sb = zfs_pool_of(h, "sub")
        (sb.create_volume(VolumeRef("custom", "v")) / "g").write_text("sub")
        h.delete_pool("sub")
        assert datasets(b) == ["", "/containers", "/containers/c1", "/containers/c1@s1"]
        assert not (h.pools_dir / "sub").exists()

        # deactivate exports the zpool; the next use imports it again, data intact
        h.deactivate_pools()
        assert zpool not in imported_zpools()
        assert not zfs_mounts_under(root)
        b = zfs_pool_of(h, "zp")
        assert (b.volume_path(CT) / "f").read_text() == "kept"
        assert [s.name for s in b.list_snapshots(CT)] == ["s1"]

        # deleting the pool destroys the zpool and its file
        h.create_pool("gone", "zfs", None, "128MiB")
        gone = h.state.get_pool("gone").config
        h.delete_pool("gone")
        assert gone["zpool"] not in imported_zpools()
        assert not Path(gone["loop_file"]).exists()
        assert not (h.pools_dir / "gone").exists()
    finally:
        problems = teardown(h, purge=True)
    assert not problems
    assert zpool not in imported_zpools()
    assert not zfs_mounts_under(root)
    assert not root.exists()



def test_delete_while_another_container_runs(make_host) -> None:  # type: ignore[no-untyped-def]
    """A running container's LXC monitor lives in a mount namespace of its own (nsexec): a
    zfs dataset mounted before it started must still be deletable while it runs. Without
    the shared storage-pools mount the monitor's copy kept it "dataset is busy"."""
    th = make_host(pools=("zfs",))
    th.cts.launch("busybox", "old", pool="zfs")
    th.cts.stop("old", force=True)
    th.cts.launch("busybox", "runner", pool="zfs")  # its monitor starts with old mounted
    t0 = time.monotonic()
    th.cts.delete("old")
    assert time.monotonic() - t0 < 10  # no busy retries
    assert not th.cts.state.has_container("old")
    assert th.cts.run_state("runner") == "RUNNING"
    th.cts.stop("runner", force=True)
