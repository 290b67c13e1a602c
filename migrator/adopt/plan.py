"""Planning the adoption of an LXC container: every check that looks at this machine,
nothing changed. ``plan_import`` is what ``--dry-run`` shows and ``import_lxc`` follows.

Beyond the config's own conversion (``adopt.lxc_config``): the original must be stopped, the
name free here, every file owner of an unprivileged rootfs inside its id map (else it would
not shift into the runtime's map), and the rootfs a plain directory tree. The container's
init and distribution are read from its rootfs the way the container sees it.

The original's state is asked of LXC in this process's own network namespace: LXC's command
sockets are per namespace, and an LXC container started from a shell lives in the host's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from migrator.adopt.lxc_config import Conversion, convert_config, read_config, unquote
from migrator.backends.generic import tree_size
from migrator.core import proc
from migrator.core.errors import (
    AlreadyExists,
    ContainerError,
    InvalidInput,
    InvalidState,
    NotFound,
)
from migrator.core.names import ContainerName, PoolName
from migrator.runtime import idmap
from migrator.runtime.containers import Containers
from migrator.runtime.inroot import RootDir

DEFAULT_LXCPATH = Path("/var/lib/lxc")

@dataclass
class ImportResult:
    """What ``import-lxc`` did or, with ``dry_run``, would do (``--format json`` dumps it)."""

    container: str
    source: str
    pool: str
    privileged: bool
    dry_run: bool
    config: dict[str, str]
    ipv4: str | None
    hwaddr: str | None
    shift: int
    size: int | None
    converted: list[str]
    replaced: list[str]
    unconvertible: list[str]
    notes: list[str]
    bytes: int = 0
    seconds: float = 0.0
    verified: str | None = None
    deleted: bool = False
    operation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImportPlan:
    name: ContainerName
    lxcpath: Path
    rootfs: Path
    pool: PoolName
    conversion: Conversion
    ipv4: str | None  # the address to ask the runtime for (None: allocate one)
    shift: int
    size: int | None
    lxc_snapshots: list[str]

    def result(self, dry_run: bool) -> ImportResult:
        c = self.conversion
        return ImportResult(self.name, str(self.lxcpath / self.name), self.pool, c.privileged,
                            dry_run, dict(self.config), self.ipv4, c.hwaddr, self.shift,
                            self.size, list(c.converted), list(c.replaced),
                            list(c.unconvertible), list(c.notes))

    @property
    def config(self) -> dict[str, str]:
        return self.conversion.config


def lxc_state(lxcpath: Path, name: str) -> str:
    """The original's state (RUNNING, STOPPED...) as LXC in this namespace reports it."""
    r = proc.run(["lxc-info", "-P", str(lxcpath), "-n", name, "-sH"], check=False)
    state = r.stdout.strip()
    if r.returncode != 0 or not state:
        raise ContainerError(f"cannot tell whether LXC container {name!r} is running: "
                             f"{r.stderr.strip() or 'lxc-info said nothing'}",
                             f"check it by hand: lxc-info -P {lxcpath} -n {name}")
    return state


def list_lxc_containers(lxcpath: Path) -> list[str]:
    """Names of the containers under ``lxcpath`` (directories holding a ``config``)."""
    if not lxcpath.is_dir():
        raise NotFound(f"LXC path {lxcpath} does not exist", "give it with --lxcpath")
    return sorted(p.name for p in lxcpath.iterdir()
                  if not p.name.startswith(".") and (p / "config").is_file())


def plan_import(cts: Containers, name: str, lxcpath: Path = DEFAULT_LXCPATH,
                pool: str | None = None) -> ImportPlan:
    """Every check, nothing changed: the plan ``import_lxc`` follows (and ``--dry-run``
    shows). Raises the first blocking problem as a typed error with a hint."""
    host = cts.host
    lxcpath = Path(os.path.abspath(lxcpath))
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInput(f"invalid LXC container name {name!r}")
    if lxcpath.resolve() == host.lxcpath.resolve():
        raise InvalidInput(f"{lxcpath} is this runtime's own LXC path",
                           "its containers are already the runtime's")
    src = lxcpath / name
    if not (src / "config").is_file():
        raise NotFound(f"no LXC container {name!r} in {lxcpath}",
                       f"list them: lxc-ls -P {lxcpath}")
    cname = ContainerName(name)
    conv = convert_config(read_config(src / "config"), cname)
    if conv.problems:
        raise InvalidInput(f"LXC container {name!r} cannot be adopted: "
                           + "; ".join(conv.problems),
                           "fix its config (lxc-update-config rewrites legacy keys), then "
                           "import again")
    state = lxc_state(lxcpath, name)
    if state != "STOPPED":
        raise InvalidState(f"LXC container {name!r} is {state.lower()}",
                           f"stop it first: lxc-stop -P {lxcpath} -n {name}")
    if cts.state.has_container(cname) or (host.lxcpath / cname).exists():
        raise AlreadyExists(f"the runtime already has a container named {cname!r}",
                            "delete or rename that one first (`migrate rename`), or rename "
                            f"the LXC container (lxc-copy -P {lxcpath} -R -n {name} -N NEW)")
    pool_name = PoolName(pool) if pool else PoolName(host.default_pool())
    backend = host.backend(pool_name)  # NotFound for an unknown pool
    assert conv.rootfs is not None
    rootfs = Path(conv.rootfs)
    if not rootfs.is_dir() or rootfs.is_symlink():
        raise NotFound(f"the rootfs of {name!r}, {rootfs}, is not a directory",
                       "was it moved or deleted?")
    shift = 0
    if conv.idmap is not None:
        target = idmap.default_idmap()
        size = min(conv.idmap.size, target.size)
        outside = ids_outside(rootfs, conv.idmap.base, size)
        if outside:
            first = ", ".join(outside[:3])
            raise InvalidInput(
                f"{len(outside)} file(s) in {rootfs} are owned by ids outside the container's "
                f"map ({conv.idmap.base}..{conv.idmap.base + size - 1}): {first}",
                "inside the container they show as nobody; chown them into the map (or "
                "remove them), then import again")
        shift = target.base - conv.idmap.base
    init, image = detect_image(rootfs)
    conv.config.update(image)
    conv.config["image.init"] = init
    ipv4 = _wanted_address(cts, conv)
    snaps_dir = src / "snaps"
    lxc_snaps = sorted(p.name for p in snaps_dir.iterdir()) if snaps_dir.is_dir() else []
    if lxc_snaps:
        conv.unconvertible.append(f"LXC snapshots {', '.join(lxc_snaps)} (only the "
                                  "container's current state is imported)")
    if not backend.supports_xattrs:
        conv.notes.append(f"pool {pool_name} keeps no xattrs or ACLs: a rootfs holding any "
                          "is refused during the copy")
    return ImportPlan(cname, lxcpath, rootfs, pool_name, conv, ipv4, shift,
                      tree_size(rootfs), lxc_snaps)


def _wanted_address(cts: Containers, conv: Conversion) -> str | None:
    if conv.ipv4 is None:
        return None
    net = cts.host.network_config()
    ip = ipaddress.ip_address(conv.ipv4)
    if ip not in net.address.network or str(net.address.ip) == conv.ipv4:
        conv.notes.append(f"address {conv.ipv4} is outside this host's network "
                          f"{net.address.network}: a free one is allocated")
        return None
    if conv.ipv4 in cts.state.used_ipv4():
        conv.notes.append(f"address {conv.ipv4} is taken on this host: a free one is "
                          "allocated")
        return None
    return conv.ipv4


def ids_outside(root: Path, base: int, size: int, limit: int = 10) -> list[str]:
    """Up to ``limit`` paths under ``root`` whose owner or group is not in
    ``base..base+size-1`` (they would not shift into the runtime's map)."""
    found: list[str] = []

    def check(path: str, st: os.stat_result) -> None:
        if not (base <= st.st_uid < base + size and base <= st.st_gid < base + size):
            found.append(f"{os.path.relpath(path, root)} ({st.st_uid}:{st.st_gid})")

    st = os.lstat(root)
    check(str(root), st)
    dev = st.st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            p = os.path.join(dirpath, entry)
            s = os.lstat(p)
            if s.st_dev != dev:
                continue
            check(p, s)
            if len(found) >= limit:
                return found
    return found


def _read_inside(root: Path, rel: str, limit: int = 65536) -> str | None:
    """A small regular file of the rootfs, read as the container sees it: links resolve
    inside the rootfs only (``migrator.runtime.inroot``), never out to this host's files."""
    try:
        with RootDir(root) as tree:
            data = tree.read_bytes(rel)
    except (InvalidInput, OSError):
        return None
    return None if data is None else data[:limit].decode(errors="replace")


def detect_image(rootfs: Path) -> tuple[str, dict[str, str]]:
    """The container's init (``busybox``, ``systemd`` or ``unknown``) and ``image.os`` /
    ``image.release`` from its os-release, as the runtime records them for its images."""
    init = "unknown"
    sbin_init = rootfs / "sbin" / "init"
    with contextlib.suppress(OSError):
        st = os.lstat(sbin_init)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(sbin_init)
            init = "busybox" if "busybox" in target else \
                "systemd" if "systemd" in target else "unknown"
        else:
            busybox = os.lstat(rootfs / "bin" / "busybox")
            if (busybox.st_ino, busybox.st_dev) == (st.st_ino, st.st_dev):
                init = "busybox"  # lxc-busybox hard-links init to busybox
    image: dict[str, str] = {}
    text = _read_inside(rootfs, "etc/os-release") or _read_inside(rootfs, "usr/lib/os-release")
    if text:
        fields = {}
        for line in text.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                fields[k.strip()] = unquote(v.strip())
        if fields.get("ID"):
            image["image.os"] = fields["ID"][:64]
        release = fields.get("VERSION_CODENAME") or fields.get("VERSION_ID")
        if release:
            image["image.release"] = release[:64]
    elif init == "busybox":
        image["image.os"] = "busybox"
    return init, image
