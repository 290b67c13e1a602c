"""Tree fixtures and comparison for storage tests: every property a copy must keep."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any


def populate(root: Path, xattrs: bool = True) -> None:
    """Files with the awkward properties: owners, modes, hard links, symlinks, a sparse
    file, a device node, a fifo, an empty dir, and (where supported) xattrs and an ACL."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("box\n")
    os.chown(root / "etc" / "hostname", 100000, 100001)
    secret = root / "etc" / "shadow"
    secret.write_text("root:*:1:0:99999:7:::\n")
    os.chmod(secret, 0o640)
    os.chown(secret, 100000, 100042)
    (root / "bin").mkdir(exist_ok=True)
    tool = root / "bin" / "tool"
    tool.write_bytes(os.urandom(300_000))
    os.chmod(tool, 0o4755)
    os.link(tool, root / "bin" / "tool-hardlink")
    os.symlink("tool", root / "bin" / "tool-link")
    os.symlink("/nonexistent/target", root / "bin" / "dangling")
    sparse = root / "sparse.img"
    with open(sparse, "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    (root / "empty").mkdir(exist_ok=True)
    os.chmod(root / "empty", 0o1777)
    if xattrs:
        os.setxattr(tool, "user.origin", b"test")
        os.setxattr(tool, "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
        import subprocess

        subprocess.run(["setfacl", "-m", "u:100005:r", str(secret)], check=True)


def _xattrs(p: str) -> dict[str, bytes]:
    try:
        return {k: os.getxattr(p, k, follow_symlinks=False)
                for k in sorted(os.listxattr(p, follow_symlinks=False))}
    except OSError:
        return {}


def signature(root: Path, with_xattrs: bool = True) -> dict[str, Any]:
    """relative path -> everything that must survive a copy (content by sha256)."""
    sig: dict[str, Any] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            entry: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                entry["sha256"] = h.hexdigest()
                entry["size"] = st.st_size
                if st.st_nlink > 1:
                    entry["link_group"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                entry["mtime"] = int(st.st_mtime)
            if with_xattrs:
                entry["xattrs"] = _xattrs(p)
            sig[rel] = entry
    return sig


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512
