"""migrator.recover's backup check: repositories are reached through their interface."""

from __future__ import annotations

from typing import Any

import pytest

from migrator import recover
from migrator.core.errors import NetworkError, NotFound


class FakeTransport:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeRemoteRepo:
    """Stands for ``RemoteRepository``: answers ``get`` like the agent would."""

    def __init__(self, have: set[str]) -> None:
        self.have, self.t = have, FakeTransport()

    def get(self, bid: str) -> Any:
        if bid not in self.have:
            raise NotFound(f"no backup {bid!r}")
        return object()


class Cts:
    host = object()


def test_ssh_repository_is_asked_through_the_interface(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    repo = FakeRemoteRepo({"c1-20261206T000000Z-abcdef"})

    def fake_open(host: Any, spec: str) -> FakeRemoteRepo:
        seen.append(spec)
        return repo

    monkeypatch.setattr(recover, "open_repository", fake_open)
    spec = "ssh://host-b/srv/backups"
    assert recover._backup_committed(Cts(), spec, "c1-20261206T000000Z-abcdef")
    assert not recover._backup_committed(Cts(), spec, "c1-20261206T000000Z-000000")
    assert seen == [spec, spec] and repo.t.closed  # the URL as given, never made a path


def test_unreachable_repository_decides_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Down(FakeRemoteRepo):
        def get(self, bid: str) -> Any:
            raise NetworkError("cannot reach host-b")

    monkeypatch.setattr(recover, "open_repository", lambda h, s: Down(set()))
    with pytest.raises(NetworkError):
        recover._backup_committed(Cts(), "ssh://host-b", "c1-20261206T000000Z-abcdef")
