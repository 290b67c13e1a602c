"""The agent protocol's framing and data path, over in-memory pipes."""

from __future__ import annotations

import io
import os
import threading

import pytest

from migrator.streams import SendStream
from migrator.transport.datapath import FrameStream, send_frames
from migrator.transport.frames import (
    DATA,
    MAX_DATA,
    ProtocolError,
    pack,
    read_frame,
    read_json,
    write_json,
)


def test_json_roundtrip_and_limits() -> None:
    buf = io.BytesIO()
    write_json(buf.write, {"op": "hello", "n": 1})
    buf.seek(0)
    assert read_json(buf.read) == {"op": "hello", "n": 1}
    with pytest.raises(ProtocolError, match="exceeds"):
        read_frame(io.BytesIO(DATA + (MAX_DATA + 1).to_bytes(4, "big")).read)
    with pytest.raises(ProtocolError, match="unknown frame"):
        read_frame(io.BytesIO(b"X\x00\x00\x00\x00").read)
    with pytest.raises(ProtocolError, match="closed"):
        read_frame(io.BytesIO(pack(DATA, b"abcdef")[:-2]).read)
    with pytest.raises(ProtocolError, match="JSON object"):
        read_json(io.BytesIO(pack(b"J", b"[1]")).read)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_stream_roundtrip_through_frames(compress: str) -> None:
    size = 9 << 20
    src = SendStream(["head", "-c", str(size), "/dev/urandom"], "tar", "x")
    buf = io.BytesIO()
    raw, wire = send_frames(src, buf.write, compress)
    assert raw == size and wire >= size * 0.99
    buf.seek(0)
    fs = FrameStream(buf.read, "tar", "x", None, compress)
    got = 0
    while chunk := os.read(fs.fileno(), 1 << 20):
        got += len(chunk)
    fs.close()
    assert got == size and fs.raw == size


def test_truncated_stream_is_an_error_even_if_the_consumer_is_happy() -> None:
    src = SendStream(["head", "-c", "3000000", "/dev/zero"], "tar", "x")
    buf = io.BytesIO()
    send_frames(src, buf.write, "zstd")
    data = buf.getvalue()
    cut = data[: len(data) - 20]  # lose the END trailer and part of the last frame
    fs = FrameStream(io.BytesIO(cut).read, "tar", "x", None, "zstd")

    def drain() -> None:
        while os.read(fs.fileno(), 65536):
            pass

    t = threading.Thread(target=drain)
    t.start()
    t.join()
    with pytest.raises(ProtocolError):
        fs.close()


def test_failed_producer_sends_no_end() -> None:
    src = SendStream(["sh", "-c", "head -c 1000 /dev/zero; exit 3"], "tar", "x")
    buf = io.BytesIO()
    with pytest.raises(Exception, match="exit code 3"):
        send_frames(src, buf.write, "none")
    assert not any(buf.getvalue()[i:i + 1] == b"E" for i in _frame_starts(buf.getvalue()))
    buf.seek(0)
    fs = FrameStream(buf.read, "tar", "x", None, "none")
    while os.read(fs.fileno(), 65536):
        pass
    with pytest.raises(ProtocolError):
        fs.close()


def _frame_starts(data: bytes) -> list[int]:
    starts, i = [], 0
    while i + 5 <= len(data):
        starts.append(i)
        i += 5 + int.from_bytes(data[i + 1:i + 5], "big")
    return starts
