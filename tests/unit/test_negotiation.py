"""Link and compression choice between two hosts (pure logic of migrator.pipelines.remote_copy)."""

from __future__ import annotations

import pytest

from migrator.core.errors import InvalidInput
from migrator.pipelines.remote_copy import (
    ZSTD_RATE,
    choose_compression,
    choose_link,
    negotiate_session,
)

NEW = {"compressors": ["none", "zstd"], "links": ["ssh", "tcp"]}
OLD = {"compressors": ["none", "zstd"]}  # an agent from before the direct link


def test_link_follows_setting_and_offer() -> None:
    assert choose_link(NEW, "auto")[0] == "tcp"
    assert choose_link(NEW, "tcp")[0] == "tcp"
    assert choose_link(NEW, "ssh")[0] == "ssh"
    assert choose_link(OLD, "auto")[0] == "ssh"
    with pytest.raises(InvalidInput, match="no direct data link"):
        choose_link(OLD, "tcp")


def test_auto_compression_depends_on_measured_link() -> None:
    assert choose_compression(NEW, "auto", None)[0] == "zstd"
    assert choose_compression(NEW, "auto", ZSTD_RATE * 2)[0] == "none"
    assert choose_compression(NEW, "auto", ZSTD_RATE / 2)[0] == "zstd"
    assert "faster than zstd" in choose_compression(NEW, "auto", ZSTD_RATE * 2)[1]
    assert choose_compression({"compressors": ["none"]}, "auto", None)[0] == "none"


def test_explicit_compression_is_kept_or_refused() -> None:
    assert choose_compression(NEW, "zstd", ZSTD_RATE * 10) == ("zstd", "asked for")
    assert choose_compression(NEW, "none", None)[0] == "none"
    with pytest.raises(InvalidInput, match="cannot decompress 'lz4'"):
        choose_compression(NEW, "lz4", None)


class _T:
    def __init__(self, data_link: str, link_rate: float | None) -> None:
        self.data_link, self.link_rate, self.fast_link = data_link, link_rate, False


def test_session_turns_the_transport_link_on_or_off() -> None:
    t = _T("auto", ZSTD_RATE * 3)
    s = negotiate_session(t, NEW, "auto")
    assert (s.link, s.compress, t.fast_link) == ("tcp", "none", True)
    assert "link tcp, compression none" in s.summary()
    t = _T("ssh", None)
    s = negotiate_session(t, NEW, "auto")
    assert (s.link, s.compress, t.fast_link) == ("ssh", "zstd", False)
