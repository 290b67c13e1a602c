"""Shared test set-up: a clean environment for every test (no stray MIGRATOR_ROOT)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIGRATOR_ROOT", raising=False)


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
