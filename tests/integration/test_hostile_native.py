"""Hostile native streams: btrfs/zfs sends that carry what a tar would have been refused for.

A stopped unprivileged container gets, from the host, a character device node (/dev/kmem's
numbers) and a setuid program owned by host root; its optimized backup (btrfs, zfs) and its
optimized LXD export then carry them as send streams, which no member check reads. Restore
and import must refuse them after receiving into their scratch volume, before anything is
recorded: the scratch volume gone, no record, the other container on the host untouched.
Also: an export that lies about its idmap, a zfs stream carrying a mountpoint property, and
btrfs streams edited to write through a symlink they made to a host file, or into a block
device node they made with the numbers of a host disk (``btrfs receive`` does both when run
plainly). Containers are named ``hn-*``.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from migrator.backends import VolumeRef
from migrator.backup.create import create_backup
from migrator.backup.repository import Repository
from migrator.backup.restore import restore_backup
from migrator.core.errors import MigratorError, UnsafeArchive
from migrator.runtime.idmap import default_idmap
from migrator.streams import SendStream
from tests.integration.conftest import TEST_BASE
from tests.integration.test_exchange import host_state
from tests.integration.treecmp import signature


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def plant(th, name: str, device_owner: int = 0) -> None:  # type: ignore[no-untyped-def]
    """The two things an unprivileged container must never hold, put there from the host."""
    r = rootfs(th, name)
    (r / "root").mkdir(exist_ok=True)
    os.mknod(r / "root/kmem", 0o600 | stat.S_IFCHR, os.makedev(1, 2))
    os.lchown(r / "root/kmem", device_owner, device_owner)
    evil = r / "usr/bin/evil"
    evil.parent.mkdir(parents=True, exist_ok=True)
    evil.write_text("#!/bin/sh\nexec /bin/sh\n")
    os.chmod(evil, 0o4755)  # owned by host root: a way to host root for any local user


def keeper(th, pool: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The other container on the host: what must stay the same."""
    rec = th.cts.get("hn-keep")
    return {"tree": signature(rootfs(th, "hn-keep"), th.host.backend(pool).supports_xattrs),
            "config": rec.config, "pool": rec.pool, "ipv4": rec.ipv4}


def test_btrfs_streams_with_a_device_and_setuid_root_are_refused(make_host,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    th = make_host(pools=("btrfs",))
    base = default_idmap().base
    th.cts.create("busybox", "hn-keep", "btrfs")
    (rootfs(th, "hn-keep") / "root/data").write_text("keep me\n")
    th.cts.create("busybox", "hn-dev", "btrfs")  # unprivileged, never started
    plant(th, "hn-dev", device_owner=base)
    repo = Repository(th.root / "backups")
    backup = create_backup(th.cts, "hn-dev", repo, optimized=True)
    assert backup.kind == "optimized"
    before, kept = host_state(th), keeper(th, "btrfs")

    # optimized backup -> restore: received, inspected, refused, removed
    r = th.cli("backup", "restore", backup.id, "--name", "hn-back")
    assert r.returncode == UnsafeArchive.exit_code, r.stderr
    assert "root/kmem is a character device node (1:2)" in r.stderr, r.stderr
    assert "usr/bin/evil is setuid to uid 0" in r.stderr, r.stderr
    assert "nothing was recorded" in r.stderr
    assert host_state(th) == before and keeper(th, "btrfs") == kept
    assert th.cts.state.list_operations()[-1].status == "rolled-back"

    # optimized LXD export -> import: the same, and the idmap the archive claims is checked
    archive = tmp_path / "hn.tar"
    r = th.cli("export", "hn-dev", str(archive), "--optimized", "--compression", "none")
    assert r.returncode == 0, r.stderr
    r = th.cli("import", str(archive), "hn-imp", "--pool", "btrfs")
    assert r.returncode == UnsafeArchive.exit_code, r.stderr
    assert "rootfs/root/kmem is a character device node (1:2)" in r.stderr, r.stderr
    assert "rootfs/usr/bin/evil is owned by 0:0, outside the ids" in r.stderr, r.stderr
    assert host_state(th) == before and keeper(th, "btrfs") == kept

    # a clean container whose archive lies: "[]" (ids not shifted on disk) for a tree that
    # is shifted would keep every file the host's; a map of another range, the same
    th.cts.create("busybox", "hn-clean", "btrfs")
    clean = tmp_path / "clean.tar"
    assert th.cli("export", "hn-clean", str(clean), "--optimized", "--compression",
                  "none").returncode == 0
    before = host_state(th)
    for lie, message in [
        ("[]", f"rootfs is owned by {base}:{base}, outside the ids 0..65535"),
        ('[{"Isuid":true,"Isgid":true,"Hostid":0,"Nsid":0,"Maprange":4294901760}]',
         "outside the ids 0..65535"),
        ('[{"Isuid":true,"Isgid":false,"Hostid":0,"Nsid":0,"Maprange":65536}]',
         "not one range for uids and one for gids"),
    ]:
        forged = tmp_path / "forged.tar"
        forged.write_bytes(_with_idmap(clean.read_bytes(), lie))
        r = th.cli("import", str(forged), "hn-lie", "--pool", "btrfs")
        assert r.returncode == UnsafeArchive.exit_code, (lie, r.stderr)
        assert message in r.stderr, (lie, r.stderr)
        assert host_state(th) == before, lie
    # the honest one imports (and is shifted to this host's map)
    r = th.cli("import", str(clean), "hn-clean2", "--pool", "btrfs")
    assert r.returncode == 0, r.stderr
    assert os.lstat(rootfs(th, "hn-clean2") / "bin/busybox").st_uid == base
    assert keeper(th, "btrfs") == kept


def _with_idmap(raw: bytes, claimed: str) -> bytes:
    """The same uncompressed export with its index claiming another on-disk idmap."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == "backup/index.yaml":
                doc = yaml.safe_load(data or b"")
                for where in ("config", "expanded_config"):
                    conf = dict(doc["config"]["container"][where])
                    conf["volatile.last_state.idmap"] = claimed
                    doc["config"]["container"][where] = conf
                data = yaml.dump(doc, Dumper=_NoAliases, sort_keys=False).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def test_zfs_streams_are_inspected_and_lose_their_properties(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("zfs",))
    th.cts.create("busybox", "hn-keep", "zfs")
    th.cts.create("busybox", "hn-zdev", "zfs")
    plant(th, "hn-zdev")
    repo = Repository(th.root / "backups")
    backup = create_backup(th.cts, "hn-zdev", repo, optimized=True)
    assert backup.kind == "optimized"
    before, kept = host_state(th), keeper(th, "zfs")
    with pytest.raises(UnsafeArchive) as e:
        restore_backup(th.cts, repo, backup.id, name="hn-zback")
    assert "root/kmem is a character device node (1:2)" in str(e.value)
    assert "usr/bin/evil is setuid to uid 0" in str(e.value)
    assert host_state(th) == before and keeper(th, "zfs") == kept
    b = th.host.backend("zfs")
    assert not any("restore" in v for v in _datasets(b))

    # a stream made with `zfs send -p` carries a mountpoint over a host directory (and a
    # quota, canmount=noauto): received with -u and every such property dropped before the
    # first mount, so it lands at its place in the pool
    evil = TEST_BASE / f"hn-evil-{os.getpid()}"
    src = VolumeRef("container", "hn-psrc")
    b.create_volume(src)
    (b.volume_path(src) / "marker").write_text("from the stream\n")
    ds = b._ds(src)  # noqa: SLF001 - the test sets properties a hostile sender would
    for prop in (f"mountpoint={evil}", "canmount=noauto", "quota=200M"):
        _zfs("set", prop, ds)
    _zfs("unmount", ds)
    _zfs("snapshot", f"{ds}@s1")
    stream = SendStream(["zfs", "send", "-p", f"{ds}@s1"], "zfs", "s1")
    dst = VolumeRef("container", "hn-precv")
    b.receive(dst, "s1", stream, None)
    assert (b.volume_path(dst) / "marker").read_text() == "from the stream\n"
    props = _zfs("get", "-H", "-o", "property,value,source", "mountpoint,canmount,quota",
                 b._ds(dst))  # noqa: SLF001
    assert "received" not in props, props
    assert str(evil) not in Path("/proc/mounts").read_text()
    assert not evil.exists() or os.listdir(evil) == []
    _zfs("inherit", "mountpoint", ds)
    b.delete_volume(src)
    b.delete_volume(dst)
    if evil.exists():  # made by `zfs set mountpoint` on the sender's side, left empty
        evil.rmdir()


def _zfs(*args: str) -> str:
    from migrator.backends.zfs import run_zfs

    return run_zfs(["zfs", *args]).stdout


def _datasets(backend) -> list[str]:  # type: ignore[no-untyped-def]
    return _zfs("list", "-H", "-o", "name", "-r", backend.dataset).split()


# ----- btrfs send streams edited by hand (format: btrfs-progs Documentation/dev/dev-send-stream)

_CMD_WRITE, _ATTR_PATH, _CMD_END = 15, 15, 21


def _crc32c(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


def _redirect_write(raw: bytes, path: bytes) -> bytes:
    """The stream with its (one) write command moved to the end and aimed at ``path``."""
    assert raw[:13] == b"btrfs-stream\0"
    cmds, off = [], 17
    while off < len(raw):
        size, cmd, _crc = struct.unpack_from("<IHI", raw, off)
        body, attrs, p = raw[off + 10:off + 10 + size], [], 0
        while p < len(body):
            kind, n = struct.unpack_from("<HH", body, p)
            attrs.append((kind, body[p + 4:p + 4 + n]))
            p += 4 + n
        cmds.append((cmd, attrs))
        off += 10 + size
    write = next(c for c in cmds if c[0] == _CMD_WRITE)
    cmds.remove(write)
    cmds.insert(len(cmds) - 1, (_CMD_WRITE, [(k, path if k == _ATTR_PATH else v)
                                             for k, v in write[1]]))
    out = raw[:17]
    for cmd, attrs in cmds:
        body = b"".join(struct.pack("<HH", k, len(v)) + v for k, v in attrs)
        crc = _crc32c(struct.pack("<IHI", len(body), cmd, 0) + body)
        out += struct.pack("<IHI", len(body), cmd, crc) + body
    return out


def test_btrfs_streams_cannot_write_through_their_links_or_devices(make_host,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    th = make_host(pools=("btrfs",))
    b = th.host.backend("btrfs")
    canary = TEST_BASE / f"hn-canary-{os.getpid()}"
    canary.write_text("host file\n")
    disk = tmp_path / "disk.img"  # a host disk: a loop device over a file
    disk.write_bytes(b"\0" * (1 << 20))
    loop = subprocess.run(["losetup", "-f", "--show", str(disk)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        rdev = os.stat(loop).st_rdev
        src = VolumeRef("container", "hn-craft")
        path = b.create_volume(src)
        (path / "a").symlink_to(canary)
        os.mknod(path / "d", 0o600 | stat.S_IFBLK, rdev)
        (path / "b").mkdir()
        (path / "b/x").write_text("payload from the stream\n")
        snap = b.snapshot(src, "s1")
        raw = subprocess.run(["btrfs", "send", "-q", str(snap.path)], capture_output=True,
                             check=True).stdout
        before = host_state(th)
        for target in (b"a", b"d"):
            evil = tmp_path / f"evil-{target.decode()}.bin"
            evil.write_bytes(_redirect_write(raw, target))
            stream = SendStream(["cat", str(evil)], "btrfs", "s1")
            with pytest.raises(MigratorError):
                b.receive(VolumeRef("container", "hn-evil"), "s1", stream, None)
            assert canary.read_text() == "host file\n", target
            assert disk.read_bytes() == b"\0" * (1 << 20), target
            assert host_state(th) == before, target
        # the same stream as an optimized export's container.bin: refused, nothing kept
        th.cts.create("busybox", "hn-exp", "btrfs")
        archive = tmp_path / "exp.tar"
        assert th.cli("export", "hn-exp", str(archive), "--optimized", "--compression",
                      "none").returncode == 0
        before = host_state(th)
        forged = tmp_path / "forged.tar"
        forged.write_bytes(_replace_member(archive.read_bytes(), "backup/container.bin",
                                           _redirect_write(raw, b"d")))
        r = th.cli("import", str(forged), "hn-forged", "--pool", "btrfs")
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        assert disk.read_bytes() == b"\0" * (1 << 20)
        assert host_state(th) == before
        b.delete_volume(src)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        canary.unlink()


def _replace_member(raw: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            body = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == name:
                body, m.size = data, len(data)
            dst.addfile(m, io.BytesIO(body) if body is not None else None)
    return out.getvalue()
