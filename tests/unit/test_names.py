"""migrator.core.names: names validated once, at the edge."""

from __future__ import annotations

import pytest

from migrator.core.errors import InvalidInput
from migrator.core.names import (
    ContainerName,
    ImageAlias,
    PoolName,
    SnapshotName,
    VolumeName,
    split_snapshot_ref,
)


@pytest.mark.parametrize("name", ["web-1", "a", "A", "a" * 63, "web1-db2", "x" + "-y" * 31])
def test_container_name_accepts(name: str) -> None:
    n = ContainerName(name)
    assert n == name
    assert isinstance(n, str)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a b",
        "a" * 64,
        "a" * 70,
        "-a",
        "a-",
        "1abc",
        "",
        "a/b",
        "a.b",
        ".",
        "..",
        "a_b",
        "é",
    ],
)
def test_container_name_rejects(name: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        ContainerName(name)
    assert ei.value.hint
    assert repr(name) in str(ei.value)


def test_container_name_rejects_non_str() -> None:
    with pytest.raises(InvalidInput):
        ContainerName(5)  # type: ignore[arg-type]


def test_container_name_rejects_trailing_newline() -> None:
    with pytest.raises(InvalidInput):
        ContainerName("web-1\n")


@pytest.mark.parametrize("cls,kind", [(PoolName, "pool"), (VolumeName, "volume")])
def test_subkinds_name_themselves_in_errors(cls: type, kind: str) -> None:
    assert cls("default") == "default"
    with pytest.raises(InvalidInput) as ei:
        cls("../x")
    assert f"invalid {kind} name" in str(ei.value)
    assert ei.value.hint


@pytest.mark.parametrize(
    "name", ["snap0", "2024-01-01", "a.b", "a_b", "0", "s" * 63, "before-upgrade.1"]
)
def test_snapshot_name_accepts(name: str) -> None:
    assert SnapshotName(name) == name


@pytest.mark.parametrize(
    "name", ["..", "a/b", "../x", "", ".", ".hidden", "a..b", "s" * 64, "a b", "-a"]
)
def test_snapshot_name_rejects(name: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        SnapshotName(name)
    assert ei.value.hint


def test_split_snapshot_ref() -> None:
    ct, snap = split_snapshot_ref("web-1/snap0")
    assert (ct, snap) == ("web-1", "snap0")
    assert isinstance(ct, ContainerName) and isinstance(snap, SnapshotName)
    assert split_snapshot_ref("web-1") == ("web-1", None)


@pytest.mark.parametrize(
    "ref", ["web-1/", "/snap0", "web-1/snap0/x", "../x", "web-1/..", "bad name/snap0"]
)
def test_split_snapshot_ref_rejects(ref: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        split_snapshot_ref(ref)
    assert ei.value.hint


@pytest.mark.parametrize(
    "alias", ["debian/bookworm", "busybox", "ubuntu/24.04", "a/b/c", "x_y-z.1"]
)
def test_image_alias_accepts(alias: str) -> None:
    assert ImageAlias(alias) == alias


@pytest.mark.parametrize(
    "alias", ["../x", "/abs", "a//b", "a/", "", "a/../b", "a b", "a" * 129, "-x"]
)
def test_image_alias_rejects(alias: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        ImageAlias(alias)
    assert ei.value.hint
