"""The fast data link between two test hosts (paramiko client in ``mt8-a`` -> agent behind
``mt8-b``'s sshd): data over the link (TLS 1.3, certificates pinned through SSH), strangers
on the link's port that connect first, the fall back to the SSH channel when the agent
cannot connect back (remembered for the host), and an agent error in the middle of a
stream over the link."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.core import errors, proc
from migrator.streams import SendStream
from migrator.transport import link, ssh, tunnel
from migrator.transport.ssh import SshTransport
from testrigs import testhosts
from testrigs.testhosts import TestHostSpec
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


def test_no_connection_back_falls_back_to_the_channel(pair, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    monkeypatch.setattr(ssh, "_LINK_FAILED", {})  # what this process remembers, for this test
    monkeypatch.setattr(link, "ACCEPT_WAIT", 3.0)
    describe = link.LinkOffer.describe
    offers: list[link.LinkOffer] = []

    def elsewhere(self: link.LinkOffer) -> dict[str, object]:
        # the agent is sent to a port nobody listens on, as if a firewall were in the way
        offers.append(self)
        return dict(describe(self), port=self.port ^ 1)

    monkeypatch.setattr(link.LinkOffer, "describe", elsewhere)
    with transport(a, b) as t:
        stream = SendStream(["head", "-c", str(8 << 20), "/dev/zero"], "probe", "probe")
        reply = t.request("sink", {"compress": "zstd"}, stream=stream, compress="zstd")
        assert reply["raw"] == 8 << 20 and t.last_link == "channel"
        assert "could not make the data link" in t.link_failed, t.link_failed
        assert "refused" in t.link_failed.lower(), t.link_failed  # the agent's reason
    assert len(offers) == 1
    assert any("using the SSH channel" in r.getMessage() for r in caplog.records)
    # remembered for this host in this process: a new connection offers no link and does
    # not wait for one, the data goes on the channel at once
    with transport(a, b) as t:
        t0 = time.monotonic()
        stream = SendStream(["head", "-c", str(8 << 20), "/dev/zero"], "probe", "probe")
        reply = t.request("sink", {"compress": "zstd"}, stream=stream, compress="zstd")
        assert reply["raw"] == 8 << 20 and t.last_link == "channel"
        assert time.monotonic() - t0 < link.ACCEPT_WAIT
    assert len(offers) == 1  # no second offer


# A stranger on the data link: three processes in host b's namespace reach the port the
# client listens on before the agent does (they are started as the offer is made): one
# sends garbage, one holds its socket without a word, one speaks TLS with a certificate of
# its own. The transfer still goes over the link, the bytes arrive unchanged, and it takes
# no longer than without them (give or take the machine's noise).
STRANGER = r"""
import os, socket, ssl, sys
from migrator.transport.link import Identity
address, port, how, server = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((address, port), timeout=10)
if how == "garbage":
    s.sendall(os.urandom(4096))
print("connected", flush=True)
if how == "tls":
    import base64
    ctx = Identity().context(False, base64.b64decode(server))
    try:  # TLS 1.3: the client learns that its certificate was refused on its first read
        s = ctx.wrap_socket(s)
        print("ACCEPTED" if s.recv(1) else "refused: closed", flush=True)
    except (OSError, ssl.SSLError) as e:
        print("refused:", type(e).__name__, flush=True)
sys.stdin.read()  # hold the socket until the test is done
"""


def _payload_tar(tmp: Path, size: int) -> tuple[Path, str]:
    d = tmp / "payload"
    (d / "rootfs").mkdir(parents=True)
    data = os.urandom(size)
    (d / "rootfs/payload.bin").write_bytes(data)
    return d, hashlib.sha256(data).hexdigest()


def _receive(t: SshTransport, src: Path, name: str) -> float:
    t0 = time.monotonic()
    t.request("receive", {"pool": "dir", "volume": {"type": "container", "name": name},
                          "snapshot": "s0", "parent": None, "how": "tar", "compress": "none"},
              stream=SendStream(["tar", "-C", str(src), "-c", "."], "tar", "s0"),
              compress="none")
    return time.monotonic() - t0


def _received_hash(b: TestHostSpec, name: str) -> str:
    found = b.root / "storage-pools/dir/containers" / name / "rootfs/payload.bin"
    return hashlib.sha256(found.read_bytes()).hexdigest()


def test_strangers_on_the_link_do_not_break_or_delay_it(pair, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    src, digest = _payload_tar(tmp_path, 96 << 20)
    strangers: list[subprocess.Popen[bytes]] = []
    offers: list[link.LinkOffer] = []
    describe = link.LinkOffer.describe

    def with_strangers(self: link.LinkOffer) -> dict[str, object]:
        offers.append(self)
        server = base64.b64encode(self.identity.der).decode()
        for how in ("garbage", "silent", "tls"):
            p = proc.spawn_piped(["env", f"PYTHONPATH={REPO}", sys.executable, "-c", STRANGER,
                                  self.address, str(self.port), how, server], netns=b.netns)
            assert p.stdout is not None and p.stdout.readline() == b"connected\n"
            strangers.append(p)
        return describe(self)

    try:
        with transport(a, b) as t:
            clean = _receive(t, src, "clean")
            assert t.last_link == "tcp"
            t.request("abort_container", {"name": "clean", "pool": "dir"})
            monkeypatch.setattr(link.LinkOffer, "describe", with_strangers)
            crowded = _receive(t, src, "crowded")
            assert t.last_link == "tcp" and not t.link_failed
            assert _received_hash(b, "crowded") == digest  # the bytes, unchanged
            t.request("abort_container", {"name": "crowded", "pool": "dir"})
        assert crowded - clean < 2.0, (clean, crowded)
        assert len(offers) == 1 and offers[0].dropped == 3
        for p in strangers:
            assert p.poll() is None  # still holding on, and got nowhere:
        tls = strangers[2]
        tls.stdin.close()  # type: ignore[union-attr]
        assert tls.stdout is not None and tls.stdout.read().startswith(b"refused")
    finally:
        for p in strangers:
            p.kill()
            p.wait()


def test_agent_error_mid_stream_is_reported_through_the_link(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    with transport(a, b) as t:
        stream = SendStream(["head", "-c", str(64 << 20), "/dev/urandom"], "tar", "s0")
        with pytest.raises(errors.MigratorError, match="tar|archive"):  # random, not a tar
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


# The post-copy page stream's forward (``tunnel.py``) on host b's loopback: another local
# user (nobody) who connects there, silent or not, is closed unheard and reaches nothing;
# root with the tunnel's token (what the agent does) is relayed, even with the silent one
# still holding its connection.
KNOCK = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
if sys.argv[2] == "silent":
    print("connected", flush=True)
    sys.stdin.read()
    sys.exit()
s.sendall(bytes.fromhex(sys.argv[2]) if sys.argv[2] != "junk" else b"GET / HTTP/1.0\r\n" * 4)
if sys.argv[2] == "junk":
    print("closed" if s.recv(100) == b"" else "ANSWERED", flush=True)
    sys.exit()
s.sendall(b"ping")
print(s.recv(4).decode(), flush=True)
"""


def test_the_page_forward_relays_only_the_token_holder(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    page_server, relay_end = tunnel.socket_pair()  # stands for criu's page server here
    silent = None
    with transport(a, b) as t:
        t.connect()
        assert t.client is not None
        pt = tunnel.PageTunnel(t.client.get_transport(), lambda: relay_end)
        port = pt.open()
        try:
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      sys.executable, "-S", "-c", KNOCK, str(port)]
            silent = proc.spawn_piped([*nobody, "silent"], netns=b.netns)
            assert silent.stdout is not None and silent.stdout.readline() == b"connected\n"
            junk = proc.run([*nobody, "junk"], netns=b.netns, timeout=30)
            assert junk.stdout.strip() == "closed", junk.stdout
            page_server.setblocking(False)
            with pytest.raises(BlockingIOError):  # not one byte reached the page server
                page_server.recv(100)
            page_server.setblocking(True)

            def pong() -> None:
                assert page_server.recv(4) == b"ping"
                page_server.sendall(b"pong")

            th = threading.Thread(target=pong)
            th.start()
            agent = proc.run([sys.executable, "-S", "-c", KNOCK, str(port), pt.token.hex()],
                             netns=b.netns, timeout=30)
            th.join(10)
            assert agent.stdout.strip() == "pong"
            assert pt.connections == 1 and pt.refused == 1 and pt.error is None
        finally:
            pt.close()
            if silent is not None:
                silent.kill()
                silent.wait()
            page_server.close()
            relay_end.close()
    assert pt.refused == 2  # the silent one too, once the tunnel closed
