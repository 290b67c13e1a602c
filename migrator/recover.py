"""``migrate recover``: finish or undo operations whose process died part-way.

The journal says how far an operation got (``migrator.runtime.operations``). Before its switch-over
point (a local move's ``switch``, a remote move's ``start-remote``) the operation is rolled
back: the target's partial copy is removed, temporary snapshots are dropped, and a
container that was running is started again where it was. After that point it is
completed: the target is already the container, so only the old copy is removed.

Either way one copy is removed, and only after the copy that stays has been checked to be
whole (its volume there, with every recorded snapshot, and the record pointing at it):
otherwise both are kept and the error says why. Backup repositories, local or ``ssh://``,
are reached through the repository interface (``migrator.backup.remote.open_repository``).

Recovery never hangs on LXC: every lxc-* command it runs is bounded (``bounded_lxc``) and a
live migration's helper processes are killed before LXC is asked anything (``_live``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from migrator.backends import VolumeRef
from migrator.backup.remote import close_repository, open_repository
from migrator.backup.restore import complete_record
from migrator.checkpoint.base import remove_images_dir
from migrator.checkpoint.lxc import LxcCheckpointer, bounded_lxc, kill_helpers
from migrator.core.errors import InvalidState, MigratorError
from migrator.core.names import SnapshotName
from migrator.p2c.convert import recover_p2c
from migrator.runtime.containers import Containers
from migrator.runtime.leftovers import remove_leftover, undo_partial_target, undo_partial_volume
from migrator.runtime.operations import owner_alive
from migrator.runtime.state import OperationRecord
from migrator.runtime.temp_snapshots import clean_stale_temp_snapshots
from migrator.runtime.volumes import volume_ref
from migrator.transport.base import Transport

# a host's name -> a connected transport to its agent (the CLI passes its transport_for)
TransportFor = Callable[[str], Transport]
LXC_WAIT_ANY = 60.0  # seconds any lxc-* command may take during a recovery (starts included)


def recover(cts: Containers, op: OperationRecord, transport_for: TransportFor) -> str:
    """Roll back or complete ``op``; returns a sentence saying which."""
    if op.status not in ("running", "failed"):
        raise InvalidState(f"operation {op.id} is {op.status}, nothing to recover")
    if op.status == "running" and owner_alive(op):
        raise InvalidState(f"operation {op.id} is still running (pid {op.detail['pid']})",
                           "wait for it, or stop that process first")
    handler = {"move": _move, "copy": _copy, "refresh": _copy, "copy-remote": _copy_remote,
               "move-remote": _move_remote, "live": _live, "backup": _backup,
               "restore": _restore, "import-lxc": _import_lxc,
               "p2c": _p2c, "volume-copy": _volume_copy, "volume-refresh": _volume_copy,
               "volume-move": _volume_move}.get(op.kind)
    if handler is None:
        raise InvalidState(f"operation {op.id} is a {op.kind!r}, which recover cannot handle")
    # no lxc-* command may hang recovery: each ends within LXC_WAIT_ANY (a live migration's
    # within LXC_WAIT), with an error that says which and why
    with bounded_lxc(cts, LXC_WAIT_ANY):
        outcome = handler(cts, op, transport_for)
    op.status = "recovered"
    op.error = (op.error + "; " if op.error else "") + outcome
    with cts.state.transaction():
        cts.state.update_operation(op)
    return outcome


def _restart(cts: Containers, name: str, was_running: bool) -> str:
    if was_running and cts.state.has_container(name) and cts.run_state(name) == "STOPPED":
        cts.start(name)
        return f"; {name} started again"
    return ""


def _clean_temps(cts: Containers, name: str) -> None:
    """Drop the temporary snapshots a killed transfer left on a container's volume."""
    if cts.state.has_container(name):
        clean_stale_temp_snapshots(cts.host.backend(cts.state.get_container(name).pool),
                                   VolumeRef("container", name))


def whole_copy_problem(cts: Containers, name: str, pool: str | None = None) -> str | None:
    """Why the copy of container ``name`` on this host (on ``pool``, if given) is not whole
    (no record, the record on another pool, no volume, a recorded snapshot missing), or
    None when it is whole."""
    if not cts.state.has_container(name):
        return f"{name} has no record here"
    rec = cts.state.get_container(name)
    if pool is not None and rec.pool != pool:
        return f"the record of {name} points at pool {rec.pool}, not {pool}"
    backend = cts.host.backend(rec.pool)
    vol = VolumeRef("container", name)
    if not backend.volume_exists(vol):
        return f"the volume of {name} is missing from pool {rec.pool}"
    have = {s.name for s in backend.list_snapshots(vol)}
    missing = [s.name for s in cts.state.list_snapshots(name) if s.name not in have]
    if missing:
        return f"{name} on pool {rec.pool} lacks its snapshot(s) {', '.join(missing)}"
    return None


def _keep_both(problem: str, other: str) -> InvalidState:
    return InvalidState(f"recover kept both copies: {problem}, so {other} may be the only "
                        "good one",
                        "look at both (`migrate info`, the pools' directories), keep the "
                        "whole one, then delete the other by hand")


def _move(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    name, src, dst = op.detail["container"], op.detail["from_pool"], op.detail["to_pool"]
    vol = VolumeRef("container", name)
    rec = cts.state.get_container(name)
    if rec.pool == src:  # not switched: the source is the container
        problem = whole_copy_problem(cts, name, src)
        if problem and cts.host.backend(dst).volume_exists(vol):
            raise _keep_both(problem, f"the copy on {dst}")
        remove_leftover(cts.host.backend(dst), vol)
        clean_stale_temp_snapshots(cts.host.backend(src), vol)
        return f"rolled back: {name} stays on {src}, the partial copy on {dst} was removed" + \
            _restart(cts, name, op.detail.get("was_running", False))
    problem = whole_copy_problem(cts, name, dst)
    if problem and cts.host.backend(src).volume_exists(vol):
        raise _keep_both(problem, f"the old copy on {src}")
    remove_leftover(cts.host.backend(src), vol)  # switched: finish by removing the old copy
    clean_stale_temp_snapshots(cts.host.backend(dst), vol)
    return f"completed: {name} is on {dst}, the old copy on {src} was removed" + \
        _restart(cts, name, op.detail.get("was_running", False))


def _copy(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    target, pool = op.detail["target"], op.detail["pool"]
    _clean_temps(cts, op.detail["container"])
    dropped = undo_partial_target(cts, target, pool)
    if dropped is None:
        return f"rolled back: the partial copy {target} on {pool} was removed"
    return (f"rolled back: {target} kept as it was before the refresh "
            f"({len(dropped)} unrecorded snapshot(s) removed)")


def _copy_remote(cts: Containers, op: OperationRecord, transport_for: TransportFor) -> str:
    host, target = op.detail["host"], op.detail["target"]
    _clean_temps(cts, op.detail["container"])
    if "commit" in op.stages and not op.detail.get("target_existed"):
        return f"nothing to undo: {target} was committed on {host}"
    if "send" not in op.stages:
        return "nothing had been sent"
    with transport_for(host) as t:
        t.request("abort_container", {"name": target, "pool": op.detail["pool"]})
    return f"rolled back: the partial copy of {target} on {host} was removed"


def _move_remote(cts: Containers, op: OperationRecord, transport_for: TransportFor) -> str:
    host, name = op.detail["host"], op.detail["container"]
    was_running = bool(op.detail.get("was_running"))
    with transport_for(host) as t:
        there = t.request("container_state", {"name": name})
        if "start-remote" in op.stages and there.get("exists") and \
                there.get("status") == "RUNNING":
            if cts.state.has_container(name):
                cts.delete(name, force=True)
            return f"completed: {name} runs on {host}; the copy here was removed"
        problem = whole_copy_problem(cts, name)
        if "send" not in op.stages:
            pass  # nothing was sent: the target never existed (the copy checks that first)
        elif problem:
            raise _keep_both(problem, f"the copy on {host}")
        elif there.get("exists") and there.get("pool") == op.detail.get("pool"):
            t.request("delete_container", {"name": name, "force": True})
        else:
            with contextlib.suppress(MigratorError):
                t.request("abort_container", {"name": name, "pool": op.detail["pool"]})
    _clean_temps(cts, name)
    return f"rolled back: {name} stays here, the copy on {host} was removed" + \
        _restart(cts, name, was_running)


LXC_WAIT = 20.0  # seconds any lxc-* command may take while a live migration is recovered


def _live(cts: Containers, op: OperationRecord, transport_for: TransportFor) -> str:
    """A live migration. First the helpers its journal names on this host (the dump's
    lxc-checkpoint and criu, the page server) are killed, each checked against its start
    time, and every lxc-* command is bounded (``LXC_WAIT``): a helper left running keeps
    the source frozen, and LXC's monitor may not answer behind it.

    Then which way: completed once the release was reached; else, if the restore may have
    begun, the target decides (``live_settle``, which first kills the helpers there): a
    container that resumed there whole runs with newer state, so the migration goes
    forward and the source is released; otherwise the target's copy is removed and the
    source resumed from its frozen state, or restored from the checkpoint images still in
    memory-backed space. A target that cannot be reached decides nothing: the error says
    so and the source stays as it is."""
    host, name = op.detail["host"], op.detail["container"]
    images = Path(op.detail["images"]) if op.detail.get("images") else None
    with bounded_lxc(cts, LXC_WAIT):
        kill_helpers(op.detail.get("source_helpers") or [], images)
        ckpt = LxcCheckpointer(cts)
        if "release" in op.stages:
            return _live_forward(cts, ckpt, op, images) + "; the source was released"
        with transport_for(host) as t:
            if "restore" in op.stages:
                settled = t.request("live_settle", {
                    "name": name, "tag": op.id,
                    "helpers": op.detail.get("target_helpers") or []})
                if settled.get("whole"):
                    with contextlib.suppress(MigratorError):
                        t.request("drop_images", {"tag": op.id})
                    return _live_forward(cts, ckpt, op, images) + \
                        " (it had resumed there with all its memory: its state is newer); " \
                        "the frozen source was released"
            if "sync" in op.stages:
                problem = whole_copy_problem(cts, name)
                if problem:
                    raise _keep_both(problem, f"the copy on {host}")
                there = t.request("container_state", {"name": name})
                if there.get("exists"):
                    t.request("delete_container", {"name": name, "force": True})
                else:
                    with contextlib.suppress(MigratorError):
                        t.request("abort_container", {"name": name, "pool": op.detail["pool"]})
            with contextlib.suppress(MigratorError):
                t.request("drop_images", {"tag": op.id})
        outcome = f"rolled back: the copy on {host} was removed"
        # LXC still calls a container RUNNING while CRIU keeps its tasks stopped: resume it
        # whatever the state says (continuing running tasks is harmless)
        if "dump" in op.stages and cts.state.has_container(name):
            ckpt.resume_source(name, images if images is not None else Path("/nonexistent"))
            outcome += f"; {name} resumed here with its memory state"
        if images is not None:
            remove_images_dir(images)
        _clean_temps(cts, name)
    return outcome


def _live_forward(cts: Containers, ckpt: LxcCheckpointer, op: OperationRecord,
                  images: Path | None) -> str:
    """The target runs the container: the source's stopped tasks are killed and, unless
    the migration kept it, the source deleted."""
    host, name = op.detail["host"], op.detail["container"]
    if cts.state.has_container(name):
        with contextlib.suppress(MigratorError):
            ckpt.release_source(name)
        if not op.detail.get("keep_source"):
            cts.delete(name, force=True)
        else:
            _clean_temps(cts, name)
    if images is not None:
        remove_images_dir(images)
    return f"completed: {name} runs on {host}"


def _backup(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    """A killed ``backup create``: its ``.partial-ID`` goes with the repository's next writer;
    here only the base snapshot an optimized backup kept on the pool is dropped, unless the
    backup was committed (its index exists), which makes the operation complete."""
    bid, name, base = op.detail["backup"], op.detail["container"], op.detail.get("base_snapshot")
    if _backup_committed(cts, op.detail["repo"], bid, op.detail.get("index")):
        return f"completed: backup {bid} is in the repository"
    if base and cts.state.has_container(name):
        backend = cts.host.backend(op.detail.get("pool") or cts.state.get_container(name).pool)
        with contextlib.suppress(MigratorError):
            backend.delete_snapshot(VolumeRef("container", name), SnapshotName(base))
    return f"rolled back: backup {bid} was not made; the next writer clears its partial files"


def _backup_committed(cts: Containers, spec: str, bid: str, index: str | None = None
                      ) -> bool:
    """Whether backup ``bid`` is in the repository ``spec`` (a directory, ``ssh://HOST/PATH``
    or ``s3://BUCKET/PREFIX``), asked through the repository itself: an unreachable
    repository raises, so nothing is dropped on a guess. A directory repository lists its
    committed backups' names (its renamed ``backups/ID``); a chunked one is asked about the
    index object ``index``, the name the journal kept from the writer (an encrypted one names
    indexes by a keyed hash of the id, which only the key computes): recover needs no
    passphrase."""
    repo = open_repository(cts.host, spec)
    try:
        committed = getattr(repo, "committed", None)
        if committed is not None:
            return bool(committed(bid, index))
        return bid in repo.ids()
    finally:
        close_repository(repo)


def _restore(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    """A killed ``backup restore``. Before ``replace`` it is rolled back (the scratch
    volumes go; a container it was to replace was not touched). From ``replace`` on, once
    the replaced container is gone, the restored volume is the only copy: it is moved in
    and recorded from what the journal kept, never removed."""
    name, scratch = op.detail["container"], op.detail["scratch"]
    pools = [op.detail["pool"]] + [p for p in [op.detail.get("receive_pool")]
                                   if p and p != op.detail["pool"]]
    dst = cts.host.backend(op.detail["pool"])
    final, restored = VolumeRef("container", name), VolumeRef("container", scratch)

    def drop_scratch() -> None:
        for pool in pools:
            with contextlib.suppress(MigratorError):
                remove_leftover(cts.host.backend(pool), restored)

    if "record" in op.stages and cts.state.has_container(name):
        drop_scratch()
        return f"completed: {name} was restored from {op.detail['backup']}"
    if "replace" in op.stages and cts.state.has_container(name):
        old = cts.state.get_container(name)
        if not cts.host.backend(old.pool).volume_exists(final):
            # cut inside the replaced container's deletion: finish it (every step of
            # Containers.delete is idempotent)
            cts.delete(name, force=True)
    if "replace" in op.stages and not cts.state.has_container(name):
        if not dst.volume_exists(final) and dst.volume_exists(restored):
            dst.rename_volume(restored, final)
        if complete_record(cts, op.detail):
            drop_scratch()
            return (f"completed: {name} was restored from {op.detail['backup']} (the restore "
                    "was cut while it replaced the old container)")
    drop_scratch()
    return f"rolled back: the partial restore of {name} was removed"


def _import_lxc(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    """A killed ``import-lxc``: complete once recorded (the original is left in place),
    else the partial volume goes; the original LXC container was only read."""
    name, pool = op.detail["container"], op.detail["pool"]
    if "record" in op.stages and cts.state.has_container(name):
        return f"completed: {name} was adopted; the original {op.detail['source']} is kept"
    undo_partial_target(cts, name, pool)
    return f"rolled back: the partial import of {name} on {pool} was removed"


def _p2c(cts: Containers, op: OperationRecord, transport_for: TransportFor) -> str:
    return recover_p2c(cts, op, transport_for)


def _volume_copy(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    """A killed ``volume copy`` (or refresh): rolled back, as a container copy is; the
    source volume was only read."""
    target, pool = op.detail["target"], op.detail["target_pool"]
    clean_stale_temp_snapshots(cts.host.backend(op.detail["pool"]),
                               volume_ref(op.detail["volume"]))
    dropped = undo_partial_volume(cts, pool, target)
    if dropped is None:
        return f"rolled back: the partial copy of volume {target} on {pool} was removed"
    return (f"rolled back: volume {target} kept as it was before the refresh "
            f"({len(dropped)} unrecorded snapshot(s) removed)")


def whole_volume_problem(cts: Containers, pool: str, name: str) -> str | None:
    """Why custom volume ``name`` on ``pool`` is not whole (no record there, no volume on
    disk, a recorded snapshot missing), or None when it is whole."""
    if not any(v.name == name for v in cts.state.list_volumes(pool)):
        return f"volume {name} has no record on pool {pool}"
    backend = cts.host.backend(pool)
    if not backend.volume_exists(volume_ref(name)):
        return f"volume {name} is missing from pool {pool}"
    have = {s.name for s in backend.list_snapshots(volume_ref(name))}
    missing = [s.name for s in cts.state.list_volume_snapshots(pool, name)
               if s.name not in have]
    if missing:
        return f"volume {name} on pool {pool} lacks its snapshot(s) {', '.join(missing)}"
    return None


def _volume_move(cts: Containers, op: OperationRecord, _t: TransportFor) -> str:
    """A killed ``volume move``: before the record was switched it is rolled back (the
    partial copy goes), after it is completed (the old copy goes); as for a container
    move, only once the copy that stays is whole."""
    name, src = op.detail["volume"], op.detail["from_pool"]
    target, dst = op.detail["target"], op.detail["to_pool"]
    src_b, dst_b = cts.host.backend(src), cts.host.backend(dst)
    if any(v.name == name for v in cts.state.list_volumes(src)):  # not switched
        problem = whole_volume_problem(cts, src, name)
        if problem and dst_b.volume_exists(volume_ref(target)):
            raise _keep_both(problem, f"the copy on {dst}")
        remove_leftover(dst_b, volume_ref(target))
        clean_stale_temp_snapshots(src_b, volume_ref(name))
        return (f"rolled back: volume {name} stays on {src}, the partial copy on {dst} "
                "was removed")
    problem = whole_volume_problem(cts, dst, target)
    if problem and src_b.volume_exists(volume_ref(name)):
        raise _keep_both(problem, f"the old copy on {src}")
    remove_leftover(src_b, volume_ref(name))  # switched: finish by removing the old copy
    clean_stale_temp_snapshots(dst_b, volume_ref(target))
    return f"completed: volume {target} is on {dst}, the old copy on {src} was removed"
