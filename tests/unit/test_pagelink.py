"""The direct page link's relay and admission (``transport/pagelink.py``) on loopback, and
the checks the target makes of the link it is told to connect to (``live_target``)."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time

import pytest

from migrator.checkpoint.base import CriuTls
from migrator.core import errors
from migrator.pipelines.live_target import _page_link
from migrator.transport.link import Identity
from migrator.transport.pagelink import PageLink, splice_relay


def _wait(cond, seconds: float = 5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_splice_relay_moves_every_byte_and_half_closes() -> None:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    data = bytes(range(256)) * 40000  # ~10 MB, more than one pipe's worth
    counted: list[int] = []
    t = threading.Thread(target=splice_relay, args=(a2, b1, counted.append))
    t.start()
    sender = threading.Thread(target=lambda: (a1.sendall(data), a1.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while chunk := b2.recv(1 << 20):
        got += chunk
    t.join(5)
    sender.join(5)
    assert bytes(got) == data and sum(counted) == len(data)
    for s in (a1, a2, b1, b2):
        s.close()


def _page_server() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_only_the_target_address_is_admitted_and_only_once() -> None:
    ours, criu_end = _page_server()
    link = PageLink("127.0.0.1", None, "127.0.0.2", lambda: ours)
    try:
        stranger = socket.create_connection(("127.0.0.1", link.port))  # from 127.0.0.1
        assert _wait(lambda: link.refused == 1)
        assert stranger.recv(1) == b""  # closed unheard
        target = socket.socket()
        target.bind(("127.0.0.2", 0))
        target.connect(("127.0.0.1", link.port))
        assert _wait(lambda: link.connections == 1)
        target.sendall(b"request")
        assert criu_end.recv(7) == b"request"
        criu_end.sendall(b"pages")
        assert target.recv(5) == b"pages"
        assert _wait(lambda: link.to_target == 5 and link.to_source == 7)
        with pytest.raises(OSError):  # the listener is gone after the first
            socket.create_connection(("127.0.0.1", link.port), timeout=1)
        target.close()
    finally:
        link.close()
        criu_end.close()


def test_a_cut_stream_is_an_error_not_an_end() -> None:
    ours, criu_end = _page_server()
    link = PageLink("127.0.0.1", None, "127.0.0.1", lambda: ours)
    try:
        target = socket.create_connection(("127.0.0.1", link.port))
        assert _wait(lambda: link.connections == 1)
        target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        target.close()  # RST
        with contextlib.suppress(OSError):  # the relay may have shut it already
            criu_end.sendall(b"x" * (1 << 20))
        assert _wait(lambda: link.error is not None), link.error
        assert criu_end.recv(1) == b""  # the page server's side ends too
    finally:
        link.close()
        criu_end.close()


def _cert() -> str:
    return Identity().encoded()


@pytest.mark.parametrize("link", [
    None, "1.2.3.4:5", {"address": "example.org", "port": 1, "cert": "x"},
    {"address": "198.51.100.1; rm -rf /", "port": 1, "cert": "x"},
    {"address": "198.51.100.1", "port": True, "cert": "x"},
    {"address": "198.51.100.1", "port": 70000, "cert": "x"},
    {"address": "198.51.100.1", "port": "22", "cert": "x"},
])
def test_the_target_refuses_a_malformed_link(link) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidInput):
        _page_link(link)


def test_the_target_refuses_a_malformed_certificate() -> None:
    bad = base64.b64encode(b"not a certificate").decode()
    with pytest.raises(errors.MigratorError):
        _page_link({"address": "198.51.100.1", "port": 4000, "cert": bad})
    assert _page_link({"address": "198.51.100.1", "port": 4000, "cert": _cert()})[:2] == \
        ("198.51.100.1", 4000)


def test_criu_tls_files_are_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    me, peer = Identity(), Identity()
    tls = CriuTls.write(tmp_path / "pl", me.key_pem(), me.der, peer.der)
    assert (tmp_path / "pl").stat().st_mode & 0o777 == 0o700
    for name in ("key.pem", "cert.pem", "peer.pem"):
        assert (tmp_path / "pl" / name).stat().st_mode & 0o777 == 0o600
    assert tls.argv()[:2] == ["--tls", "--tls-cacert"] and "--tls-no-cn-verify" in tls.argv()
    tls.remove()
    assert not (tmp_path / "pl").exists()
    with pytest.raises(errors.CheckpointError):
        CriuTls.write(tmp_path / "with blank", me.key_pem(), me.der)
