"""Checkpoint mode choice for live migration (pure logic of migrator.pipelines.live)."""

from __future__ import annotations

import pytest

from migrator.checkpoint.base import Features
from migrator.core.errors import CheckpointError, InvalidInput
from migrator.pipelines.live import choose_mode

LAZY = Features("4.1.1", lazy_pages=True, pre_dump=False,
                pre_dump_reason="kernel has no soft-dirty tracking")
NO_LAZY = Features("4.1.1", lazy_pages=False, pre_dump=False, pre_dump_reason="no soft-dirty")
REMOTE_LAZY = {"criu_features": {"uffd": True, "uffd-noncoop": True}}
REMOTE_NO = {"criu_features": {"uffd": False, "uffd-noncoop": False}}


def test_post_copy_when_both_sides_have_userfaultfd() -> None:
    mode, reasons = choose_mode("auto", LAZY, REMOTE_LAZY)
    assert mode == "post-copy"
    assert any("pre-copy skipped: kernel has no soft-dirty" in r for r in reasons)


@pytest.mark.parametrize(("local", "remote", "who"), [(NO_LAZY, REMOTE_LAZY, "this host"),
                                                      (LAZY, REMOTE_NO, "the target")])
def test_stop_and_copy_otherwise_and_says_who_lacks_it(local, remote, who) -> None:  # type: ignore[no-untyped-def]
    mode, reasons = choose_mode("auto", local, remote)
    assert mode == "stop-and-copy" and who in reasons[-1]
    with pytest.raises(CheckpointError, match=who):
        choose_mode("post-copy", local, remote)


def test_explicit_stop_and_copy_and_bad_mode() -> None:
    assert choose_mode("stop-and-copy", LAZY, REMOTE_LAZY)[0] == "stop-and-copy"
    with pytest.raises(InvalidInput, match="unknown checkpoint mode"):
        choose_mode("teleport", LAZY, REMOTE_LAZY)


def test_unprivileged_post_copy_needs_the_targets_userfaultfd_sysctl() -> None:
    # the restored tasks fault pages from inside their user namespace
    mode, reasons = choose_mode("auto", LAZY, REMOTE_LAZY, unprivileged=True)
    assert mode == "stop-and-copy" and "vm.unprivileged_userfaultfd = 0" in reasons[-1]
    with pytest.raises(CheckpointError, match="unprivileged") as e:
        choose_mode("post-copy", LAZY, REMOTE_LAZY, unprivileged=True)
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in (e.value.hint or "")
    allowed = {"criu_features": {"uffd": True, "uffd-noncoop": True, "unprivileged-uffd": True}}
    assert choose_mode("auto", LAZY, allowed, unprivileged=True)[0] == "post-copy"
    assert choose_mode("auto", LAZY, REMOTE_LAZY, unprivileged=False)[0] == "post-copy"
