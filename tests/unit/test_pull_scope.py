"""A pull's calls back from the source host, bound to the pulled container (``PullScope``):
the sequence a real push makes passes; every call aimed elsewhere, or out of order, is
refused with ``CallRefused`` before the agent runs anything, and the pull's undo touches
only what the pull itself wrote."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from migrator.core import errors
from migrator.pipelines.pull_scope import PullScope, answer_call
from migrator.transport.frames import read_json

CT = "pulled"


# a host with a recorded container "victim" (and, for refreshes, "pulled") -----------------
@dataclass
class FakeBackend:
    snaps: dict[str, list[str]] = field(default_factory=dict)
    deleted: list[tuple[str, str]] = field(default_factory=list)

    def list_snapshots(self, vol: Any) -> list[Any]:
        return [SimpleNamespace(name=n) for n in self.snaps.get(vol.name, [])]

    def delete_snapshot(self, vol: Any, snap: str) -> None:
        self.deleted.append((vol.name, str(snap)))
        self.snaps[vol.name].remove(str(snap))


class FakeCts:
    def __init__(self, recorded: dict[str, dict[str, str]],
                 snaps: dict[str, list[str]]) -> None:
        self.backend = FakeBackend(dict(snaps))
        self.records = recorded
        self.state = SimpleNamespace(
            has_container=lambda n: n in self.records,
            get_container=lambda n: SimpleNamespace(name=n, pool="fast",
                                                    config=self.records[n]),
            list_snapshots=lambda n: [SimpleNamespace(name=s) for s in snaps.get(n, [])
                                      if not s.startswith("migrate.")],
        )
        self.host = SimpleNamespace(backend=lambda pool: self.backend)


def host(refresh_target: bool = False, privileged: bool = False) -> FakeCts:
    recorded = {"victim": {"security.privileged": "false"}}
    snaps = {"victim": ["v0"]}
    if refresh_target:
        recorded[CT] = {"security.privileged": "true" if privileged else "false"}
        snaps[CT] = ["s0"]
    return FakeCts(recorded, snaps)


def vol(name: str = CT, kind: str = "container") -> dict[str, str]:
    return {"type": kind, "name": name}


def receive(snap: str, first: bool = False, parent: str | None = None,
            drop_after: bool = False, name: str = CT, pool: str = "fast",
            privileged: bool = False) -> dict[str, Any]:
    return {"call": "receive", "pool": pool, "volume": vol(name), "snapshot": snap,
            "parent": parent, "how": "tar", "compress": "none", "first": first,
            "drop_after": drop_after, "privileged": privileged}


def commit(name: str = CT, snaps: tuple[str, ...] = ("s0",), pool: str = "fast",
           config: dict[str, str] | None = None) -> dict[str, Any]:
    return {"call": "commit_container", "name": name, "pool": pool, "image": None,
            "config": config or {}, "snapshots": [{"name": s} for s in snaps]}


def run(scope: PullScope, calls: list[dict[str, Any]]) -> None:
    for c in calls:
        scope.check(c)
        scope.done(c)


def started(scope: PullScope) -> PullScope:
    run(scope, [{"call": "hello"}, {"call": "container_state", "name": CT}])
    return scope


def new_scope(**kw: Any) -> PullScope:
    return started(PullScope.begin(host(), "host-a", CT, None, False, **kw))


# what a real push does passes -------------------------------------------------------------
def test_a_new_copy_in_push_order_passes() -> None:
    scope = new_scope()
    run(scope, [receive("s0", first=True), receive("s1", parent="s0"),
                receive("migrate.xfer-1", parent="s1", drop_after=True),
                commit(snaps=("s0", "s1"))])
    assert scope.phase == "committed" and scope.created == ["s0", "s1"]
    assert scope.pool == "fast" and scope.privileged is False


def test_a_refresh_adds_new_snapshots_from_a_shared_base() -> None:
    cts = host(refresh_target=True)
    scope = started(PullScope.begin(cts, "host-a", CT, None, True))
    assert scope.pool == "fast" and scope.known == {"s0"}
    run(scope, [receive("s1", parent="s0"), receive("migrate.xfer-2", parent="s1",
                                                    drop_after=True),
                commit(snaps=("s1",))])
    assert scope.phase == "committed"


def test_a_new_copy_needs_a_free_name() -> None:
    cts = host(refresh_target=True)
    with pytest.raises(errors.AlreadyExists, match="already exists"):
        PullScope.begin(cts, "host-a", CT, None, False)


# calls aimed at another container ---------------------------------------------------------
@pytest.mark.parametrize("call", [
    receive("s0", first=True, name="victim"),
    {**receive("s0", first=True), "volume": vol("victim", "custom")},
    {**receive("s0", first=True), "volume": "victim"},
    {"call": "delete_snapshot", "pool": "fast", "volume": vol("victim"), "snapshot": "v0"},
    commit(name="victim", config={"user.x": "y"}),
    {"call": "abort_container", "name": "victim", "pool": "fast"},
    {"call": "container_state", "name": "victim"},
], ids=["receive", "custom-volume", "malformed-volume", "delete", "commit", "abort", "state"])
def test_a_call_aimed_at_another_container_is_refused(call: dict[str, Any]) -> None:
    scope = new_scope()
    with pytest.raises(errors.CallRefused) as e:
        scope.check(call)
    assert repr(call["call"]) in e.value.message and "pulling 'pulled'" in e.value.message
    if isinstance(call.get("volume"), dict) or "name" in call:
        assert "victim" in e.value.message  # names what it aimed at
    assert "do not trust" in e.value.hint


@pytest.mark.parametrize("op", ["start", "delete_container", "rsync_receive", "sink",
                                "delegate", "repository", "p2c_finish", "snapshot_volume",
                                "receive_images", "checkpoint_restore"])
def test_calls_a_pull_never_makes_are_refused(op: str) -> None:
    scope = new_scope()
    with pytest.raises(errors.CallRefused, match=op):
        scope.check({"call": op, "name": CT, "pool": "fast", "volume": vol(),
                     "snapshot": "x"})


def test_the_order_of_a_push_is_enforced() -> None:
    scope = PullScope.begin(host(), "host-a", CT, None, False)
    with pytest.raises(errors.CallRefused, match="no hello first"):
        scope.check(receive("s0", first=True))
    run(scope, [{"call": "hello"}])
    with pytest.raises(errors.CallRefused, match="second hello"):
        scope.check({"call": "hello"})
    with pytest.raises(errors.CallRefused, match="state was asked"):
        scope.check(receive("s0", first=True))
    run(scope, [{"call": "container_state", "name": CT}])
    with pytest.raises(errors.CallRefused, match="before the container's data"):
        scope.check(commit())
    with pytest.raises(errors.CallRefused, match="must start the volume afresh"):
        scope.check(receive("s0"))
    run(scope, [receive("s0", first=True)])
    with pytest.raises(errors.CallRefused, match="only a new copy's first stream"):
        scope.check(receive("s1", first=True, parent="s0"))
    with pytest.raises(errors.CallRefused, match="pool 'other'"):
        scope.check(receive("s1", parent="s0", pool="other"))
    with pytest.raises(errors.CallRefused, match="received over"):
        scope.check(receive("s0", parent="s0"))
    with pytest.raises(errors.CallRefused, match="parent 'v0'"):
        scope.check(receive("s1", parent="v0"))
    with pytest.raises(errors.CallRefused, match="'v0' was not received"):
        scope.check(commit(snaps=("s0", "v0")))
    run(scope, [commit()])
    with pytest.raises(errors.CallRefused, match="already committed"):
        scope.check({"call": "delete_snapshot", "pool": "fast", "volume": vol(),
                     "snapshot": "s0"})


def test_a_refresh_never_receives_over_or_deletes_what_the_target_had() -> None:
    cts = host(refresh_target=True)
    scope = started(PullScope.begin(cts, "host-a", CT, None, True))
    with pytest.raises(errors.CallRefused, match="'s0' exists here"):
        scope.check(receive("s0"))
    with pytest.raises(errors.CallRefused, match="start the volume afresh"):
        scope.check(receive("s1", first=True))  # first would drop its unrecorded snapshots
    with pytest.raises(errors.CallRefused, match="pool 'slow'"):
        scope.check(receive("s1", parent="s0", pool="slow"))
    with pytest.raises(errors.CallRefused, match="'s0' was not received by this pull"):
        scope.check({"call": "delete_snapshot", "pool": "fast", "volume": vol(),
                     "snapshot": "s0"})
    run(scope, [receive("s1", parent="s0")])
    run(scope, [{"call": "delete_snapshot", "pool": "fast", "volume": vol(),
                 "snapshot": "s1"}])  # its own: allowed
    assert scope.created == []


def test_privilege_is_announced_fixed_and_needs_the_operator() -> None:
    scope = new_scope()
    with pytest.raises(errors.CallRefused, match="privileged") as e:
        scope.check(receive("s0", first=True, privileged=True))
    assert "--allow-privileged" in e.value.hint and scope.touched is False
    with pytest.raises(errors.CallRefused, match="whether the container is privileged"):
        scope.check({**receive("s0", first=True), "privileged": "no"})
    run(scope, [receive("s0", first=True)])
    with pytest.raises(errors.CallRefused, match="for a privileged container"):
        scope.check(receive("s1", parent="s0", privileged=True))
    with pytest.raises(errors.CallRefused, match="config makes it privileged"):
        scope.check(commit(config={"security.privileged": "TRUE"}))
    allowed = new_scope(allow_privileged=True)
    run(allowed, [receive("s0", first=True, privileged=True),
                  commit(config={"security.privileged": "true"})])
    # a refresh keeps the target's privilege
    cts = host(refresh_target=True, privileged=False)
    refresh = started(PullScope.begin(cts, "host-a", CT, None, True, True))
    with pytest.raises(errors.CallRefused, match="for a privileged container"):
        refresh.check(receive("s1", parent="s0", privileged=True))


def test_hostile_text_in_a_call_is_not_echoed_raw() -> None:
    scope = new_scope()
    with pytest.raises(errors.CallRefused) as e:
        scope.check(receive("s0", first=True, name="\x1b[2Jvictim\x07" + "x" * 500))
    assert "\x1b" not in e.value.message and "\x07" not in e.value.message
    assert len(e.value.message) < 400


# the undo removes only the pull's own work ------------------------------------------------
def test_undo_of_a_refresh_removes_only_the_snapshots_it_received() -> None:
    cts = host(refresh_target=True)
    scope = started(PullScope.begin(cts, "host-a", CT, None, True))
    run(scope, [receive("s1", parent="s0")])
    cts.backend.snaps[CT].append("s1")
    assert scope.undo(cts) == {"removed": ["s1"]}
    assert cts.backend.deleted == [(CT, "s1")] and cts.backend.snaps[CT] == ["s0"]
    assert scope.phase == "aborted"
    with pytest.raises(errors.CallRefused, match="already aborted"):
        scope.check(receive("s2", parent="s0"))


def test_undo_before_any_data_touches_nothing() -> None:
    cts = host()
    scope = new_scope()
    assert scope.undo(cts) == {"removed": []} and cts.backend.deleted == []


def test_undo_of_a_new_copy_removes_its_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.pipelines.pull_scope

    undone: list[tuple[str, str]] = []
    monkeypatch.setattr(migrator.pipelines.pull_scope, "undo_partial_target",
                        lambda cts, name, pool: undone.append((name, pool)))
    scope = new_scope()
    run(scope, [receive("s0", first=True)])
    assert scope.undo(host()) == {"removed": "volume"} and undone == [(CT, "fast")]
    committed = new_scope()
    run(committed, [receive("s0", first=True), commit()])
    committed.undo(host())
    assert undone == [(CT, "fast")]  # a committed copy is never undone


# answer_call: the refusal is answered, raised, and nothing runs ---------------------------
def test_answer_call_refuses_before_the_agent_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.pipelines.remote_target

    ran: list[str] = []
    def delete(agent: Any, call: Any, read: Any) -> dict[str, Any]:
        ran.append("delete")
        return {}

    monkeypatch.setitem(migrator.pipelines.remote_target.TARGET_OPS, "delete_snapshot", delete)
    scope = new_scope()
    out = io.BytesIO()
    call = {"call": "delete_snapshot", "pool": "fast", "volume": vol("victim"),
            "snapshot": "v0"}
    with pytest.raises(errors.CallRefused):
        answer_call(SimpleNamespace(cts=host()), call, io.BytesIO().read, out.write, scope)
    assert ran == []
    out.seek(0)
    reply = read_json(out.read)
    assert reply["ok"] is False and reply["error"]["type"] == "CallRefused"
    assert "victim" in reply["error"]["message"]


def test_answer_call_serves_an_abort_with_the_scoped_undo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.pipelines.remote_target

    monkeypatch.setitem(migrator.pipelines.remote_target.TARGET_OPS, "abort_container",
                        lambda *a: pytest.fail("the agent's own abort must not run"))
    cts = host(refresh_target=True)
    scope = started(PullScope.begin(cts, "host-a", CT, None, True))
    out = io.BytesIO()
    answer_call(SimpleNamespace(cts=cts), {"call": "abort_container", "name": CT,
                                           "pool": "fast"}, io.BytesIO().read, out.write,
                scope)
    out.seek(0)
    assert read_json(out.read) == {"ok": True, "removed": []}
    assert cts.backend.deleted == []


def test_a_native_stream_is_inspected_before_the_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.pipelines.remote_target

    monkeypatch.setitem(migrator.pipelines.remote_target.TARGET_OPS, "commit_container",
                        lambda *a: pytest.fail("committed an uninspected volume"))
    scope = new_scope()
    run(scope, [{**receive("s0", first=True), "how": "btrfs"}])
    assert scope.native

    def inspect(s: PullScope) -> None:
        raise errors.UnsafeArchive("'pulled': rootfs/etc/disk is a block device")

    scope.inspect = inspect
    out = io.BytesIO()
    with pytest.raises(errors.UnsafeArchive, match="block device"):
        answer_call(SimpleNamespace(cts=host()), commit(), io.BytesIO().read, out.write,
                    scope)
    out.seek(0)
    assert read_json(out.read)["error"]["type"] == "UnsafeArchive"
    assert scope.phase == "state"  # not committed: the caller's undo removes the volume
