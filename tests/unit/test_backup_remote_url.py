"""Repository addresses (``ssh://HOST/PATH``) and the names checked on the agent's side."""

from __future__ import annotations

import pytest

from migrator.backup.remote import check_path, parse_url
from migrator.backup.repository import valid_part_path
from migrator.core.errors import InvalidInput


def test_urls() -> None:
    assert parse_url("ssh://host-b/srv/backups") == ("host-b", "/srv/backups")
    assert parse_url("ssh://host-b/srv/backups/") == ("host-b", "/srv/backups")
    assert parse_url("ssh://host-b") == ("host-b", None)  # that host's default repository
    assert parse_url("ssh://host-b/") == ("host-b", None)


@pytest.mark.parametrize("bad", ["ssh://root@host-b/srv", "ssh://host-b:2222/srv",
                                 "ssh:///srv", "ssh://host-b/srv/../etc",
                                 "ssh://host-b//srv", "ssh://host-b/srv?x=1", "sftp://h/x"])
def test_bad_urls_are_refused_with_an_example(bad: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_url(bad)
    assert e.value.hint and "ssh://" in e.value.hint


def test_paths_and_parts() -> None:
    assert check_path("/srv/b") == "/srv/b"
    for bad in ("srv/b", "/srv/./b", "/srv/../b", "/srv\0/b"):
        with pytest.raises(InvalidInput):
            check_path(bad)
    assert valid_part_path("rootfs.tar.zst") and valid_part_path("snapshots/s0.tar.zst")
    for bad in ("", "/etc/passwd", "../x", "a/../../x", ".hidden", "index.json", "a\0b"):
        assert not valid_part_path(bad), bad
