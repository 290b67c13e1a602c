"""System containers on one host: create, run, snapshot, delete.

Every multi-step change is staged with an undo list (``Stages``): a failure part-way through
``create`` removes what it made, so a bad image or a full pool leaves no half container.
The LXC config is rendered from the database record before every start, so the record is the
single source of truth and ``config set`` simply takes effect on the next start (limits are
also applied live to a running container).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.dir import copy_tree
from migrator.core.errors import (
    AlreadyExists,
    ContainerError,
    InvalidState,
    MigratorError,
    Protected,
)
from migrator.core.names import ContainerName, SnapshotName, next_snapshot_name
from migrator.runtime import config as cfg
from migrator.runtime import freezer, idmap
from migrator.runtime.host import Host
from migrator.runtime.images import ImageStore
from migrator.runtime.lxc import ContainerSpec, LxcDriver, cpuset
from migrator.runtime.network import allocate_ipv4
from migrator.runtime.state import ContainerRecord, SnapshotRecord

EXEC_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


class Stages:
    """Undo actions run in reverse order if the block fails (then the error propagates)."""

    def __init__(self) -> None:
        self.undo: list[tuple[str, Callable[[], Any]]] = []

    def __enter__(self) -> Stages:
        return self

    def add_undo(self, what: str, fn: Callable[[], Any]) -> None:
        self.undo.append((what, fn))

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            return
        for _what, fn in reversed(self.undo):
            try:
                fn()
            except Exception:  # noqa: S112 - keep undoing; the first error is the one reported
                continue


@dataclass
class ContainerInfo:
    name: str
    state: str
    ipv4: str | None
    pool: str
    snapshots: int
    image: str | None
    privileged: bool
    config: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Containers:
    """The container manager of one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.state = host.state
        self.lxc = LxcDriver(host.lxcpath, host.netns)
        self.images = ImageStore(host.images_dir, host.state)

    # lookups -----------------------------------------------------------------------------
    def get(self, name: str) -> ContainerRecord:
        return self.state.get_container(ContainerName(name))

    def volume(self, rec: ContainerRecord) -> VolumeRef:
        return VolumeRef("container", rec.name)

    def rootfs(self, rec: ContainerRecord) -> Path:
        return self.host.backend(rec.pool).volume_path(self.volume(rec)) / "rootfs"

    def status(self, name: str) -> str:
        return self.lxc.state(self.get(name).name)

    def spec(self, rec: ContainerRecord) -> ContainerSpec:
        privileged = cfg.is_true(rec.config, "security.privileged")
        mem = rec.config.get("limits.memory")
        cpus = rec.config.get("limits.cpu")
        return ContainerSpec(
            name=rec.name,
            rootfs=self.rootfs(rec),
            log_file=self.host.lxcpath / rec.name / "lxc.log",
            init=rec.config.get("image.init", "systemd"),
            ipv4=rec.ipv4,
            network=self.host.network_config(),
            idmap=None if privileged else idmap.default_idmap(),
            memory=int(mem) if mem else None,
            cpus=int(cpus) if cpus else None,
            mounts=tuple(
                (self.host.backend(a.pool).volume_path(VolumeRef("custom", a.volume)), a.path)
                for a in self.state.list_attachments(container=rec.name)
            ),
            hwaddr=rec.config.get("volatile.eth0.hwaddr"),
        )

    # create / delete ---------------------------------------------------------------------
    def create(
        self,
        image_ref: str,
        name: str,
        pool: str | None = None,
        config: dict[str, str] | None = None,
    ) -> ContainerRecord:
        cname = ContainerName(name)
        conf = dict(config or {})
        for k, v in list(conf.items()):
            conf[k] = cfg.validate(k, v)
        if self.state.has_container(cname) or (self.host.lxcpath / cname).exists():
            raise AlreadyExists(f"container {cname!r} already exists", "pick another name")
        image = self.images.find(image_ref)
        pool_name = pool or self.host.default_pool()
        backend = self.host.backend(pool_name)  # raises NotFound for an unknown pool
        net = self.host.network_config()
        ipv4 = allocate_ipv4(net, self.state.used_ipv4())
        privileged = cfg.is_true(conf, "security.privileged")
        # what the image says of itself is input from whoever built the image
        conf.update(cfg.admit_config(
            {f"image.{key}": str(image.properties[key]) for key in ("os", "release", "init")
             if key in image.properties},
            f"the properties of image {image.fingerprint[:12]}", allow_privileged=False))
        rec = ContainerRecord(cname, pool_name, image.fingerprint, ipv4, conf)
        vol = VolumeRef("container", cname)
        with Stages() as st:
            st.add_undo("delete volume", lambda: backend.delete_volume(vol))
            self._populate_volume(backend, vol, image.fingerprint, privileged)
            st.add_undo("remove LXC config", lambda: self.lxc.remove_config(cname))
            self.lxc.write_config(self.spec_for_new(rec, backend.volume_path(vol) / "rootfs"))
            self.state.add_container(rec)
        return self.get(cname)

    def record_received(
        self, name: str, pool: str, image: str | None, config: Mapping[str, object],
        snapshots: list[SnapshotRecord], ipv4: str | None = None, *, origin: str,
        allow_privileged: bool,
    ) -> ContainerRecord:
        """Record a container whose volume was filled by a transfer, a restore, an import
        or a conversion (or update the record of an existing one: its config, plus the
        snapshots given), in one transaction, then render its LXC config.

        ``config`` and every snapshot's config pass ``config.admit_config`` here, whatever
        the caller checked before: ``origin`` names where they came from in the error, and
        a privileged config needs ``allow_privileged`` (the operator's flag). ``ipv4`` is
        kept when it is free and inside this host's subnet (a moved container keeps its
        address); otherwise a free one is allocated.
        """
        cname = ContainerName(name)
        config = cfg.admit_config(config, origin, allow_privileged=allow_privileged)
        snapshots = admit_snapshots(snapshots, origin, allow_privileged=allow_privileged)
        with self.state.transaction():
            if self.state.has_container(cname):
                self.state.update_container_config(cname, config)
            else:
                used = self.state.used_ipv4()
                net = self.host.network_config()
                if ipv4 and ipv4 not in used and \
                        ipaddress.ip_address(ipv4) in net.address.network and \
                        str(net.address.ip) != ipv4:
                    address = ipv4
                else:
                    address = allocate_ipv4(net, used)
                self.state.add_container(ContainerRecord(cname, pool, image, address, config))
            for s in snapshots:
                self.state.add_snapshot(s)
        rec = self.get(cname)
        if rec.ipv4:  # back with its address: allocatable here again once it leaves
            self.host.reserve_ipv4(rec.ipv4, reserved=False)
        self.lxc.write_config(self.spec(rec))
        return rec

    def spec_for_new(self, rec: ContainerRecord, rootfs: Path) -> ContainerSpec:
        return dataclasses.replace(self.spec(rec), rootfs=rootfs)

    def _populate_volume(self, backend: StorageBackend, vol: VolumeRef, fp: str,
                         privileged: bool) -> None:
        """Fill a new container volume with the image's rootfs, shifted when unprivileged.

        On CoW pools the (shifted) image is kept as an image volume once per pool and each
        container starts as a snapshot of it, as LXD does: launch then costs no copy.
        """
        shift = 0 if privileged else idmap.default_idmap().base
        src_rootfs = self.images.rootfs(fp)

        def fill(p: Path) -> None:
            _copy_rootfs(src_rootfs, p / "rootfs")
            idmap.shift_tree(p / "rootfs", shift)

        if backend.name == "btrfs":
            img_vol = VolumeRef("image", f"{fp}-{shift}")
            if not backend.volume_exists(img_vol):
                tmp_vol = VolumeRef("image", f"{fp}-{shift}.tmp")
                if backend.volume_exists(tmp_vol):
                    backend.delete_volume(tmp_vol)
                p = backend.create_volume(tmp_vol)
                fill(p)
                p.rename(backend.volume_path(img_vol))
            backend.create_volume_from(vol, img_vol)
        else:
            fill(backend.create_volume(vol))

    def launch(
        self,
        image_ref: str,
        name: str,
        pool: str | None = None,
        config: dict[str, str] | None = None,
    ) -> ContainerRecord:
        rec = self.create(image_ref, name, pool, config)
        try:
            self.start(rec.name)
        except MigratorError as e:
            e.hint = (e.hint + "; " if e.hint else "") + (
                f"the container was created; inspect it, then `migrate delete {rec.name}`"
            )
            raise
        return rec

    def delete(self, name: str, force: bool = False) -> None:
        rec = self.get(name)
        if cfg.is_true(rec.config, "security.protection.delete"):
            raise Protected(
                f"container {rec.name!r} is protected from deletion",
                f"unset it first: `migrate config unset {rec.name} security.protection.delete`",
            )
        st = self.lxc.state(rec.name)
        if st != "STOPPED":
            if not force:
                raise InvalidState(
                    f"container {rec.name!r} is {st.lower()}",
                    "stop it first, or delete with --force",
                )
            if st == "FROZEN":
                self.lxc.unfreeze(rec.name)
            self.lxc.stop(rec.name, force=True)
        backend = self.host.backend(rec.pool)
        backend.delete_volume(self.volume(rec))
        self.lxc.remove_config(rec.name)
        self.state.delete_container(rec.name)

    # lifecycle ---------------------------------------------------------------------------
    def start(self, name: str) -> None:
        rec = self.get(name)
        st = self.lxc.state(rec.name)
        if st != "STOPPED":
            raise InvalidState(f"container {rec.name!r} is already {st.lower()}")
        self.lxc.write_config(self.spec(rec))
        self.lxc.start(rec.name)

    def stop(self, name: str, force: bool = False, timeout: int = 30) -> None:
        rec = self.get(name)
        st = self.lxc.state(rec.name)
        if st == "STOPPED":
            raise InvalidState(f"container {rec.name!r} is already stopped")
        if st == "FROZEN":
            self.lxc.unfreeze(rec.name)
        self.lxc.stop(rec.name, timeout=timeout, force=force)

    def restart(self, name: str, force: bool = False, timeout: int = 30) -> None:
        if self.status(name) != "STOPPED":
            self.stop(name, force=force, timeout=timeout)
        self.start(name)

    def freeze(self, name: str) -> None:
        self.lxc.freeze(self._in_state(name, "RUNNING", "freeze").name)

    def unfreeze(self, name: str) -> None:
        self.lxc.unfreeze(self._in_state(name, "FROZEN", "unfreeze").name)

    # what the pipelines ask of LXC ------------------------------------------------------
    # The lifecycle methods above check the state first and refuse what a user should not
    # do; a pipeline (or an undo) that already knows the state, or must not be refused,
    # uses these, which go straight to LXC and need no record.
    def run_state(self, name: str) -> str:
        """What LXC says of ``name`` now: RUNNING, FROZEN, STOPPED (also for a container
        LXC does not know); unlike ``status`` it needs no record."""
        return self.lxc.state(name)

    def run_states(self) -> dict[str, tuple[str, str]]:
        """Every container LXC knows, ``{name: (state, ipv4)}``, from one ``lxc-ls`` (a
        scheduler tick asks once, not once per container)."""
        return self.lxc.states()

    def wait_state(self, name: str, state: str, timeout: float = 30) -> bool:
        """Wait until ``name`` is in ``state``; False on timeout."""
        return self.lxc.wait_state(name, state, timeout)

    def stop_now(self, name: str, force: bool = False) -> None:
        """Stop ``name`` without the checks of ``stop``: a pipeline's final-sync stop of a
        container it knows is running, or an undo's forced stop of a half-restored one."""
        self.lxc.stop(name, force=force)

    @contextlib.contextmanager
    def frozen(self, name: str) -> Iterator[None]:
        """Freeze the running container ``name`` for the block (a consistent snapshot is
        taken in it), then thaw it, whatever the block's outcome. Through the cgroup's
        freezer files where they are found (``runtime/freezer.py``: ``lxc-freeze`` may
        keep it frozen a second longer), else through LXC."""
        init = self.lxc.init_pid(name)
        state_file = freezer.freezer_state_file(init) if init else None
        direct = False
        with contextlib.suppress(OSError):
            direct = state_file is not None and freezer.freeze(state_file)
        if not direct:
            self.lxc.freeze(name)
        try:
            yield
        finally:
            thawed = False
            if direct and state_file is not None:
                with contextlib.suppress(OSError):
                    freezer.thaw(state_file)
                    thawed = True
            if not thawed:
                self.lxc.unfreeze(name)

    def thaw_if_frozen(self, name: str) -> None:
        """Unfreeze ``name`` if it is frozen or freezing (a rollback or release does not
        know; a freezer caught in its transition is thawed too, not left to finish it)."""
        if self.lxc.state(name) in ("FROZEN", "FREEZING"):
            self.lxc.unfreeze(name)

    def memory_usage(self, name: str) -> int:
        """Bytes of memory the running container ``name`` uses now (its cgroup's count)."""
        return int(self.lxc.get_cgroup(name, "memory.usage_in_bytes"))

    def render_lxc_config(self, name: str) -> ContainerSpec:
        """Write the LXC config of ``name`` from its record (the record is the truth) and
        return the spec it was rendered from."""
        spec = self.spec(self.get(name))
        self.lxc.write_config(spec)
        return spec

    def remove_lxc_config(self, name: str) -> None:
        """Remove the LXC directory of ``name`` (its config and log); its volume stays."""
        self.lxc.remove_config(name)

    def _in_state(self, name: str, want: str, verb: str) -> ContainerRecord:
        rec = self.get(name)
        st = self.lxc.state(rec.name)
        if st != want:
            raise InvalidState(f"cannot {verb} {rec.name!r}: it is {st.lower()}")
        return rec

    def _running(self, name: str) -> ContainerRecord:
        rec = self.get(name)
        st = self.lxc.state(rec.name)
        if st != "RUNNING":
            raise InvalidState(
                f"container {rec.name!r} is {st.lower()}", f"start it: `migrate start {rec.name}`"
            )
        return rec

    def exec(
        self, name: str, argv: list[str], input: str | None = None, timeout: float | None = 300
    ) -> tuple[int, str, str]:
        """Run ``argv`` in the container; returns (exit code, stdout, stderr)."""
        rec = self._running(name)
        r = self.lxc.attach(rec.name, argv, EXEC_ENV, input=input, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def exec_interactive(self, name: str, argv: list[str], term: str | None = None) -> int:
        rec = self._running(name)
        env = dict(EXEC_ENV)
        if term:
            env["TERM"] = term
        return self.lxc.attach_interactive(rec.name, argv, env)

    def wait_booted(self, name: str, timeout: float = 120) -> str:
        """Wait until the container's init has finished booting; return its state word.

        systemd: ``systemctl is-system-running --wait`` (retried while systemd's bus socket
        does not exist yet, which is the first half-second after start). Other inits have no
        boot to wait for.
        """
        rec = self._running(name)
        if rec.config.get("image.init") != "systemd":
            return "running"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            r = self.lxc.attach(rec.name, ["systemctl", "is-system-running", "--wait"],
                                EXEC_ENV, timeout=max(left, 1))
            state = r.stdout.strip()
            if state:
                return state
            if time.monotonic() > deadline:
                raise ContainerError(f"container {rec.name!r} did not finish booting in "
                                     f"{timeout:.0f}s: {r.stderr.strip()}",
                                     f"look inside: `migrate exec {rec.name} -- journalctl -b`")
            time.sleep(0.2)

    # listing -----------------------------------------------------------------------------
    def list_all(self) -> list[ContainerInfo]:
        live = self.lxc.states()
        out = []
        for rec in self.state.list_containers():
            st, _ip = live.get(rec.name, ("STOPPED", ""))
            out.append(self._info(rec, st))
        return out

    def info(self, name: str) -> ContainerInfo:
        rec = self.get(name)
        return self._info(rec, self.lxc.state(rec.name))

    def _info(self, rec: ContainerRecord, st: str) -> ContainerInfo:
        return ContainerInfo(
            name=rec.name,
            state=st,
            ipv4=rec.ipv4 if st in ("RUNNING", "FROZEN") else None,
            pool=rec.pool,
            snapshots=len(self.state.list_snapshots(rec.name)),
            image=rec.image,
            privileged=cfg.is_true(rec.config, "security.privileged"),
            config=rec.config,
            created=rec.created,
        )

    # config ------------------------------------------------------------------------------
    def config_set(self, name: str, values: dict[str, str]) -> None:
        rec = self.get(name)
        new = {k: cfg.validate(k, v) for k, v in values.items()}
        conf = dict(rec.config)
        running = self.lxc.state(rec.name) != "STOPPED"
        if "security.privileged" in new and new["security.privileged"] != conf.get(
            "security.privileged", "false"
        ):
            if running:
                raise InvalidState(
                    "security.privileged can only change while stopped",
                    f"`migrate stop {rec.name}` first",
                )
            base = idmap.default_idmap().base
            delta = -base if new["security.privileged"] == "true" else base
            idmap.shift_tree(self.rootfs(rec), delta)
        conf.update(new)
        self.state.update_container_config(rec.name, conf)
        if running:
            self._apply_limits_live(rec.name, new)

    def config_unset(self, name: str, keys: list[str]) -> None:
        rec = self.get(name)
        conf = dict(rec.config)
        for k in keys:
            if k.startswith(cfg.READ_ONLY_PREFIXES):
                cfg.validate(k, "")
            if k == "security.privileged" and conf.get(k) == "true":
                self.config_set(name, {k: "false"})
                conf = dict(self.get(name).config)
            conf.pop(k, None)
        self.state.update_container_config(rec.name, conf)

    def _apply_limits_live(self, name: str, new: dict[str, str]) -> None:
        if "limits.memory" in new:
            self.lxc.set_cgroup(name, "memory.limit_in_bytes", new["limits.memory"])
        if "limits.cpu" in new:
            self.lxc.set_cgroup(name, "cpuset.cpus", cpuset(int(new["limits.cpu"])))

    # snapshots ---------------------------------------------------------------------------
    def snapshot_create(self, name: str, snap: str | None = None, created: float | None = None,
                        expires: float | None = None) -> SnapshotRecord:
        """Snapshot ``name``; ``expires`` (epoch) marks an automatic snapshot the scheduler
        deletes when due, ``created`` is the scheduler's time (simulated ticks)."""
        rec = self.get(name)
        existing = {s.name for s in self.state.list_snapshots(rec.name)}
        if snap is None:
            snap = next_snapshot_name(existing)
        sname = SnapshotName(snap)
        if sname in existing:
            raise AlreadyExists(f"snapshot {rec.name}/{sname} already exists", "pick another name")
        backend = self.host.backend(rec.pool)
        srec = SnapshotRecord(rec.name, sname, time.time() if created is None else created,
                              dict(rec.config), expires)
        with Stages() as st:
            backend.snapshot(self.volume(rec), sname)
            st.add_undo("delete snapshot", lambda: backend.delete_snapshot(self.volume(rec), sname))
            self.state.add_snapshot(srec)
        return srec

    def snapshot_list(self, name: str) -> list[SnapshotRecord]:
        return self.state.list_snapshots(self.get(name).name)

    def snapshot_delete(self, name: str, snap: str) -> None:
        rec = self.get(name)
        s = self.state.get_snapshot(rec.name, SnapshotName(snap))
        self.host.backend(rec.pool).delete_snapshot(self.volume(rec), SnapshotName(s.name))
        self.state.delete_snapshot(rec.name, s.name)

    def snapshot_restore(self, name: str, snap: str) -> bool:
        """Put the snapshot's files and config back; a running container is restarted.

        Returns whether the container was restarted.
        """
        rec = self.get(name)
        s = self.state.get_snapshot(rec.name, SnapshotName(snap))
        was_running = self.lxc.state(rec.name) != "STOPPED"
        if was_running:
            self.stop(rec.name)
        # the snapshot's config was admitted when it was recorded (taken here, or received
        # with the operator's privilege decision); checked again before it becomes the
        # container's, as records made by older versions were not
        config = cfg.admit_config(s.config, f"snapshot {rec.name}/{s.name}",
                                  allow_privileged=True)
        self.host.backend(rec.pool).restore_snapshot(self.volume(rec), SnapshotName(s.name))
        self.state.update_container_config(rec.name, config)
        if was_running:
            self.start(rec.name)
        return was_running


def admit_snapshots(snapshots: list[SnapshotRecord], origin: str, *,
                    allow_privileged: bool) -> list[SnapshotRecord]:
    """Each snapshot's config through ``config.admit_config`` (``snapshot restore`` makes
    it the container's config one day, so it is held to the same rules)."""
    return [dataclasses.replace(s, config=cfg.admit_config(
        s.config, f"{origin} (snapshot {s.name})", allow_privileged=allow_privileged))
        for s in snapshots]


def _copy_rootfs(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise ContainerError(
            f"image rootfs {src} is missing",
            "re-import the image: `migrate image delete` then import/build",
        )
    copy_tree(src, dst)
