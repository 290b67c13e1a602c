"""The fast data link (``migrator/transport/link.py``) on the loopback interface: TLS 1.3
with certificates pinned through the channel, strangers on the port, a changed or cut
stream, and the fall back to the channel when no link can be made."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from migrator.streams import SendStream
from migrator.transport import link as L
from migrator.transport.datapath import FrameStream, send_frames
from migrator.transport.frames import ProtocolError, write_link


def _drain(fs: FrameStream) -> tuple[threading.Thread, list[int]]:
    got = [0]

    def run() -> None:
        while chunk := os.read(fs.fileno(), 1 << 20):
            got[0] += len(chunk)

    t = threading.Thread(target=run)
    t.start()
    return t, got


def _receiver(offer: dict[str, Any], compress: str = "none"
              ) -> tuple[FrameStream, queue.Queue[dict[str, Any]]]:
    """A FrameStream reading a channel that holds ``offer``; its answers land in a queue
    (the channel back to the sender)."""
    channel = io.BytesIO()
    write_link(channel.write, offer)
    channel.seek(0)
    answers: queue.Queue[dict[str, Any]] = queue.Queue()
    fs = FrameStream(channel.read, "tar", "x", None, compress, answer=answers.put)
    return fs, answers


def _cert(answers: queue.Queue[dict[str, Any]]) -> bytes:
    ans = answers.get(timeout=5)
    assert ans["event"] == "link" and "cert" in ans, ans
    return L.decode_cert(ans["cert"])


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_frames_cross_the_link_in_tls13(compress: str) -> None:
    size = 9 << 20
    offer = L.LinkOffer("127.0.0.1")
    fs, answers = _receiver(offer.describe(), compress)  # connects from its thread
    drain, got = _drain(fs)
    writer = offer.accept(_cert(answers), 5.0)
    assert writer is not None and offer.listener is None  # one connection, port closed
    cipher = writer.cipher()
    assert writer.version() == "TLSv1.3" and cipher is not None
    assert "AES" in cipher[0] and "GCM" in cipher[0]
    src = SendStream(["head", "-c", str(size), "/dev/urandom"], "tar", "x")
    raw, _wire = send_frames(src, writer, compress)
    writer.close()
    drain.join()
    fs.close()
    assert raw == size and got[0] == size and fs.raw == size and fs.link == "tcp"
    assert answers.empty()  # no error came after the certificate


def test_no_link_means_the_channel_carries_the_frames() -> None:
    # an offer nobody listens on: the receiver says why and keeps reading the channel
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    me = L.Identity()
    channel = io.BytesIO()
    write_link(channel.write, {"address": "127.0.0.1", "port": port, "tls": "1.3",
                               "cert": me.encoded()})
    send_frames(SendStream(["head", "-c", "3000000", "/dev/zero"], "tar", "x"),
                channel.write, "zstd")
    channel.seek(0)
    answers: queue.Queue[dict[str, Any]] = queue.Queue()
    fs = FrameStream(channel.read, "tar", "x", None, "zstd", answer=answers.put)
    drain, got = _drain(fs)
    drain.join()
    fs.close()
    assert got[0] == 3000000 and fs.link == "channel" and fs.link_error
    assert "cert" in answers.get_nowait()
    assert answers.get_nowait()["error"] == fs.link_error


@pytest.mark.parametrize("offer", [
    {"address": "127.0.0.1", "port": 1, "cipher": "aes-256-gcm", "secret": "A" * 44},
    {"address": "127.0.0.1", "port": 1, "tls": "1.3", "cert": "not base64!"},
    {"address": "127.0.0.1", "port": 1, "tls": "1.3", "cert": "QUJD"},  # not a certificate
])
def test_a_malformed_offer_is_answered_with_an_error(offer: dict[str, Any]) -> None:
    fs, answers = _receiver(offer)
    drain, _got = _drain(fs)
    drain.join()
    with pytest.raises(ProtocolError):  # the channel then holds no frames at all
        fs.close()
    assert "cert" not in answers.get_nowait()


def _connect_in_thread(offer: L.LinkOffer, me: L.Identity
                       ) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(L.connect(offer.describe(), me, offer.identity.der))
        except (OSError, ProtocolError) as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _stranger_with_a_wrong_cert(port: int, server: bytes, result: list[Any]) -> None:
    # it even trusts the sender's real certificate (certificates are not secret); what it
    # lacks is the certificate the sender was told to expect
    ctx = L.Identity().context(False, server)
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                ctx.wrap_socket(raw) as s:
            result.append(s.recv(10))
    except (OSError, ssl.SSLError) as e:
        result.append(e)


def test_strangers_first_do_not_hold_up_the_real_peer() -> None:
    offer = L.LinkOffer("127.0.0.1")
    garbage = socket.create_connection(("127.0.0.1", offer.port))
    garbage.sendall(os.urandom(600))
    silent = socket.create_connection(("127.0.0.1", offer.port))
    wrong: list[Any] = []
    stranger = threading.Thread(target=_stranger_with_a_wrong_cert,
                                args=(offer.port, offer.identity.der, wrong))
    stranger.start()
    time.sleep(0.2)  # all three are in the backlog before the real peer
    me = L.Identity()
    t0 = time.monotonic()
    t, out = _connect_in_thread(offer, me)
    writer = offer.accept(me.der, 8.0)
    elapsed = time.monotonic() - t0
    t.join()
    assert writer is not None and isinstance(out[0], L.LinkReader)
    assert elapsed < 2.0, elapsed  # well under one stranger's handshake timeout (5 s)
    writer(b"hello" * 1000)
    assert bytes(out[0](5000)) == b"hello" * 1000
    writer.close()
    assert bytes(out[0](10)) == b""  # close_notify: a clean end
    out[0].close()
    stranger.join()
    assert wrong and isinstance(wrong[0], ssl.SSLError | OSError) or wrong == [b""], wrong
    garbage.settimeout(5)
    silent.settimeout(5)
    with contextlib.suppress(ConnectionResetError):  # an alert at most, then closed
        while garbage.recv(4096):
            pass
    assert silent.recv(10) == b""  # closed on it when the real peer won
    assert offer.dropped == 3
    garbage.close()
    silent.close()


def test_the_sender_refuses_a_receiver_with_another_certificate() -> None:
    offer = L.LinkOffer("127.0.0.1")
    real, impostor = L.Identity(), L.Identity()
    t, out = _connect_in_thread(offer, impostor)
    assert offer.accept(real.der, 1.5) is None  # pinned to `real`: nobody got in
    t.join()
    reader = out[0]
    if isinstance(reader, L.LinkReader):  # TLS 1.3: the refusal shows on the first read
        with pytest.raises(ProtocolError):
            reader(10)
        reader.close()
    assert offer.dropped == 1


def test_the_receiver_refuses_a_sender_with_another_certificate() -> None:
    offer = L.LinkOffer("127.0.0.1")
    me = L.Identity()
    accepted: list[Any] = []
    t = threading.Thread(target=lambda: accepted.append(offer.accept(me.der, 2.0)))
    t.start()
    pinned_elsewhere = L.Identity().der  # what a forged offer on the channel would not know
    with pytest.raises(ProtocolError, match="TLS handshake failed"):
        L.connect(offer.describe(), me, pinned_elsewhere)
    t.join()
    assert accepted == [None]


class _Relay:
    """A man in the middle on loopback: client <-> relay <-> offer, with ``mangle``
    applied to what flows from the sender to the receiver."""

    def __init__(self, target: int, mangle: Callable[[int, bytes], bytes | None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.mangle = target, mangle
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        down, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.target))

        def pipe(src: socket.socket, dst: socket.socket, mangle: bool) -> None:
            seen = 0
            try:
                while data := src.recv(65536):
                    out = self.mangle(seen, data) if mangle else data
                    seen += len(data)
                    if out is None:  # cut here
                        break
                    dst.sendall(out)
            except OSError:
                pass
            for s in (src, dst):  # shutdown wakes the other direction's blocked recv
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

        threading.Thread(target=pipe, args=(down, up, False), daemon=True).start()
        pipe(up, down, True)


def _through(mangle: Callable[[int, bytes], bytes | None]) -> L.LinkReader:
    """A link whose bytes pass ``mangle``; 4 MiB are written into it."""
    offer = L.LinkOffer("127.0.0.1")
    relay = _Relay(offer.port, mangle)
    me = L.Identity()
    out: list[Any] = []

    def receive() -> None:
        out.append(L.connect(dict(offer.describe(), port=relay.port), me,
                             offer.identity.der))

    t = threading.Thread(target=receive)
    t.start()
    writer = offer.accept(me.der, 5.0)
    t.join()
    assert writer is not None

    def send() -> None:
        try:
            for _ in range(4):
                writer(bytes(1 << 20))
            writer.close()
        except OSError:
            pass  # the relay cut it

    threading.Thread(target=send, daemon=True).start()
    return out[0]


def _read_all(reader: L.LinkReader) -> int:
    n = 0
    while piece := reader(256 << 10):
        n += len(piece)
    return n


def test_a_changed_byte_fails_tls() -> None:
    def flip(seen: int, data: bytes) -> bytes:
        if seen <= 2 << 20 < seen + len(data):
            b = bytearray(data)
            b[(2 << 20) - seen] ^= 0x01
            return bytes(b)
        return data

    reader = _through(flip)
    with pytest.raises(ProtocolError, match="TLS checks"):
        _read_all(reader)
    reader.close()


def test_a_cut_stream_is_an_error_not_an_end() -> None:
    def cut(seen: int, data: bytes) -> bytes | None:
        return None if seen > 1 << 20 else data

    reader = _through(cut)
    with pytest.raises(ProtocolError, match="cut"):
        _read_all(reader)
    reader.close()


def test_an_untouched_relay_changes_nothing() -> None:
    reader = _through(lambda seen, data: data)  # the same path, nothing changed: all 4 MiB
    assert _read_all(reader) == 4 << 20
    reader.close()


def test_a_cut_link_fails_the_frame_stream() -> None:
    offer = L.LinkOffer("127.0.0.1")
    fs, answers = _receiver(offer.describe())
    drain, _got = _drain(fs)
    writer = offer.accept(_cert(answers), 5.0)
    assert writer is not None
    buf = io.BytesIO()
    send_frames(SendStream(["head", "-c", "3000000", "/dev/zero"], "tar", "x"), buf.write,
                "none")
    writer(buf.getvalue()[:-30])  # everything but the END trailer
    writer.close()  # even a clean TLS end is early: no END frame
    drain.join()
    with pytest.raises(ProtocolError):
        fs.close()


def test_the_certificate_is_ephemeral_p256_and_short_lived() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    a, b = L.Identity(), L.Identity()
    assert a.der != b.der and a.fingerprint != b.fingerprint
    cert = x509.load_der_x509_certificate(a.der)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    life = cert.not_valid_after - cert.not_valid_before
    assert life <= 2 * L.VALIDITY
    assert a.fingerprint.startswith("SHA256:") and len(a.fingerprint) == 50


def test_the_page_stream_pair_is_connected_and_leaves_no_listener() -> None:
    from migrator.checkpoint.base import dump_options
    from migrator.transport.tunnel import socket_pair

    a, b = socket_pair()
    a.sendall(b"pages")
    assert b.recv(5) == b"pages"
    port = a.getpeername()[1]
    with pytest.raises(ConnectionRefusedError):  # nobody listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    a.close()
    b.close()
    opts = dump_options(True, ps_socket=7)
    assert "ps-socket 7" in opts and not any(o.startswith(("address", "port")) for o in opts)
