"""Reading and writing inside a root filesystem whose content is not ours.

A container's rootfs comes from another host, a backup, an export or a converted machine:
any name in it may be a symlink planted to make a root-owned writer on this host follow it
out (``etc/network/interfaces.p2c-orig -> /etc/cron.d/x``). Every access here goes through
one open directory descriptor of the root, and every path is resolved *as the container
would see it*: a symlink is followed inside the root (an absolute target starts again at
the root, ``..`` stops at it), never out of it. That is ``openat2(2)`` with
``RESOLVE_IN_ROOT`` (plus ``RESOLVE_NO_MAGICLINKS`` and ``RESOLVE_NO_XDEV``: no
``/proc/self/fd`` tricks, no crossing into another mount); where the kernel lacks
``openat2`` (before 5.6) the same resolution is done one component at a time with
``O_NOFOLLOW`` opens and ``readlinkat``.

The last component of a write is never followed: a file is written under a temporary name in
its (resolved) directory and renamed over the name, which replaces a symlink rather than
writing through it; removals, renames, symlink creation and ``chmod`` act on the name
itself. Anything that cannot be done that way (a directory where a file goes, a symlink
loop, a component that is not a directory) is refused with ``InvalidInput`` naming the path,
and nothing outside the root is ever opened for writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import secrets
import shutil
import stat
from pathlib import Path
from types import TracebackType

from migrator.core.errors import InvalidInput

#: openat2's syscall number (the same on x86_64 and aarch64, the generic table)
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}.get(platform.machine())
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
MAX_LINKS = 40  # symlinks followed in one resolution, as the kernel allows (ELOOP past it)
MAX_READ = 16 << 20  # a config file read into memory (fstab, interfaces...) is no bigger
HINT = ("the tree holds a link or a non-directory where a file or directory is expected; "
        "fix it in the source and retry (nothing outside the tree was touched)")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_use_openat2 = SYS_OPENAT2 is not None  # cleared on ENOSYS; tests clear it to try the walk


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0, links: bool = True) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode,
                   RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
                   | (0 if links else RESOLVE_NO_SYMLINKS))
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2 or 0), ctypes.c_int(dirfd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _reopen(path_fd: int, flags: int) -> int:
    """A real descriptor of the inode an O_PATH descriptor holds (the same inode: no race
    with a rename in between)."""
    return os.open(f"/proc/self/fd/{path_fd}", flags | os.O_NOCTTY | os.O_CLOEXEC)


def _parts(rel: str | os.PathLike[str]) -> list[str]:
    """Components of ``rel`` (leading slashes mean the root too); ``..`` is kept: it is
    resolved against the root like any other component, never above it."""
    return [p for p in os.fspath(rel).split("/") if p not in ("", ".")]


def lstat_at(pfd: int, name: str) -> os.stat_result | None:
    """The entry ``name`` in directory ``pfd`` itself (a symlink is not followed); None
    when there is none."""
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(pfd: int, name: str) -> bool:
    """Remove the entry ``name`` in directory ``pfd`` itself: a file or link unlinked, a
    directory with everything in it (no symlink followed). False when there was none."""
    st = lstat_at(pfd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        # rmtree needs a real directory descriptor, not O_PATH
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        try:
            shutil.rmtree(name, dir_fd=dfd)
        finally:
            os.close(dfd)
    else:
        os.unlink(name, dir_fd=pfd)
    return True


class RootDir:
    """A root filesystem opened once; every method takes paths relative to it.

    ``follow_links=False`` is for paths that must be exactly what they say (the removals a
    backup lists): any symlink on the way, even one that stays inside, is refused."""

    def __init__(self, root: Path | str, follow_links: bool = True) -> None:
        self.root = Path(root)
        self.follow_links = follow_links
        # the root itself is named by this host (a volume path), so only it may be trusted
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _refuse(self, rel: str | os.PathLike[str], why: str) -> InvalidInput:
        return InvalidInput(f"refusing /{'/'.join(_parts(rel))} in {self.root}: {why}", HINT)

    # resolution ------------------------------------------------------------------------
    def _open(self, rel: str | os.PathLike[str], flags: int, mode: int = 0) -> int:
        """``rel`` opened with ``flags``, every symlink resolved inside the root (the last
        one too unless ``O_NOFOLLOW``). OSError as the kernel reports it."""
        global _use_openat2
        path = "/".join(_parts(rel)) or "."
        if _use_openat2:
            try:
                return _openat2(self.fd, path, flags, mode, self.follow_links)
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                _use_openat2 = False
        return self._walk(_parts(rel), flags, mode)

    def _walk(self, parts: list[str], flags: int, mode: int) -> int:
        """The resolution openat2 does, for kernels without it: one component at a time,
        each opened ``O_NOFOLLOW`` relative to the last, symlinks read and spliced in."""
        stack = [os.dup(self.fd)]  # stack[-1] is the current directory; stack[0] the root
        todo = list(parts)
        links = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                last = not todo
                if last:
                    try:
                        st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                    except FileNotFoundError:
                        st = None
                    if st is None or not stat.S_ISLNK(st.st_mode) or flags & os.O_NOFOLLOW:
                        return os.open(comp, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                       dir_fd=stack[-1])
                else:
                    st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                    if st.st_dev != os.fstat(stack[0]).st_dev:
                        raise OSError(errno.EXDEV, "crosses a mount point", comp)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_LINKS or not self.follow_links:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), comp)
                    target = os.readlink(comp, dir_fd=stack[-1])
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo[:0] = _parts(target)
                    continue
                stack.append(os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, dir_fd=stack[-1]))
            # the path named the root (or a directory reached through ..): open it as asked
            return os.open(".", flags & ~os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                           dir_fd=stack[-1])
        finally:
            for fd in stack:
                os.close(fd)

    def _dir(self, rel: str | os.PathLike[str], create: bool = False) -> int:
        """An O_PATH descriptor of directory ``rel`` (made with its parents if ``create``)."""
        parts = _parts(rel)
        try:
            return self._open("/".join(parts), os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            raise self._refuse(rel, f"not a directory inside the tree ({e.strerror})") from e
        for i in range(1, len(parts) + 1):  # make what is missing, one level at a time
            try:
                fd = self._open("/".join(parts[:i]), os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                pfd = self._dir("/".join(parts[:i - 1]))
                try:
                    os.mkdir(parts[i - 1], 0o755, dir_fd=pfd)
                except FileExistsError as e:  # a dangling link, say: not ours to replace
                    raise self._refuse("/".join(parts[:i]), "exists but is no directory") \
                        from e
                finally:
                    os.close(pfd)
                fd = self._open("/".join(parts[:i]), os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise self._refuse("/".join(parts[:i]), f"not a directory inside the tree "
                                   f"({e.strerror})") from e
            if i < len(parts):
                os.close(fd)
        return fd

    def _parent(self, rel: str | os.PathLike[str], create: bool = False) -> tuple[int, str]:
        """(descriptor of the resolved parent directory, last component) of ``rel``."""
        parts = _parts(rel)
        if not parts or parts[-1] == "..":
            raise self._refuse(rel, "names no entry of a directory")
        return self._dir("/".join(parts[:-1]), create), parts[-1]

    # reading ---------------------------------------------------------------------------
    def lstat(self, rel: str | os.PathLike[str]) -> os.stat_result | None:
        """The entry itself (a symlink is not followed), or None when it is missing."""
        try:
            pfd, name = self._parent(rel)
        except (FileNotFoundError, InvalidInput):
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(pfd)

    def stat(self, rel: str | os.PathLike[str]) -> os.stat_result | None:
        """What ``rel`` leads to inside the root (links followed in it), or None."""
        try:
            fd = self._open(rel, os.O_PATH)
        except OSError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def is_file(self, rel: str | os.PathLike[str]) -> bool:
        st = self.stat(rel)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, rel: str | os.PathLike[str]) -> bool:
        st = self.stat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def is_symlink(self, rel: str | os.PathLike[str]) -> bool:
        st = self.lstat(rel)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def lexists(self, rel: str | os.PathLike[str]) -> bool:
        return self.lstat(rel) is not None

    def readlink(self, rel: str | os.PathLike[str]) -> str | None:
        """A symlink's target as stored, or None when ``rel`` is not a symlink."""
        try:
            pfd, name = self._parent(rel)
        except (FileNotFoundError, InvalidInput):
            return None
        try:
            return os.readlink(name, dir_fd=pfd)
        except OSError:
            return None
        finally:
            os.close(pfd)

    def listdir(self, rel: str | os.PathLike[str]) -> list[str]:
        """Names in directory ``rel``, sorted; empty when it is missing or no directory."""
        try:
            fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def read_bytes(self, rel: str | os.PathLike[str]) -> bytes | None:
        """A regular file's content (links followed inside the root), None when missing;
        anything else (a fifo, a device, a directory) or a file over ``MAX_READ`` refused,
        before it is opened for reading (opening a device can act: a watchdog, a tape)."""
        try:
            pfd = self._open(rel, os.O_PATH)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._refuse(rel, f"cannot be read inside the tree ({e.strerror})") from e
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(rel, "not a regular file")
            if st.st_size > MAX_READ:
                raise self._refuse(rel, f"{st.st_size} bytes, more than {MAX_READ} to read")
            fd = _reopen(pfd, os.O_RDONLY)
        finally:
            os.close(pfd)
        try:
            chunks = []
            while data := os.read(fd, 1 << 20):
                chunks.append(data)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_text(self, rel: str | os.PathLike[str]) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    # writing ---------------------------------------------------------------------------
    def write_bytes(self, rel: str | os.PathLike[str], data: bytes, mode: int = 0o644,
                    owner: tuple[int, int] | None = None) -> None:
        """Replace ``rel`` with a regular file holding ``data`` (parents made as needed),
        owned by ``owner`` (uid, gid) when given.

        Written under a temporary name in the resolved directory, then renamed over the
        name: a symlink there is replaced, never written through, and a reader sees the old
        entry or the new one, never none."""
        pfd, name = self._parent(rel, create=True)
        try:
            tmp = f".{name[:200]}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    if owner is not None:
                        os.fchown(fd, *owner)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                self._rename_over(pfd, tmp, name, rel, "a directory is where a file goes")
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=pfd)
                raise
        finally:
            os.close(pfd)

    def write_text(self, rel: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
        self.write_bytes(rel, text.encode("utf-8", "surrogateescape"), mode)

    def append_text(self, rel: str | os.PathLike[str], text: str) -> None:
        """Add to the end of an existing regular file, keeping its owner and mode; a symlink
        or anything else at ``rel`` is refused (a running container may have put it there)."""
        try:
            pfd, name = self._parent(rel)
        except FileNotFoundError as e:
            raise self._refuse(rel, "missing") from e
        try:
            fd = self._checked(pfd, name, rel, (stat.S_IFREG,), os.O_WRONLY | os.O_APPEND)
            try:
                if os.fstat(fd).st_nlink != 1:
                    raise self._refuse(rel, "a file of several names (hard links)")
                os.write(fd, text.encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
        finally:
            os.close(pfd)

    def mkdir(self, rel: str | os.PathLike[str]) -> None:
        """Directory ``rel`` and its parents (existing directories are fine)."""
        os.close(self._dir(rel, create=True))

    def symlink(self, target: str, rel: str | os.PathLike[str]) -> None:
        """A new symlink ``rel`` -> ``target`` (the target is stored, not resolved)."""
        pfd, name = self._parent(rel, create=True)
        try:
            os.symlink(target, name, dir_fd=pfd)
        except FileExistsError as e:
            raise self._refuse(rel, "already exists") from e
        finally:
            os.close(pfd)

    def replace_with_symlink(self, rel: str | os.PathLike[str], target: str,
                             owner: tuple[int, int]) -> None:
        """Atomically replace the entry ``rel`` (not a directory) with a symlink to
        ``target`` owned by ``owner``: made under a temporary name beside it and renamed
        over it, so a watcher sees one rename, never a missing name."""
        pfd, name = self._parent(rel)
        tmp = f".{name[:200]}.{secrets.token_hex(4)}.tmp"
        try:
            os.symlink(target, tmp, dir_fd=pfd)
            try:
                os.chown(tmp, *owner, dir_fd=pfd, follow_symlinks=False)
                self._rename_over(pfd, tmp, name, rel, "a directory is where a link goes")
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=pfd)
                raise
        finally:
            os.close(pfd)

    def rename(self, rel: str | os.PathLike[str], new: str | os.PathLike[str]) -> None:
        """Rename the entry ``rel`` itself (a symlink stays a symlink) to ``new``, replacing
        what is there unless it is a directory."""
        spfd, sname = self._parent(rel)
        try:
            dpfd, dname = self._parent(new, create=True)
            try:
                self._rename_over(dpfd, sname, dname, new, "a directory is in the way",
                                  src_pfd=spfd)
            finally:
                os.close(dpfd)
        finally:
            os.close(spfd)

    def chmod(self, rel: str | os.PathLike[str], mode: int) -> None:
        """Mode of the regular file or directory ``rel`` itself (a symlink is refused)."""
        pfd, name = self._parent(rel)
        try:
            fd = self._checked(pfd, name, rel, (stat.S_IFREG, stat.S_IFDIR), os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(pfd)

    def remove(self, rel: str | os.PathLike[str]) -> bool:
        """Remove the entry ``rel`` itself: a file, a link, or a directory with everything
        in it (``shutil.rmtree`` by descriptor, which never follows a link). False when it
        was not there."""
        try:
            pfd, name = self._parent(rel)
        except FileNotFoundError:
            return False
        try:
            return remove_at(pfd, name)
        finally:
            os.close(pfd)

    def _checked(self, pfd: int, name: str, rel: str | os.PathLike[str],
                 kinds: tuple[int, ...], flags: int) -> int:
        """Entry ``name`` itself opened with ``flags`` once it is known to be of ``kinds``:
        looked at through an O_PATH descriptor first, so a link, fifo or device is refused
        without ever being opened for real."""
        try:
            path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except OSError as e:
            raise self._refuse(rel, f"cannot be opened ({e.strerror})") from e
        try:
            if stat.S_IFMT(os.fstat(path_fd).st_mode) not in kinds:
                raise self._refuse(rel, "not a regular file" + (
                    " or directory" if stat.S_IFDIR in kinds else ""))
            return _reopen(path_fd, flags)
        finally:
            os.close(path_fd)

    def _rename_over(self, pfd: int, src: str, name: str, rel: str | os.PathLike[str],
                     refusal: str, src_pfd: int | None = None) -> None:
        """Rename ``src`` (in ``src_pfd``, else ``pfd``) over ``name`` in ``pfd``: what is
        there is replaced in one step, unless it is a directory (refused with ``refusal``)."""
        old = lstat_at(pfd, name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise self._refuse(rel, refusal)
        os.rename(src, name, src_dir_fd=pfd if src_pfd is None else src_pfd, dst_dir_fd=pfd)

