"""Images in the LXD/Incus unified tarball layout: ``metadata.yaml`` + ``rootfs/``.

The fingerprint is the sha256 of the tarball, as in LXD, and the tarball itself is kept so an
export hands out the very same bytes (and the same fingerprint) on every host. The unpacked
rootfs is cached beside it for fast launches.

The image file is opened once: copied into the store (hashed on the way: the fingerprint),
and everything after reads only that private copy, so the file cannot be swapped between the
check, the fingerprint and the unpack. The copy is read through ``migrator.targuard`` twice:
a full check first (members under ``rootfs/`` or ``templates/``, or ``metadata.yaml``; no
absolute path, no ``..``, nothing reached through a symlink of the archive, hard links only
to earlier members, no device node but the standard ones under ``rootfs/dev``), then the
unpack, where GNU tar (numeric ids, xattrs, ACLs) reads only the headers the guard rewrote,
into a temporary directory renamed into place (0700) when complete.

Builds (``busybox``, ``debian/SUITE``) are cached machine-wide (``/var/cache/migrator``) by
recipe, so a second host or a second test run imports instead of running debootstrap again.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
import zstandard

from migrator.backends.generic import tar_exact_options, tar_extract
from migrator.core import proc, safeyaml
from migrator.core.errors import ImageError, InvalidInput, MigratorError, NotFound
from migrator.core.names import ImageAlias
from migrator.runtime.state import ImageRecord, StateStore
from migrator.streams import FedStream
from migrator.targuard import TarGuard, TarRules

RECIPE_VERSION = 4  # bump when a recipe's output changes, so caches are rebuilt
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITES = ("bookworm", "trixie", "bullseye")
MAX_METADATA = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# systemd units that cannot work, or cannot be checkpointed, in a container here: logind and
# dbus run nested UTS namespaces / non-root processes CRIU cannot dump on these machines.
DEBIAN_MASKED_UNITS = [
    "systemd-logind.service",
    "getty-static.service",
    "console-getty.service",
    "systemd-networkd-wait-online.service",
    "dbus.service",
    "dbus.socket",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-journald-audit.socket",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
]
PROTECT_HOSTNAME_UNITS = [
    "systemd-logind",
    "systemd-localed",
    "systemd-timedated",
    "systemd-hostnamed",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class ImageContent:
    metadata: dict[str, Any]
    members: int
    size: int


def cache_dir() -> Path:
    return Path(os.environ.get("MIGRATOR_IMAGE_CACHE", "/var/cache/migrator/images"))


# archive validation ------------------------------------------------------------------------
#: what an image may hold: metadata.yaml, templates/ (plain files) and one rootfs, with no
#: device node but the standard character devices under rootfs/dev (LXC's autodev mounts
#: its own /dev over them anyway)
IMAGE_RULES = TarRules(root="rootfs", data_prefix="templates", data_files=("metadata.yaml",),
                       standard_devices=True)
_UNREADABLE = (tarfile.TarError, zstandard.ZstdError, EOFError, OSError, TypeError,
               ValueError, lzma.LZMAError)


def _decompressed(f: IO[bytes]) -> Any:
    """Explicit decompressors (not tarfile's ``r|*``): they raise on a truncated stream."""
    head = f.read(6)
    f.seek(0)
    if head.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f)  # closed with the file by the caller
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f)  # noqa: SIM115 - closed with the file by the caller
    if head.startswith(b"BZh"):
        return bz2.BZ2File(f)
    return f


def _refused(label: object, e: BaseException) -> ImageError:
    if isinstance(e, MigratorError):
        return ImageError(f"{label} is refused: {e.message}",
                          "the archive is malformed or malicious; nothing was extracted")
    if isinstance(e, yaml.YAMLError):
        return ImageError(f"metadata.yaml in {label} is not valid YAML: {e}")
    return ImageError(f"{label} is not a readable image archive: {e}")


def _validate(f: IO[bytes], label: object) -> ImageContent:
    """Read the whole archive from ``f`` through the tar guard; raise ImageError on anything
    unsafe or malformed. The metadata is read from the guard's own output."""
    metadata: Any = None
    has_rootfs = False
    f.seek(0)
    try:
        guard = TarGuard(_decompressed(f), IMAGE_RULES)
        with tarfile.open(fileobj=guard, mode="r|") as tar:  # type: ignore[call-overload]
            for m in tar:
                has_rootfs = has_rootfs or m.name == "rootfs"
                if m.name == "metadata.yaml":
                    if not m.isfile() or m.size > MAX_METADATA:
                        raise ImageError("metadata.yaml is not a small regular file")
                    data = tar.extractfile(m)
                    assert data is not None
                    metadata = safeyaml.load(data.read())
        while guard.read(1 << 20):  # to the end: the guard checks what follows the end
            pass
    except ImageError:
        raise
    except (MigratorError, yaml.YAMLError, *_UNREADABLE) as e:
        raise _refused(label, e) from e
    if not isinstance(metadata, dict):
        raise ImageError(
            f"{label} has no metadata.yaml mapping",
            "a unified image tarball holds metadata.yaml and rootfs/",
        )
    if not has_rootfs:
        raise ImageError(f"{label} has no rootfs/ directory")
    return ImageContent(metadata, guard.summary.members, guard.summary.bytes)


def validate_archive(path: Path) -> ImageContent:
    """Read the whole archive once; raise ImageError on anything unsafe or malformed."""
    with open(path, "rb") as f:
        return _validate(f, path)


class _GuardedFeed(FedStream):
    """An image's archive, through the tar guard, as a pipe GNU tar reads: what tar
    unpacks is what the guard approved and rewrote."""

    how = "tar"
    parent = None
    size_hint = None

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.name = name
        self._guard = TarGuard(_decompressed(f), IMAGE_RULES)
        self.start_feeding("image-feed")

    def produce(self, write: Callable[[bytes | memoryview], None]) -> None:
        while data := self._guard.read(1 << 20):
            write(data)


def pack(src_dir: Path, out: Path) -> None:
    """Write the unified tarball of ``src_dir`` (metadata.yaml, rootfs/, templates/)."""
    members = [m for m in ("metadata.yaml", "rootfs", "templates") if (src_dir / m).exists()]
    argv = ["tar", *tar_exact_options(), "--sparse", "-I", "zstd -T0 -3 -q", "-C", str(src_dir),
            "-cf", str(out), *members]
    proc.run(argv, timeout=None)


def unpack(f: IO[bytes], dest: Path, label: object = "the image") -> None:
    """Unpack the archive open as ``f`` into the new directory ``dest``, through the tar
    guard (GNU tar sees only the members it approved, with headers it wrote)."""
    dest.mkdir(mode=0o700, parents=True)
    f.seek(0)
    feed = _GuardedFeed(f, "image")
    try:
        tar_extract(feed, dest, None, acls=True)
    except BaseException as e:
        feed.kill()
        cause = feed.error or e
        if isinstance(cause, ImageError):
            raise cause from e
        if isinstance(cause, (MigratorError, yaml.YAMLError, *_UNREADABLE)):
            raise _refused(label, cause) from e
        raise


# recipes -------------------------------------------------------------------------------------
def _metadata(os_name: str, release: str, init: str, description: str) -> dict[str, Any]:
    return {
        "architecture": os.uname().machine,
        "creation_date": int(time.time()),
        "properties": {
            "os": os_name,
            "release": release,
            "architecture": os.uname().machine,
            "description": description,
            "variant": "default",
            "init": init,
        },
        "templates": {},
    }


def build_busybox_rootfs(rootfs: Path) -> dict[str, Any]:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise ImageError("busybox is not installed", "apt-get install busybox-static")
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "var/log",
        "run",
        "mnt",
        "home",
        "lib",
    ):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    shutil.copy2(busybox, rootfs / "bin/busybox")
    applets = proc.run([busybox, "--list-full"]).stdout.split()
    for rel in applets:
        link = rootfs / rel
        if rel != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    # busybox init with no tty: run rcS once, then idle; halts on SIGUSR1 (lxc.signal.halt)
    (rootfs / "etc/inittab").write_text("::sysinit:/etc/init.d/rcS\n::shutdown:/bin/umount -a -r\n")
    rcs = rootfs / "etc/init.d/rcS"
    rcs.write_text(
        "#!/bin/sh\nmount -t tmpfs -o mode=1777 tmpfs /tmp 2>/dev/null\n"
        "hostname -F /etc/hostname 2>/dev/null\nexit 0\n"
    )
    rcs.chmod(0o755)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n")
    return _metadata("busybox", "static", "busybox", "BusyBox (static) system container")


def build_debian_rootfs(rootfs: Path, suite: str, log: Log) -> dict[str, Any]:
    if suite not in DEBIAN_SUITES:
        raise InvalidInput(f"unknown Debian suite {suite!r}", f"use one of {DEBIAN_SUITES}")
    log(f"debootstrap {suite} (minbase + systemd-sysv) from {DEBIAN_MIRROR}")
    proc.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=systemd-sysv,iproute2",
            suite,
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        timeout=1800,
    )
    etc = rootfs / "etc/systemd/system"
    for unit in DEBIAN_MASKED_UNITS:
        link = etc / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for unit in PROTECT_HOSTNAME_UNITS:
        d = etc / f"{unit}.service.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "migrator-container.conf").write_text("[Service]\nProtectHostname=no\n")
    (rootfs / "etc/hostname").unlink(missing_ok=True)  # LXC sets the hostname
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    return _metadata("debian", suite, "systemd", f"Debian {suite} (minbase, systemd)")


def recipe_key(recipe: str) -> str:
    return f"{recipe.replace('/', '-')}-v{RECIPE_VERSION}-{os.uname().machine}"


def build_recipe(recipe: str, out: Path, log: Log) -> None:
    """Build ``recipe`` into the unified tarball ``out``."""
    with tempfile.TemporaryDirectory(prefix="migrator-image-", dir=out.parent) as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        rootfs.mkdir()
        if recipe == "busybox":
            meta = build_busybox_rootfs(rootfs)
        elif recipe.startswith("debian/"):
            meta = build_debian_rootfs(rootfs, recipe.split("/", 1)[1], log)
        else:
            raise InvalidInput(
                f"no recipe for image {recipe!r}", "build `busybox` or `debian/bookworm`"
            )
        (work / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        (work / "templates").mkdir()
        log("packing the image tarball")
        partial = out.with_name(out.name + ".partial")
        pack(work, partial)
        partial.replace(out)


class ImageStore:
    """A host's images: ``images/<fp>.tar.*`` (as imported) and ``images/<fp>/`` unpacked."""

    def __init__(self, images_dir: Path, state: StateStore) -> None:
        self.dir = images_dir
        self.state = state

    def rootfs(self, fingerprint: str) -> Path:
        return self.dir / fingerprint / "rootfs"

    def tarball(self, fingerprint: str) -> Path:
        return self.dir / f"{fingerprint}.tar"

    def find(self, ref: str) -> ImageRecord:
        return self.state.find_image(ref)

    def list(self) -> list[ImageRecord]:
        return self.state.list_images()

    def build(self, recipe: str, alias: str | None, log: Log, rebuild: bool = False) -> ImageRecord:
        ImageAlias(recipe)
        cdir = cache_dir()
        cdir.mkdir(parents=True, exist_ok=True)
        cached = cdir / f"{recipe_key(recipe)}.tar.zst"
        if rebuild or not cached.exists():
            build_recipe(recipe, cached, log)
        else:
            log(f"using cached build {cached}")
        return self.import_file(cached, alias or recipe)

    def import_file(self, path: Path, alias: str | None) -> ImageRecord:
        """Import the image file ``path``. It is opened once: copied (and hashed) into the
        store, and everything after reads only that private copy, so the file cannot be
        swapped between the check, the fingerprint and the unpack."""
        if alias is not None:
            ImageAlias(alias)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"image file {path} not found") from e
        except OSError as e:
            raise ImageError(f"image file {path} cannot be opened: {e.strerror}",
                             "give a regular file (not a symlink or a device)") from e
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"image file {path} is not a regular file")
            os.set_blocking(src.fileno(), True)
            return self._import_open(src, path, alias)

    def _import_open(self, src: IO[bytes], label: Path, alias: str | None) -> ImageRecord:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", suffix=".tar", dir=self.dir)
        copy = Path(tmp_name)  # 0600, in the store: only root can change it from now on
        unpacked: Path | None = None
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "w+b") as own:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    own.write(chunk)
                    size += len(chunk)
                own.flush()
                fp = h.hexdigest()
                content = _validate(own, label)
                dest = self.dir / fp
                if not dest.exists():
                    unpacked = self.dir / f".{fp}.tmp"
                    if unpacked.exists():
                        shutil.rmtree(unpacked)
                    unpack(own, unpacked, label)
            if unpacked is not None:
                os.replace(copy, self.tarball(fp))
                unpacked.rename(dest)
                os.chmod(dest, 0o700)  # image trees are not for local users to read
                unpacked = None
        finally:
            copy.unlink(missing_ok=True)
            if unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        props = dict(content.metadata.get("properties") or {})
        if "init" not in props:
            props["init"] = "busybox" if props.get("os") == "busybox" else "systemd"
        rec = ImageRecord(fp, alias, props, size, time.time())
        self.state.add_image(rec)
        return self.state.find_image(fp)

    def export(self, ref: str, dest: str) -> ImageRecord:
        rec = self.find(ref)
        src = self.tarball(rec.fingerprint)
        if dest == "-":
            with open(src, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        else:
            out = Path(dest)
            tmp = out.with_name(f".{out.name}.partial")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o600)
            tmp.replace(out)
        return rec

    def delete(self, ref: str) -> ImageRecord:
        rec = self.find(ref)
        shutil.rmtree(self.dir / rec.fingerprint, ignore_errors=True)
        self.tarball(rec.fingerprint).unlink(missing_ok=True)
        self.state.delete_image(rec.fingerprint)
        return rec


def read_stream_to_file(stream: IO[bytes], dest: Path) -> None:
    with open(dest, "wb") as f:
        shutil.copyfileobj(stream, f, 1 << 20)
