"""The generic tar method: one spelling of tar's argument sets, and a tree that goes
through a tar stream arrives exactly."""

from __future__ import annotations

import os
from pathlib import Path

from migrator.backends.generic import tar_create_argv, tar_exact_options, tar_extract, tar_send

EXACT = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def test_exact_options_keep_owners_xattrs_and_acls() -> None:
    assert tar_exact_options() == EXACT
    assert tar_exact_options(xattrs=False) == ["--numeric-owner", "--no-xattrs", "--no-acls"]
    assert tar_exact_options(acls=False) == [*EXACT[:3], "--no-acls"]


def test_create_argv_writes_an_exact_posix_archive_to_stdout() -> None:
    argv = tar_create_argv(Path("/src"), ["."], options=["--anchored", "--exclude=./a/*"])
    assert argv == ["tar", "--create", "--file=-", *EXACT, "--sparse", "--format=posix",
                    "--anchored", "--exclude=./a/*", "-C", "/src", "."]


def test_a_tree_arrives_exactly(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data" * 1000)
    os.chmod(src / "d" / "f", 0o640)
    os.symlink("d/f", src / "link")
    dst.mkdir()
    stream = tar_send(src, "snap", xattrs=False)
    tar_extract(stream, dst, None, acls=False)
    assert (dst / "d" / "f").read_bytes() == b"data" * 1000
    assert (dst / "d" / "f").stat().st_mode & 0o777 == 0o640
    assert os.readlink(dst / "link") == "d/f"
