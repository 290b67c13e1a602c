"""``migrate import-lxc``: adopting plain LXC containers (made with ``lxc-create``) into
the runtime, as LXD's ``lxc-to-lxd`` does for LXD: copy the rootfs of a planned container
(``adopt.plan``) into a volume of a pool, verify the copy, shift its ids and record it as
one of the runtime's containers.

The one design decision: the original is only ever *read* until the adopted container is
recorded and its copy verified; any failure before the record undoes everything (the work
is journaled, so ``recover`` finishes the undo after a crash). Only then, with ``--delete``,
is the original destroyed, and a failure there is a note, never an undo.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.adopt.plan import (
    DEFAULT_LXCPATH,
    ImportPlan,
    ImportResult,
    list_lxc_containers,
    lxc_state,
    plan_import,
)
from migrator.backends import VolumeRef
from migrator.backends.generic import rsync_tree
from migrator.core import proc
from migrator.core.errors import InvalidState, MigratorError
from migrator.pipelines.target_check import verify_trees
from migrator.runtime import config as cfg
from migrator.runtime import idmap
from migrator.runtime.containers import Containers, Stages
from migrator.runtime.durable import sync_filesystem
from migrator.runtime.leftovers import remove_leftover
from migrator.runtime.operations import journaled
from migrator.streams import Progress, ProgressMeter, no_progress


def import_lxc(cts: Containers, plan: ImportPlan, delete: bool = False,
               progress: Progress = no_progress, allow_privileged: bool = False
               ) -> ImportResult:
    """Adopt the planned container: copy, verify, shift, record; then, with ``delete``,
    destroy the original. Any failure before the record undoes everything this did.
    A privileged container only with ``allow_privileged`` (the operator's flag)."""
    origin = f"LXC container {plan.lxcpath / plan.name}"
    cfg.admit_config(plan.config, origin, allow_privileged=allow_privileged)  # before a copy
    t0 = time.monotonic()
    result = plan.result(dry_run=False)
    backend = cts.host.backend(plan.pool)
    vol = VolumeRef("container", plan.name)
    exact = bool(backend.subsecond_mtimes)
    with journaled(cts.state, "import-lxc", container=plan.name, pool=plan.pool,
                   source=str(plan.lxcpath / plan.name)) as op:
        result.operation = op.id
        with Stages() as st:
            if remove_leftover(backend, vol):  # no record owns it (plan checked): debris
                result.notes.append(f"removed an unfinished import left on {plan.pool}")
            op.stage("copy")
            st.add_undo("delete the new volume", lambda: remove_leftover(backend, vol))
            path = backend.create_volume(vol)
            meter = ProgressMeter(progress, f"copy {plan.name}", plan.size)
            result.bytes = rsync_tree(plan.rootfs, path / "rootfs", meter,
                                      checksum=not exact, exact_times=exact)
            op.stage("verify")
            result.verified = verify_trees(plan.rootfs, path / "rootfs",
                                           bool(backend.supports_xattrs), exact_times=exact)
            state = lxc_state(plan.lxcpath, plan.name)
            if state != "STOPPED":
                raise InvalidState(f"LXC container {plan.name!r} was started during the copy",
                                   f"stop it (lxc-stop -P {plan.lxcpath} -n {plan.name}) and "
                                   "import again")
            if plan.shift:
                op.stage("shift")
                idmap.shift_tree(path / "rootfs", plan.shift)
                result.notes.append(f"rootfs ids shifted by {plan.shift:+d} to the runtime's "
                                    "map")
            op.stage("record")
            st.add_undo("forget the record", lambda: _forget(cts, plan.name))
            if delete:  # the original goes next: the copy and its record on disk first
                sync_filesystem(backend.volume_path(vol))
            with cts.state.durable() if delete else contextlib.nullcontext():
                rec = cts.record_received(plan.name, plan.pool, None, plan.config, [],
                                          plan.ipv4, origin=origin,
                                          allow_privileged=allow_privileged)
        result.ipv4 = rec.ipv4
        if plan.ipv4 and rec.ipv4 != plan.ipv4:
            result.notes.append(f"address {plan.ipv4} was taken meanwhile; got {rec.ipv4}")
        if delete:
            op.stage("delete-source")
            result.deleted = _destroy_original(plan, result.notes)
    result.seconds = time.monotonic() - t0
    return result


def _forget(cts: Containers, name: str) -> None:
    if cts.state.has_container(name):
        with cts.state.transaction():
            cts.state.delete_container(name)
    cts.remove_lxc_config(name)


def _destroy_original(plan: ImportPlan, notes: list[str]) -> bool:
    """lxc-destroy the original, after the import is complete: a failure here is a note,
    never an undo (the adopted container is already whole)."""
    if plan.lxc_snapshots:
        notes.append(f"the original was kept: it has LXC snapshots that were not imported; "
                     f"`lxc-destroy -P {plan.lxcpath} -s -n {plan.name}` removes them with it")
        return False
    try:
        proc.run(["lxc-destroy", "-P", str(plan.lxcpath), "-n", plan.name], timeout=600)
    except MigratorError as e:
        notes.append(f"could not destroy the original: {e.message}; remove it by hand "
                     f"(lxc-destroy -P {plan.lxcpath} -n {plan.name})")
        return False
    return True


@dataclass
class BatchEntry:
    """One container of ``--all``: its result, or the error that stopped it."""

    name: str
    result: ImportResult | None = None
    error: str | None = None
    error_type: str | None = None
    hint: str | None = None
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name,
                               "status": "failed" if self.error else
                               "planned" if self.result and self.result.dry_run else "imported"}
        if self.result is not None:
            out.update(self.result.as_dict())
        if self.error:
            out.update(error=self.error, error_type=self.error_type, hint=self.hint,
                       exit_code=self.exit_code)
        return out


def import_all(cts: Containers, lxcpath: Path = DEFAULT_LXCPATH, pool: str | None = None,
               delete: bool = False, dry_run: bool = False,
               progress: Progress = no_progress,
               on_done: Callable[[BatchEntry], None] | None = None,
               allow_privileged: bool = False) -> list[BatchEntry]:
    """Plan and import every container of ``lxcpath``, each on its own: a failure is
    recorded in its entry and the next one goes on."""
    entries = []
    for name in list_lxc_containers(lxcpath):
        entry = BatchEntry(name)
        try:
            plan = plan_import(cts, name, lxcpath, pool)
            entry.result = plan.result(True) if dry_run else \
                import_lxc(cts, plan, delete, progress, allow_privileged)
        except MigratorError as e:
            entry.error, entry.error_type = e.message, type(e).__name__
            entry.hint, entry.exit_code = e.hint or None, e.exit_code
        entries.append(entry)
        if on_done is not None:
            on_done(entry)
    return entries
