"""migrator.targuard: every rule refuses its own crafted archive, with its own message.

Archives are built in memory with tarfile; a few come from GNU tar itself (sparse files,
long names, hard links), because that is what backups and imports really contain.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from migrator.core.errors import CorruptBackup, UnsafeArchive
from migrator.targuard import TarGuard, TarRules, check_tar

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


def rewritten(data: bytes, rules: TarRules | None = None, size: int = 1 << 20) -> bytes:
    guard = TarGuard(io.BytesIO(data), rules or TarRules())
    out = bytearray()
    while chunk := guard.read(size):
        out += chunk
    return bytes(out)


def members(data: bytes) -> list[tuple[str, bytes, str, bytes]]:
    """(name, type, link, content) of each member, as Python's tarfile reads them."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out.append((m.name, m.type, m.linkname, f.read() if f else b""))
    return out


def test_the_guard_rewrites_every_header_the_same_in_any_chunking() -> None:
    data = build(GOOD, fmt=tarfile.PAX_FORMAT)
    first = rewritten(data)
    for size in (1, 7, 512, 513, 10240):
        assert rewritten(data, size=size) == first
    assert first != data  # headers are our own, not the input's
    assert members(first) == [
        (n.removeprefix("./") or ".", t, (a.get("linkname", "") if t != tarfile.LNKTYPE
                                          else str(a["linkname"]).removeprefix("./")),
         a.get("data", b"")) for n, t, a in GOOD]  # type: ignore[misc]


def test_read_all_through_the_guard() -> None:
    data = build(GOOD)
    guard = TarGuard(io.BytesIO(data), TarRules(declared_bytes=2206))
    assert len(members(guard.read())) == len(GOOD)
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
         "member 'backup/container' appears twice in the archive"),
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
    guard = TarGuard(io.BytesIO(good + bad), TarRules(), chunk=512)
    passed = bytearray()
    with pytest.raises(UnsafeArchive, match="'../escape' climbs out"):
        while chunk := guard.read(512):
            passed += chunk
    assert b"escape" not in passed  # tar never saw the bad header
    assert b"motd" in passed


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
    from migrator.targuard import GnuTarInfo

    with tarfile.open(fileobj=io.BytesIO(hidden), tarinfo=GnuTarInfo) as t:
        assert t.getnames() == ["etc/passwd"]  # GNU tar's, and the checker's
    posix = build([entry("a/" * 60 + "f", data=b"x")], fmt=tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(posix), tarinfo=GnuTarInfo) as t:
        assert t.getnames() == ["a/" * 60 + "f"]  # a real ustar prefix still counts


# ----- header variants where parsers disagree: what is written is what was checked


def raw_header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "",
               fmt: int = tarfile.USTAR_FORMAT, **attrs: object) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def pax(records: list[tuple[str, bytes]], kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A pax header block by hand (duplicates and order as given)."""
    body = b""
    for key, value in records:
        rec = b" " + key.encode() + b"=" + value + b"\n"
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    head = raw_header("././@PaxHeader", kind, len(body))
    return head + body + bytes(-len(body) % 512)


def data(content: bytes) -> bytes:
    return content + bytes(-len(content) % 512)


END = bytes(1024)


def test_old_gnu_prefix_is_not_the_name_written() -> None:
    # the prefix field of an old-GNU header holds times for GNU tar; tarfile would read
    # "../../etc/passwd" where GNU tar reads "etc/passwd": the output says "etc/passwd"
    head = bytearray(raw_header("etc/passwd", size=1, fmt=tarfile.GNU_FORMAT))
    head[345:351] = b"../..\0"
    head[148:156] = b" " * 8
    head[148:155] = b"%06o\0" % sum(head)
    crafted = bytes(head) + data(b"x") + END
    with tarfile.open(fileobj=io.BytesIO(crafted)) as t:
        assert t.getnames() == ["../../etc/passwd"]  # the disagreement is real
    assert [m[0] for m in members(rewritten(crafted))] == ["etc/passwd"]


def test_a_pax_path_beside_a_sparse_name_is_refused_on_a_plain_file() -> None:
    crafted = (pax([("path", b"ok"), ("GNU.sparse.name", b"../../evil")])
               + raw_header("ok", size=1) + data(b"x") + END)
    with pytest.raises(UnsafeArchive, match="GNU sparse form other than 1.0"):
        rewritten(crafted)


def sparse10(name: bytes, path: bytes, regions: list[tuple[int, int]], realsize: int,
             stored: bytes) -> bytes:
    text = f"{len(regions)}\n".encode() + b"".join(f"{o}\n{n}\n".encode()
                                                  for o, n in regions)
    text += bytes(-len(text) % 512)
    return (pax([("path", path), ("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"),
                 ("GNU.sparse.name", name), ("GNU.sparse.realsize", str(realsize).encode())])
            + raw_header("GNUSparseFile.0/x", size=len(text) + len(stored))
            + data(text + stored))


def test_a_sparse_member_is_written_under_its_sparse_name_only() -> None:
    # GNU tar takes GNU.sparse.name, tarfile the last of the two: the output has one name
    ok = sparse10(b"data/f", b"../../evil", [(4096, 3)], 8192, b"abc") + END
    out = rewritten(ok, TarRules())
    assert members(out) == [("data/f", tarfile.REGTYPE, "", bytes(4096) + b"abc" + bytes(4093))]
    assert b"evil" not in out
    bad = sparse10(b"../../evil", b"ok", [(0, 3)], 3, b"abc") + END
    with pytest.raises(UnsafeArchive, match=r"member '../../evil' climbs out"):
        rewritten(bad)


def test_a_sparse_map_that_claims_more_than_its_data_is_refused() -> None:
    # GNU tar would read the map's bytes past the member, into what follows as "data"
    lying = sparse10(b"f", b"f", [(0, 512), (4096, 2048)], 8192, b"a" * 512) + END
    with pytest.raises(UnsafeArchive, match="stores 512 bytes but its map claims 2560"):
        rewritten(lying)
    overlap = sparse10(b"f", b"f", [(0, 512), (256, 512)], 8192, b"a" * 1024) + END
    with pytest.raises(UnsafeArchive, match="overlap, go backwards or pass its size"):
        rewritten(overlap)
    unaligned = sparse10(b"f", b"f", [(0, 3), (4096, 3)], 8192, b"abcdef") + END
    with pytest.raises(UnsafeArchive, match="ends inside a block before its last"):
        rewritten(unaligned)


def test_pax_linkpath_is_what_is_checked() -> None:
    crafted = (pax([("linkpath", b"../../../../etc")])
               + raw_header("l", tarfile.SYMTYPE, linkname="harmless") + END)
    with pytest.raises(UnsafeArchive, match="symlink 'l' points to '../../../../etc'"):
        rewritten(crafted)
    hard = (raw_header("f", size=1) + data(b"x") + pax([("linkpath", b"/etc/shadow")])
            + raw_header("h", tarfile.LNKTYPE, linkname="f") + END)
    with pytest.raises(UnsafeArchive, match="hard link 'h' points to the absolute path"):
        rewritten(hard)


@pytest.mark.parametrize("records", [[("path", b"../x")], [("uid", b"0")],
                                     [("linkpath", b"/")]])
def test_a_global_pax_header_that_changes_members_is_refused(
        records: list[tuple[str, bytes]]) -> None:
    crafted = pax(records, tarfile.XGLTYPE) + raw_header("f", size=1) + data(b"x") + END
    with pytest.raises(UnsafeArchive, match="pax global header that changes every later"):
        rewritten(crafted)


def test_a_global_comment_is_dropped() -> None:
    crafted = pax([("comment", b"git")], tarfile.XGLTYPE) + raw_header("f", size=1) \
        + data(b"x") + END
    out = rewritten(crafted)
    assert members(out) == [("f", tarfile.REGTYPE, "", b"x")]
    assert b"comment" not in out


@pytest.mark.parametrize(("crafted", "message"), [
    (pax([("path", b"a"), ("path", b"../b")]) + raw_header("a", size=1) + data(b"x"),
     "gives 'path' twice"),
    (pax([("path", b"a")]) + pax([("path", b"../b")]) + raw_header("a", size=1) + data(b"x"),
     "two pax headers for one member"),
    (raw_header("f", size=1) + data(b"1") + raw_header("f", size=1) + data(b"2"),
     "member 'f' appears twice"),
    (raw_header("d", tarfile.DIRTYPE) + raw_header("d", size=1) + data(b"2"),
     "member 'd' appears twice"),
    (pax([("path", b"f/")]) + raw_header("f", size=1) + data(b"1"),
     "is a file with a directory's name"),
    (pax([("path", b"a\0/../../x")]) + raw_header("a", size=1) + data(b"1"),
     "NUL character"),
    (pax([("size", b"0x10")]) + raw_header("a", size=1) + data(b"1"), "malformed pax size"),
])
def test_header_games_are_refused(crafted: bytes, message: str) -> None:
    with pytest.raises((UnsafeArchive, CorruptBackup), match=message):
        rewritten(crafted + END)


def test_a_hard_link_to_a_symlink_is_a_symlink_too() -> None:
    # link(2) on a symlink makes a second symlink: going through it must be refused too
    crafted = (raw_header("s", tarfile.SYMTYPE, linkname="/etc")
               + raw_header("h", tarfile.LNKTYPE, linkname="s")
               + raw_header("h/passwd", size=1) + data(b"x") + END)
    with pytest.raises(UnsafeArchive, match="'h/passwd' goes through the symlink 'h'"):
        rewritten(crafted)


def test_base256_owner_is_written_as_a_plain_number() -> None:
    head = bytearray(raw_header("f", size=1, fmt=tarfile.GNU_FORMAT))
    head[108:116] = b"\x80" + (100000).to_bytes(7, "big")
    head[148:156] = b" " * 8
    head[148:155] = b"%06o\0" % sum(head)
    out = rewritten(bytes(head) + data(b"x") + END)
    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        assert t.getmembers()[0].uid == 100000
    assert out[108:116] == b"0303240\0"  # octal, as every tar reads it


def test_devices_in_an_image_only_the_standard_ones() -> None:
    rules = TarRules(root="rootfs", standard_devices=True)
    ok = raw_header("rootfs", tarfile.DIRTYPE) + raw_header(
        "rootfs/dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666) + END
    assert members(rewritten(ok, rules))[1][:2] == ("rootfs/dev/null", tarfile.CHRTYPE)
    for name, major, minor, mode in [("rootfs/dev/null", 8, 0, 0o666),
                                     ("rootfs/dev/sda", 8, 0, 0o600),
                                     ("rootfs/dev/null", 1, 3, 0o4666)]:
        bad = raw_header(name, tarfile.CHRTYPE, devmajor=major, devminor=minor,
                         mode=mode) + END
        with pytest.raises(UnsafeArchive, match="an image may only hold"):
            rewritten(bad, rules)
    elsewhere = raw_header("rootfs/tmp/null", tarfile.CHRTYPE, devmajor=1, devminor=3) + END
    with pytest.raises(UnsafeArchive, match="device nodes are refused"):
        rewritten(elsewhere, rules)


def _old_gnu_symlink(outside: str) -> bytes:
    head = bytearray(raw_header("etc", tarfile.SYMTYPE, linkname=outside,
                                fmt=tarfile.GNU_FORMAT))
    head[345:354] = b"innocent\0"  # tarfile would call it innocent/etc
    head[148:156] = b" " * 8
    head[148:155] = b"%06o\0" % sum(head)
    return bytes(head) + raw_header("etc/x", size=1) + data(b"x")


HOSTILE: dict[str, Callable[[str], bytes]] = {
    "old-gnu prefix": _old_gnu_symlink,
    "through a symlink": lambda out: raw_header("etc", tarfile.SYMTYPE, linkname=out)
    + raw_header("etc/x", size=1) + data(b"x"),
    "symlink via pax": lambda out: raw_header("d", tarfile.DIRTYPE)
    + pax([("linkpath", b"../../outside")]) + raw_header("d/l", tarfile.SYMTYPE, linkname="ok"),
    "traversal via pax": lambda out: pax([("path", b"../outside/x")])
    + raw_header("x", size=1) + data(b"x"),
    "sparse name": lambda out: sparse10(b"../outside/x", b"ok", [(0, 1)], 1, b"x"),
    "hard link out": lambda out: raw_header("h", tarfile.LNKTYPE, linkname="../outside/x"),
    "hard link to a symlink": lambda out: raw_header("s", tarfile.SYMTYPE, linkname=out)
    + raw_header("h", tarfile.LNKTYPE, linkname="s") + raw_header("h/x", size=1) + data(b"x"),
    "long name": lambda out: raw_header("../" * 40 + "outside/x", size=1,
                                        fmt=tarfile.GNU_FORMAT) + data(b"x"),
    "device node": lambda out: raw_header("mem", tarfile.CHRTYPE, devmajor=1, devminor=1,
                                          mode=0o666),
    "global path": lambda out: pax([("path", b"../outside/x")], tarfile.XGLTYPE)
    + raw_header("x", size=1) + data(b"x"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="GNU tar extracts as root in production")
@pytest.mark.parametrize("name", list(HOSTILE))
def test_gnu_tar_writes_nothing_outside_from_what_the_guard_passes(
        tmp_path: Path, name: str) -> None:
    # whatever the guard let through before refusing (or all of it) goes to real GNU tar,
    # as root, the way a restore runs it: nothing may appear beside the target
    target, outside = tmp_path / "a" / "target", tmp_path / "a" / "outside"
    target.mkdir(parents=True)
    outside.mkdir()
    (outside / "x").write_text("host file\n")
    crafted = HOSTILE[name](str(outside)) + raw_header("after", size=1) + data(b"x") + END
    guard = TarGuard(io.BytesIO(crafted), TarRules(), chunk=512)
    passed = bytearray()
    try:
        while chunk := guard.read(512):
            passed += chunk
    except UnsafeArchive:
        pass
    subprocess.run(["tar", "-x", "--numeric-owner", "--same-owner", "-C", str(target)],
                   input=bytes(passed) + END, capture_output=True, check=False)
    assert sorted(p.name for p in outside.iterdir()) == ["x"]
    assert (outside / "x").read_text() == "host file\n"
    assert not (target / "after").exists()  # the guard stopped the archive there
    # GNU tar alone refuses most of these itself, but it makes the device node
    assert not any(stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode)
                   for p in target.rglob("*"))


@pytest.mark.parametrize("options", [["-S"], ["-S", "--format=posix"], ["--format=gnu", "-S"]])
def test_gnu_tar_reads_the_rewritten_archive_back_exactly(
        tmp_path: Path, options: list[str]) -> None:
    _gnu_tar(tmp_path)  # builds the tree
    root = tmp_path / "root"
    posix = "--format=posix" in options
    xattrs = ["--xattrs", "--xattrs-include=*"] if posix else []
    if posix:
        os.setxattr(root / "sparse", "user.note", b"\xff\x00binary")
    original = subprocess.run(["tar", "-C", str(root), *xattrs, *options, "-cf", "-", "."],
                              check=True, capture_output=True).stdout
    out = rewritten(original)
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(["tar", "-x", *xattrs, "--numeric-owner", "-C", str(dest)], input=out,
                   check=True, capture_output=True)
    if posix:
        assert os.getxattr(dest / "sparse", "user.note") == b"\xff\x00binary"
    for p in sorted(root.rglob("*")):
        q = dest / p.relative_to(root)
        a, b = os.lstat(p), os.lstat(q)
        assert (a.st_mode, a.st_size, a.st_uid) == (b.st_mode, b.st_size, b.st_uid), p
        if posix:
            assert a.st_mtime_ns == b.st_mtime_ns, p  # pax times kept to the nanosecond
        if p.is_file() and not p.is_symlink():
            assert p.read_bytes() == q.read_bytes()
    sparse = dest / "sparse"
    assert sparse.stat().st_blocks * 512 < 1_000_000  # holes stayed holes
    assert os.stat(dest / "hard").st_ino == os.stat(
        dest / ("d" * 120) / ("e" * 120) / ("f" * 150)).st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="GNU tar extracts as root in production")
def test_a_delta_cannot_go_through_a_symlink_already_in_the_tree(tmp_path: Path) -> None:
    # a restore applies a delta on the tree the points before it made, where an earlier
    # (checked, absolute, hence allowed) symlink may sit: GNU tar follows it
    outside = tmp_path / "outside"
    outside.mkdir()
    crafted = raw_header("rootfs/etc/cron.d", size=1) + data(b"x") + END
    naive = tmp_path / "naive"
    (naive / "rootfs").mkdir(parents=True)
    (naive / "rootfs/etc").symlink_to(outside)
    subprocess.run(["tar", "-x", "-C", str(naive)], input=crafted, check=True)
    assert (outside / "cron.d").exists()  # the attack is real without the check
    (outside / "cron.d").unlink()

    target = tmp_path / "target"
    (target / "rootfs").mkdir(parents=True)
    (target / "rootfs/etc").symlink_to(outside)
    rules = TarRules(root="rootfs", existing=str(target))
    with pytest.raises(UnsafeArchive, match="'rootfs/etc', a symlink already in the tree"):
        rewritten(crafted, rules)
    assert list(outside.iterdir()) == []
    # a directory member of the same archive replaces the symlink first (GNU tar does)
    replaced = raw_header("rootfs/etc", tarfile.DIRTYPE) + crafted
    assert [m[0] for m in members(rewritten(replaced, rules))] == ["rootfs/etc",
                                                                    "rootfs/etc/cron.d"]
    (target / "rootfs/etc").unlink()
    (target / "rootfs/etc").mkdir()
    assert len(members(rewritten(crafted, rules))) == 1
