"""The generic transfer methods every pool supports: ``rsync`` (local delta) and ``tar``.

``rsync`` needs both trees on one machine (or rsync's own protocol over a transport) and
sends only changed files, so it is the fallback for refresh between different drivers.
``tar`` is a one-way stream (GNU tar, numeric ids, xattrs, ACLs, hard links, sparse files,
devices) that any transport or compressor can carry; it is always a full copy.

Both keep ownership numerically: an unprivileged container's shifted uids stay as they are.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from migrator.backends.base import Snapshot, StorageBackend, VolumeRef
from migrator.core import proc
from migrator.core.errors import CommandFailed, InvalidInput, NoSpace, StorageError
from migrator.core.names import SnapshotName
from migrator.streams import ProgressMeter, SendStream, Stream, receive_with, run_watched

GENERIC_TYPES = ["rsync", "tar"]

#: GNU tar writing an archive to its stdout (the start of every tar stream the project sends)
TAR_TO_STDOUT = ["tar", "--create", "--file=-"]


def tar_exact_options(xattrs: bool = True, acls: bool | None = None) -> list[str]:
    """The tar options that keep a tree exact, to create and to extract alike: numeric
    owners (an unprivileged container's shifted ids stay as they are), every xattr
    namespace (file capabilities, security labels) and POSIX ACLs.

    ``xattrs=False`` for a side that can hold none (zfs-fuse): tar neither reads nor asks
    for them. ``acls`` (by default as ``xattrs``) is apart for extracting onto such a side
    (``tar_extract``).
    """
    with_acls = xattrs if acls is None else acls
    return ["--numeric-owner",
            *(["--xattrs", "--xattrs-include=*"] if xattrs else ["--no-xattrs"]),
            "--acls" if with_acls else "--no-acls"]


def tar_create_argv(root: Path, operands: Sequence[str], xattrs: bool = True,
                    options: Sequence[str] = ()) -> list[str]:
    """``tar`` writing an exact (``tar_exact_options``) POSIX archive of ``operands`` under
    ``root`` to its stdout, holes kept: the members (``.``), or ``--files-from`` a list.
    ``options`` go before the ``-C`` (exclusions, a transform, a blocking factor)."""
    return [*TAR_TO_STDOUT, *tar_exact_options(xattrs), "--sparse", "--format=posix",
            *options, "-C", str(root), *operands]


def tree_size(path: Path) -> int | None:
    """Apparent bytes under ``path`` (the total for a full copy's progress), if ``du`` can."""
    r = proc.run(["du", "-sb", "--", str(path)], check=False, timeout=600)
    try:
        return int(r.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def tar_send(path: Path, name: str, xattrs: bool = True,
             options: Sequence[str] = ()) -> SendStream:
    """A tar stream of the directory ``path`` (a mounted snapshot), members ``./...``.

    ``xattrs=False`` for a source that cannot hold any (zfs-fuse), so tar does not ask;
    ``options`` add to ``tar_create_argv``'s (a backup leaves some directories out).
    """
    return SendStream(tar_create_argv(path, ["."], xattrs, options), "tar", name,
                      size_hint=tree_size(path))


def unhandled_stream(driver: str, how: str, offered: Stream | None = None) -> InvalidInput:
    """The error for a stream type ``driver`` cannot send, or cannot receive when a stream
    is ``offered``: that stream is killed first, so its producer stops rather than wait for
    a reader that never comes."""
    if offered is None:
        return InvalidInput(f"the {driver} driver cannot send a {how!r} stream")
    offered.kill()
    return InvalidInput(f"the {driver} driver cannot receive a {how!r} stream")


NOT_STORABLE = ("Cannot set", "Operation not supported")


def tar_extract(stream: Stream, dest: Path, meter: ProgressMeter | None,
                acls: bool = True) -> int:
    """Unpack a tar stream into ``dest`` exactly (owners, modes, xattrs, ACLs).

    GNU tar refuses members with ``..`` and strips leading ``/``; ``--delay-directory-
    restore`` sets directory modes last so read-only directories still fill. tar only warns
    (exit 0) when the target cannot store an xattr or ACL: such warnings fail the receive,
    so nothing is dropped silently on a pool without xattrs (zfs-fuse). There ``acls`` is
    False, because ``--acls`` warns for every member even without ACLs; extended ACLs still
    arrive as ``system.posix_acl_*`` xattrs and fail the receive as they should.
    """
    argv = ["tar", "--extract", "--file=-", *tar_exact_options(acls=acls), "--same-permissions",
            "--same-owner", "--delay-directory-restore", "-C", str(dest)]
    try:
        return receive_with(argv, stream, meter, fatal_stderr=NOT_STORABLE)
    except CommandFailed as e:
        if any(m in e.stderr for m in NOT_STORABLE):
            raise _not_storable(dest, e.stderr) from e
        raise


def _not_storable(dest: Path | str, detail: str) -> StorageError:
    first = detail.strip().splitlines()[0] if detail.strip() else ""
    return StorageError(
        f"the target pool cannot store the source's xattrs or ACLs ({first})",
        "pick a target pool that keeps xattrs (dir, btrfs), or remove them at the source; "
        "nothing was changed on the target",
    )


def tar_receive(
    backend: StorageBackend, vol: VolumeRef, name: str, stream: Stream, meter: ProgressMeter | None
) -> Snapshot:
    """Receive a tar stream as the volume's new content plus snapshot ``name``.

    A new volume is filled in place and deleted if anything fails. An existing volume is
    never touched until the whole stream has arrived in a scratch volume; it is then
    synced over with rsync, so a broken stream leaves it exactly as it was.
    """
    acls = bool(backend.supports_xattrs)
    exact = bool(backend.subsecond_mtimes)
    if not backend.volume_exists(vol):
        path = backend.create_volume(vol)
        try:
            tar_extract(stream, path, meter, acls)
            return backend.snapshot(vol, SnapshotName(name))
        except BaseException:
            stream.kill()
            backend.delete_volume(vol)
            raise
    scratch = VolumeRef(vol.type, f"{vol.name[:50]}-recv")
    if backend.volume_exists(scratch):
        backend.delete_volume(scratch)
    spath = backend.create_volume(scratch)
    try:
        tar_extract(stream, spath, meter, acls)
        rsync_tree(spath, backend.volume_path(vol), exact_times=exact, checksum=not exact)
    finally:
        stream.kill()
        backend.delete_volume(scratch)
    return backend.snapshot(vol, SnapshotName(name))


#: how often a first copy's progress is looked at (seconds)
PROGRESS_EVERY = 0.25


def _fs_used(path: Path) -> int | None:
    """Bytes in use on the filesystem holding ``path`` (None when it cannot be asked)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def copy_into_empty(src: Path, dst: Path, meter: ProgressMeter | None = None) -> int:
    """Fill the empty directory ``dst`` with an exact copy of ``src``; return the bytes.

    For the first copy into a new target, where rsync has nothing to compare with: ``cp``
    copies in the kernel (``copy_file_range``, a CoW clone where the filesystem can), about
    2.5x faster than rsync's sender/receiver pair on a 1 GiB tree (bench/README.md,
    "Storage"). What it keeps is what ``rsync_exact`` keeps (the dir driver's snapshots are
    made the same way): owners by number, modes, nanosecond times, hard links, holes,
    devices, every xattr and ACL; ``--preserve=all`` after ``-a`` makes a lost xattr an
    error, not a silent omission. ``-T`` also gives ``dst`` itself ``src``'s owner, mode
    and times, as rsync's ``src/ dst/`` does.
    """
    argv = ["cp", "-a", "--preserve=all", "--reflink=auto", "--sparse=always", "-T", "--",
            str(src), str(dst)]
    with tempfile.TemporaryFile() as errfile:
        child = proc.start_process(argv, stderr=errfile)
        try:
            # cp says nothing while it works: the progress shown is what the target's
            # filesystem has gained (nothing for a CoW clone, which is instant anyway)
            base = _fs_used(dst)
            while True:
                try:
                    rc = child.wait(timeout=PROGRESS_EVERY)
                    break
                except proc.TimeoutExpired:
                    if meter is not None and base is not None:
                        meter.set_done(max(0, (_fs_used(dst) or base) - base))
        except BaseException:
            child.kill()
            child.wait()
            raise
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    if rc != 0:
        if "No space left" in err:
            raise NoSpace(f"copy to {dst}: no space left on the target pool",
                          "free space on the target pool or pick another pool")
        if "Operation not supported" in err:
            raise _not_storable(dst, err)
        raise CommandFailed(argv, rc, err.strip())
    size = tree_size(dst) or 0
    if meter is not None:
        meter.set_done(size, size)
        meter.finish()
    return size


_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%")
_STAT = re.compile(r"^(Literal data|Total transferred file size|Total file size): ([\d,]+)")


def rsync_exact(*, xattrs: bool = True, exact_times: bool = True,
                checksum: bool = False) -> list[str]:
    """rsync's options for "``dst`` is exactly ``src``": what is kept and when a file
    differs. The copy (``rsync_tree``) and the check after it
    (``migrator.pipelines.target_check``) both use them, so the check compares files the
    way the copy decided what to write.

    ``-aHS --numeric-ids --delete``: hard links, sparse files, devices and numeric owners
    survive, extras go; ``xattrs`` adds ``-AX`` (xattrs, ACLs) where the pools keep them.
    Files are compared by size and mtime to the nanosecond (``exact_times``,
    ``--modify-window=-1``): rsync's default whole-second check skipped a same-length
    rewrite within one second and left old data on the target (a test caught it). Where one
    end keeps whole seconds only (zfs-fuse), exact times would make every file differ:
    callers pass ``exact_times=False, checksum=True``, which compares contents.
    """
    argv = ["-aHSAX" if xattrs else "-aHS", "--numeric-ids", "--delete"]
    if exact_times:
        argv += ["--modify-window=-1"]
    if checksum:
        argv += ["--checksum"]
    return argv


def rsync_tree(
    src: Path, dst: Path | str, meter: ProgressMeter | None = None, checksum: bool = False,
    dry_run: bool = False, exact_times: bool = True, rsh: str | None = None,
    compress: bool = False,
) -> int:
    """Make ``dst`` an exact copy of ``src`` (deleting extras); return the bytes written.

    With ``rsync_exact``'s options, xattrs and ACLs included: a target that cannot store
    an xattr or ACL (zfs-fuse) makes rsync fail (exit 23), which is reported, never
    ignored. Only changed files are written, which is what makes a refresh between
    different drivers cheap. ``dry_run`` changes nothing.

    ``rsh`` makes ``dst`` remote (``host:path``): rsync's own delta protocol then runs over
    that command (``migrator.transport.rsync_relay`` passes a shim that hands the pipes to
    the agent's channel); ``compress`` has rsync compress its data with zstd.
    """
    argv = ["rsync", *rsync_exact(exact_times=exact_times, checksum=checksum), "--stats",
            "--info=progress2", "--no-inc-recursive"]
    if dry_run:
        argv += ["--dry-run"]
    if compress:
        argv += ["--compress", "--compress-choice=zstd"]
    if rsh:
        argv += ["--rsh", rsh]
    argv += [f"{src}/", f"{dst}/"]

    def on_line(line: str) -> None:
        m = _PROGRESS.match(line)
        if m and meter is not None:
            done = int(m.group(1).replace(",", ""))
            pct = int(m.group(2))
            meter.set_done(done, done * 100 // pct if pct else None)

    rc, out, err = run_watched(argv, on_line)
    if rc != 0:
        if "No space left" in err:
            raise NoSpace(f"rsync to {dst}: no space left on the target pool",
                          "free space on the target pool or pick another pool")
        if rc == 23 and "Operation not supported" in err:
            raise _not_storable(dst, err)
        raise CommandFailed(argv, rc, err.strip())
    stats: dict[str, int] = {}
    for line in out.splitlines():
        m = _STAT.match(line.strip())
        if m:
            stats[m.group(1)] = int(m.group(2).replace(",", ""))
    if meter is not None:
        meter.finish()
    return stats.get("Literal data", 0)
