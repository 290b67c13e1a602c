"""``backup extract ID PATH... --to DIR``: single files out of a backup, without a restore.

**Generic backups only.** A generic point is a tar of the container's tree, so a file is a
member to pick out. A native btrfs or zfs send stream is not a list of files: it is a
sequence of operations (btrfs) or of blocks (zfs) that rebuild a whole volume relative to
its parent snapshot, and a file's content exists only once the stream has been received
into a pool of that driver. Such a backup is refused, saying so and how to get the file
(restore it under another name, copy the file out, delete the copy).

**Which state.** The backup's final state, or one of its snapshots (``--snapshot``): the
chain is replayed for the asked paths only, from the last full tar at or before that point,
through every delta after it in the chain's order (its removed paths, then its changed
members), so each part of that stretch is read once, as it streams; nothing is staged.

**Hostile by default**, as a restore is:

- every tar passes ``migrator.targuard.TarGuard`` with the backup's rules (one rootfs, no
  ``..``, no member through an earlier symlink, devices only in a privileged container), and
  only the headers it wrote are parsed here;
- the files are written by this module, not by tar, relative to one descriptor of ``DIR``:
  every directory on the way is opened ``O_NOFOLLOW``, so no symlink, whether it came from
  the backup or was planted in ``DIR`` meanwhile, is ever followed out of it; a symlink member is
  made as a link holding its target text (an absolute one means the container's ``/``),
  never resolved; a hard link only to a file extracted here; device nodes and fifos are
  skipped (and said so); setuid, setgid and sticky bits are dropped; owners are not set
  (the files belong to the operator); modes and modification times are kept;
- ``DIR`` must be new or empty (nothing of the operator's is overwritten), and any failure
  (a part's checksum at its end; in a chunked repository every chunk is authenticated
  before a byte of it is used) removes everything written into it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from migrator.backup.delta import decode_paths
from migrator.backup.model import BackupIndex, PartInfo
from migrator.backup.parts import CHUNK, check_digest, open_decompressed, read_small
from migrator.backup.repository import BackupRepository
from migrator.backup.verify import tar_rules, verify_chain
from migrator.core.errors import BackupError, CorruptBackup, InvalidInput, NotFound, UnsafeArchive
from migrator.runtime.inroot import lstat_at, remove_at
from migrator.streams import Progress, ProgressMeter, no_progress
from migrator.targuard import TarGuard

ROOT = "rootfs"  # the member directory that is the container's /
HOLE = 64 << 10  # an all-zero block of this size is left as a hole in the file written
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ExtractResult:
    """What ``extract`` wrote (``--format json`` dumps it)."""

    id: str
    point: str
    to: str
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    chain: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # asked for, not in that state
    skipped: list[str] = field(default_factory=list)  # devices, fifos, unlinkable links
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wanted_path(path: str) -> str:
    """A path as the container sees it -> relative to its root: ``/etc/hosts`` ->
    ``etc/hosts``, ``/`` -> ``""`` (everything). ``..`` is refused."""
    if "\0" in path or not path.strip():
        raise InvalidInput(f"invalid path {path!r}", "a path inside the container, e.g. "
                           "/etc/hostname or /srv")
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"path {path!r} climbs with '..'", "give the path as the "
                           "container sees it, e.g. /srv/app/config.yaml")
    return "/".join(parts)


def selects(wanted: list[str], rel: str) -> bool:
    """Whether the entry ``rel`` (relative to the rootfs) is one of, or under one of,
    ``wanted``."""
    return any(w == "" or rel == w or rel.startswith(w + "/") for w in wanted)


def plan(chain: list[BackupIndex], idx: BackupIndex, snapshot: str | None
         ) -> tuple[str, list[tuple[BackupIndex, str]]]:
    """The point to rebuild (``idx``'s final state, or snapshot ``snapshot``) and the
    points to apply for it: its last full tar, then every delta after it (pure)."""
    if idx.kind != "generic":
        raise BackupError(
            f"backup {idx.id} holds {idx.driver} send streams: single files cannot be read "
            "out of them (a send stream rebuilds a whole volume, operation by operation or "
            "block by block, and a file exists only once all of it is received into a "
            f"{idx.driver} pool)",
            f"restore it under another name (`migrate backup restore {idx.id} --name "
            "TMP`), copy the files out of TMP, then `migrate delete TMP`")
    seq = [(b, p) for b in chain for p in b.points()]
    if snapshot is None:
        end = (idx.id, idx.final)
        point = idx.final
    else:
        snap = next((s for s in idx.snapshots if s.name == snapshot), None)
        if snap is None:
            raise NotFound(f"backup {idx.id} has no snapshot {snapshot!r}",
                           f"its snapshots: {', '.join(s.name for s in idx.snapshots) or 'none'}")
        end = (snap.backup, snap.name)
        point = snapshot
    cut = next((i for i, (b, p) in enumerate(seq) if (b.id, p) == end), None)
    if cut is None:
        raise CorruptBackup(f"backup {idx.id}: point {end[1]} of {end[0]} is not in its chain")
    full = [i for i in range(cut + 1) if {x.kind for x in seq[i][0].parts_of(seq[i][1])}
            == {"tar"}]
    if not full:
        raise CorruptBackup(f"backup {idx.id}: no full tar before {point} in its chain")
    return point, seq[full[-1]:cut + 1]


def extract_files(repo: BackupRepository, backup_id: str, paths: list[str], to: Path,
                  snapshot: str | None = None, progress: Progress = no_progress
                  ) -> ExtractResult:
    """Write ``paths`` (as the container saw them; ``/`` for everything) of backup
    ``backup_id`` into directory ``to`` (see the module docstring)."""
    t0 = time.monotonic()
    wanted = sorted({wanted_path(p) for p in paths})
    if not wanted:
        raise InvalidInput("no path to extract", "e.g. /etc/hostname")
    repo.check()
    idx = repo.get(backup_id)
    if idx.kind != "generic":
        plan([idx], idx, snapshot)  # refused, with why
    chain = verify_chain(repo, idx, read=False)  # structure, presence and sizes first
    point, todo = plan(chain, idx, snapshot)
    result = ExtractResult(idx.id, point, str(to), chain=[b.id for b in chain])
    made = _prepare(to)
    out = _Tree(to, result)
    meter = ProgressMeter(progress, f"extract {idx.id}",
                          sum(p.raw_size for b, pt in todo for p in b.parts_of(pt)))
    try:
        for b, pt in todo:
            parts = b.parts_of(pt)
            listed = next((p for p in parts if p.kind == "deleted"), None)
            if listed is not None:
                gone = decode_paths(read_small(repo, b.id, listed, b.compression),
                                    f"backup {b.id}")
                out.remove_under(wanted, gone)
            tar = next(p for p in parts if p.kind in ("tar", "delta"))
            _read_tar(repo, b, tar, wanted, out)
            meter.advance(sum(p.raw_size for p in parts))
        out.finish()
        result.missing = [f"/{w}" for w in wanted if w and not out.lexists(w)]
    except BaseException:
        out.close()
        _clean(to, made)
        raise
    out.close()
    meter.finish()
    result.seconds = time.monotonic() - t0
    return result


def _prepare(to: Path) -> bool:
    """``to`` exists and is an empty real directory afterwards; True when made here."""
    try:
        st = os.lstat(to)
    except FileNotFoundError:
        os.makedirs(to, mode=0o700)
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{to} exists and is not a directory",
                           "give a new or empty directory")
    if os.listdir(to):
        raise InvalidInput(f"{to} is not empty", "give a new or empty directory: extract "
                           "never writes over files already there")
    return False


def _clean(to: Path, made: bool) -> None:
    """Remove what a failed extract wrote (``to`` was empty, or made by it)."""
    import shutil

    with contextlib.suppress(OSError):
        fd = os.open(to, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(fd):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)  # by descriptor: no link followed
                else:
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
        if made:
            os.rmdir(to)


def _read_tar(repo: BackupRepository, b: BackupIndex, part: PartInfo, wanted: list[str],
              out: _Tree) -> None:
    """One tar part, checked and guarded, its selected members written by ``out``."""
    reader, hashing = open_decompressed(repo, b.id, part, b.compression)
    guard = TarGuard(reader, tar_rules(b))  # type: ignore[arg-type]
    try:
        with tarfile.open(fileobj=guard, mode="r|", encoding="utf-8",  # type: ignore[call-overload]
                          errors="surrogateescape") as tf:
            for m in tf:
                rel = _rel(m.name)
                if rel is None or not selects(wanted, rel):
                    continue
                out.member(tf, m, rel)
        while guard.read(CHUNK):  # to its end: the guard's end checks, the whole part hashed
            pass
        hashing.drain()
    except zstandard.ZstdError as e:
        raise CorruptBackup(f"backup {b.id}: part {part.path} does not decompress: {e}") \
            from e
    except tarfile.TarError as e:
        raise CorruptBackup(f"backup {b.id}: part {part.path}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            hashing.f.close()
    check_digest(hashing, b.id, part)
    reader.check_complete()  # type: ignore[attr-defined]


def _rel(name: str) -> str | None:
    """A member's path relative to the rootfs; None for the rootfs itself or outside it."""
    name = name.rstrip("/")
    if not name.startswith(ROOT + "/"):
        return None
    return name[len(ROOT) + 1:]


class _Tree:
    """``DIR`` opened once; entries written relative to it, every directory on the way
    opened ``O_NOFOLLOW`` (a symlink there is refused, never followed)."""

    def __init__(self, root: Path, result: ExtractResult) -> None:
        self.root = root
        self.fd = os.open(root, _DIR_FLAGS)
        self.result = result
        self.files: set[str] = set()  # regular files written (hard link targets)
        self.dir_attrs: list[tuple[str, int, float]] = []  # set last, deepest first
        self.skipped: list[str] = result.skipped

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _dir(self, parts: list[str], create: bool) -> int:
        """An O_PATH descriptor of directory ``parts`` (made 0755 if missing and
        ``create``)."""
        fd = os.dup(self.fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeArchive(
                            f"/{'/'.join(parts[:i + 1])} is not a directory in {self.root} "
                            "(a symlink there is never followed)") from e
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def lexists(self, rel: str) -> bool:
        parts = rel.split("/")
        try:
            pfd = self._dir(parts[:-1], create=False)
        except (FileNotFoundError, UnsafeArchive):
            return False
        try:
            return lstat_at(pfd, parts[-1]) is not None
        finally:
            os.close(pfd)

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str) -> None:
        parts = rel.split("/")
        mode = m.mode & 0o777  # no setuid, setgid or sticky bit out of a backup
        if m.isdir():
            pfd = self._dir(parts[:-1], create=True)
            try:  # a delta's directory where an earlier point had a file or a link: that
                # entry itself goes (never followed), as GNU tar replaces it in a restore
                st = lstat_at(pfd, parts[-1])
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    remove_at(pfd, parts[-1])
            finally:
                os.close(pfd)
            os.close(self._dir(parts, create=True))
            self.dir_attrs.append((rel, mode, float(m.mtime)))
            self.result.dirs += 1
            return
        if m.ischr() or m.isblk() or m.isfifo():
            self.skipped.append(f"/{rel} ({'fifo' if m.isfifo() else 'device node'})")
            return
        pfd = self._dir(parts[:-1], create=True)
        name = parts[-1]
        try:
            if m.islnk():
                target = _rel(m.linkname)
                if target is None or target not in self.files:
                    self.skipped.append(f"/{rel} (hard link to /{target or m.linkname}, "
                                        "which is not among the paths extracted)")
                    return
                tparts = target.split("/")
                tfd = self._dir(tparts[:-1], create=False)
                try:
                    remove_at(pfd, name)
                    os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd,
                            follow_symlinks=False)
                finally:
                    os.close(tfd)
                self.files.add(rel)
                self.result.links += 1
            elif m.issym():
                remove_at(pfd, name)
                os.symlink(m.linkname, name, dir_fd=pfd)  # stored, never resolved here
                os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
                self.result.links += 1
            elif m.isreg():
                remove_at(pfd, name)
                src = tf.extractfile(m)
                assert src is not None
                self._write(pfd, name, src, m, mode)
                self.files.add(rel)
                self.result.files += 1
            else:
                self.skipped.append(f"/{rel} (member type {m.type!r})")
        finally:
            os.close(pfd)

    def _write(self, pfd: int, name: str, src: IO[bytes], m: tarfile.TarInfo,
               mode: int) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            zero = bytes(HOLE)
            while data := src.read(HOLE):
                if data == zero[:len(data)]:
                    os.lseek(fd, len(data), os.SEEK_CUR)  # a hole, as the sparse file had
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                self.result.bytes += len(data)
            os.ftruncate(fd, m.size)
            os.fchmod(fd, mode)
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)

    def remove_under(self, wanted: list[str], gone: list[str]) -> None:
        """A delta's removed paths (relative to the volume), where they touch the asked
        ones: the entry itself, or the asked paths below it."""
        for path in gone:
            rel = _rel(path)
            if rel is None:
                continue
            targets = {rel} if selects(wanted, rel) else {w for w in wanted
                                                          if w.startswith(rel + "/")}
            for t in targets:
                parts = t.split("/")
                try:
                    pfd = self._dir(parts[:-1], create=False)
                except FileNotFoundError:
                    continue
                try:
                    remove_at(pfd, parts[-1])
                finally:
                    os.close(pfd)
                self.files = {f for f in self.files if f != t and not f.startswith(t + "/")}

    def finish(self) -> None:
        """Directory modes and times, deepest first (a read-only directory is filled
        before it becomes read-only; writing into one changes its mtime)."""
        for rel, mode, mtime in sorted(self.dir_attrs, key=lambda x: -x[0].count("/")):
            with contextlib.suppress(FileNotFoundError):
                fd = self._dir(rel.split("/"), create=False)
                try:
                    real = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                   dir_fd=fd)
                finally:
                    os.close(fd)
                try:
                    os.fchmod(real, mode)
                    os.utime(real, (mtime, mtime))
                finally:
                    os.close(real)
