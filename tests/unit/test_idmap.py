"""migrator.runtime.idmap: subordinate id ranges and on-disk uid shifting (plain files in
tmp_path)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from migrator.core.errors import InvalidInput, MissingDependency
from migrator.runtime import idmap
from migrator.runtime.idmap import IdMap, default_idmap, parse_subid, shift_tree

DELTA = 100000
UNDEF = 0xFFFFFFFF
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_entries(value: bytes) -> list[tuple[int, int, int]]:
    assert struct.unpack_from("<I", value, 0)[0] == 2
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


# parse_subid / default_idmap ----------------------------------------------------------------------
def test_parse_subid_first_root_range() -> None:
    text = "alice:100000:65536\nroot:200000:1000000000\nroot:5:5\n"
    assert parse_subid(text) == (200000, 1000000000)
    assert parse_subid(text, "alice") == (100000, 65536)


def test_parse_subid_missing_or_malformed() -> None:
    assert parse_subid("") is None
    assert parse_subid("alice:1:2\n") is None
    assert parse_subid("root:x:65536\nroot:1:2:3\n") is None
    assert parse_subid("root:abc:65536\n root:7:65536 \n") == (7, 65536)


def test_default_idmap_good(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("root:100000:1000000000\n")
    (tmp_path / "subgid").write_text("daemon:1:1\nroot:100000:65536\n")
    m = default_idmap(tmp_path / "subuid", tmp_path / "subgid")
    assert m == IdMap(100000, 65536)
    assert m.lxc_lines() == ["lxc.idmap = u 0 100000 65536", "lxc.idmap = g 0 100000 65536"]


def test_default_idmap_range_too_small(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("root:100000:65535\n")
    (tmp_path / "subgid").write_text("root:100000:65536\n")
    with pytest.raises(MissingDependency) as ei:
        default_idmap(tmp_path / "subuid", tmp_path / "subgid")
    assert str(tmp_path / "subuid") in str(ei.value)
    assert ei.value.hint


def test_default_idmap_missing_files(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("root:100000:65536\n")
    with pytest.raises(MissingDependency) as ei:
        default_idmap(tmp_path / "subuid", tmp_path / "nope")
    assert "nope" in str(ei.value)


def test_default_idmap_no_root_line(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    (tmp_path / "subgid").write_text("alice:100000:65536\n")
    with pytest.raises(MissingDependency):
        default_idmap(tmp_path / "subuid", tmp_path / "subgid")


def test_default_idmap_mismatched_starts(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("root:100000:65536\n")
    (tmp_path / "subgid").write_text("root:300000:65536\n")
    with pytest.raises(InvalidInput):
        default_idmap(tmp_path / "subuid", tmp_path / "subgid")


# shift_tree ---------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "home/user").mkdir(parents=True)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "etc/hostname").write_text("c1\n")
    (root / "home/user/file").write_text("data")
    os.chown(root / "home/user", 1000, 1000)
    os.chown(root / "home/user/file", 1000, 1001)
    su = root / "su"
    su.write_text("#!/bin/sh\n")
    os.chmod(su, 0o4755)
    sg = root / "sg"
    sg.write_text("#!/bin/sh\n")
    os.chmod(sg, 0o2755)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o2775)
    (root / "link").symlink_to("/etc/passwd")  # absolute, pointing outside: must not follow
    os.lchown(root / "link", 5, 6)
    (root / "dangling").symlink_to("nowhere")
    os.setxattr(
        root / "home/user/file",
        "system.posix_acl_access",
        acl(
            (ACL_USER_OBJ, 6, UNDEF),
            (ACL_USER, 6, 1000),
            (ACL_GROUP_OBJ, 4, UNDEF),
            (ACL_GROUP, 4, 1001),
            (ACL_MASK, 6, UNDEF),
            (ACL_OTHER, 4, UNDEF),
        ),
    )
    os.setxattr(
        root / "shared",
        "system.posix_acl_default",
        acl(
            (ACL_USER_OBJ, 7, UNDEF),
            (ACL_GROUP_OBJ, 5, UNDEF),
            (ACL_GROUP, 7, 50),
            (ACL_MASK, 7, UNDEF),
            (ACL_OTHER, 5, UNDEF),
        ),
    )
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (st.st_uid, st.st_gid, st.st_mode)
    return out


def test_shift_tree_shifts_every_owner(tree: Path) -> None:
    before = snapshot(tree)
    n = shift_tree(tree, DELTA)
    assert n == len(before)
    after = snapshot(tree)
    assert after.keys() == before.keys()
    for rel, (uid, gid, mode) in before.items():
        assert after[rel] == (uid + DELTA, gid + DELTA, mode), rel
    assert owner(tree / "home/user/file") == (1000 + DELTA, 1001 + DELTA)
    assert owner(tree / "link") == (5 + DELTA, 6 + DELTA)


def test_shift_tree_does_not_follow_symlinks(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("x")
    (tree / "out").symlink_to(outside)
    (tree / "outdir").symlink_to(tmp_path)
    shift_tree(tree, DELTA)
    assert owner(outside) == (0, 0)
    assert owner(tmp_path) == (0, 0)
    assert owner(tree / "out") == (DELTA, DELTA)
    assert owner(tree / "outdir") == (DELTA, DELTA)


def test_shift_tree_keeps_setuid_setgid_and_sticky(tree: Path) -> None:
    shift_tree(tree, DELTA)
    assert stat.S_IMODE(os.lstat(tree / "su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(tree / "sg").st_mode) == 0o2755
    assert stat.S_IMODE(os.lstat(tree / "shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(tree / "tmp").st_mode) == 0o1777


def test_shift_tree_shifts_acl_entries(tree: Path) -> None:
    shift_tree(tree, DELTA)
    entries = acl_entries(os.getxattr(tree / "home/user/file", "system.posix_acl_access"))
    by_tag = {tag: (perm, ident) for tag, perm, ident in entries}
    assert by_tag[ACL_USER] == (6, 1000 + DELTA)
    assert by_tag[ACL_GROUP] == (4, 1001 + DELTA)
    # entries without an id stay undefined
    assert by_tag[ACL_USER_OBJ] == (6, UNDEF)
    assert by_tag[ACL_MASK] == (6, UNDEF)
    dflt = acl_entries(os.getxattr(tree / "shared", "system.posix_acl_default"))
    assert (ACL_GROUP, 7, 50 + DELTA) in dflt


def test_shift_acl_user_entry_spec_example(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    os.setxattr(
        f,
        "system.posix_acl_access",
        acl(
            (ACL_USER_OBJ, 6, UNDEF),
            (ACL_USER, 6, 1000),
            (ACL_GROUP_OBJ, 4, UNDEF),
            (ACL_MASK, 6, UNDEF),
            (ACL_OTHER, 4, UNDEF),
        ),
    )
    assert shift_tree(f, 65536) == 1
    entries = acl_entries(os.getxattr(f, "system.posix_acl_access"))
    assert [e for e in entries if e[0] == ACL_USER] == [(ACL_USER, 6, 1000 + 65536)]
    assert owner(f) == (65536, 65536)


def test_shift_back_restores_everything(tree: Path) -> None:
    before = snapshot(tree)
    acl_before = os.getxattr(tree / "home/user/file", "system.posix_acl_access")
    dflt_before = os.getxattr(tree / "shared", "system.posix_acl_default")
    shift_tree(tree, DELTA)
    assert snapshot(tree) != before
    shift_tree(tree, -DELTA)
    assert snapshot(tree) == before
    assert os.getxattr(tree / "home/user/file", "system.posix_acl_access") == acl_before
    assert os.getxattr(tree / "shared", "system.posix_acl_default") == dflt_before


def test_shift_by_zero_is_a_no_op(tree: Path) -> None:
    before = snapshot(tree)
    assert shift_tree(tree, 0) == 0
    assert snapshot(tree) == before


def test_shift_below_zero_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(InvalidInput) as ei:
        shift_tree(f, -1)
    assert "cannot be shifted" in str(ei.value)
    assert owner(f) == (0, 0)


def test_shift_acl_pure_function() -> None:
    v = acl((ACL_USER_OBJ, 7, UNDEF), (ACL_USER, 5, 10), (ACL_GROUP, 1, 20), (ACL_OTHER, 0, UNDEF))
    shifted = idmap._shift_acl(v, 3)
    assert acl_entries(shifted) == [
        (ACL_USER_OBJ, 7, UNDEF),
        (ACL_USER, 5, 13),
        (ACL_GROUP, 1, 23),
        (ACL_OTHER, 0, UNDEF),
    ]
    assert idmap._shift_acl(shifted, -3) == v


def test_shift_tree_hard_links_shifted_once(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_text("x")
    os.link(root / "a", root / "b")
    shift_tree(root, DELTA)
    assert owner(root / "a") == (DELTA, DELTA)


def test_shift_acl_out_of_range_is_refused_cleanly(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    os.chown(f, DELTA, DELTA)
    os.setxattr(
        f,
        "system.posix_acl_access",
        acl(
            (ACL_USER_OBJ, 6, UNDEF),
            (ACL_USER, 6, 1000),
            (ACL_GROUP_OBJ, 4, UNDEF),
            (ACL_MASK, 6, UNDEF),
            (ACL_OTHER, 4, UNDEF),
        ),
    )
    with pytest.raises(InvalidInput):
        shift_tree(f, -DELTA)
    assert owner(f) == (DELTA, DELTA)
