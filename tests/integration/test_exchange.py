"""migrate export / migrate import: LXD/Incus-layout tarballs, round trips and bad archives.

Containers here are named ``bk2-*``. Every host is torn down by the fixtures, pass or fail.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from migrator.runtime.idmap import default_idmap
from tests.integration.conftest import MIGRATE
from tests.integration.treecmp import populate, signature

REPO = Path(__file__).resolve().parents[2]


def rootfs(th, name: str) -> Path:  # type: ignore[no-untyped-def]
    return th.cts.rootfs(th.cts.get(name))


def sh(th, name: str, script: str) -> str:  # type: ignore[no-untyped-def]
    rc, out, err = th.exec(name, "sh", "-c", script)
    assert rc == 0, err
    return out.strip()


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as t:  # transparent gzip/xz; zstd below
        return {m.name: m for m in t.getmembers()}


def zstd_members(archive: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["zstd", "-dc", str(archive)], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: m for m in t.getmembers()}


def host_state(th) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Everything an import could leave behind: records, LXC dirs, volumes, snapshots."""
    pools = {}
    for p in th.host.state.list_pools():
        base = th.host.backend(p.name).path
        pools[p.name] = sorted(str(x.relative_to(base)) for sub in ("containers",
                                                                     "containers-snapshots")
                               if (base / sub).exists() for x in (base / sub).iterdir())
    return {
        "containers": sorted(c.name for c in th.host.state.list_containers()),
        "lxc": sorted(p.name for p in th.host.lxcpath.iterdir()),
        "pools": pools,
    }


def test_round_trip_privileged_dir_to_btrfs_keeps_every_file_property(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk2-priv", "dir", {"security.privileged": "true",
                                                   "limits.memory": "256MiB",
                                                   "user.team": "blue"})
    populate(rootfs(host, "bk2-priv") / "opt" / "t")
    host.cts.snapshot_create("bk2-priv", "s0")
    (rootfs(host, "bk2-priv") / "opt" / "t" / "etc" / "hostname").write_text("changed\n")
    host.cts.snapshot_create("bk2-priv", "s1")
    (rootfs(host, "bk2-priv") / "after").write_text("after s1\n")
    archive = host.root / "bk2-priv.tar.gz"
    r = host.cli("export", "bk2-priv", str(archive), "--compression", "gzip")
    assert r.returncode == 0, r.stderr
    names = members(archive)
    assert next(iter(names)) == "backup"  # the index comes first, as LXD writes it
    assert list(names)[1] == "backup/index.yaml"
    for m in ("backup/snapshots/s0/rootfs/opt/t/bin/tool", "backup/snapshots/s1/metadata.yaml",
              "backup/container/rootfs/after", "backup/container/backup.yaml"):
        assert m in names, m
    with tarfile.open(archive) as t:
        index = yaml.safe_load(t.extractfile("backup/index.yaml").read())  # type: ignore[union-attr]
    assert index["snapshots"] == ["s0", "s1"] and index["type"] == "container"
    assert index["config"]["container"]["config"]["security.privileged"] == "true"

    r = host.cli("import", str(archive), "bk2-back", "--pool", "btrfs", "--allow-privileged",
                 "--format", "json")
    assert r.returncode == 0, r.stderr
    assert signature(rootfs(host, "bk2-back")) == signature(rootfs(host, "bk2-priv"))
    rec = host.cts.get("bk2-back")
    assert rec.pool == "btrfs"
    assert rec.config["limits.memory"] == str(256 << 20)
    assert rec.config["user.team"] == "blue"
    assert [s.name for s in host.cts.snapshot_list("bk2-back")] == ["s0", "s1"]
    for snap in ("s0", "s1"):
        back = host.host.backend("btrfs").path / "containers-snapshots" / "bk2-back" / snap
        orig = host.host.backend("dir").path / "containers-snapshots" / "bk2-priv" / snap
        assert signature(back / "rootfs") == signature(orig / "rootfs"), snap
    host.cts.start("bk2-back")
    assert sh(host, "bk2-back", "cat /after") == "after s1"


def test_round_trip_unprivileged_is_stored_unshifted_and_piped(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.launch("busybox", "bk2-un", "btrfs")
    sh(host, "bk2-un", "mkdir -p /home/u && echo mine > /home/u/f && chown -R 1000:1000 /home/u")
    host.cts.snapshot_create("bk2-un", "snap0")
    sh(host, "bk2-un", "echo later > /home/u/f")
    base = 100000
    assert os.stat(rootfs(host, "bk2-un") / "home/u/f").st_uid == base + 1000
    # debootstrap leaves device nodes in rootfs/dev (under LXC's tmpfs): not exported
    (rootfs(host, "bk2-un") / "dev").mkdir(exist_ok=True)
    os.mknod(rootfs(host, "bk2-un") / "dev" / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    archive = host.root / "bk2-un.tar.zst"
    # stdout -> file, running container (frozen for a consistent snapshot only)
    with open(archive, "wb") as f:
        r = subprocess.run([*MIGRATE, "--root", str(host.root), "export", "bk2-un", "-"],
                           stdout=f, stderr=subprocess.PIPE, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert host.cts.status("bk2-un") == "RUNNING"
    names = zstd_members(archive)
    assert names["backup/container/rootfs/home/u/f"].uid == 1000  # the container's view
    assert names["backup/container/rootfs/bin/busybox"].uid == 0
    assert "backup/container/rootfs/dev" in names
    assert not any(n.startswith("backup/container/rootfs/dev/") for n in names)
    # file -> stdin of import, onto the dir pool
    with open(archive, "rb") as f:
        r = subprocess.run([*MIGRATE, "--root", str(host.root), "import", "-", "bk2-un2",
                            "--pool", "dir"], stdin=f, capture_output=True, cwd=REPO,
                           timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.stat(rootfs(host, "bk2-un2") / "home/u/f").st_uid == base + 1000
    host.cts.stop("bk2-un", force=True)
    dev = rootfs(host, "bk2-un") / "dev"
    before = os.stat(dev)
    (dev / "full").unlink()
    os.utime(dev, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert signature(rootfs(host, "bk2-un2")) == signature(rootfs(host, "bk2-un"))
    host.cts.start("bk2-un2")
    assert sh(host, "bk2-un2", "cat /home/u/f; stat -c %u /home/u/f") == "later\n1000"
    host.cts.snapshot_restore("bk2-un2", "snap0")
    assert (rootfs(host, "bk2-un2") / "home/u/f").read_text() == "mine\n"


def test_optimized_btrfs_export_pipes_into_import(host) -> None:  # type: ignore[no-untyped-def]
    host.cts.create("busybox", "bk2-opt", "btrfs")
    base = default_idmap().base  # files made from the host, owned as the container's root
    # would own them (an optimized import holds every owner to the archive's idmap)
    for name, snap in (("one", "a"), ("two", "b"), ("three", None)):
        (rootfs(host, "bk2-opt") / name).write_text(f"{name}\n")
        os.chown(rootfs(host, "bk2-opt") / name, base, base)
        if snap:
            host.cts.snapshot_create("bk2-opt", snap)
    with open(host.root / "export.err", "wb") as err:
        export = subprocess.Popen([*MIGRATE, "--root", str(host.root), "export", "bk2-opt",
                                   "-", "--optimized", "--compression", "none"],
                                  stdout=subprocess.PIPE, stderr=err, cwd=REPO)
        assert export.stdout is not None
        imp = subprocess.run([*MIGRATE, "--root", str(host.root), "import", "-", "bk2-opt2",
                              "--pool", "btrfs", "--format", "json"], stdin=export.stdout,
                             capture_output=True, cwd=REPO, timeout=300)
        export.stdout.close()
    assert imp.returncode == 0, imp.stderr
    assert export.wait(60) == 0, (host.root / "export.err").read_text()
    assert '"optimized": true' in imp.stdout.decode()
    with open(host.root / "opt.tar.zst", "wb") as f:
        subprocess.run([*MIGRATE, "--root", str(host.root), "export", "bk2-opt", "-",
                        "--optimized"], stdout=f, cwd=REPO, timeout=300, check=True)
    names = zstd_members(host.root / "opt.tar.zst")
    assert list(names)[:3] == ["backup", "backup/index.yaml", "backup/optimized_header.yaml"]
    assert {"backup/snapshots/a.bin", "backup/snapshots/b.bin", "backup/container.bin"} <= \
        set(names)
    assert signature(rootfs(host, "bk2-opt2")) == signature(rootfs(host, "bk2-opt"))
    snaps = host.host.backend("btrfs").path / "containers-snapshots" / "bk2-opt2"
    assert sorted(p.name for p in snaps.iterdir()) == ["a", "b"]
    assert not (snaps / "a" / "rootfs" / "two").exists()
    assert (snaps / "b" / "rootfs" / "two").exists()
    assert not (snaps / "b" / "rootfs" / "three").exists()
    # an optimized archive does not go onto a dir pool; nothing is left behind
    before = host_state(host)
    archive = host.root / "opt.tar"
    with open(archive, "wb") as f:
        host_run = subprocess.run([*MIGRATE, "--root", str(host.root), "export", "bk2-opt",
                                   "-", "--optimized"], stdout=f, cwd=REPO, timeout=300)
    assert host_run.returncode == 0
    r = host.cli("import", str(archive), "bk2-opt3", "--pool", "dir")
    assert r.returncode == 3 and "btrfs pool" in r.stderr
    assert host_state(host) == before


# ----- archives in LXD's layout, made by hand


def lxd_index(name: str, config: dict[str, str], snapshots: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """index.yaml as LXD 5 writes it (fields from lxd/backup/backup_info.go, config.go)."""
    instance = {
        "architecture": "x86_64", "config": config, "devices": {}, "ephemeral": False,
        "profiles": ["default"], "stateful": False, "description": "", "created_at":
        "2025-03-01T10:00:00.123456789Z", "expanded_config": config,
        "expanded_devices": {"root": {"path": "/", "pool": "default", "type": "disk"},
                             "eth0": {"name": "eth0", "network": "lxdbr0", "type": "nic"},
                             "gpu": {"type": "gpu"}},
        "name": name, "status": "Stopped", "status_code": 102, "last_used_at":
        "1970-01-01T00:00:00Z", "location": "none", "type": "container", "project": "default",
    }
    doc = {"name": name, "backend": "dir", "pool": "default", "snapshots": list(snapshots),
           "optimized": False, "optimized_header": False, "type": "container",
           "config": {"container": instance,
                      "snapshots": [{**instance, "name": s} for s in snapshots],
                      "pool": {"name": "default", "driver": "dir", "config": {}},
                      "volume": {"name": name, "type": "container", "config": {}}}}
    return yaml.safe_dump(doc).encode()


def lxd_archive(index: bytes, rootfs_src: Path | None, extra: list[tuple[tarfile.TarInfo,
                bytes]] = (), compress: bool = True) -> bytes:  # type: ignore[assignment]
    """An archive as Go's archive/tar writes LXD's: names without './', pax headers."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        add("backup/index.yaml", index)
        add("backup/container/backup.yaml", b"container: {}\n")
        add("backup/container/metadata.yaml", b"architecture: x86_64\ncreation_date: 0\n")
        if rootfs_src is not None:
            t.add(rootfs_src, "backup/container/rootfs")
        for info, data in extra:
            t.addfile(info, io.BytesIO(data) if data else None)
    raw = out.getvalue()
    return gzip.compress(raw) if compress else raw


def test_handcrafted_lxd_archive_imports_and_starts(host) -> None:  # type: ignore[no-untyped-def]
    image = host.cts.images.find("busybox")
    src = host.cts.images.rootfs(image.fingerprint)
    config = {"limits.memory": "256MiB", "limits.cpu": "0-1", "limits.processes": "100",
              "user.owner": "ops", "image.os": "busybox", "volatile.eth0.hwaddr":
              "00:16:3e:00:00:01", "volatile.last_state.idmap": "[]", "raw.lxc": "x"}
    archive = host.root / "from-lxd.tar.gz"
    archive.write_bytes(lxd_archive(lxd_index("web", config), src))
    r = host.cli("import", str(archive), "bk2-lxd", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert "limits.processes=100" in r.stdout and "raw.lxc=x" in r.stdout
    assert "limits.cpu=0-1" in r.stdout and "device gpu" in r.stdout
    rec = host.cts.get("bk2-lxd")
    assert rec.config["limits.memory"] == str(256 << 20)
    assert rec.config["user.owner"] == "ops" and rec.config["image.init"] == "busybox"
    assert not any(k.startswith(("volatile.", "raw.")) for k in rec.config)
    # unprivileged: the archive's uid 0 is this host's map base on disk
    assert os.stat(rootfs(host, "bk2-lxd") / "bin").st_uid == 100000
    host.cts.start("bk2-lxd")
    assert sh(host, "bk2-lxd", "id -u; echo ok > /tmp/x; cat /tmp/x") == "0\nok"
    # the name is taken now
    r = host.cli("import", str(archive), "bk2-lxd")
    assert r.returncode == 5 and "already exists" in r.stderr


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tuple[tarfile.TarInfo,
                                                                              bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    data = attrs.pop("data", b"")
    for k, v in attrs.items():
        setattr(info, k, v)
    info.size = len(data)
    return info, data


R = "backup/container/rootfs"
BAD = [
    ("dotdot", [_member(f"{R}/../../../../etc/cron.d/x", data=b"x")], 22,
     "climbs out of the rootfs (..)"),
    ("absolute", [_member("/etc/cron.d/x", data=b"x")], 22, "has an absolute path"),
    # (not rootfs/etc: the rootfs already holds that directory, and a name twice is refused)
    ("symlink then through it", [_member(f"{R}/conf", tarfile.SYMTYPE, linkname="/etc"),
                                 _member(f"{R}/conf/cron.d/x", data=b"x")], 22,
     "goes through the symlink"),
    ("symlink out", [_member(f"{R}/l", tarfile.SYMTYPE, linkname="../../../../etc")], 22,
     "climbs out of the rootfs"),
    ("hard link out", [_member(f"{R}/h", tarfile.LNKTYPE, linkname="/etc/shadow")], 22,
     "points to the absolute path"),
    ("device, unprivileged", [_member(f"{R}/dev/sda", tarfile.BLKTYPE, devmajor=8)], 22,
     "device nodes are refused unless the container is privileged"),
    ("outside the layout", [_member("etc/passwd", data=b"x")], 22,
     "outside the allowed parts of the archive"),
    ("uid beyond the map", [_member(f"{R}/f", data=b"x", uid=70000)], 22,
     "outside the 65536 ids"),
]


@pytest.mark.parametrize(("extra", "code", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_archives_are_refused_and_change_nothing(host, tmp_path: Path, extra: list[Any],  # type: ignore[no-untyped-def]
                                                     code: int, message: str) -> None:
    image = host.cts.images.find("busybox")
    src = host.cts.images.rootfs(image.fingerprint)
    before = host_state(host)
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(lxd_archive(lxd_index("evil", {}), src, extra))
    for pool in ("dir", "btrfs"):
        r = host.cli("import", str(archive), "bk2-evil", "--pool", pool)
        assert r.returncode == code, r.stderr
        assert message in r.stderr, r.stderr
        assert host_state(host) == before
    assert not Path("/etc/cron.d/x").exists()


def test_truncated_and_corrupt_archives_change_nothing(host, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = host.cts.images.find("busybox")
    src = host.cts.images.rootfs(image.fingerprint)
    raw = lxd_archive(lxd_index("cut", {}), src, compress=False)
    before = host_state(host)
    cases = {
        "mid-member": (raw[: len(raw) // 2 + 100], 21, "truncated"),
        # cut exactly after a member: GNU tar and Python accept it; we do not
        "at a boundary": (raw[: _boundary(raw)], 21, "without the end-of-archive block"),
        "gzip cut": (gzip.compress(raw)[:-2000], 21, "gzip stream is damaged or cut short"),
        "no index": (gzip.compress(raw[1536:]), 3, "does not start with backup/index.yaml"),
    }
    for what, (data, code, message) in cases.items():
        archive = tmp_path / "cut.tar"
        archive.write_bytes(data)
        r = host.cli("import", str(archive), "bk2-cut")
        assert r.returncode == code, (what, r.stderr)
        assert message in r.stderr, (what, r.stderr)
        assert host_state(host) == before, what


def _boundary(raw: bytes) -> int:
    """Offset just after the last member's data (before the end blocks)."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        last = t.getmembers()[-1]
    return last.offset_data + (last.size + 511) // 512 * 512


def test_export_of_a_missing_container_and_bad_compression(host, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = host.cli("export", "bk2-none", str(tmp_path / "x.tar"))
    assert r.returncode == 4
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.iterdir())
    host.cts.create("busybox", "bk2-c", "dir")
    r = host.cli("export", "bk2-c", str(tmp_path / "x.tar"), "--compression", "lz4")
    assert r.returncode == 3 and "unknown compression" in r.stderr
    assert not list(tmp_path.iterdir())
    t0 = time.monotonic()
    r = host.cli("export", "bk2-c", str(tmp_path / "x.tar"), "--compression", "none")
    assert r.returncode == 0 and time.monotonic() - t0 < 60
    assert "backup/container/rootfs/bin/busybox" in members(tmp_path / "x.tar")


def test_zfs_pool_exports_through_its_mounted_snapshots(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir", "zfs"))
    th.cts.create("busybox", "bk2-z", "zfs")
    (rootfs(th, "bk2-z") / "z").write_text("on zfs\n")
    os.chown(rootfs(th, "bk2-z") / "z", 100000, 100000)  # as the container's root made it
    th.cts.snapshot_create("bk2-z", "zs")
    archive = th.root / "z.tar.zst"
    r = th.cli("export", "bk2-z", str(archive))
    assert r.returncode == 0, r.stderr
    assert "backup/snapshots/zs/rootfs/z" in zstd_members(archive)
    r = th.cli("import", str(archive), "bk2-z2", "--pool", "dir")
    assert r.returncode == 0, r.stderr
    assert (rootfs(th, "bk2-z2") / "z").read_text() == "on zfs\n"
    assert signature(rootfs(th, "bk2-z2"), with_xattrs=False) == \
        signature(rootfs(th, "bk2-z"), with_xattrs=False)
