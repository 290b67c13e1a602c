"""File-level deltas: the change rule, hard-link groups, parents, and safe removal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migrator.backup.delta import Manifest, decode_paths, diff, encode_paths, remove_paths, scan
from migrator.core.errors import CorruptBackup, UnsafeArchive


def tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a").write_text("aaa")
    (root / "d" / "sub" / "b").write_text("bbb")
    (root / "keep").write_text("k")
    os.link(root / "keep", root / "keep-link")
    os.symlink("d/a", root / "ln")
    os.utime(root / "d" / "a", ns=(10**18, 10**18))


def test_unchanged_tree_has_an_empty_delta(tmp_path: Path) -> None:
    tree(tmp_path)
    d = diff(scan(tmp_path), scan(tmp_path))
    assert (d.members, d.deleted, d.bytes) == ([], [], 0)


def test_changes_new_deleted_and_type_changes(tmp_path: Path) -> None:
    tree(tmp_path)
    old = Manifest.from_bytes(scan(tmp_path).to_bytes(), "t")  # through JSON, as stored
    a = tmp_path / "d" / "a"
    a.write_text("AAA")  # same size ...
    os.utime(a, ns=(10**18 + 1, 10**18 + 1))  # ... a nanosecond later: changed
    (tmp_path / "d" / "sub" / "b").unlink()
    (tmp_path / "d" / "sub").rmdir()
    (tmp_path / "ln").unlink()
    (tmp_path / "ln").mkdir()  # a symlink became a directory
    (tmp_path / "new").write_text("n" * 10)
    d = diff(old, scan(tmp_path))
    assert "d/a" in d.members and "new" in d.members and "ln" in d.members
    assert "d" in d.members  # the parent of a changed entry, for its mtime
    assert d.deleted == ["d/sub", "ln"]  # d/sub/b is inside d/sub: one removal covers it
    assert "keep" not in d.members
    assert d.bytes == 3 + 10  # regular-file bytes of the members (the progress total)


def test_a_new_hard_link_brings_its_whole_inode(tmp_path: Path) -> None:
    tree(tmp_path)
    old = scan(tmp_path)
    os.link(tmp_path / "keep", tmp_path / "d" / "third")
    d = diff(old, scan(tmp_path))
    assert {"keep", "keep-link", "d/third"} <= set(d.members)


def test_mode_and_owner_changes_are_seen(tmp_path: Path) -> None:
    tree(tmp_path)
    old = scan(tmp_path)
    os.chmod(tmp_path / "keep", 0o600)
    os.chown(tmp_path / "d" / "a", 1234, 1234)
    assert {"keep", "keep-link", "d/a"} <= set(diff(old, scan(tmp_path)).members)


def test_paths_encoding_and_malformed_lists() -> None:
    paths = ["a", "b c", os.fsdecode(b"caf\xe9")]
    assert decode_paths(encode_paths(paths), "t") == paths
    with pytest.raises(CorruptBackup):
        decode_paths(b"no-terminator", "t")
    with pytest.raises(CorruptBackup, match="manifest malformed"):
        Manifest.from_bytes(b'{"version": 1, "entries": {"a": [1]}}', "t")


def test_remove_paths_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f").write_text("f")
    os.symlink(outside, root / "escape")
    with pytest.raises(UnsafeArchive, match="not a directory"):
        remove_paths(root, ["escape/victim"])
    assert (outside / "victim").exists()
    for bad in ("../outside/victim", "/etc/passwd", "a//b", "./x"):
        with pytest.raises(UnsafeArchive, match="not a plain relative path"):
            remove_paths(root, [bad])
    assert remove_paths(root, ["dir", "missing", "escape"]) == 2
    assert not (root / "dir").exists() and not (root / "escape").is_symlink()
    assert outside.is_dir()
