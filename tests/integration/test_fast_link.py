"""The fast data link between two test hosts (paramiko client in ``mt8-a`` -> agent behind
``mt8-b``'s sshd): data over the link, the fall back to the SSH channel when the agent
cannot connect back, and an agent error in the middle of a stream over the link."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator import errors
from migrator.streams import SendStream
from migrator.transport import link
from migrator.transport.ssh import SshTransport
from runtime import testhosts
from runtime.testhosts import TestHostSpec
from tests.conftest import IN_CI

BASE = Path("/var/tmp/migrator-tests/fast-link")
PREFIX = "mt8"
REPO = Path(__file__).resolve().parents[2]
AGENT = f"env PYTHONPATH={REPO} {sys.executable} -m migrator.cli.main"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[TestHostSpec, TestHostSpec]]:
    if os.geteuid() != 0 or shutil.which("/usr/sbin/sshd") is None:
        msg = "fast link tests need root and sshd (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    testhosts.down(BASE, PREFIX)
    try:
        a, b = testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX)
        yield a, b
    finally:
        problems = testhosts.down(BASE, PREFIX)
        assert not problems, problems
        assert testhosts.leftovers(BASE, PREFIX) == []


def transport(a: TestHostSpec, b: TestHostSpec) -> SshTransport:
    return SshTransport("b", b.link_ip, key=str(a.client_key), remote_root=str(b.root),
                        command=AGENT, known_hosts=a.known_hosts, netns=a.netns,
                        fast_link=True)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_upload_goes_over_the_link(pair, compress: str) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    size = 48 << 20
    with transport(a, b) as t:
        stream = SendStream(["head", "-c", str(size), "/dev/urandom"], "probe", "probe")
        reply = t.request("sink", {"compress": compress}, stream=stream, compress=compress)
        assert reply["raw"] == size and t.last_raw == size
        assert t.last_link == "tcp" and not t.link_failed


def test_no_connection_back_falls_back_to_the_channel(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    monkeypatch.setattr(link, "ACCEPT_WAIT", 3.0)
    describe = link.LinkOffer.describe
    # the agent is sent to a port nobody listens on, as if a firewall were in the way
    monkeypatch.setattr(link.LinkOffer, "describe",
                        lambda self: dict(describe(self), port=self.port ^ 1))
    with transport(a, b) as t:
        for _ in range(2):
            stream = SendStream(["head", "-c", str(8 << 20), "/dev/zero"], "probe", "probe")
            reply = t.request("sink", {"compress": "zstd"}, stream=stream, compress="zstd")
            assert reply["raw"] == 8 << 20 and t.last_link == "channel"
        assert "did not connect back" in t.link_failed  # and was not asked again


def test_agent_error_mid_stream_is_reported_through_the_link(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    with transport(a, b) as t:
        stream = SendStream(["head", "-c", str(64 << 20), "/dev/urandom"], "tar", "s0")
        with pytest.raises(errors.RemoteError, match="tar"):
            t.request("receive", {"pool": "dir", "volume": {"type": "container",
                                                            "name": "junk"},
                                  "snapshot": "s0", "parent": None, "how": "tar",
                                  "compress": "none"}, stream=stream, compress="none")
        assert t.last_link == "tcp" and not t.link_failed  # the link was fine, tar was not
        t.request("abort_container", {"name": "junk", "pool": "dir"})
        # and the connection still serves the next upload over a new link
        stream = SendStream(["head", "-c", str(4 << 20), "/dev/zero"], "probe", "probe")
        assert t.request("sink", {}, stream=stream)["raw"] == 4 << 20
        assert t.last_link == "tcp"
