"""Shared test set-up: a clean environment for every test (no stray MIGRATOR_ROOT)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIGRATOR_ROOT", raising=False)


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(msg: str) -> None:
    """A tool or privilege a test needs is not here: under CI (where setup installs
    everything) that is a failure, elsewhere a skip."""
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)
