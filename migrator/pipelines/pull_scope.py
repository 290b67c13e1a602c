"""What a pulled-from host may do on this host: the scope of one pull, checked call by call.

``migrate copy host-a:c1 c1`` has host a push to this host back up the request's own channel
(``transport/reverse.py``); each request of that push reaches this host as a call, which
:func:`answer_call` serves with this host's own target half (``remote_target.py``).

The design decision: host a is *input*, not a peer this host trusts. The client knows what
it asked for (one container, by its name here, new or refreshed), so every call is checked
against a :class:`PullScope` before it is served: only that container's volume, record and
snapshots, in the order a push makes its requests, with tar data through the restore's tar
guard and no LINK offer followed. A call outside the scope is refused with ``CallRefused``
naming the call and what it aimed at; the pull then ends and its own partial copy is
removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migrator.backends import VolumeRef
from migrator.core import errors
from migrator.core.names import SnapshotName
from migrator.pipelines.remote_target import TARGET_OPS, RemoteTarget
from migrator.runtime.containers import Containers
from migrator.runtime.leftovers import undo_partial_target
from migrator.transport.frames import Reader, Writer, write_json
from migrator.transport.replies import MAX_NAME, clean_text, error_reply

CALLABLE = {"hello", "container_state", "receive", "commit_container", "abort_container",
            "delete_snapshot"}
_TRUE = ("true", "1", "yes", "on")


@dataclass
class PullScope:
    """What the host a pull reads from may do on this host, and what it has done.

    Bound to one container, ``name`` (its name here). A new copy (``refresh`` False) needs
    the name free when the pull begins; its volume is created by the first ``receive``
    (which must say ``first``) and removed again if the pull does not commit. A refresh
    (``--refresh`` of a container recorded here) receives into that container's volume on
    its own pool, only as *new* snapshots: the snapshots it had when the pull began are
    never received over, named as a parent they may be, but deleted they are not (the
    ``--refresh`` rules keep target-only snapshots, so a refresh never deletes any).

    Calls come in a push's order: ``hello``, ``container_state`` (of ``name``),
    ``receive``\\* then one ``commit_container`` (its snapshots must be ones this pull
    received), or an ``abort_container`` at any point, which undoes only this pull's own
    work (a new copy's volume; a refresh's new snapshots). ``delete_snapshot`` may only
    remove a snapshot this pull received. ``snapshot_volume`` is never accepted: it follows
    rsync, which a pull does not carry. After the commit or the abort nothing more is.

    ``privileged`` is the privilege the data is checked for (devices in a tar stream) and
    the committed config must state: the refreshed record's, or what the source announces
    with its first ``receive``, then fixed. A privileged container is refused at that first
    ``receive``, before any of its data is written, unless the operator allowed it
    (``allow_privileged``: ``copy --allow-privileged``).
    """

    source: str
    name: str
    refresh: bool
    pool: str | None = None
    privileged: bool | None = None
    allow_privileged: bool = False
    known: frozenset[str] = frozenset()  # the refreshed target's snapshots at the start
    created: list[str] = field(default_factory=list)  # received by this pull, still there
    touched: bool = False  # a receive was let through (the volume may hold its data)
    native: bool = False  # some data came as a native stream, which no tar guard saw
    # looks at the received volume before the commit (``remote.pull_copy``: the restore's
    # tree inspection), as nothing checked a native stream's content on its way in
    inspect: Callable[[PullScope], None] | None = None
    received: bool = False  # a receive completed
    phase: str = "new"  # new -> hello -> state -> committed | aborted

    @classmethod
    def begin(cls, cts: Containers, source: str, name: str, pool: str | None, refresh: bool,
              allow_privileged: bool = False) -> PullScope:
        """The scope of pulling ``name`` from ``source``, from this host's own records."""
        if not cts.state.has_container(name):
            return cls(source, name, False, pool, None, allow_privileged)
        if not refresh:
            raise errors.AlreadyExists(f"{name!r} already exists here",
                                       "add --refresh to update it")
        rec = cts.state.get_container(name)
        mine = str(rec.config.get("security.privileged", "false")).lower() in _TRUE
        on_disk = {s.name for s in cts.host.backend(rec.pool).list_snapshots(
            VolumeRef("container", name))}
        recorded = {s.name for s in cts.state.list_snapshots(name)}
        return cls(source, name, True, rec.pool, mine, allow_privileged,
                   frozenset(on_disk | recorded))

    # checks ---------------------------------------------------------------------------------
    def _refuse(self, op: str, aimed: str, why: str,
                hint: str | None = None) -> errors.CallRefused:
        source = clean_text(self.source, MAX_NAME)
        return errors.CallRefused(
            f"refused {source}'s {clean_text(op, 40)!r} call aimed at {aimed}: {why}; "
            f"pulling {self.name!r}",
            hint or f"the pull was stopped and its partial copy here removed; {source} does "
            "not behave like a migrate agent: do not trust it")

    @staticmethod
    def _shown(value: Any) -> str:
        return repr(clean_text(value, 80))

    def check(self, call: dict[str, Any]) -> None:
        """Raise ``CallRefused`` unless ``call`` is one this pull expects now."""
        op = call.get("call")
        op = op if isinstance(op, str) else repr(op)
        aimed = self._aimed(op, call)
        if op not in CALLABLE:
            raise self._refuse(op, aimed, "a pull makes no such call")
        if self.phase in ("committed", "aborted"):
            raise self._refuse(op, aimed, f"the pull was already {self.phase}")
        if op == "hello":
            if self.phase != "new":
                raise self._refuse(op, aimed, "a second hello")
            return
        if self.phase == "new":
            raise self._refuse(op, aimed, "no hello first")
        if self._target(op, call) != ("container", self.name):
            raise self._refuse(op, aimed, "only the container being pulled may be touched")
        getattr(self, f"_check_{op}")(op, aimed, call)

    @staticmethod
    def _target(op: str, call: dict[str, Any]) -> tuple[Any, Any]:
        """(volume type, name) that ``call`` acts on, exactly as sent."""
        if op in ("receive", "delete_snapshot", "snapshot_volume"):
            vol = call.get("volume")
            return (vol.get("type"), vol.get("name")) if isinstance(vol, dict) else (None, None)
        return "container", call.get("name")

    def _aimed(self, op: str, call: dict[str, Any]) -> str:
        """What ``call`` aims at, as shown in a refusal: a container name, or a volume's."""
        if op in ("receive", "delete_snapshot", "snapshot_volume"):
            vol = call.get("volume")
            if not isinstance(vol, dict):
                return "no volume"
            if vol.get("type") != "container":
                return f"{self._shown(vol.get('type'))} volume {self._shown(vol.get('name'))}"
            return self._shown(vol.get("name"))
        if op == "hello":
            return "this host"
        return self._shown(call.get("name"))

    def _pool(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        pool = call.get("pool")
        if self.pool is not None and pool != self.pool:
            raise self._refuse(op, aimed, f"pool {self._shown(pool)} is not {self.pool!r}, "
                               "where the pulled container is")

    def _check_container_state(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        if self.touched:
            raise self._refuse(op, aimed, "the state is asked before any data")
        self.phase = "state"

    def _check_receive(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        if self.phase != "state":
            raise self._refuse(op, aimed, "data before the target's state was asked")
        self._pool(op, aimed, call)
        if not isinstance(call.get("pool"), str):
            raise self._refuse(op, aimed, "no pool named")
        snap = call.get("snapshot")
        if not isinstance(snap, str) or snap in self.known or snap in self.created:
            raise self._refuse(op, aimed, f"snapshot {self._shown(snap)} exists here and "
                               "would be received over")
        parent = call.get("parent")
        if parent is not None and parent not in self.known and parent not in self.created:
            raise self._refuse(op, aimed, f"parent {self._shown(parent)} is none of the "
                               "pulled container's snapshots")
        first = bool(call.get("first"))
        if first != (not self.refresh and not self.touched):
            raise self._refuse(op, aimed, "only a new copy's first stream may start the "
                               "volume afresh" if first else "a new copy's first stream "
                               "must start the volume afresh")
        announced = call.get("privileged")
        if not isinstance(announced, bool):
            raise self._refuse(op, aimed, "the stream does not say whether the container is "
                               "privileged")
        if self.privileged is not None and announced != self.privileged:
            raise self._refuse(op, aimed, f"the stream is for a {self._priv(announced)} "
                               f"container, the pull is for a {self._priv(self.privileged)} "
                               "one")
        if announced and not self.allow_privileged:
            raise self._refuse(op, aimed, "the container is privileged (its root is root "
                               "here)", "nothing was written; if you trust it, pull again "
                               "with --allow-privileged")
        self.privileged = announced
        self.pool = call["pool"]
        self.touched = True
        self.native = self.native or call.get("how") != "tar"

    @staticmethod
    def _priv(value: bool | None) -> str:
        return "privileged" if value else "unprivileged"

    def _check_commit_container(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        self._pool(op, aimed, call)
        if not self.received:
            raise self._refuse(op, aimed, "a commit before the container's data arrived")
        names = [s.get("name") if isinstance(s, dict) else s
                 for s in call.get("snapshots") or []]
        stray = [n for n in names if n not in self.created]
        if stray:
            raise self._refuse(op, aimed, f"snapshot {self._shown(stray[0])} was not "
                               "received by this pull")
        config = call.get("config") or {}
        stated = isinstance(config, dict) and \
            str(config.get("security.privileged", "false")).strip().lower() in _TRUE
        if stated != self.privileged:
            raise self._refuse(op, aimed, f"the config makes it {self._priv(stated)}, its "
                               f"data was received as {self._priv(self.privileged)}")

    def _check_abort_container(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        self._pool(op, aimed, call)

    def _check_delete_snapshot(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        self._pool(op, aimed, call)
        snap = call.get("snapshot")
        if snap not in self.created:
            raise self._refuse(op, aimed, f"snapshot {self._shown(snap)} was not received "
                               "by this pull")

    def _check_snapshot_volume(self, op: str, aimed: str, call: dict[str, Any]) -> None:
        raise self._refuse(op, aimed, "a pull carries no rsync, which alone needs it")

    # accounting -----------------------------------------------------------------------------
    def done(self, call: dict[str, Any]) -> None:
        """Note what an accepted call did, once it succeeded."""
        op = call.get("call")
        if op == "hello":
            self.phase = "hello"
        elif op == "receive":
            self.received = True
            if not call.get("drop_after"):
                self.created.append(str(call["snapshot"]))
        elif op == "delete_snapshot":
            self.created.remove(str(call["snapshot"]))
        elif op == "commit_container":
            self.phase = "committed"

    def undo(self, cts: Containers) -> dict[str, Any]:
        """Remove what this pull wrote and did not commit: a new copy's volume, or the
        snapshots a refresh added (what ``abort_container`` does, bound to this pull)."""
        if self.phase == "committed" or not self.touched or self.pool is None:
            self.phase = "aborted" if self.phase != "committed" else self.phase
            return {"removed": []}
        self.phase = "aborted"
        if not self.refresh:
            undo_partial_target(cts, self.name, self.pool)  # unrecorded: the volume goes
            return {"removed": "volume"}
        backend = cts.host.backend(self.pool)
        vol = VolumeRef("container", self.name)
        there = {s.name for s in backend.list_snapshots(vol)}
        gone = [s for s in self.created if s in there]
        for s in gone:
            backend.delete_snapshot(vol, SnapshotName(s))
        self.created = []
        return {"removed": gone}


class _Ends(Exception):  # noqa: N818 - a carrier, never seen outside answer_call
    """An error that ends the pull, whatever its class."""

    def __init__(self, error: errors.MigratorError) -> None:
        super().__init__(error.message)
        self.error = error


def answer_call(end: RemoteTarget, call: dict[str, Any], read: Reader, write: Writer,
                scope: PullScope) -> None:
    """Serve one call from the far side with this host's target half, within ``scope``;
    write its reply (a typed error too, so the push there unwinds with its own undo).

    A call outside the scope is answered with ``CallRefused`` and raised here, which ends
    the pull (the caller undoes this pull's work), and so is a received volume that fails
    its inspection before the commit. So is a failed ``receive``: it has left the rest of
    its data frames unread, so the channel can no longer be trusted."""
    op = str(call.get("call"))
    try:
        scope.check(call)
        if op == "commit_container" and scope.inspect is not None:
            try:
                scope.inspect(scope)
            except errors.MigratorError as e:
                raise _Ends(e) from e
        if op == "abort_container":
            result = scope.undo(end.cts)
        elif op == "hello":
            result = TARGET_OPS[op](end, {}, read)  # nothing the far side asks for (criu)
        else:
            result = TARGET_OPS[op](end, call, read)
        scope.done(call)
    except _Ends as e:
        write_json(write, error_reply(e.error))
        raise e.error from None
    except errors.CallRefused as e:
        write_json(write, error_reply(e))
        raise
    except (KeyError, TypeError, ValueError) as e:
        write_json(write, error_reply(errors.InvalidInput(f"malformed call: {e!r}")))
        raise errors.InvalidInput(
            f"the far side sent a malformed {clean_text(op, 40)!r} call: "
            f"{clean_text(repr(e), 200)}") from e
    except errors.MigratorError as e:
        write_json(write, error_reply(e))
        if op == "receive":
            raise
        return
    write_json(write, {"ok": True, **result})
