"""The archive's layout, as ``lxc export`` / ``incus export`` write it: member names, the
``backup/index.yaml`` both written (``index_document``) and read back (``parse_index``).

Read from LXD's and Incus's sources (``backup/backup_info.go``, ``backup/config``,
``storage/drivers/generic_vfs.go``, ``driver_btrfs_volumes.go``, ``instancewriter``):

```
backup/index.yaml                 first member. name, backend, pool, snapshots: [names],
                                  optimized, optimized_header, type: container, and config:
                                  {container: <api.Instance>, snapshots: [<api.InstanceSnapshot>],
                                  pool: <api.StoragePool>, volume: <api.StorageVolume>}
backup/snapshots/NAME/            generic: each snapshot's volume (rootfs/, metadata.yaml,
                                  templates/, backup.yaml), oldest first
backup/container/                 generic: the container's volume, last
backup/optimized_header.yaml      optimized btrfs: {subvolumes: [{path, snapshot, readonly,
                                  uuid}]}
backup/snapshots/NAME.bin         optimized: ``btrfs send`` of each snapshot, each incremental
                                  from the one before
backup/container.bin              optimized: the container, incremental from the last snapshot
```

The one design decision: only an index with the embedded ``config`` (LXD 4.0 and later, every
Incus) is read; older archives carry their config only in ``backup.yaml``, too late in the
stream to decide the uid shift and device rule. The index is YAML from outside, so it is read
through ``migrator.core.safeyaml`` (aliases bounded) and only from a member of bounded size.
"""

from __future__ import annotations

import platform
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from migrator.core import safeyaml
from migrator.core.errors import CorruptBackup, InvalidInput, UnsafeArchive
from migrator.core.names import SnapshotName
from migrator.exchange.lxd_config import lxd_config
from migrator.exchange.lxd_idmap import lxd_idmap
from migrator.runtime.state import ContainerRecord, SnapshotRecord
from migrator.targuard import TarRules

INDEX = "backup/index.yaml"
OPTIMIZED_HEADER = "backup/optimized_header.yaml"
MAX_YAML = 16 << 20  # index.yaml and optimized_header.yaml are read into memory
#: what the tar guard lets through: rootfs trees of the container and its snapshots
TAR_RULES = TarRules(root="backup/container/rootfs", more_roots=("backup/snapshots/*/rootfs",),
                     data_prefix="backup")
_STOPPED = 102  # LXD's status code for a stopped instance


class BackupFormatError(InvalidInput):
    """An archive in a layout this importer does not read (not a damaged one)."""


# ----------------------------------------------------------------------------------------
# writing


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a dict used twice (``config`` and ``expanded_config``) out twice, as LXD
    does: an import bounds what YAML aliases expand to (``migrator.core.safeyaml``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instance_doc(rec: ContainerRecord, pool: str, snaps: list[SnapshotRecord],
                  disk_base: int = 0) -> dict[str, Any]:
    conf = lxd_config(rec.config)
    if disk_base:  # optimized, unprivileged: the streams carry this host's shifted ids
        conf["volatile.last_state.idmap"] = lxd_idmap(disk_base)
    devices = {"root": {"path": "/", "pool": pool, "type": "disk"}}
    common = {"architecture": platform.machine(), "config": conf, "devices": devices,
              "ephemeral": False, "profiles": ["default"], "stateful": False,
              "expanded_config": conf, "expanded_devices": devices}
    return {
        "container": {**common, "name": rec.name, "description": "", "type": "container",
                      "created_at": _iso(rec.created), "last_used_at": _iso(0),
                      "status": "Stopped", "status_code": _STOPPED, "location": "none",
                      "project": "default"},
        "snapshots": [{**common, "config": lxd_config(s.config) or conf, "name": s.name,
                       "created_at": _iso(s.created), "expires_at": _iso(s.expires or 0),
                       "last_used_at": _iso(0), "size": -1} for s in snaps],
        "pool": {"name": pool, "description": "", "driver": "", "status": "Created",
                 "config": {}, "locations": ["none"]},
        "volume": {"name": rec.name, "description": "", "type": "container",
                   "content_type": "filesystem", "config": {}, "location": "none",
                   "project": "default", "used_by": []},
    }


def config_document(rec: ContainerRecord, driver: str, snaps: list[SnapshotRecord],
                    disk_base: int) -> dict[str, Any]:
    """The instance document LXD keeps twice: as ``config`` in ``backup/index.yaml`` and as
    each volume's ``backup.yaml`` (where LXD's import looks for the root disk device to
    point at the target pool: without it, "No root device could be found")."""
    config_doc = _instance_doc(rec, rec.pool, snaps, disk_base)
    config_doc["pool"]["driver"] = driver
    return config_doc


def index_document(rec: ContainerRecord, driver: str, snaps: list[SnapshotRecord],
                   optimized: bool, disk_base: int) -> bytes:
    """``backup/index.yaml`` for container ``rec`` on a pool of ``driver``; ``disk_base``:
    the host id its optimized streams store for the container's root (0: not shifted)."""
    config_doc = config_document(rec, driver, snaps, disk_base)
    index = {
        "name": rec.name, "backend": driver, "pool": rec.pool, "optimized": optimized,
        "optimized_header": optimized, "type": "container",
        "snapshots": [s.name for s in snaps], "config": config_doc,
    }
    return yaml.dump(index, Dumper=_NoAliasDumper, sort_keys=False).encode()


def metadata_yaml(rec: ContainerRecord) -> bytes:
    """A volume's ``metadata.yaml``: the image properties LXD keeps beside each rootfs."""
    props = {k.removeprefix("image."): v for k, v in rec.config.items()
             if k.startswith("image.")}
    doc = {"architecture": platform.machine(), "creation_date": int(rec.created or 0),
           "properties": props, "templates": {}}
    return yaml.safe_dump(doc, sort_keys=True).encode()


def backup_yaml(rec: ContainerRecord, driver: str, snaps: list[SnapshotRecord],
                disk_base: int = 0) -> bytes:
    """A volume's ``backup.yaml``: the whole instance document, as LXD writes it (its import
    rewrites the root disk's pool in this file and refuses an archive whose file has none).
    """
    return yaml.dump(config_document(rec, driver, snaps, disk_base), Dumper=_NoAliasDumper,
                     sort_keys=False).encode()


def optimized_header(subvolumes: list[tuple[str, str]]) -> bytes:
    """``backup/optimized_header.yaml``: ``(snapshot name, uuid)`` of each snapshot's
    stream, oldest first; the container's own entry is added last."""
    header = {"subvolumes": [
        {"path": "/", "snapshot": name, "readonly": True, "uuid": uuid}
        for name, uuid in subvolumes]
        + [{"path": "/", "snapshot": "", "readonly": False, "uuid": ""}]}
    return yaml.safe_dump(header, sort_keys=False).encode()


# ----------------------------------------------------------------------------------------
# reading


def read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A metadata member's bytes, at most ``MAX_YAML`` of them."""
    if member.size > MAX_YAML:
        raise UnsafeArchive(f"member {member.name!r} is {member.size} bytes; at most "
                            f"{MAX_YAML} are read")
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def parse_yaml(data: bytes, what: str) -> dict[str, Any]:
    """A YAML mapping from the archive (``what`` names it in errors)."""
    try:
        doc = safeyaml.load(data)  # aliases bounded: a 1 kB alias bomb would expand to GBs
    except yaml.YAMLError as e:
        raise CorruptBackup(f"{what} is not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptBackup(f"{what} is not a YAML mapping")
    return doc


@dataclass
class ArchiveIndex:
    """What an import relies on of ``backup/index.yaml``, checked by ``parse_index``."""

    name: str
    optimized: bool
    backend: str
    snapshots: list[str]
    container: dict[str, Any]
    snapshot_docs: dict[str, dict[str, Any]]

    @property
    def config(self) -> dict[str, str]:
        """The effective config (LXD's ``expanded_config``: profiles applied)."""
        conf = self.container.get("expanded_config") or self.container.get("config") or {}
        return {str(k): str(v) for k, v in conf.items()} if isinstance(conf, dict) else {}

    @property
    def privileged(self) -> bool:
        return self.config.get("security.privileged", "false").lower() in ("true", "1", "yes")


def parse_index(data: bytes) -> ArchiveIndex:
    """Validate ``backup/index.yaml`` (only what we rely on)."""
    doc = parse_yaml(data, INDEX)
    kind = doc.get("type") or "container"
    if kind != "container":
        raise InvalidInput(f"the archive holds a {kind}, not a container",
                           "only system containers can be imported")
    name = doc.get("name")
    if not isinstance(name, str):
        raise CorruptBackup(f"{INDEX} has no name")
    snaps = doc.get("snapshots") or []
    if not isinstance(snaps, list) or not all(isinstance(s, str) for s in snaps):
        raise CorruptBackup(f"{INDEX}: snapshots must be a list of names")
    for s in snaps:
        SnapshotName(s)
    if len(set(snaps)) != len(snaps):
        raise CorruptBackup(f"{INDEX} lists a snapshot twice")
    conf = doc.get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("container"), dict):
        raise BackupFormatError(
            f"{INDEX} has no embedded config (an archive from LXD before 4.0?)",
            "export it again from a newer LXD or Incus")
    snap_docs = {}
    for s in conf.get("snapshots") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            snap_docs[s["name"].rpartition("/")[2]] = s
    return ArchiveIndex(name, bool(doc.get("optimized")), str(doc.get("backend") or ""),
                        snaps, conf["container"], snap_docs)
