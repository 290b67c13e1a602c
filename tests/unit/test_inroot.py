"""migrator.runtime.inroot: paths resolve inside the root, links are replaced, never written
through.

Every test runs twice: through openat2(RESOLVE_IN_ROOT) and through the O_NOFOLLOW walk used
on kernels without it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from migrator.core.errors import InvalidInput
from migrator.runtime import inroot
from migrator.runtime.inroot import RootDir


@pytest.fixture(params=["openat2", "walk"], autouse=True)
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(inroot, "_use_openat2", request.param == "openat2")
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a small rootfs and a host directory beside it holding a canary."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc/real").mkdir(parents=True)
    (root / "etc/real/file").write_text("inside\n")
    outside.mkdir()
    (outside / "canary").write_text("host\n")
    return root, outside


def test_links_resolve_as_the_container_sees_them(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "abs").symlink_to("/etc/real")           # absolute: from the root
    (root / "etc/up").symlink_to("../../../../../..")  # .. stops at the root
    (root / "out").symlink_to(outside)                 # a host path means the same path inside
    with RootDir(root) as r:
        assert r.read_text("abs/file") == "inside\n"
        assert r.read_text("etc/up/etc/real/file") == "inside\n"
        assert r.read_text("/../../etc/real/file") == "inside\n"
        assert r.read_text("out/canary") is None
        assert r.listdir("etc/up") == ["abs", "etc", "out"]
        assert r.is_symlink("abs") and r.is_dir("abs") and not r.is_file("abs")
        assert r.readlink("out") == str(outside)


def test_a_write_replaces_a_link_at_its_name(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "etc/passwd").symlink_to(outside / "canary")
    (root / "etc/shadow").symlink_to(outside / "new")  # dangling on the host
    with RootDir(root) as r:
        r.write_text("etc/passwd", "root:x:0:0\n", 0o640)
        r.write_text("etc/shadow", "secret\n", 0o600)
    assert (outside / "canary").read_text() == "host\n" and not (outside / "new").exists()
    assert not (root / "etc/passwd").is_symlink()
    assert (root / "etc/passwd").read_text() == "root:x:0:0\n"
    assert (root / "etc/passwd").stat().st_mode & 0o7777 == 0o640
    assert (root / "etc/shadow").stat().st_mode & 0o7777 == 0o600
    assert sorted(os.listdir(root / "etc")) == ["passwd", "real", "shadow"]  # no temp left


def test_a_write_through_a_linked_parent_stays_inside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "var").symlink_to(outside)  # dangling inside the tree: refused, not followed
    (root / "lib").symlink_to("etc/real")  # relative, inside: followed
    with RootDir(root) as r:
        with pytest.raises(InvalidInput, match=r"refusing /var"):
            r.write_text("var/canary", "pwned\n")
        r.write_text("lib/new", "ok\n")
        r.mkdir("lib/a/b")
    assert (outside / "canary").read_text() == "host\n" and os.listdir(outside) == ["canary"]
    assert (root / "etc/real/new").read_text() == "ok\n"
    assert (root / "etc/real/a/b").is_dir()


def test_loops_and_files_in_the_way_are_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "loop").symlink_to("/loop")
    (root / "etc/real/dir").mkdir()
    with RootDir(root) as r:
        with pytest.raises(InvalidInput, match="refusing /loop in .*symbolic links"):
            r.write_text("loop/x", "")
        with pytest.raises(InvalidInput, match="not a directory"):
            r.write_text("etc/real/file/x", "")
        with pytest.raises(InvalidInput, match="directory is where a file goes"):
            r.write_text("etc/real/dir", "")
        assert r.stat("loop") is None and r.lexists("loop")


def test_rename_symlink_remove_chmod_act_on_the_name(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "etc/unit").symlink_to(outside / "canary")
    (root / "etc/d").symlink_to(outside)
    with RootDir(root) as r:
        r.rename("etc/unit", "etc/unit.orig")
        r.symlink("/dev/null", "etc/unit")
        with pytest.raises(InvalidInput, match="already exists"):
            r.symlink("/dev/null", "etc/unit")
        with pytest.raises(InvalidInput, match="not a regular file or directory"):
            r.chmod("etc/unit.orig", 0o777)
        assert r.remove("etc/d") and not r.remove("etc/d")
        r.chmod("etc/real/file", 0o600)
        assert r.remove("etc/real")
    assert os.readlink(root / "etc/unit") == "/dev/null"
    assert os.readlink(root / "etc/unit.orig") == str(outside / "canary")
    assert sorted(os.listdir(root / "etc")) == ["unit", "unit.orig"]
    assert (outside / "canary").stat().st_mode & 0o777 == 0o644
    assert os.listdir(outside) == ["canary"]


def test_append_keeps_the_file_and_refuses_links_and_fifos(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "etc/log").symlink_to(outside / "canary")
    os.mkfifo(root / "etc/fifo")
    os.mknod(root / "etc/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # never opened
    with RootDir(root) as r:
        r.append_text("etc/real/file", "more\n")
        with pytest.raises(InvalidInput, match="not a regular file"):
            r.read_text("etc/null")
        for rel in ("etc/log", "etc/fifo", "etc/null", "etc/missing", "nodir/x"):
            with pytest.raises(InvalidInput, match="refusing"):
                r.append_text(rel, "x\n")
        with pytest.raises(InvalidInput, match="not a regular file"):
            r.read_text("etc/fifo")  # O_NONBLOCK: refused, not hung
    assert (root / "etc/real/file").read_text() == "inside\nmore\n"
    assert (outside / "canary").read_text() == "host\n"


def test_openat2_is_what_the_kernel_here_offers() -> None:
    # the kernel's answer does not depend on which resolution the fixture chose
    fd = os.open("/", os.O_PATH)
    try:
        os.close(inroot._openat2(fd, "etc", os.O_PATH))
    finally:
        os.close(fd)


def test_without_links_even_an_inside_link_is_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "lib").symlink_to("etc/real")
    with RootDir(root, follow_links=False) as r:
        with pytest.raises(InvalidInput, match="refusing /lib in"):
            r.remove("lib/file")
        assert r.remove("lib")  # the link itself
    assert (root / "etc/real/file").exists() and not (root / "lib").is_symlink()
