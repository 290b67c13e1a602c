"""The allow-list for the rsync receiver an agent will run (pure)."""

from __future__ import annotations

import pytest

from migrator.core.errors import InvalidInput
from migrator.transport.rsync_relay import server_args

REAL = ["rsync", "--server", "-lHogDtpAXrSe.LsfxCIvu", "--delete", "--stats", "-@-1",
        "--numeric-ids", ".", "/volume/"]


def test_the_arguments_our_client_sends_are_accepted_without_the_target() -> None:
    assert server_args(REAL) == REAL[:-1]
    with_checksum = ["rsync", "--server", "-lHogDtpAXrcSe.LsfxCIvu", "--compress-choice=zstd",
                     "--delete", "--numeric-ids", ".", "/x/"]
    assert server_args(with_checksum)[-1] == "."


@pytest.mark.parametrize("bad", [
    ["rsync", "--server", "--sender", "-lHogDtpAXrSe.LsfxCIvu", ".", "/x/"],  # would read
    ["rsync", "--server", "-lHogDtpAXrSe.LsfxCIvu", "--log-file=/etc/passwd", ".", "/x/"],
    ["rsync", "--server", "-lHogDtpAXrSe.LsfxCIvu", "--rsync-path=sh", ".", "/x/"],
    ["rsync", "--server", "-lHogDtpAXrSTe.LsfxCIvu", ".", "/x/"],  # -T takes a directory
    ["sh", "--server", "-lHogDtpAXrSe.LsfxCIvu", ".", "/x/"],
    ["rsync", "-lHogDtpAXrSe.LsfxCIvu", "--delete", ".", "/x/"],  # not a server
    "rsync --server",
    ["rsync", "--server", "-e.Ls", "/etc", "/x/"],
])
def test_anything_else_is_refused(bad: object) -> None:
    with pytest.raises(InvalidInput):
        server_args(bad)
