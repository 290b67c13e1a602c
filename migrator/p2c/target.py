"""The target host's half of a conversion: the agent's ``p2c_pull`` and ``p2c_finish``
requests (``convert.py`` is the client's half).

``prepare_volume`` makes (or, resuming, reuses) the container's volume that rsync fills;
``finish`` turns the received tree into a container: fixups, the report, the uid shift
into this host's idmap (unless privileged), the record with a systemd-appropriate config
(``Containers.record_received``, as every received container), then a first boot whose
outcome (``systemctl is-system-running`` and any failed units) is added to the report.
The fixups come before the shift, so every file they write ends up owned by the
container's root like the rest of the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from migrator.backends import VolumeRef
from migrator.core import errors
from migrator.core.names import ContainerName, PoolName
from migrator.p2c.fixups import NetworkPlan, append_report, apply_all, write_report
from migrator.p2c.pull import check_rules, serve_pull
from migrator.pipelines.remote_target import Handler, RemoteTarget
from migrator.runtime import idmap
from migrator.runtime.config import admit_config, validate
from migrator.runtime.containers import Containers
from migrator.runtime.network import allocate_ipv4
from migrator.transport.frames import Reader, write_json

BOOT_WAIT = 180.0  # seconds for systemd to finish booting the new container


def prepare_volume(cts: Containers, name: str, pool: str, resume: bool) -> Path:
    """The rootfs directory rsync writes into, in a new or (``resume``) partial volume."""
    cname, pname = ContainerName(name), PoolName(pool)
    if cts.state.has_container(cname):
        raise errors.AlreadyExists(f"container {cname!r} already exists on this host",
                                   "pick another name for the converted machine")
    backend = cts.host.backend(pname)
    vol = VolumeRef("container", cname)
    if backend.volume_exists(vol):
        if not resume:
            raise errors.AlreadyExists(
                f"a partial conversion into {cname!r} is on pool {pname!r}",
                "continue it with --resume, or remove it with `migrate recover`")
        path = backend.volume_path(vol)
    else:
        path = backend.create_volume(vol)
    rootfs = path / "rootfs"
    rootfs.mkdir(mode=0o755, exist_ok=True)
    return rootfs


def finish(cts: Containers, req: dict[str, Any]) -> dict[str, Any]:
    """Fixups, report, shift, record and (``start``) boot; what was changed and how it booted."""
    cname, pname = ContainerName(req["name"]), PoolName(req["pool"])
    backend = cts.host.backend(pname)
    vol = VolumeRef("container", cname)
    if cts.state.has_container(cname):
        raise errors.AlreadyExists(f"container {cname!r} already exists on this host")
    if not backend.volume_exists(vol):
        raise errors.NotFound(f"no received volume for {cname!r} on pool {pname!r}")
    rootfs = backend.volume_path(vol) / "rootfs"
    privileged = bool(req.get("privileged"))
    origin = f"the machine converted into {cname}"
    admit_config({"image.os": str(req.get("os", "unknown")),  # refused before any change
                  "image.release": str(req.get("release", ""))}, origin,
                 allow_privileged=privileged)
    net = cts.host.network_config()
    ipv4 = allocate_ipv4(net, cts.state.used_ipv4())
    plan = NetworkPlan(bool(req.get("dhcp")), f"{ipv4}/{net.prefixlen}", net.gateway)
    try:  # every read and write stays inside the tree (migrator.runtime.inroot)
        changes = apply_all(rootfs, plan)
    except errors.InvalidInput as e:
        raise errors.InvalidInput(f"cannot convert the received tree: {e}", e.hint) from e
    unreadable = [str(u) for u in req.get("unreadable", [])]
    header = {str(k): str(v) for k, v in dict(req.get("header", {})).items()}
    header.update({"container": cname, "address": "DHCP" if plan.dhcp else str(plan.address),
                   "privileged": "yes" if privileged else "no (uids shifted into the "
                   "host's idmap)"})
    write_report(rootfs, header, changes, unreadable)
    if not privileged:
        idmap.shift_tree(rootfs, idmap.default_idmap().base)
    config = {"image.os": str(req.get("os", "unknown")),
              "image.release": str(req.get("release", "")),
              "image.init": "systemd",
              "image.description": f"converted from {header.get('source', 'a machine')}"}
    if privileged:
        config["security.privileged"] = validate("security.privileged", "true")
    # os and release come from the machine's os-release: the gate checks them; privileged
    # only as the operator asked (``migrate p2c --privileged``)
    rec = cts.record_received(cname, pname, None, config, [], ipv4,
                              origin=origin,
                              allow_privileged=privileged)
    result: dict[str, Any] = {"ipv4": rec.ipv4, "changes": changes, "status": "STOPPED"}
    if req.get("start"):
        cts.start(cname)
        state = cts.wait_booted(cname, BOOT_WAIT)
        _rc, out, _err = cts.exec(cname, ["systemctl", "--failed", "--plain", "--no-legend",
                                          "--no-pager"])
        failed = [line.split()[0] for line in out.splitlines() if line.split()]
        result.update({"status": cts.status(cname), "boot": state, "failed_units": failed})
        # appended in place (owner and mode stay as written, shifted); the container has
        # run by now, so a link it put there is refused rather than followed
        try:
            append_report(rootfs, f"\nFirst boot: systemd is {state}\nFailed units: "
                          + (", ".join(failed) if failed else "none") + "\n")
        except errors.InvalidInput as e:
            result["report"] = f"first-boot lines not added to the report: {e}"
    return result


def p2c_pull(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Run rsync's client into the new (or, resuming, partial) volume; its transport is
    relayed by the client to the machine (``migrator.p2c.pull``). "started" goes out first."""
    rules = check_rules(req.get("rules", []))
    rootfs = prepare_volume(end.cts, req["name"], req["pool"], bool(req.get("resume")))
    write_json(end.write, {"ok": True, "started": True})
    return serve_pull(rootfs, rules, read, end.write)


def p2c_finish(end: RemoteTarget, req: dict[str, Any], read: Reader) -> dict[str, Any]:
    """Fixups, report, uid shift, record and first boot of a received machine."""
    return finish(end.cts, req)


P2C_OPS: dict[str, Handler] = {"p2c_pull": p2c_pull, "p2c_finish": p2c_finish}
