"""Pure logic of transfers: negotiation, refresh plans, progress, verification samples."""

from __future__ import annotations

import pytest

from migrator.core.errors import InvalidState
from migrator.pipelines.target_check import sample
from migrator.pipelines.transfer import SnapInfo, negotiate, plan_transfer
from migrator.streams import ProgressEvent, ProgressMeter


def snaps(*names: str) -> list[SnapInfo]:
    return [SnapInfo(n, f"uuid-{n}") for n in names]


@pytest.mark.parametrize(
    ("src", "dst", "local", "want"),
    [
        (["btrfs", "rsync", "tar"], ["btrfs", "rsync", "tar"], True, "btrfs"),
        (["zfs", "rsync", "tar"], ["zfs", "rsync", "tar"], True, "zfs"),
        (["btrfs", "rsync", "tar"], ["zfs", "rsync", "tar"], True, "rsync"),
        (["rsync", "tar"], ["btrfs", "rsync", "tar"], True, "rsync"),
        (["btrfs", "rsync", "tar"], ["zfs", "rsync", "tar"], False, "tar"),
        (["btrfs", "rsync", "tar"], ["btrfs", "rsync", "tar"], False, "btrfs"),
    ],
)
def test_negotiate_picks_best_common(src, dst, local, want) -> None:  # type: ignore[no-untyped-def]
    assert negotiate(src, dst, local) == want


def test_negotiate_without_common_method() -> None:
    with pytest.raises(Exception, match="no common"):
        negotiate(["btrfs"], ["zfs"])


def test_new_target_gets_every_snapshot() -> None:
    p = plan_transfer(snaps("a", "b"), None, "btrfs")
    assert (p.how, p.base, p.send, p.skipped, p.target_only) == ("btrfs", None, ["a", "b"], [], [])


def test_refresh_sends_after_newest_shared() -> None:
    p = plan_transfer(snaps("a", "b", "c", "d"), snaps("a", "b"), "btrfs")
    assert (p.how, p.base, p.send) == ("btrfs", "b", ["c", "d"])


def test_refresh_gap_is_skipped_and_reported() -> None:
    p = plan_transfer(snaps("a", "b", "c", "d"), snaps("a", "c"), "btrfs")
    assert (p.base, p.send, p.skipped) == ("c", ["d"], ["b"])
    assert any("skipped b" in n for n in p.notes)


def test_target_only_snapshots_are_kept_and_reported() -> None:
    p = plan_transfer(snaps("a", "b"), snaps("a", "mine"), "btrfs")
    assert (p.base, p.send, p.target_only) == ("a", ["b"], ["mine"])
    assert p.how == "btrfs"  # btrfs receive does not care about other subvolumes


def test_zfs_with_newer_target_snapshot_falls_back_to_rsync() -> None:
    p = plan_transfer(snaps("a", "b"), snaps("a", "mine"), "zfs")
    assert p.how == "rsync" and p.send == ["b"]
    assert any("destroy" in n for n in p.notes)


def test_zfs_with_base_newest_on_target_stays_native() -> None:
    assert plan_transfer(snaps("a", "b"), snaps("a"), "zfs").how == "zfs"


def test_native_identity_mismatch_falls_back() -> None:
    p = plan_transfer(snaps("a", "b"), snaps("a"), "btrfs", native_base_ok=lambda n: False)
    assert p.how == "rsync" and any("was not copied" in n for n in p.notes)


def test_no_shared_snapshot_on_existing_target_uses_rsync_and_says_so() -> None:
    p = plan_transfer(snaps("a"), snaps("x"), "btrfs")
    assert p.how == "rsync" and p.base is None and p.send == ["a"]
    assert any("no shared snapshot" in n for n in p.notes)


def test_same_name_other_identity_is_refused() -> None:
    with pytest.raises(InvalidState, match="different content"):
        plan_transfer(snaps("a", "b"), [SnapInfo("a", "uuid-a"), SnapInfo("b", "other")], "btrfs")


def test_unknown_identity_matches_by_name() -> None:
    p = plan_transfer(snaps("a", "b"), [SnapInfo("a", "")], "rsync")
    assert (p.base, p.send) == ("a", ["b"])


def test_progress_meter_reports_rate_and_eta() -> None:
    events: list[ProgressEvent] = []
    m = ProgressMeter(events.append, "x", total=1000, every=0)
    m.advance(250)
    m.advance(250)
    m.finish()
    assert [e.done for e in events] == [250, 500, 500]
    assert events[-1].total == 1000 and events[-1].rate > 0 and events[-1].eta is not None


def test_progress_meter_total_grows_to_done() -> None:
    events: list[ProgressEvent] = []
    m = ProgressMeter(events.append, "x", total=10, every=0)
    m.advance(15)
    m.finish()
    assert events[-1].total == 15 and events[-1].eta == 0


def test_verification_sample_has_biggest_and_spread() -> None:
    files = [(i, f"f{i:03d}") for i in range(200)]
    picked = sample(files, 10)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert {"f199", "f195"} <= set(picked)
    assert sample([(1, "only")], 10) == ["only"]
