"""A host: one state root (database, LXC path, images, pool disks) and its network.

Several independent hosts can live on one machine: each has its own state root
(``--root``/``MIGRATOR_ROOT``) and, for test hosts, its own network namespace. Everything the
runtime does goes through a ``Host``, which is what later pipelines open on both ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from migrator.backends import StorageBackend, driver_class, open_backend, zfs
from migrator.backends.btrfs import make_loop_filesystem
from migrator.core import proc
from migrator.core.errors import InvalidInput, InvalidState, MigratorError, StorageError
from migrator.core.names import PoolName
from migrator.runtime import network
from migrator.runtime.state import PoolRecord, StateStore

DEFAULT_ROOT = Path("/var/lib/migrator")
DEFAULT_POOL_SIZE = 10 * 2**30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10GiB``, ``512M``, ``1T`` -> bytes (binary units, as LXD reads them)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidInput(f"invalid size {text!r}", "write it like 10GiB, 512MiB or 1TiB")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def root_from_env(root: str | Path | None = None) -> Path:
    if root:
        return Path(root)
    env = os.environ.get("MIGRATOR_ROOT")
    return Path(env) if env else DEFAULT_ROOT


class Host:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        # 0711: unprivileged containers' root (a high uid) must traverse to its rootfs.
        os.chmod(self.root, 0o711)
        self.state = StateStore(self.root / "state.db")
        self.lxcpath = self.root / "lxc"
        self.images_dir = self.root / "images"
        self.disks_dir = self.root / "disks"
        self.pools_dir = self.root / "storage-pools"
        for d in (self.lxcpath, self.images_dir, self.disks_dir, self.pools_dir):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o711)
        self._backends: dict[str, StorageBackend] = {}

    def close(self) -> None:
        self.state.close()

    # network -----------------------------------------------------------------------------
    @property
    def netns(self) -> str | None:
        return self.state.get_setting("network.netns") or None

    def network_config(self) -> network.NetworkConfig:
        address = network.parse_subnet(
            self.state.get_setting("network.subnet", network.DEFAULT_SUBNET) or "")
        pool_text = self.state.get_setting("network.range")
        overlay_text = self.state.get_setting("network.overlay")
        reserved = self.state.get_setting("network.reserved")
        return network.NetworkConfig(
            netns=self.netns,
            bridge=self.state.get_setting("network.bridge", network.DEFAULT_BRIDGE) or "",
            address=address,
            ip_range=network.parse_range(pool_text, address) if pool_text else None,
            overlay=network.Overlay.from_json(overlay_text) if overlay_text else None,
            reserved=frozenset(reserved.split(",")) if reserved else frozenset(),
        )

    def init(self, netns: str | None, subnet: str | None, bridge: str | None, *,
             addr_range: str | None = None, overlay: network.Overlay | None = None,
             no_overlay: bool = False) -> list[str]:
        """Record this host's network settings and create its namespace, bridge and (with
        ``overlay``) its VXLAN device with its peers. Everything is checked before anything
        is recorded or made; what is recorded is made again by the next ``init`` with no
        options (after a reboot). ``addr_range`` ``""`` goes back to the whole subnet.
        Returns warnings for the operator."""
        if netns:
            network.validate_ifname(netns)
        if bridge:
            network.validate_ifname(bridge)
        if subnet:
            network.parse_subnet(subnet)
        if overlay is not None and no_overlay:
            raise InvalidInput("a VXLAN overlay given and taken away at once",
                               "give either the --vxlan-* options or --no-vxlan")
        new_subnet = network.parse_subnet(
            subnet or self.state.get_setting("network.subnet", network.DEFAULT_SUBNET) or "")
        pool_text = addr_range if addr_range is not None else \
            self.state.get_setting("network.range")
        if pool_text:
            network.parse_range(pool_text, new_subnet)  # also an old range in a new subnet
        if self.state.list_containers() and (netns is not None or subnet or bridge):
            current = (self.netns, self.state.get_setting("network.subnet"))
            if (netns, subnet) != current:
                raise InvalidState("the host has containers; its network cannot change now")
        old = self.network_config()
        with self.state.transaction():
            if netns is not None:
                self.state.set_setting("network.netns", netns)
            if subnet:
                self.state.set_setting("network.subnet", subnet)
            if bridge:
                self.state.set_setting("network.bridge", bridge)
            if addr_range is not None:
                if addr_range:
                    self.state.set_setting("network.range", addr_range)
                else:
                    self.state.delete_setting("network.range")
            if overlay is not None:
                self.state.set_setting("network.overlay", overlay.to_json())
            elif no_overlay:
                self.state.delete_setting("network.overlay")
        net = self.network_config()
        if old.overlay is not None and (old.bridge, old.netns) != (net.bridge, net.netns):
            network.ensure_overlay(dataclasses.replace(old, overlay=None))  # the old device
        network.ensure_bridge(net)
        try:
            return network.ensure_overlay(net)
        except MigratorError:
            if overlay is not None:  # e.g. no device has that address: keep the old record
                with self.state.transaction():
                    if old.overlay is not None:
                        self.state.set_setting("network.overlay", old.overlay.to_json())
                    else:
                        self.state.delete_setting("network.overlay")
            raise

    def set_overlay_peers(self, add: Sequence[str] = (), remove: Sequence[str] = ()
                          ) -> network.Overlay:
        """Add and remove VXLAN peers (``migrate host overlay``), recorded then applied."""
        net = self.network_config()
        if net.overlay is None:
            raise InvalidState("this host has no VXLAN overlay",
                               "set it up first: migrate init --vxlan-id N --vxlan-local ADDR")
        gone = {network.parse_ipv4(x, "VXLAN peer") for x in remove}
        kept = [str(p) for p in net.overlay.peers if p not in gone]
        ov = network.make_overlay(net.overlay.vni, str(net.overlay.local), [*kept, *add],
                                  net.overlay.port)
        with self.state.transaction():
            self.state.set_setting("network.overlay", ov.to_json())
        network.ensure_bridge(net)
        network.ensure_overlay(dataclasses.replace(net, overlay=ov))
        return ov

    def reserve_ipv4(self, address: str, reserved: bool = True) -> None:
        """Keep ``address`` out of (or put it back into) this host's allocation, when the host
        shares its network: called when a container of its range moves to another host,
        which keeps the address, and when one comes back. A no-op on an isolated host."""
        net = self.network_config()
        if net.overlay is None:
            return
        now = set(net.reserved)
        now = now | {address} if reserved else now - {address}
        with self.state.transaction():
            if now:
                self.state.set_setting("network.reserved", ",".join(
                    sorted(now, key=ipaddress.IPv4Address)))
            else:
                self.state.delete_setting("network.reserved")

    # pools -------------------------------------------------------------------------------
    def create_pool(
        self, name: str, driver: str, source: str | None = None, size: str | None = None
    ) -> PoolRecord:
        pname = PoolName(name)
        backend_class = driver_class(driver)  # InvalidInput naming the drivers there are
        if any(p.name == pname for p in self.state.list_pools()):
            raise InvalidInput(f"storage pool {pname!r} already exists", "pick another name")
        prepare = {"dir": self._prepare_dir, "btrfs": self._prepare_btrfs,
                   "zfs": self._prepare_zfs}[driver]
        undo: list[Callable[[], object]] = []
        self.share_pools_dir()
        try:
            config = prepare(pname, source, size, undo)
            rec = PoolRecord(pname, driver, source or "", config)
            backend_class.from_config(config).activate()
            self.state.add_pool(rec)
        except BaseException:
            # best-effort undo, newest first: the original error is the one to report
            for fn in reversed(undo):
                with contextlib.suppress(Exception):
                    fn()
            raise
        return self.state.get_pool(pname)

    def _prepare_dir(
        self, pname: str, source: str | None, size: str | None, undo: list[Callable[[], object]]
    ) -> dict[str, str]:
        path = Path(source).absolute() if source else self.pools_dir / pname
        if source and not path.is_dir():
            raise InvalidInput(f"source directory {path} does not exist")
        if source and any(path.iterdir()):
            raise InvalidInput(
                f"source directory {path} is not empty",
                "give an empty directory so no data can be mixed up",
            )
        if not path.exists():
            path.mkdir(parents=True)
            undo.append(path.rmdir)
        return {"path": str(path)}

    def _prepare_btrfs(
        self, pname: str, source: str | None, size: str | None, undo: list[Callable[[], object]]
    ) -> dict[str, str]:
        if source:
            path = Path(source).absolute()
            fstype = _fstype(path)
            if fstype != "btrfs":
                raise InvalidInput(
                    f"{path} is not a directory on btrfs (it is {fstype or 'missing'})",
                    "give a directory on a mounted btrfs filesystem, or no --source for a "
                    "loop file",
                )
            return {"path": str(path)}
        loop = self.disks_dir / f"{pname}.img"
        if loop.exists():
            raise InvalidInput(
                f"{loop} already exists",
                "a pool of that name was not cleaned up; remove the file",
            )
        make_loop_filesystem(loop, parse_size(size) if size else DEFAULT_POOL_SIZE)
        undo.append(lambda: loop.unlink(missing_ok=True))
        config = {"path": str(self.pools_dir / pname), "loop_file": str(loop),
                  "size": size or "10GiB"}
        undo.append(lambda: open_backend("btrfs", config).deactivate())
        return config

    def _prepare_zfs(
        self, pname: str, source: str | None, size: str | None, undo: list[Callable[[], object]]
    ) -> dict[str, str]:
        """A zpool on a sparse file (no source), or a child dataset of ``source``."""
        path = self.pools_dir / pname
        if source:
            dataset = f"{source.strip('/')}/mig-{pname}"
            zfs.create_base_dataset(source.strip("/"), dataset, path)
            config = {"path": str(path), "dataset": dataset,
                      "zpool": source.strip("/").split("/")[0]}
            undo.append(lambda: open_backend("zfs", config).destroy())
            return config
        nbytes = parse_size(size) if size else DEFAULT_POOL_SIZE
        if nbytes < zfs.MIN_POOL_SIZE:
            raise InvalidInput(f"a zfs pool needs at least 64MiB, not {size}",
                               "give --size 64MiB or more")
        loop = self.disks_dir / f"{pname}.zfs.img"
        if loop.exists():
            raise InvalidInput(
                f"{loop} already exists",
                "a pool of that name was not cleaned up; remove the file",
            )
        zpool = zfs.zpool_name(self.root, pname)
        zfs.create_loop_pool(zpool, loop, nbytes, path)
        config = {"path": str(path), "dataset": zpool, "zpool": zpool, "loop_file": str(loop),
                  "size": size or "10GiB"}
        undo.append(lambda: open_backend("zfs", config).destroy())
        return config

    def backend(self, pool: str) -> StorageBackend:
        """The pool's driver, activated (mounted) on first use in this process."""
        if pool not in self._backends:
            rec = self.state.get_pool(pool)
            b = open_backend(rec.driver, rec.config)
            self.share_pools_dir()
            b.activate()
            self._backends[pool] = b
        return self._backends[pool]

    def delete_pool(self, name: str) -> None:
        rec = self.state.get_pool(name)
        users = self.state.pool_users(name)
        if users:
            raise InvalidState(
                f"storage pool {name!r} is in use by: {', '.join(users)}",
                "delete or move those first",
            )
        b = self.backend(name)
        b.destroy()
        self._backends.pop(name, None)
        self.state.delete_pool(rec.name)

    def default_pool(self) -> str:
        pools = self.state.list_pools()
        if not pools:
            raise StorageError(
                "this host has no storage pool",
                "create one: `migrate pool create default --driver dir`",
            )
        for p in pools:
            if p.name == "default":
                return p.name
        return pools[0].name

    def share_pools_dir(self) -> None:
        """``<root>/storage-pools`` as a shared mount (bound onto itself), made before the
        first pool mounts under it; idempotent.

        Why: every lxc-* command runs in a mount namespace of its own (``core/nsexec.py``),
        whose copies of the host's mounts follow the host's only where the host's mount is
        shared, and ``/`` is private on many hosts. Without this, a running container's LXC
        monitor keeps a copy of every pool mount that existed when it started: deleting or
        moving another container's zfs dataset then fails "dataset is busy" for as long as
        that container runs. Under a shared parent, an unmount here reaches those copies.
        A pools directory that already holds mounts but is not a mount itself (a host set up
        before this) is left as it is until its pools are next unmounted."""
        with open(self.root / ".pools.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mounts = _mountinfo()
            here = mounts.get(str(self.pools_dir))
            if here is None:
                inside = str(self.pools_dir) + "/"
                if any(m.startswith(inside) for m in mounts):
                    return
                proc.run(["mount", "--bind", str(self.pools_dir), str(self.pools_dir)],
                         hint="the state root's storage-pools directory must be mountable")
            elif "shared:" in here:
                return
            proc.run(["mount", "--make-shared", str(self.pools_dir)])

    def unshare_pools_dir(self) -> None:
        """Undo ``share_pools_dir`` once every pool is unmounted (teardown)."""
        if str(self.pools_dir) in _mountinfo():
            proc.run(["umount", str(self.pools_dir)], check=False)

    def deactivate_pools(self) -> None:
        """Deactivate every pool; one failing does not keep the others active."""
        first: MigratorError | None = None
        for rec in self.state.list_pools():
            try:
                open_backend(rec.driver, rec.config).deactivate()
            except MigratorError as e:
                first = first or e
        self._backends.clear()
        if first is not None:
            raise first


def _mountinfo() -> dict[str, str]:
    """Mount point -> its optional fields ("shared:N", "master:N" ...), from this process's
    /proc/self/mountinfo (the last mount on a point wins, as it is the one seen)."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 7:
                continue
            point = fields[4].replace("\\040", " ").replace("\\011", "\t")
            found[point] = " ".join(fields[6:fields.index("-")] if "-" in fields else [])
    return found


def _fstype(path: Path) -> str | None:
    if not path.exists():
        return None
    best, fstype = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(
                mnt
            ) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype
