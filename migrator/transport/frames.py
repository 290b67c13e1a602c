"""The agent protocol's framing: typed, length-prefixed frames on one byte channel.

A frame is one type byte, a 4-byte big-endian length, then the payload:

- ``J`` a JSON control message (requests, results, errors); at most 1 MiB;
- ``D`` binary data (a slice of a volume stream, possibly zstd-compressed); at most 4 MiB;
- ``E`` end of data, payload = JSON trailer with the byte count the sender produced, so a
  stream cut short (a dropped link, a killed sender) is detected, never taken for the end;
- ``L`` a fast data link offer (JSON, see ``link.py``): only as the first frame of a data
  stream; the frames that follow come over that link if the receiver can make it.

Each request runs on its own SSH channel, so several logical streams (control, fs, state)
share one connection without interleaving. Lengths are checked before anything is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from migrator.core.errors import NetworkError

# the version of the agent protocol: the first frame of every request names it, and an agent
# refuses one it does not speak (both hosts must run the same migrator version)
PROTOCOL = 1

JSON, DATA, END, LINK = b"J", b"D", b"E", b"L"
MAX_JSON = 1 << 20
MAX_DATA = 4 << 20
_HEADER = struct.Struct(">cI")
HEADER_SIZE = _HEADER.size


class ProtocolError(NetworkError):
    """The peer sent something that is not a valid frame (or the link was cut mid-frame)."""


Writer = Callable[[bytes], Any]  # control messages
DataWriter = Callable[[bytes | memoryview], Any]  # data frames (sent without a copy)
Reader = Callable[[int], bytes | memoryview]


def pack(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def write_json(write: Writer, obj: Any) -> None:
    write(pack(JSON, json.dumps(obj, separators=(",", ":")).encode()))


def write_end(write: Writer, trailer: dict[str, Any]) -> None:
    write(pack(END, json.dumps(trailer).encode()))


def write_link(write: Writer, offer: dict[str, Any]) -> None:
    write(pack(LINK, json.dumps(offer, separators=(",", ":")).encode()))


def read_exactly(read: Reader, n: int) -> bytes:
    parts = []
    while n:
        chunk = read(n)
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a message",
                                "the peer or the link went away; nothing was committed")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_header(read: Reader) -> tuple[bytes, int]:
    """A frame's type and payload length, both checked; the payload is left to read."""
    kind, length = _HEADER.unpack(read_exactly(read, _HEADER.size))
    if kind not in (JSON, DATA, END, LINK):
        raise ProtocolError(f"unknown frame type {kind!r}")
    limit = MAX_DATA if kind == DATA else MAX_JSON
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
    return kind, length


def pack_header_into(buf: bytearray | memoryview, kind: bytes, length: int) -> None:
    """Write a frame header into the first ``HEADER_SIZE`` bytes of ``buf``."""
    _HEADER.pack_into(buf, 0, kind, length)


def read_frame(read: Reader) -> tuple[bytes, bytes]:
    kind, length = read_header(read)
    return kind, read_exactly(read, length)


def read_json(read: Reader) -> dict[str, Any]:
    kind, payload = read_frame(read)
    if kind != JSON:
        raise ProtocolError(f"expected a control message, got frame type {kind!r}")
    try:
        obj = json.loads(payload)
    except ValueError as e:
        raise ProtocolError(f"invalid JSON control message: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("a control message must be a JSON object")
    return obj
