"""migrator.runtime.treecheck on real trees (device nodes need root, as every test here runs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from migrator.core.errors import UnsafeArchive
from migrator.runtime.treecheck import TreePolicy, TreeReport, inspect_tree

BASE = 100000
UNPRIV = TreePolicy(privileged=False, base=BASE)


def volume(tmp_path: Path) -> Path:
    """A volume of an unprivileged container: rootfs owned by the shifted ids, debootstrap's
    /dev nodes, a setuid program owned by the container's root."""
    vol = tmp_path / "vol"
    for d in ("rootfs/dev", "rootfs/usr/bin", "rootfs/tmp"):
        (vol / d).mkdir(parents=True)
    os.mknod(vol / "rootfs/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(vol / "rootfs/dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    su = vol / "rootfs/usr/bin/su"
    su.write_text("#!/bin/sh\n")
    os.chmod(su, 0o4755)
    (vol / "rootfs/bin").symlink_to("usr/bin")
    os.mkfifo(vol / "rootfs/tmp/fifo")
    for dirpath, dirnames, filenames in os.walk(vol):
        for n in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, n), BASE, BASE)
    os.lchown(vol, BASE, BASE)
    os.chmod(su, 0o4755)  # chown dropped the bit
    return vol


def test_a_legitimate_unprivileged_tree_passes(tmp_path: Path) -> None:
    vol = volume(tmp_path)
    report = TreeReport()
    inspect_tree(vol, UNPRIV, "backup x", report)
    inspect_tree(vol, TreePolicy(privileged=False, base=BASE, all_owners=True), "x")
    assert report.entries == 11  # the top directory too


@pytest.mark.parametrize(("plant", "message"), [
    ("kmem", "rootfs/root/kmem is a character device node (1:2)"),
    ("disk", "rootfs/dev/sda is a block device node (8:0)"),
    ("fake-null", "rootfs/dev/null is a character device node (1:1)"),
    ("nested-dev", "rootfs/srv/rootfs/dev/null is a character device node (1:3)"),
    ("setuid-root", "rootfs/usr/bin/evil is setuid to uid 0, which is not one of"),
    ("setgid-other", "rootfs/usr/bin/evil is setgid to gid 200000"),
])
def test_devices_and_foreign_setuid_are_refused(tmp_path: Path, plant: str,
                                                message: str) -> None:
    vol = volume(tmp_path)
    r = vol / "rootfs"
    if plant == "kmem":
        (r / "root").mkdir()
        os.mknod(r / "root/kmem", 0o600 | stat.S_IFCHR, os.makedev(1, 2))
    elif plant == "disk":
        os.mknod(r / "dev/sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    elif plant == "fake-null":  # the right name with /dev/mem's numbers
        os.unlink(r / "dev/null")
        os.mknod(r / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 1))
    elif plant == "nested-dev":
        (r / "srv/rootfs/dev").mkdir(parents=True)
        os.mknod(r / "srv/rootfs/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        evil = r / "usr/bin/evil"
        evil.write_text("#!/bin/sh\n")
        if plant == "setuid-root":
            os.chown(evil, 0, BASE)
            os.chmod(evil, 0o4755)
        else:
            os.chown(evil, BASE, 200000)
            os.chmod(evil, 0o2755)
    with pytest.raises(UnsafeArchive) as e:
        inspect_tree(vol, UNPRIV, "backup x")
    assert str(e.value).startswith("backup x: ") and message in str(e.value)
    assert "nothing was recorded" in e.value.hint
    inspect_tree(vol, TreePolicy(privileged=True), "x")  # a privileged container's own


def test_an_archive_is_held_to_the_ids_it_claims(tmp_path: Path) -> None:
    vol = volume(tmp_path)
    os.lchown(vol / "rootfs/tmp/fifo", 0, 0)  # plain file, but outside the claimed ids
    inspect_tree(vol, UNPRIV, "x")  # not setuid: fine for a restore
    with pytest.raises(UnsafeArchive, match="tmp/fifo is owned by 0:0, outside the ids "
                       "100000..165535 the archive says"):
        inspect_tree(vol, TreePolicy(privileged=False, base=BASE, all_owners=True), "x")
    with pytest.raises(UnsafeArchive, match="rootfs is owned by 100000:100000"):
        inspect_tree(vol, TreePolicy(privileged=False, base=0, all_owners=True), "x")
    os.lchown(vol / "rootfs", 0, 0)  # the volume's top and what is beside rootfs are the
    os.lchown(vol, 0, 0)             # host's: not held to the map
    (vol / "metadata.yaml").write_text("x\n")
    with pytest.raises(UnsafeArchive, match="rootfs is owned by 0:0"):
        inspect_tree(vol, TreePolicy(privileged=False, base=BASE, all_owners=True), "x")


def test_many_problems_are_named_three_at_a_time(tmp_path: Path) -> None:
    vol = volume(tmp_path)
    for i in range(10):
        os.mknod(vol / f"rootfs/dev/m{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 1))
    with pytest.raises(UnsafeArchive, match=r"\(and maybe more\)") as e:
        inspect_tree(vol, UNPRIV, "x")
    assert str(e.value).count("is a character device node") == 3


def test_a_system_sized_tree_is_walked_quickly() -> None:
    """This machine's /usr/lib (tens of thousands of entries, a Debian rootfs has ~20k) with
    the host's own ids as the map, so every entry is looked at and none refused."""
    report = TreeReport()
    inspect_tree(Path("/usr/lib"), TreePolicy(privileged=False, base=0, size=2**32 - 1),
                 "/usr/lib", report)
    assert report.entries > 10000
    assert report.seconds < 0.1 * report.entries / 1000, report  # under 0.1 ms an entry
