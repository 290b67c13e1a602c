"""migrator.recover for custom volumes: a killed volume copy is rolled back, a killed move
is rolled back before its switch and completed after, and never loses the only whole copy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from migrator import recover
from migrator.backends import VolumeRef
from migrator.core.errors import InvalidState
from migrator.runtime.state import OperationRecord, VolumeRecord, VolumeSnapshotRecord


class Pool:
    """A pool's volumes on disk: volume name -> its snapshot names (None: not on disk)."""

    def __init__(self, **volumes: list[str]) -> None:
        self.volumes: dict[str, list[str]] = {k: list(v) for k, v in volumes.items()}

    def volume_exists(self, vol: VolumeRef) -> bool:
        return vol.name in self.volumes

    def list_snapshots(self, vol: VolumeRef) -> list[Any]:
        return [SimpleNamespace(name=s) for s in self.volumes.get(vol.name, [])]

    def delete_volume(self, vol: VolumeRef) -> None:
        self.volumes.pop(vol.name, None)

    def delete_snapshot(self, vol: VolumeRef, name: str) -> None:
        self.volumes[vol.name].remove(name)


class State:
    """The records: ``volumes`` is {(pool, name): [recorded snapshot names]}."""

    def __init__(self, volumes: dict[tuple[str, str], list[str]]) -> None:
        self.volumes = volumes

    def list_volumes(self, pool: str | None = None) -> list[VolumeRecord]:
        return [VolumeRecord(p, "custom", n) for (p, n) in self.volumes if pool in (None, p)]

    def list_volume_snapshots(self, pool: str, name: str) -> list[VolumeSnapshotRecord]:
        return [VolumeSnapshotRecord(pool, "custom", name, s, 0.0)
                for s in self.volumes.get((pool, name), [])]


def cts(pools: dict[str, Pool], records: dict[tuple[str, str], list[str]]) -> Any:
    return SimpleNamespace(host=SimpleNamespace(backend=pools.__getitem__),
                           state=State(records))


def move_op(*stages: str) -> OperationRecord:
    return OperationRecord("op1", "volume-move", "running", list(stages),
                           {"volume": "data", "from_pool": "a", "to_pool": "b",
                            "target": "data2"})


def test_move_cut_before_the_switch_is_rolled_back() -> None:
    a, b = Pool(data=["s0", "migrate.xfer-1"]), Pool(data2=["s0"])
    out = recover._volume_move(cts({"a": a, "b": b}, {("a", "data"): ["s0"]}),
                               move_op("copy", "verify"), lambda h: None)
    assert out.startswith("rolled back")
    assert b.volumes == {} and a.volumes == {"data": ["s0"]}


def test_move_cut_after_the_switch_is_completed() -> None:
    a, b = Pool(data=["s0"]), Pool(data2=["s0", "migrate.xfer-1"])
    out = recover._volume_move(cts({"a": a, "b": b}, {("b", "data2"): ["s0"]}),
                               move_op("copy", "verify", "switch"), lambda h: None)
    assert out.startswith("completed")
    assert a.volumes == {} and b.volumes == {"data2": ["s0"]}


def test_move_keeps_both_copies_when_the_one_to_keep_is_not_whole() -> None:
    a, b = Pool(data=["s0"]), Pool(data2=[])  # the switched-to copy lacks s0
    with pytest.raises(InvalidState, match="kept both"):
        recover._volume_move(cts({"a": a, "b": b}, {("b", "data2"): ["s0"]}),
                             move_op("switch"), lambda h: None)
    assert a.volumes == {"data": ["s0"]} and b.volumes == {"data2": []}


def copy_op(kind: str) -> OperationRecord:
    return OperationRecord("op2", kind, "running", ["copy"],
                           {"volume": "data", "pool": "a", "target": "copy",
                            "target_pool": "b"})


def test_copy_cut_removes_the_partial_target() -> None:
    a, b = Pool(data=["s0", "migrate.xfer-1"]), Pool(copy=["s0"])
    out = recover._volume_copy(cts({"a": a, "b": b}, {("a", "data"): ["s0"]}),
                               copy_op("volume-copy"), lambda h: None)
    assert out.startswith("rolled back") and b.volumes == {}
    assert a.volumes == {"data": ["s0"]}


def test_refresh_cut_keeps_the_target_and_drops_unrecorded_snapshots() -> None:
    a, b = Pool(data=["s0", "s1"]), Pool(copy=["s0", "s1", "migrate.xfer-2"])
    out = recover._volume_copy(
        cts({"a": a, "b": b}, {("a", "data"): ["s0", "s1"], ("b", "copy"): ["s0"]}),
        copy_op("volume-refresh"), lambda h: None)
    assert "2 unrecorded snapshot(s) removed" in out and b.volumes == {"copy": ["s0"]}
