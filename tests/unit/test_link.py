"""The fast data link (``migrator/transport/link.py``) on the loopback interface: the
handshake, sealed records, and the fall back to the channel when no link can be made."""

from __future__ import annotations

import io
import os
import socket
import threading

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


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_frames_cross_the_link_sealed(compress: str) -> None:
    size = 9 << 20
    offer = L.LinkOffer("127.0.0.1")
    channel = io.BytesIO()
    write_link(channel.write, offer.describe())
    channel.seek(0)
    fs = FrameStream(channel.read, "tar", "x", None, compress)  # connects from its thread
    drain, got = _drain(fs)
    writer = offer.accept(5.0)
    assert writer is not None and offer.listener is None  # one connection, port closed
    src = SendStream(["head", "-c", str(size), "/dev/urandom"], "tar", "x")
    raw, _wire = send_frames(src, writer, compress)
    writer.close()
    drain.join()
    fs.close()
    assert raw == size and got[0] == size and fs.raw == size and fs.link == "tcp"


def test_no_link_means_the_channel_carries_the_frames() -> None:
    # an offer nobody listens on: the receiver keeps reading the channel
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    channel = io.BytesIO()
    write_link(channel.write, {"address": "127.0.0.1", "port": port, "cipher": L.CIPHER,
                               "secret": "A" * 43 + "="})
    send_frames(SendStream(["head", "-c", "3000000", "/dev/zero"], "tar", "x"),
                channel.write, "zstd")
    channel.seek(0)
    fs = FrameStream(channel.read, "tar", "x", None, "zstd")
    drain, got = _drain(fs)
    drain.join()
    fs.close()
    assert got[0] == 3000000 and fs.link == "channel" and fs.link_error


def test_a_stranger_is_dropped_and_the_agent_still_gets_in() -> None:
    offer = L.LinkOffer("127.0.0.1")
    stranger = socket.create_connection(("127.0.0.1", offer.port))
    stranger.sendall(os.urandom(32))
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(offer.accept(5.0)))
    t.start()
    reader = L.connect(offer.describe())
    t.join()
    writer = result[0]
    assert isinstance(writer, L.LinkWriter)
    assert stranger.recv(64) == b""  # closed on it, no answer
    writer(b"hello")
    assert bytes(reader(100)) == b"hello"
    writer.close()
    assert bytes(reader(100)) == b""  # a clean end between records
    reader.close()
    stranger.close()


def test_a_wrong_secret_gets_no_link() -> None:
    offer = L.LinkOffer("127.0.0.1")
    t = threading.Thread(target=offer.accept, args=(1.0,))
    t.start()
    bad = dict(offer.describe(), secret="B" * 43 + "=")
    with pytest.raises((ProtocolError, OSError)):
        L.connect(bad)
    t.join()


def _pair(key: bytes = b"k" * 32) -> tuple[L.LinkWriter, L.LinkReader, socket.socket]:
    a, b = socket.socketpair()
    return L.LinkWriter(a, key), L.LinkReader(b, key), b


def test_changed_or_replayed_records_fail_their_tag() -> None:
    writer, _reader, b = _pair()
    writer(b"x" * 1000)
    writer(b"y" * 1000)
    writer.close()
    wire = b""
    while chunk := b.recv(1 << 16):
        wire += chunk
    one = len(wire) // 2
    flipped = bytearray(wire)
    flipped[100] ^= 1
    replayed = wire[:one] + wire[:one]  # the first record again where the second belongs
    for bad, ok_records in ((bytes(flipped), 0), (replayed, 1)):
        c, d = socket.socketpair()
        c.sendall(bad)
        c.close()
        reader = L.LinkReader(d, b"k" * 32)
        for _ in range(ok_records):
            assert len(reader(5000)) == 1000
        with pytest.raises(ProtocolError, match="authentication"):
            reader(5000)
        reader.close()


def test_a_cut_link_is_an_error_not_an_end() -> None:
    offer = L.LinkOffer("127.0.0.1")
    channel = io.BytesIO()
    write_link(channel.write, offer.describe())
    channel.seek(0)
    fs = FrameStream(channel.read, "tar", "x", None, "none")
    drain, _got = _drain(fs)
    writer = offer.accept(5.0)
    assert writer is not None
    buf = io.BytesIO()
    send_frames(SendStream(["head", "-c", "3000000", "/dev/zero"], "tar", "x"), buf.write,
                "none")
    writer(buf.getvalue()[:-30])  # everything but the END trailer
    writer.close()
    drain.join()
    with pytest.raises(ProtocolError):
        fs.close()
