"""Host evacuation (``migrate evacuate``): every container of this host onto a set of
targets, and back again with ``--restore``.

Three steps, each reusing a pipeline that exists for one container:

1. place (:func:`place`, pure): each running container goes to the target with the most
   free memory (the agents' ``hello`` reports MemAvailable) that has room in its pool for
   the rootfs and the memory; each stopped one where the pool has the most room. What is
   placed is taken off that target's figures, and hosts whose figures differ by less than
   256 MiB count as equal and fill evenly, so containers spread instead of all landing on
   the host that had a little more memory free. Biggest first, so the large ones find room.
2. decide (:func:`decide`): a running container goes live where ``live.plan_live`` accepts
   it, else stateless, with the plan's refusal as the reason (what CRIU cannot dump, a CPU
   that lacks flags, no CRIU). A live migration that fails on the way (rolled back, the
   container running here again) also falls back to a stateless move, saying why.
3. move (:func:`evacuate_one`): ``live.live_migrate`` or ``remote_copy.move_to_host`` for a
   running container; each keeps it running here until its target runs it, so a failure
   loses nothing. A stopped one is copied, checked and only then deleted here: it arrives
   stopped.

Where each container went is written to ``<root>/evacuation.json`` (0600, replaced
atomically after every container, so an interrupted evacuation still knows what moved);
:func:`restore_one` brings one back: live through the target's agent (``delegate``) when it
runs there, else pulled (a stopped container) and only then deleted there.

The design decision: the placement is a pure function over figures read once, so it is
tested without hosts and ``--dry-run`` prints exactly what a run would do.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from migrator.checkpoint.base import tree_bytes
from migrator.core import proc
from migrator.core.errors import (
    CheckpointError,
    InvalidInput,
    InvalidState,
    MigratorError,
    MissingDependency,
    NoSpace,
    NotFound,
)
from migrator.pipelines.live import live_migrate, memory_bytes, plan_live
from migrator.pipelines.remote_copy import choose_pool, move_to_host, pull_copy
from migrator.pipelines.remote_target import RemoteTarget, host_id, no_data
from migrator.runtime.containers import Containers
from migrator.streams import Progress, no_progress
from migrator.transport.base import Transport
from migrator.transport.replies import remote_error

RECORD = "evacuation.json"
NEAR = 256 << 20  # bytes of free memory or pool room that do not decide a placement

# a live plan refused for one of these reasons can still move the container stateless
# (stopped, copied, started there); anything else (the name taken there, the host
# unreachable) would refuse the stateless move too
LIVE_ONLY_REFUSALS = (CheckpointError, MissingDependency, NoSpace)


@dataclass
class Target:
    """One host an evacuation may fill: what its agent's hello said, less what is placed."""

    name: str
    pool: str  # the pool a container lands in there
    pool_free: int  # bytes
    mem_available: int | None = None  # bytes; None: the agent did not say
    host_id: str | None = None  # ``remote_target.host_id``: this host's own, if it is this one

    @classmethod
    def from_hello(cls, name: str, hello: dict[str, Any], pool: str | None) -> Target:
        p = choose_pool(hello, pool)
        return cls(name, str(p["name"]), int(p["free"]), hello.get("mem_available"),
                   hello.get("host_id"))


@dataclass
class Candidate:
    """One container of the evacuated host, with what it needs where it goes."""

    name: str
    state: str  # RUNNING, STOPPED, FROZEN...
    memory: int = 0  # bytes in use (running)
    rootfs: int = 0  # bytes on disk


@dataclass
class Placement:
    """Where one container goes and how (``how`` is settled by :func:`decide`)."""

    name: str
    state: str
    to: str | None  # None: it stays
    pool: str | None = None
    how: str = "stayed"  # live | stateless | stayed | failed (a refusal no move avoids)
    reason: str = ""
    memory: int = 0
    rootfs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "from": "local", **asdict(self)}


@dataclass
class Outcome:
    """What happened to one container: one ``--format json`` record."""

    name: str
    source: str
    to: str | None
    how: str  # live | stateless | stayed | failed
    reason: str = ""
    downtime: float | None = None
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("exit_code")
        return {"from": d.pop("source"), **d}


def place(candidates: Sequence[Candidate], targets: Sequence[Target],
          running_only: bool = False) -> list[Placement]:
    """Each container on a target (pure; see the module's docstring), in the given order.

    Running: the most free memory among the targets with room for rootfs and memory in the
    pool and (where the target says) that much memory available; a target that reports no
    memory ranks after every one that does. Stopped: the most room in the pool. Ties go to
    the earlier target. What does not fit anywhere stays, with the reason.
    """
    free = {t.name: t.pool_free for t in targets}
    mem = {t.name: t.mem_available for t in targets}
    order = {t.name: i for i, t in enumerate(targets)}
    placed = dict.fromkeys(order, 0)
    out: dict[str, Placement] = {}
    # running first, the biggest first: they need memory and room both
    for c in sorted(candidates, key=lambda c: (c.state != "RUNNING", -(c.memory + c.rootfs))):
        p = Placement(c.name, c.state, None, memory=c.memory, rootfs=c.rootfs)
        out[c.name] = p
        if c.state not in ("RUNNING", "STOPPED"):
            p.reason = f"{c.state.lower()}: only running and stopped containers move"
            continue
        if c.state == "STOPPED" and running_only:
            p.reason = "stopped (--running-only)"
            continue
        running = c.state == "RUNNING"
        need = c.rootfs + (c.memory if running else 0)
        fits = [t for t in targets if free[t.name] >= need and
                (not running or (mem[t.name] is None or (mem[t.name] or 0) >= c.memory))]
        if not targets:
            p.reason = "no target host"
            continue
        if not fits:
            p.reason = (f"no target has room for it ({need} bytes in the pool"
                        + (f", {c.memory} of memory" if running else "") + ")")
            continue

        best = _pick(fits, running, mem, free, placed, order)
        p.to, p.pool = best.name, best.pool
        p.how = "live" if running else "stateless"
        p.reason = ("running" if running else "stopped: moves stateless")
        free[best.name] -= need
        placed[best.name] += 1
        if running and mem[best.name] is not None:
            mem[best.name] = (mem[best.name] or 0) - c.memory
    return [out[c.name] for c in candidates]


def _pick(fits: list[Target], running: bool, mem: dict[str, int | None],
          free: dict[str, int], placed: dict[str, int], order: dict[str, int]) -> Target:
    """The best of the targets a container fits on. Running: the most free memory (targets
    that report it before those that do not); stopped: the most room in the pool. Figures
    within :data:`NEAR` of the best count as equal (MemAvailable and a shared filesystem's
    free space move by more than a small container between two reads), and among equals
    the target given the fewest containers so far wins, then the most room, then the
    earlier one: equal hosts fill evenly."""
    if running:
        known = [t for t in fits if mem[t.name] is not None]
        if known:
            best = max(mem[t.name] or 0 for t in known)
            fits = [t for t in known if best - (mem[t.name] or 0) <= NEAR]
    else:
        best = max(free[t.name] for t in fits)
        fits = [t for t in fits if best - free[t.name] <= NEAR]
    return max(fits, key=lambda t: (-placed[t.name], free[t.name], -order[t.name]))


# this host's side ---------------------------------------------------------------------------
def candidates(cts: Containers, names: Sequence[str] | None = None) -> list[Candidate]:
    """The containers of this host (or the named ones) with their state and sizes."""
    wanted = set(names) if names else None
    out = []
    for info in cts.list_all():
        if wanted is not None and info.name not in wanted:
            continue
        rec = cts.get(info.name)
        running = info.state == "RUNNING"
        out.append(Candidate(info.name, info.state,
                             memory_bytes(cts, info.name) if running else 0,
                             tree_bytes(cts.rootfs(rec))))
    if wanted is not None:
        missing = sorted(wanted - {c.name for c in out})
        if missing:
            raise NotFound(f"no container {', '.join(map(repr, missing))} here",
                           "`migrate list` shows this host's containers")
    return out


def survey(transport: Transport, pool: str | None) -> Target:
    """One target's figures, from its agent's hello."""
    return Target.from_hello(transport.name, transport.request("hello"), pool)


def is_this_host(cts: Containers, transport: Transport) -> bool:
    """Whether an inventory host is this very host (its entry for itself, which a restore
    uses): its agent's hello names this state root's id."""
    return transport.request("hello").get("host_id") == host_id(cts.host.root)


def decide(cts: Containers, transport: Transport, p: Placement, mode: str = "auto",
           compress: str = "auto") -> Placement:
    """Live or stateless for a placed running container: live where the live plan (every
    check made before anything freezes) accepts it, else stateless with its refusal."""
    if p.to is None or p.state != "RUNNING":
        return p
    try:
        plan = plan_live(cts, transport, p.name, p.pool, mode, compress)
    except LIVE_ONLY_REFUSALS as e:
        return replace(p, how="stateless", reason=f"live refused: {e.message}")
    except MigratorError as e:  # a stateless move would meet it too (name taken there...)
        return replace(p, how="failed", reason=e.message)
    return replace(p, how="live", reason=plan.mode)


def evacuate_one(cts: Containers, transport: Transport, p: Placement, mode: str = "auto",
                 compress: str = "auto", progress: Progress = no_progress) -> Outcome:
    """Move one placed container as decided; a failure is the outcome, never raised, and
    leaves the container here (the pipelines' own undo), running if it was."""
    out = Outcome(p.name, "local", p.to, p.how, p.reason)
    if p.to is None:
        return out
    if p.how == "failed":
        out.error, out.exit_code = p.reason, 1
        out.notes.append(f"still on this host ({_state_here(cts, p.name)})")
        return out
    t0 = time.monotonic()
    try:
        if p.how == "live":
            try:
                r = live_migrate(cts, transport, p.name, p.pool, mode, False, compress,
                                 progress)
                out.downtime, out.notes = r.downtime, list(r.notes)
                out.seconds = round(time.monotonic() - t0, 3)
                return out
            except LIVE_ONLY_REFUSALS as e:
                if cts.run_state(p.name) != "RUNNING":
                    raise
                out.how = "stateless"
                out.reason = f"live migration failed, rolled back: {e.message}"
        m = move_to_host(cts, transport, p.name, p.pool, progress, compress)
        out.downtime, out.notes = m.downtime, list(m.notes)
    except MigratorError as e:
        out.how, out.error, out.exit_code = "failed", e.message, e.exit_code
        out.notes.append(f"still on this host ({_state_here(cts, p.name)})")
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def _state_here(cts: Containers, name: str) -> str:
    with contextlib.suppress(MigratorError):
        return cts.run_state(name).lower()
    return "state unknown"


# the record of where each container went ----------------------------------------------------
def record_path(root: Path) -> Path:
    return root / RECORD


def load_record(root: Path) -> dict[str, dict[str, Any]]:
    """Evacuated containers by name (``to``, ``how``, ``was_running``, ``privileged``,
    ``at``); empty when nothing is evacuated."""
    path = record_path(root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InvalidState(f"{path} is unreadable: {e}",
                           "fix or remove it; it only lists where containers went") from e
    entries = data.get("containers") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise InvalidState(f"{path} is not an evacuation record")
    return {str(k): v for k, v in entries.items() if isinstance(v, dict) and v.get("to")}


def save_record(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Replace the record atomically (0600, synced); no entry left: no file."""
    path = record_path(root)
    if not entries:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{RECORD}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps({"version": 1, "containers": entries}, indent=1,
                                sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remember(root: Path, outcome: Outcome, was_running: bool, privileged: bool) -> None:
    """Add a container that left for another host to the record."""
    if outcome.to is None or outcome.how not in ("live", "stateless"):
        return
    entries = load_record(root)
    entries[outcome.name] = {"to": outcome.to, "how": outcome.how, "was_running": was_running,
                             "privileged": privileged, "at": round(time.time(), 3)}
    save_record(root, entries)


def forget(root: Path, name: str) -> None:
    entries = load_record(root)
    if entries.pop(name, None) is not None:
        save_record(root, entries)


# back again ---------------------------------------------------------------------------------
def restore_one(cts: Containers, transport: Transport, name: str, entry: dict[str, Any],
                self_target: dict[str, Any] | None, pool: str | None = None,
                mode: str = "auto", compress: str = "auto",
                progress: Progress = no_progress) -> Outcome:
    """Bring one evacuated container back from ``transport``'s host; a failure is the
    outcome (the container stays there, as it was)."""
    out = Outcome(name, transport.name, "local", "failed")
    t0 = time.monotonic()
    try:
        there = transport.request("container_state", {"name": name})
        if cts.state.has_container(name):
            if not there.get("exists"):  # back already (a restore cut after its move)
                out.how, out.reason = "stayed", "already back on this host"
                out.seconds = round(time.monotonic() - t0, 3)
                return out
            raise InvalidState(f"{name!r} exists on this host and on {transport.name}",
                               "compare both copies, delete one, then `migrate evacuate "
                               "local --restore` again")
        if not there.get("exists"):
            raise NotFound(f"{name!r} is no longer on {transport.name}",
                           "it was moved or deleted since the evacuation; nothing to restore "
                           "(the record keeps it until you remove "
                           f"{record_path(cts.host.root)})")
        if there.get("status") == "RUNNING":
            if self_target is None:
                raise InvalidState(f"{name!r} runs on {transport.name}; bringing it back "
                                   "needs how that host reaches this one",
                                   "add this host to its own inventory (`migrate host add "
                                   "NAME ADDRESS`) and pass --as NAME")
            out.how, out.reason, out.downtime = _delegated_back(transport, name, self_target,
                                                                pool, mode, compress)
        else:
            # stopped there: nothing changes under the copy, so pull it, then delete there
            pull_copy(cts, transport, name, name, pool, compress=compress, progress=progress,
                      allow_privileged=bool(entry.get("privileged")))
            RemoteTarget(cts).sync_container({"name": name}, no_data)  # on disk here first
            transport.request("delete_container", {"name": name})  # refused if it runs
            out.how, out.reason = "stateless", "stopped there: pulled back, then deleted there"
    except MigratorError as e:
        out.error, out.exit_code = e.message, e.exit_code
        out.notes.append(f"still on {transport.name}")
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def _delegated_back(transport: Transport, name: str, self_target: dict[str, Any],
                    pool: str | None, mode: str, compress: str
                    ) -> tuple[str, str, float | None]:
    """The target's agent migrates it back here live; where the live plan refuses, it
    moves it stateless (a delegated ``move``)."""
    reply = transport.request("delegate", {
        "command": "live", "target": self_target, "names": [name], "pool": pool,
        "mode": mode, "keep_source": False, "compress": compress})
    for r in reply.get("results") or []:
        if isinstance(r, dict) and r.get("container") == name:
            down = r.get("downtime")
            mode_used = r.get("mode")
            return ("live", mode_used if isinstance(mode_used, str) else "",
                    float(down) if isinstance(down, (int, float)) else None)
    fails = [f for f in reply.get("failures") or [] if isinstance(f, dict)]
    err = remote_error(transport.name, fails[0] if fails else None)
    if not isinstance(err, LIVE_ONLY_REFUSALS):
        raise err
    try:
        moved = transport.request("delegate", {
            "command": "move", "target": self_target, "source": name, "pool": pool,
            "compress": compress})
    except InvalidInput as e:  # an agent that delegates only live migrations and copies
        raise InvalidState(f"{name!r} cannot go live ({err.message}) and {transport.name} "
                           f"cannot move it stateless for this host ({e.message})",
                           "stop it there, then restore again: a stopped container is "
                           "pulled back") from e
    res = moved.get("result")
    down = res.get("downtime") if isinstance(res, dict) else None
    return ("stateless", f"live refused: {err.message}",
            float(down) if isinstance(down, (int, float)) else None)


# another host's evacuation, asked for by a client ---------------------------------------------
EVACUATE_COMPRESS = ("auto", "zstd", "none")
MAX_ROWS_BYTES = 4 << 20  # the far evacuation's JSON rows


def evacuate_argv(root: Path, req: dict[str, Any]) -> list[str]:
    """``migrate --root ROOT evacuate local ... --format json`` from a client's request,
    every value checked: host and pool names by the name rule, numbers and flags by type,
    modes from their lists. Nothing from the request reaches the command line otherwise."""
    from migrator.core.names import ContainerName, PoolName
    from migrator.pipelines.live import MODES

    def flag(key: str) -> bool:
        value = req.get(key, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"evacuate: {key!r} must be true or false")
        return value

    argv = [sys.executable, "-m", "migrator.cli.main", "--root", str(root), "evacuate", "local",
            "--format", "json"]
    to = req.get("to") or []
    if not isinstance(to, list) or len(to) > 64:
        raise InvalidInput("evacuate: 'to' must be a list of host names")
    if to:
        argv += ["--to", ",".join(str(ContainerName(str(h))) for h in to)]
    parallel = req.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 16:
        raise InvalidInput("evacuate: 'parallel' must be 1 to 16")
    argv += ["--parallel", str(parallel)]
    for key, option in (("dry_run", "--dry-run"), ("running_only", "--running-only"),
                        ("restore", "--restore")):
        if flag(key):
            argv.append(option)
    if req.get("as_name") is not None:
        argv += ["--as", str(ContainerName(str(req["as_name"])))]
    if req.get("pool") is not None:
        argv += ["--target-pool", str(PoolName(str(req["pool"])))]
    mode, compress = str(req.get("mode", "auto")), str(req.get("compress", "auto"))
    if mode not in MODES or compress not in EVACUATE_COMPRESS:
        raise InvalidInput("evacuate: unknown mode or compression")
    return [*argv, "--mode", mode, "--compress", compress]


def serve_evacuate(end: RemoteTarget, req: dict[str, Any], read: Any) -> dict[str, Any]:
    """``migrate evacuate HOST`` run from another host's client: this host evacuates itself,
    exactly as ``migrate evacuate local`` typed here would (its own inventory names the
    targets, its own record remembers where each container went, so ``--restore`` works from
    here or from there). It runs as this host's command, in a session of its own: if the
    client goes away the evacuation still finishes, each container whole on one host. Its
    lines come back as events while it runs; its JSON rows and exit code are the reply."""
    child = proc.spawn_piped(evacuate_argv(end.host.root, req))
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    child.stdin.close()
    stderr = child.stderr

    def relay() -> None:
        for line in stderr:
            with contextlib.suppress(Exception):  # the client left: the evacuation goes on
                end.notify({"event": "say", "text": line.decode(errors="replace").rstrip()})

    talker = threading.Thread(target=relay, daemon=True, name="evacuate-lines")
    talker.start()
    out = child.stdout.read(MAX_ROWS_BYTES + 1)
    rc = proc.wait_or_kill(child)
    talker.join(10)
    rows: Any = []
    if out.strip() and len(out) <= MAX_ROWS_BYTES:
        with contextlib.suppress(ValueError):
            rows = json.loads(out)
    return {"rows": rows if isinstance(rows, list) else [],
            "exit_code": rc if rc >= 0 else 128 - rc}  # killed by a signal: as a shell says
