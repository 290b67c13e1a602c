"""backup.safety: every rule refuses its own crafted archive, with its own message.

Archives are built in memory with tarfile; a few come from GNU tar itself (sparse files,
long names, hard links), because that is what backups and imports really contain.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from backup.safety import TarGuard, TarRules, check_tar
from migrator.errors import CorruptBackup, UnsafeArchive

Entry = tuple[str, bytes, dict[str, object]]  # name, type, TarInfo attributes


def entry(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> Entry:
    return name, kind, attrs


def build(entries: list[Entry], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, kind, given in entries:
            attrs = dict(given)
            info = tarfile.TarInfo(name)
            info.type = kind
            data = attrs.pop("data", b"") if kind == tarfile.REGTYPE else b""
            assert isinstance(data, bytes)
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


GOOD = [
    entry(".", tarfile.DIRTYPE),
    entry("./etc", tarfile.DIRTYPE),
    entry("./etc/hostname", data=b"web-1\n"),
    entry("./etc/motd", data=b"x" * 1000),
    entry("./bin", tarfile.DIRTYPE),
    entry("./bin/busybox", data=b"\x7fELF" * 300),
    entry("./bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox"),
    entry("./bin/ls", tarfile.SYMTYPE, linkname="busybox"),
    entry("./etc/mtab", tarfile.SYMTYPE, linkname="../proc/self/mounts"),
    entry("./bin/busybox2", tarfile.LNKTYPE, linkname="./bin/busybox"),
    entry("./run", tarfile.DIRTYPE),
    entry("./run/initctl", tarfile.FIFOTYPE),
]


def check(data: bytes, rules: TarRules | None = None):
    return check_tar(io.BytesIO(data), rules or TarRules())


def test_a_normal_rootfs_passes_and_is_counted() -> None:
    summary = check(build(GOOD))
    assert summary.members == len(GOOD)
    assert summary.bytes == 6 + 1000 + 1200


def test_the_guard_passes_bytes_through_unchanged_in_any_chunking() -> None:
    data = build(GOOD, fmt=tarfile.PAX_FORMAT)
    for size in (1, 7, 512, 513, 10240, 1 << 20):
        guard = TarGuard(io.BytesIO(data), TarRules())
        out = bytearray()
        while chunk := guard.read(size):
            out += chunk
        assert bytes(out) == data
        assert guard.summary.members == len(GOOD)


def test_read_all_through_the_guard() -> None:
    data = build(GOOD)
    guard = TarGuard(io.BytesIO(data), TarRules(declared_bytes=2206))
    assert guard.read() == data
    assert guard.summary.bytes == 2206


BAD: list[tuple[str, list[Entry], type[Exception], str]] = [
    ("absolute", [entry("/etc/passwd", data=b"x")], UnsafeArchive,
     "member '/etc/passwd' has an absolute path"),
    ("dotdot", [entry("../etc/passwd", data=b"x")], UnsafeArchive,
     r"member '../etc/passwd' climbs out of the rootfs \(\.\.\)"),
    ("dotdot inside", [entry("a/../../etc/passwd", data=b"x")], UnsafeArchive,
     "climbs out of the rootfs"),
    ("through symlink",
     [entry("etc", tarfile.SYMTYPE, linkname="/etc"), entry("etc/passwd", data=b"x")],
     UnsafeArchive, "member 'etc/passwd' goes through the symlink 'etc'"),
    ("through a relative symlink deeper down",
     [entry("a", tarfile.DIRTYPE), entry("a/b", tarfile.SYMTYPE, linkname="."),
      entry("a/b/c/d", data=b"x")],
     UnsafeArchive, "goes through the symlink 'a/b'"),
    ("replaces symlink",
     [entry("x", tarfile.SYMTYPE, linkname="/etc"), entry("x", tarfile.DIRTYPE)],
     UnsafeArchive, "member 'x' replaces the symlink"),
    ("hard link absolute", [entry("shadow", tarfile.LNKTYPE, linkname="/etc/shadow")],
     UnsafeArchive, "hard link 'shadow' points to the absolute path '/etc/shadow'"),
    ("hard link dotdot", [entry("shadow", tarfile.LNKTYPE, linkname="../etc/shadow")],
     UnsafeArchive, r"hard link 'shadow' points to '../etc/shadow', which climbs out"),
    ("hard link to nothing", [entry("shadow", tarfile.LNKTYPE, linkname="etc/shadow")],
     UnsafeArchive, "which is not an earlier member"),
    ("hard link to a later member",
     [entry("a", tarfile.LNKTYPE, linkname="b"), entry("b", data=b"x")],
     UnsafeArchive, "hard link 'a' points to 'b', which is not an earlier member"),
    ("symlink climbs",
     [entry("etc", tarfile.DIRTYPE), entry("etc/x", tarfile.SYMTYPE, linkname="../../root")],
     UnsafeArchive, "symlink 'etc/x' points to '../../root', which climbs out of the rootfs"),
    ("symlink climbs after descending",
     [entry("l", tarfile.SYMTYPE, linkname="a/../../b")],
     UnsafeArchive, "symlink 'l' points to"),
    ("block device", [entry("dev/sda", tarfile.BLKTYPE, devmajor=8)], UnsafeArchive,
     "member 'dev/sda' is a block device; device nodes are refused unless"),
    ("char device", [entry("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)],
     UnsafeArchive, "member 'dev/mem' is a character device"),
    ("unknown type", [entry("vol", b"V")], UnsafeArchive,
     "member 'vol' has an unknown type 'V'"),
    ("gnu dumpdir type", [entry("d", b"D")], UnsafeArchive, "unknown type 'D'"),
]


@pytest.mark.parametrize(("entries", "error", "message"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_rule_refuses(entries: list[Entry], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        check(build(entries))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_are_checked_whole(fmt: int) -> None:
    name = "a/" * 80 + "../" * 81 + "etc/passwd"
    with pytest.raises(UnsafeArchive, match="climbs out of the rootfs"):
        check(build([entry(name, data=b"x")], fmt=fmt))
    link = "b/" * 80 + "../" * 82 + "x"
    with pytest.raises(UnsafeArchive, match="symlink 'l' points to"):
        check(build([entry("l", tarfile.SYMTYPE, linkname=link)], fmt=fmt))


def test_devices_pass_for_a_privileged_container() -> None:
    data = build([entry("dev", tarfile.DIRTYPE), entry("dev/null", tarfile.CHRTYPE,
                                                       devmajor=1, devminor=3)])
    assert check(data, TarRules(allow_devices=True)).members == 2


def _with_header(data: bytes, index: int, patch: dict[int, bytes]) -> bytes:
    """Patch bytes of the index-th header block and fix its checksum."""
    raw = bytearray(data)
    pos = 512 * index
    for offset, value in patch.items():
        raw[pos + offset:pos + offset + len(value)] = value
    raw[pos + 148:pos + 156] = b" " * 8
    raw[pos + 148:pos + 155] = b"%06o\0" % sum(raw[pos:pos + 512])
    return bytes(raw)


def test_old_gnu_headers_do_not_take_a_name_prefix() -> None:
    # GNU tar ignores the ustar prefix field in an old-GNU header; so must the checker,
    # or the name it checks is not the name tar writes
    data = build([entry("etc", tarfile.SYMTYPE, linkname="/etc"),
                  entry("etc/passwd", data=b"x")])
    hidden = _with_header(data, 1, {345: b"innocent\0"})
    with pytest.raises(UnsafeArchive, match="goes through the symlink 'etc'"):
        check(hidden)


def test_pax_path_overrides_the_header_name() -> None:
    data = build([entry("../evil", data=b"x", pax_headers={"path": "../evil"})],
                 fmt=tarfile.PAX_FORMAT)
    with pytest.raises(UnsafeArchive, match="member '../evil' climbs out"):
        check(data)


def test_a_directory_with_data_is_refused() -> None:
    data = _with_header(build([entry("d", tarfile.DIRTYPE)]), 0, {124: b"00000001000\0"})
    with pytest.raises(UnsafeArchive, match="member 'd' is a directory but claims 512 bytes"):
        check(data)


def test_a_damaged_header_is_corrupt() -> None:
    data = bytearray(build(GOOD))
    data[512 * 2 + 10] ^= 0xFF  # inside the third header's name, checksum left stale
    with pytest.raises(CorruptBackup, match="damaged header at offset 1024"):
        check(bytes(data))


ROOTFS = "backup/container/rootfs"
LXD_RULES = TarRules(root=ROOTFS, more_roots=("backup/snapshots/*/rootfs",),
                     data_prefix="backup")


def lxd_layout(extra: list[Entry]) -> bytes:
    return build([
        entry("backup", tarfile.DIRTYPE),
        entry("backup/index.yaml", data=b"name: c1\n"),
        entry("backup/container", tarfile.DIRTYPE),
        entry("backup/container/backup.yaml", data=b"{}\n"),
        entry("backup/container/templates", tarfile.DIRTYPE),
        entry(ROOTFS, tarfile.DIRTYPE),
        entry(f"{ROOTFS}/bin", tarfile.DIRTYPE),
        entry(f"{ROOTFS}/bin/busybox", data=b"b" * 10),
        entry(f"{ROOTFS}/bin/sh", tarfile.SYMTYPE, linkname="busybox"),
        entry(f"{ROOTFS}/bin/ash", tarfile.LNKTYPE, linkname=f"{ROOTFS}/bin/busybox"),
        entry("backup/snapshots", tarfile.DIRTYPE),
        entry("backup/snapshots/snap0", tarfile.DIRTYPE),
        entry("backup/snapshots/snap0/rootfs", tarfile.DIRTYPE),
        entry("backup/snapshots/snap0/rootfs/x", data=b"s"),
        *extra,
    ])


def test_lxd_layout_passes() -> None:
    assert check(lxd_layout([]), LXD_RULES).bytes == 9 + 3 + 10 + 1
    # optimized exports: send streams as plain files beside the snapshot directories
    optimized = [entry("backup/snapshots/s0.bin", data=b"btrfs"),
                 entry("backup/container.bin", data=b"stream")]
    assert check(lxd_layout(optimized), LXD_RULES).members == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([entry("etc/passwd", data=b"x")],
         r"member 'etc/passwd' is outside the allowed parts of the archive \(backup/container"),
        ([entry("backup/container/evil", tarfile.SYMTYPE, linkname="/etc/shadow")],
         "is a symlink outside a rootfs; only plain files and directories"),
        ([entry("backup/container", data=b"x")],
         "member 'backup/container' is a file; it must be a directory"),
        ([entry("backup/snapshots/s.bin", tarfile.SYMTYPE, linkname="/etc/shadow")],
         "member 'backup/snapshots/s.bin' is a symlink outside a rootfs"),
        ([entry("backup/snapshots/snap0/rootfs/y", tarfile.LNKTYPE,
                linkname=f"{ROOTFS}/bin/busybox")],
         "outside its rootfs 'backup/snapshots/snap0/rootfs'"),
        ([entry(f"{ROOTFS}/l", tarfile.SYMTYPE, linkname="../backup.yaml")],
         "climbs out of the rootfs"),
        ([entry(f"{ROOTFS}/dev/sda", tarfile.BLKTYPE)], "is a block device"),
    ],
)
def test_lxd_layout_refuses(extra: list[Entry], message: str) -> None:
    with pytest.raises(UnsafeArchive, match=message):
        check(lxd_layout(extra), LXD_RULES)


def test_an_index_declaring_less_is_refused_while_reading() -> None:
    with pytest.raises(UnsafeArchive, match="past the 2000 bytes of file data its index"):
        check(build(GOOD), TarRules(declared_bytes=2000))


def test_an_index_declaring_more_is_corrupt() -> None:
    with pytest.raises(CorruptBackup, match="holds 2206 bytes of file data but its index "
                                            "declares 3000"):
        check(build(GOOD), TarRules(declared_bytes=3000))


def test_truncation_in_data_is_corrupt() -> None:
    data = build(GOOD)
    with pytest.raises(CorruptBackup, match="truncated in the data of member './etc/motd'"):
        check(data[: 512 * 5 + 100])


def test_truncation_between_members_is_corrupt() -> None:
    # tarfile and GNU tar accept an archive cut exactly between two members; we do not
    data = build(GOOD)
    cut = 512 * 4  # ".", "etc", "hostname" header + 1 data block
    with tarfile.open(fileobj=io.BytesIO(data[:cut]), mode="r|") as tar:
        assert len(tar.getmembers()) == 3
    with pytest.raises(CorruptBackup, match="truncated after member './etc/hostname'"):
        check(data[:cut])


def test_empty_and_garbage_tail() -> None:
    with pytest.raises(CorruptBackup, match="archive is empty"):
        check(b"")
    with pytest.raises(CorruptBackup, match="data after its end-of-archive block"):
        check(build(GOOD) + b"\0" * 512 + b"tar header?" + b"\0" * 501)


def test_the_guard_stops_before_passing_a_bad_header_on() -> None:
    good = build(GOOD[:4])[: 7 * 512]  # ".", "etc", hostname (+1 block), motd (+2 blocks)
    bad = build([entry("../escape", data=b"x")])
    data = good + bad
    guard = TarGuard(io.BytesIO(data), TarRules())
    passed = bytearray()
    with pytest.raises(UnsafeArchive, match="'../escape' climbs out"):
        while chunk := guard.read(512):
            passed += chunk
    assert bytes(passed) == good  # tar never saw the bad header


def _gnu_tar(tmp_path: Path, *options: str) -> bytes:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (root / "sparse").touch()
    os.truncate(root / "sparse", 50_000_000)
    with open(root / "sparse", "r+b") as f:
        f.seek(20_000_000)
        f.write(b"data")
    deep = root / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True, exist_ok=True)
    (deep / ("f" * 150)).write_bytes(b"long" * 100)
    os.link(deep / ("f" * 150), root / "hard")
    (root / "link").symlink_to("/" + "x" * 200)
    return subprocess.run(["tar", "-C", str(root), *options, "-cf", "-", "."],
                          check=True, capture_output=True).stdout


@pytest.mark.parametrize("options", [["-S"], ["-S", "--format=posix"], ["--format=gnu"]])
def test_gnu_tar_archives_pass(tmp_path: Path, options: list[str]) -> None:
    data = _gnu_tar(tmp_path, *options)
    summary = check(data)
    assert summary.members == 7  # ., sparse, d..., d.../e..., f..., hard, link
    assert summary.bytes == 50_000_000 + 400
    if "-S" in options:
        assert len(data) < 1_000_000  # holes were not stored, yet counted


def test_gnu_tar_info_reads_names_as_gnu_tar_does() -> None:
    data = build([entry("etc/passwd", data=b"x")])
    hidden = _with_header(data, 0, {345: b"innocent\0"})
    with tarfile.open(fileobj=io.BytesIO(hidden)) as t:
        assert t.getnames() == ["innocent/etc/passwd"]  # Python's reading
    from backup.safety import GnuTarInfo

    with tarfile.open(fileobj=io.BytesIO(hidden), tarinfo=GnuTarInfo) as t:
        assert t.getnames() == ["etc/passwd"]  # GNU tar's, and the checker's
    posix = build([entry("a/" * 60 + "f", data=b"x")], fmt=tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(posix), tarinfo=GnuTarInfo) as t:
        assert t.getnames() == ["a/" * 60 + "f"]  # a real ustar prefix still counts
