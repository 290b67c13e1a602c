"""Images in the LXD/Incus unified tarball layout: ``metadata.yaml`` + ``rootfs/``.

The fingerprint is the sha256 of the tarball, as in LXD, and the tarball itself is kept so an
export hands out the very same bytes (and the same fingerprint) on every host. The unpacked
rootfs is cached beside it for fast launches.

Archives are validated in full before anything is extracted: members must lie under
``rootfs/`` or ``templates/`` (or be ``metadata.yaml``), with no absolute path, no ``..``, no
member reached through a symlink of the archive, hard links only to earlier members, and
device nodes only under ``rootfs/dev``. Extraction then uses GNU tar (numeric ids, xattrs,
ACLs) into a temporary directory that is renamed into place only when complete.

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
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import yaml
import zstandard

from migrator import proc
from migrator.errors import ImageError, InvalidInput, NotFound
from migrator.names import ImageAlias
from runtime.state import ImageRecord, StateStore

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
class _CountingReader:
    """A decompressed stream that counts what it hands out (to detect truncation)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _decompressed(f: IO[bytes]) -> _CountingReader:
    """Explicit decompressors (not tarfile's ``r|*``): they raise on a truncated stream."""
    head = f.read(6)
    f.seek(0)
    raw: Any
    if head.startswith(ZSTD_MAGIC):
        raw = zstandard.ZstdDecompressor().stream_reader(f)
    elif head.startswith(b"\x1f\x8b"):
        raw = gzip.GzipFile(fileobj=f)  # closed with the file by the caller
    elif head.startswith(b"\xfd7zXZ\x00"):
        raw = lzma.LZMAFile(f)  # noqa: SIM115 - closed with the file by the caller
    elif head.startswith(b"BZh"):
        raw = bz2.BZ2File(f)
    else:
        raw = f
    return _CountingReader(raw)


def _clean_member_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise ImageError(
            f"unsafe path in image archive: {name!r}",
            "the archive is malformed or malicious; nothing was extracted",
        )
    parts = [x for x in p.parts if x not in (".", "")]
    return "/".join(parts)


def validate_archive(path: Path) -> ImageContent:
    """Read the whole archive once; raise ImageError on anything unsafe or malformed."""
    metadata: dict[str, Any] | None = None
    seen: set[str] = set()
    symlinks: set[str] = set()
    count = size = 0
    try:
        with open(path, "rb") as f:
            stream = _decompressed(f)
            tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
            for m in tar:
                name = _clean_member_name(m.name)
                if not name:
                    continue
                top = name.split("/", 1)[0]
                if name != "metadata.yaml" and top not in ("rootfs", "templates"):
                    raise ImageError(
                        f"unexpected member {m.name!r} in image archive",
                        "an image holds metadata.yaml, rootfs/ and templates/",
                    )
                parents = name.split("/")
                for i in range(1, len(parents)):
                    if "/".join(parents[:i]) in symlinks:
                        raise ImageError(
                            f"member {m.name!r} lies behind a symlink of the archive",
                            "the archive is malformed or malicious",
                        )
                if m.islnk():
                    target = _clean_member_name(m.linkname)
                    if target not in seen:
                        raise ImageError(
                            f"hard link {m.name!r} points outside the archive ({m.linkname!r})"
                        )
                if m.issym():
                    symlinks.add(name)
                if (m.ischr() or m.isblk()) and not name.startswith("rootfs/dev/"):
                    raise ImageError(f"device node {m.name!r} outside rootfs/dev")
                if name == "metadata.yaml":
                    if not m.isfile() or m.size > MAX_METADATA:
                        raise ImageError("metadata.yaml is not a small regular file")
                    data = tar.extractfile(m)
                    assert data is not None
                    metadata = yaml.safe_load(data.read())
                seen.add(name)
                count += 1
                size += m.size
            # stream mode stops quietly at a cut: demand the two zero end blocks
            end = tar.offset
            stream.drain()
            if stream.count < end + 2 * tarfile.BLOCKSIZE:
                raise ImageError(f"{path} is truncated (the tar archive has no end)",
                                 "copy the image again; nothing was extracted")
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError, TypeError,
            ValueError, lzma.LZMAError) as e:
        raise ImageError(f"{path} is not a readable image archive: {e}") from e
    except yaml.YAMLError as e:
        raise ImageError(f"metadata.yaml in {path} is not valid YAML: {e}") from e
    if not isinstance(metadata, dict):
        raise ImageError(
            f"{path} has no metadata.yaml mapping",
            "a unified image tarball holds metadata.yaml and rootfs/",
        )
    if "rootfs" not in seen:
        raise ImageError(f"{path} has no rootfs/ directory")
    return ImageContent(metadata, count, size)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Flags that keep a rootfs exact: numeric ids, xattrs (file capabilities), ACLs.
TAR_EXACT = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def pack(src_dir: Path, out: Path) -> None:
    """Write the unified tarball of ``src_dir`` (metadata.yaml, rootfs/, templates/)."""
    members = [m for m in ("metadata.yaml", "rootfs", "templates") if (src_dir / m).exists()]
    argv = ["tar", *TAR_EXACT, "--sparse", "-I", "zstd -T0 -3 -q", "-C", str(src_dir), "-cf",
            str(out), *members]
    proc.run(argv, timeout=None)


def unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    argv = ["tar", *TAR_EXACT, "--same-permissions", "--same-owner", "-C", str(dest), "-xf",
            str(archive)]
    proc.run(argv, timeout=None)


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
        if alias is not None:
            ImageAlias(alias)
        if not path.is_file():
            raise NotFound(f"image file {path} not found")
        content = validate_archive(path)
        fp = sha256_file(path)
        props = dict(content.metadata.get("properties") or {})
        if "init" not in props:
            props["init"] = "busybox" if props.get("os") == "busybox" else "systemd"
        dest = self.dir / fp
        if not dest.exists():
            tmp = self.dir / f".{fp}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                unpack(path, tmp)
                shutil.copyfile(path, self.tarball(fp))
                os.chmod(self.tarball(fp), 0o600)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                self.tarball(fp).unlink(missing_ok=True)
                raise
        rec = ImageRecord(fp, alias, props, path.stat().st_size, time.time())
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
