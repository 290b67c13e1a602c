"""criu's own TLS on the page stream, with certificates pinned as the live pipeline pins
them (``checkpoint.base.CriuTls``): the real criu page server completes a handshake only
with the peer whose certificate it was given, and refuses any other before a page moves."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from migrator.checkpoint.base import CriuTls
from migrator.transport.link import Identity
from tests.conftest import unavailable

pytestmark = pytest.mark.integration


def _serve(tmp_path: Path, me: Identity, peer: Identity) -> tuple[subprocess.Popen[bytes],
                                                                  socket.socket, Path]:
    if shutil.which("criu") is None:
        unavailable("criu is not installed")
    tls = CriuTls.write(tmp_path / "tls", me.key_pem(), me.der, peer.der)
    (tmp_path / "img").mkdir()
    theirs, ours = socket.socketpair()
    log = tmp_path / "ps.log"
    p = subprocess.Popen(["criu", "page-server", "--ps-socket", str(theirs.fileno()), "-D",
                          str(tmp_path / "img"), "-o", str(log), "-v4", *tls.argv()],
                         pass_fds=(theirs.fileno(),))
    theirs.close()
    return p, ours, log


def test_the_pinned_peer_is_served(tmp_path: Path) -> None:
    source, target = Identity(), Identity()
    p, sock, log = _serve(tmp_path, source, target)
    try:
        tls = target.context(False, source.der).wrap_socket(sock)
        assert tls.getpeercert(binary_form=True) == source.der  # and criu checked ours
        tls.close()
        p.wait(10)
        assert "TLS handshake completed" in log.read_text()
        assert "NOT trusted" not in log.read_text()
    finally:
        p.kill()
        p.wait()


def test_any_other_peer_is_refused(tmp_path: Path) -> None:
    source, target, stranger = Identity(), Identity(), Identity()
    p, sock, log = _serve(tmp_path, source, target)
    try:
        got = b""
        try:  # TLS 1.3: the client's side may finish before criu checks its certificate
            tls = stranger.context(False, source.der).wrap_socket(sock)
            got = tls.recv(1)  # then the refusal: an alert, or the connection closed
        except (ssl.SSLError, OSError):
            pass
        assert got == b""
        assert p.wait(10) != 0
        assert "certificate is NOT trusted" in log.read_text()
    finally:
        p.kill()
        p.wait()
