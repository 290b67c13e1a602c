"""migrator.runtime.images: archive validation on tarballs built in tmp_path, and import end to
end."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
import zstandard

from migrator.core.errors import ImageError, InvalidInput, NotFound
from migrator.runtime.images import ImageStore, validate_archive
from migrator.runtime.state import StateStore

METADATA = {
    "architecture": "x86_64",
    "creation_date": 1700000000,
    "properties": {"os": "busybox", "release": "static", "description": "test"},
}

Entry = Callable[[tarfile.TarFile], None]


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = mode
        tar.addfile(ti, io.BytesIO(data))

    return add


def dir_(name: str, mode: int = 0o755) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE
        ti.mode = mode
        tar.addfile(ti)

    return add


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.linkname = target
        tar.addfile(ti)

    return add


def chrdev(name: str, major: int = 1, minor: int = 3) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = major, minor
        ti.mode = 0o666
        tar.addfile(ti)

    return add


def meta(doc: object = METADATA) -> Entry:
    return reg("metadata.yaml", yaml.safe_dump(doc).encode())


def base() -> list[Entry]:
    return [meta(), dir_("rootfs"), dir_("rootfs/etc"), reg("rootfs/etc/hostname", b"c1\n")]


def build(path: Path, entries: list[Entry], compress: str = "") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in entries:
            e(tar)
    raw = buf.getvalue()
    if compress == "gz":
        raw = gzip.compress(raw)
    elif compress == "zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


# good archives ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compress,suffix", [("", ".tar"), ("gz", ".tar.gz"), ("zst", ".tar.zst")])
def test_good_archive_returns_metadata(tmp_path: Path, compress: str, suffix: str) -> None:
    p = build(tmp_path / f"img{suffix}", base(), compress)
    content = validate_archive(p)
    assert content.metadata == METADATA
    assert content.members == 4
    assert content.size == len(yaml.safe_dump(METADATA).encode()) + 3


def test_good_archive_with_templates_links_and_dev(tmp_path: Path) -> None:
    p = build(
        tmp_path / "img.tar",
        [
            dir_("./"),
            meta(),
            dir_("./rootfs"),
            dir_("rootfs/bin"),
            reg("rootfs/bin/busybox", b"\x7fELF", 0o755),
            link("rootfs/bin/sh", "busybox"),
            link("rootfs/bin/ls", "/bin/busybox"),
            link("rootfs/bin/true", "rootfs/bin/busybox", tarfile.LNKTYPE),
            dir_("rootfs/dev"),
            chrdev("rootfs/dev/null"),
            dir_("templates"),
            reg("templates/hosts.tpl", b"127.0.0.1 {{ name }}\n"),
        ],
    )
    content = validate_archive(p)
    assert content.metadata["properties"]["os"] == "busybox"
    assert content.members == 12


# rejected archives ------------------------------------------------------------------------------
def reject(path: Path, match: str | None = None) -> ImageError:
    with pytest.raises(ImageError) as ei:
        validate_archive(path)
    if match:
        assert match in str(ei.value), str(ei.value)
    return ei.value


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_rejects_dotdot(tmp_path: Path, compress: str) -> None:
    reject(build(tmp_path / "a", [*base(), reg("../evil", b"x")], compress), "climbs out")


def test_rejects_dotdot_inside(tmp_path: Path) -> None:
    reject(build(tmp_path / "a", [*base(), reg("rootfs/../../evil", b"x")]), "climbs out")


def test_rejects_absolute(tmp_path: Path) -> None:
    e = reject(build(tmp_path / "a", [*base(), reg("/etc/passwd", b"x")]), "absolute path")
    assert "nothing was extracted" in e.hint


def test_rejects_member_under_symlink(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [*base(), link("rootfs/x", "/etc"), reg("rootfs/x/passwd", b"x")])
    reject(p, "goes through the symlink 'rootfs/x'")


def test_rejects_member_under_relative_symlink(tmp_path: Path) -> None:
    p = build(
        tmp_path / "a",
        [*base(), link("rootfs/up", "../.."), dir_("rootfs/up/d"), reg("rootfs/up/d/f", b"x")],
    )
    reject(p, "climbs out of the rootfs")


def test_rejects_rootfs_itself_a_symlink(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [meta(), link("rootfs", "/"), reg("rootfs/etc/shadow", b"x")])
    reject(p, "member 'rootfs' is a symlink; it must be a directory")


def test_rejects_hardlink_to_unknown_name(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [*base(), link("rootfs/shadow", "etc/shadow", tarfile.LNKTYPE)])
    reject(p, "hard link")


def test_rejects_hardlink_to_later_member(tmp_path: Path) -> None:
    p = build(
        tmp_path / "a",
        [
            meta(),
            dir_("rootfs"),
            link("rootfs/a", "rootfs/b", tarfile.LNKTYPE),
            reg("rootfs/b", b"x"),
        ],
    )
    reject(p, "hard link")


def test_rejects_hardlink_escaping(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [*base(), link("rootfs/x", "../../etc/passwd", tarfile.LNKTYPE)])
    reject(p, "climbs out")


@pytest.mark.parametrize("name", ["rootfs/etc/null", "rootfs/devx/null", "rootfs/dev"])
def test_rejects_char_device_outside_dev(tmp_path: Path, name: str) -> None:
    reject(build(tmp_path / "a", [*base(), chrdev(name)]), "device node")


def test_rejects_block_device_outside_dev(tmp_path: Path) -> None:
    def blk(tar: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo("rootfs/sda")
        ti.type = tarfile.BLKTYPE
        ti.devmajor, ti.devminor = 8, 0
        tar.addfile(ti)

    reject(build(tmp_path / "a", [*base(), blk]), "device node")


def test_rejects_unexpected_top_level(tmp_path: Path) -> None:
    reject(build(tmp_path / "a", [*base(), reg("etc/passwd", b"x")]), "outside the allowed parts")


def test_rejects_no_metadata(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [dir_("rootfs"), reg("rootfs/etc/hostname", b"c1\n")])
    reject(p, "no metadata.yaml")


@pytest.mark.parametrize("doc", [["a", "list"], "a string", 42, None])
def test_rejects_metadata_not_a_mapping(tmp_path: Path, doc: object) -> None:
    reject(build(tmp_path / "a", [meta(doc), dir_("rootfs")]), "mapping")


def test_rejects_metadata_bad_yaml(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [reg("metadata.yaml", b"a: [unclosed\n"), dir_("rootfs")])
    reject(p, "not valid YAML")


def test_rejects_metadata_not_regular_file(tmp_path: Path) -> None:
    p = build(tmp_path / "a", [link("metadata.yaml", "/etc/passwd"), dir_("rootfs")])
    reject(p, "metadata.yaml")


def test_rejects_no_rootfs(tmp_path: Path) -> None:
    reject(build(tmp_path / "a", [meta(), dir_("templates")]), "no rootfs")


def test_rejects_garbage_bytes(tmp_path: Path) -> None:
    p = tmp_path / "garbage.tar"
    p.write_bytes(bytes(range(256)) * 64)
    reject(p, "damaged header at offset 0")


def test_rejects_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.tar"
    p.write_bytes(b"")
    reject(p)


def test_rejects_garbage_with_zstd_magic(tmp_path: Path) -> None:
    p = tmp_path / "fake.tar.zst"
    p.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4000))
    reject(p)


def test_rejects_truncated_gzip_cut_in_half(tmp_path: Path) -> None:
    p = build(tmp_path / "a.tar.gz", base(), "gz")
    data = p.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    reject(cut, "not a readable image archive")


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_rejects_archive_cut_inside_member_data(tmp_path: Path, compress: str) -> None:
    p = build(tmp_path / "a", [*base(), reg("rootfs/blob", os.urandom(8192))], compress)
    data = p.read_bytes()
    cut = tmp_path / "cut"
    # metadata.yaml, rootfs/, rootfs/etc/, hostname: 6 blocks, then the blob's header and
    # part of its data; compressed archives are cut in the middle of the incompressible blob
    end = 6 * 512 + 512 + 4096 if compress == "" else len(data) // 2
    cut.write_bytes(data[:end])
    reject(cut)


TRUNCATION_BUG = (
    "tarfile in stream mode ends iteration silently when the data stops at a "
    "header boundary (no end-of-archive blocks, gzip stream without trailer), so "
    "validate_archive accepts an archive that lost members "
    "(runtime/images.py validate_archive)"
)


@pytest.mark.parametrize("extra", [0, 1, 100])
def test_rejects_plain_tar_cut_near_a_header_boundary(tmp_path: Path, extra: int) -> None:
    p = build(tmp_path / "a.tar", [*base(), reg("rootfs/etc/passwd", b"root:x:0:0::/:/bin/sh\n")])
    assert validate_archive(p).members == 5
    cut = tmp_path / "cut.tar"
    # metadata.yaml (header + 1 block) and rootfs/ (header): 3 blocks, then part of a header
    cut.write_bytes(p.read_bytes()[: 3 * 512 + extra])
    reject(cut)


def test_rejects_gzip_cut_at_a_header_boundary(tmp_path: Path) -> None:
    raw = build(tmp_path / "a.tar", base()).read_bytes()
    comp = zlib.compressobj(wbits=31)  # gzip container
    head = comp.compress(raw[:1536]) + comp.flush(zlib.Z_SYNC_FLUSH)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(head)  # a gzip stream with no end: gzip -t calls it truncated
    with pytest.raises(EOFError):
        gzip.decompress(head)
    reject(cut)


def test_rejects_zstd_cut_at_a_header_boundary(tmp_path: Path) -> None:
    raw = build(tmp_path / "a.tar", base()).read_bytes()
    cctx = zstandard.ZstdCompressor().compressobj()
    head = cctx.compress(raw[:1536]) + cctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(head)
    reject(cut)


def test_rejects_gzip_cut_inside_its_header(tmp_path: Path) -> None:
    data = build(tmp_path / "a.tar.gz", base(), "gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[:3])
    reject(cut)


# ImageStore.import_file -------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    images = tmp_path / "images"
    images.mkdir()
    state = StateStore(tmp_path / "s.db")
    yield ImageStore(images, state)
    state.close()


def test_import_file_end_to_end(tmp_path: Path, store: ImageStore) -> None:
    p = build(
        tmp_path / "img.tar.gz",
        [
            *base(),
            dir_("rootfs/bin"),
            reg("rootfs/bin/tool", b"#!/bin/sh\n", 0o4755),
            link("rootfs/bin/t2", "tool"),
        ],
        "gz",
    )
    fp = hashlib.sha256(p.read_bytes()).hexdigest()
    rec = store.import_file(p, "test/img")
    assert rec.fingerprint == fp
    assert rec.alias == "test/img"
    assert rec.size == p.stat().st_size
    assert rec.properties["os"] == "busybox"
    assert rec.properties["init"] == "busybox"  # derived from os
    rootfs = store.rootfs(fp)
    assert (rootfs / "etc/hostname").read_text() == "c1\n"
    assert os.readlink(rootfs / "bin/t2") == "tool"
    assert os.stat(rootfs / "bin/tool").st_mode & 0o7777 == 0o4755
    assert store.tarball(fp).read_bytes() == p.read_bytes()
    assert store.tarball(fp).stat().st_mode & 0o777 == 0o600
    assert (store.dir / fp).stat().st_mode & 0o777 == 0o700  # not for local users
    assert sorted(x.name for x in store.dir.iterdir()) == sorted([fp, f"{fp}.tar"])
    assert store.find("test/img").fingerprint == fp
    assert [r.fingerprint for r in store.list()] == [fp]


def test_import_zstd(tmp_path: Path, store: ImageStore) -> None:
    p = build(tmp_path / "img.tar.zst", base(), "zst")
    rec = store.import_file(p, None)
    assert rec.alias is None
    assert rec.properties["init"] == "busybox"
    assert (store.rootfs(rec.fingerprint) / "etc/hostname").read_text() == "c1\n"


def test_import_defaults_init_to_systemd(tmp_path: Path, store: ImageStore) -> None:
    doc = {"properties": {"os": "debian", "release": "bookworm"}}
    p = build(tmp_path / "img.tar", [meta(doc), dir_("rootfs")])
    assert store.import_file(p, "debian/bookworm").properties["init"] == "systemd"


def test_import_same_file_twice_is_idempotent(tmp_path: Path, store: ImageStore) -> None:
    p = build(tmp_path / "img.tar", base())
    a = store.import_file(p, "x")
    b = store.import_file(p, "x")
    assert a.fingerprint == b.fingerprint
    assert len(store.list()) == 1
    assert len(list(store.dir.iterdir())) == 2


@pytest.mark.parametrize(
    "evil",
    [
        lambda out: [reg("../evil", b"x")],
        lambda out: [reg(f"{out}/evil", b"x")],  # absolute
        lambda out: [link("rootfs/x", str(out)), reg("rootfs/x/evil", b"x")],
        lambda out: [link("rootfs/h", f"{out}/evil", tarfile.LNKTYPE)],
        lambda out: [dir_("rootfs/dev"), chrdev("rootfs/evil")],
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_import_malicious_extracts_nothing(
    tmp_path: Path, store: ImageStore, evil: Callable[[Path], list[Entry]]
) -> None:
    out = tmp_path / "outside"
    out.mkdir()
    p = build(tmp_path / "evil.tar", [*base(), *evil(out)])
    with pytest.raises(ImageError):
        store.import_file(p, "evil")
    assert list(store.dir.iterdir()) == []
    assert store.list() == []
    assert list(out.iterdir()) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "evil.tar",
        "images",
        "outside",
        "s.db",
        "s.db-shm",
        "s.db-wal",
    ]


def test_import_missing_file(tmp_path: Path, store: ImageStore) -> None:
    with pytest.raises(NotFound):
        store.import_file(tmp_path / "nope.tar", None)


def test_import_bad_alias_checked_first(tmp_path: Path, store: ImageStore) -> None:
    p = build(tmp_path / "img.tar", base())
    with pytest.raises(InvalidInput):
        store.import_file(p, "../x")
    assert list(store.dir.iterdir()) == []


def test_delete_image(tmp_path: Path, store: ImageStore) -> None:
    p = build(tmp_path / "img.tar", base())
    rec = store.import_file(p, "x")
    store.delete("x")
    assert list(store.dir.iterdir()) == []
    with pytest.raises(NotFound):
        store.find(rec.fingerprint)


def test_import_reads_the_file_once_so_a_swap_changes_nothing(
        tmp_path: Path, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # the file is replaced by a hostile one right after the import opened it: the check,
    # the fingerprint and the unpack all see the bytes read through that one open
    good = build(tmp_path / "img.tar", base())
    fp = hashlib.sha256(good.read_bytes()).hexdigest()
    evil = build(tmp_path / "evil.tar", [*base(), dir_("rootfs/dev"), chrdev("rootfs/dev/sda",
                                                                             8, 0)])
    real_open = os.open
    opened: list[str] = []

    def open_then_swap(path: object, *args: object, **kw: object) -> int:
        fd = real_open(path, *args, **kw)  # type: ignore[arg-type]
        if str(path) == str(good):
            opened.append(str(path))
            os.replace(evil, good)
        return fd

    monkeypatch.setattr("migrator.runtime.images.os.open", open_then_swap)
    rec = store.import_file(good, "x")
    assert opened == [str(good)]
    assert rec.fingerprint == fp
    assert not (store.rootfs(fp) / "dev/sda").exists()
    assert hashlib.sha256(store.tarball(fp).read_bytes()).hexdigest() == fp


def test_import_refuses_a_symlink_or_a_device_as_the_file(
        tmp_path: Path, store: ImageStore) -> None:
    good = build(tmp_path / "img.tar", base())
    (tmp_path / "link.tar").symlink_to(good)
    with pytest.raises(ImageError, match="cannot be opened"):
        store.import_file(tmp_path / "link.tar", None)
    with pytest.raises(ImageError, match="not a regular file"):
        store.import_file(Path("/dev/null"), None)
    assert list(store.dir.iterdir()) == []


@pytest.mark.parametrize(("entries", "message"), [
    ([dir_("rootfs/dev"), chrdev("rootfs/dev/sda", 8, 0)], "an image may only hold"),
    ([dir_("rootfs/dev"), chrdev("rootfs/dev/null", 8, 0)], "character device 8:0"),
    ([dir_("rootfs/dev"), chrdev("rootfs/dev/kmsg", 1, 11)], "an image may only hold"),
])
def test_only_the_standard_devices_pass(tmp_path: Path, entries: list[Entry],
                                        message: str) -> None:
    reject(build(tmp_path / "a", [*base(), *entries]), message)


def test_unpack_itself_goes_through_the_guard(tmp_path: Path) -> None:
    # not only the check before it: the unpack refuses on its own, and tar never sees it
    from migrator.runtime.images import unpack

    out = tmp_path / "outside"
    out.mkdir()
    p = build(tmp_path / "a", [*base(), link("rootfs/x", str(out)), reg("rootfs/x/evil", b"x"),
                               reg("rootfs/after", b"x")])
    dest = tmp_path / "dest"
    with open(p, "rb") as f, pytest.raises(ImageError, match="goes through the symlink"):
        unpack(f, dest, p)
    assert list(out.iterdir()) == []
    assert not (dest / "rootfs/after").exists()


def test_an_alias_bomb_in_metadata_is_refused_fast(tmp_path: Path) -> None:
    bomb = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
        b"%c: &%c [%s]\n" % (98 + i, 98 + i, b",".join([b"*%c" % (97 + i)] * 9))
        for i in range(8))
    assert len(bomb) < 1024
    p = build(tmp_path / "a", [reg("metadata.yaml", bomb), dir_("rootfs")])
    reject(p, "YAML aliases expand the document beyond")
