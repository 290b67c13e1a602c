"""The first copy into a new target (``copy_into_empty``, ``cp -a``) leaves what an rsync
with the project's own exactness options would: that rsync, run after it, finds nothing to
change, so a later refresh or verification sees the same tree either way."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from migrator.backends.generic import copy_into_empty, rsync_exact


def _tree(src: Path) -> None:
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data" * 1000)
    os.link(src / "d" / "f", src / "hard")
    os.symlink("d/f", src / "link")
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.write(b"x")
    os.chmod(src / "d" / "f", 0o4750)
    os.chmod(src, 0o705)
    with contextlib.suppress(OSError):  # a tmp without user xattrs: the rest still holds
        os.setxattr(src / "d" / "f", "user.k", b"v")
    os.utime(src / "d", ns=(1, 978_307_200_123_456_789))


def test_a_new_tree_is_what_rsync_would_leave(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir(mode=0o711)  # as a pool's create_volume leaves it
    size = copy_into_empty(src, dst)
    assert size >= 4000 + (8 << 20)
    left = subprocess.run(["rsync", *rsync_exact(), "--dry-run", "--itemize-changes",
                           f"{src}/", f"{dst}/"], capture_output=True, text=True, check=True)
    assert left.stdout == "", left.stdout
    assert (dst / "hard").stat().st_ino == (dst / "d" / "f").stat().st_ino
    assert (dst / "sparse").stat().st_blocks * 512 < 1 << 20
    assert dst.stat().st_mode & 0o7777 == 0o705
    assert os.listxattr(dst / "d" / "f") == os.listxattr(src / "d" / "f")
