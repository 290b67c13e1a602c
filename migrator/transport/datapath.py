"""Volume streams over the framed protocol: compress and frame on one side, check and
unframe on the other into a pipe a storage backend's ``receive`` reads like any stream.

Compression is zstd (the ``zstandard`` library, multi-threaded) or none, as negotiated.
The END trailer carries the raw byte count; the receiving side compares it with what it
decoded, so a truncated stream fails the receive instead of being committed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import zstandard

from migrator.streams import CHUNK, ProgressMeter, Stream
from migrator.transport.frames import (
    DATA,
    END,
    MAX_DATA,
    ProtocolError,
    Reader,
    Writer,
    pack,
    read_frame,
    write_end,
)

COMPRESSORS = ("zstd", "none")
ZSTD_LEVEL = 3


def send_frames(
    stream: Stream, write: Writer, compress: str, meter: ProgressMeter | None = None,
    level: int = ZSTD_LEVEL,
) -> tuple[int, int]:
    """Read ``stream`` to its end and write it as DATA frames + END; returns (raw, wire)."""
    fd = stream.fileno()
    raw = wire = 0
    comp: Any = None
    if compress == "zstd":
        comp = zstandard.ZstdCompressor(level=level, threads=2).compressobj()
    elif compress != "none":
        raise ProtocolError(f"unknown compressor {compress!r}")
    def emit(out: bytes) -> None:
        nonlocal wire
        for i in range(0, len(out), MAX_DATA):
            piece = out[i:i + MAX_DATA]
            write(pack(DATA, piece))
            wire += len(piece)

    while True:
        data = os.read(fd, CHUNK)
        if not data:
            break
        raw += len(data)
        if meter is not None:
            meter.advance(len(data))
        if comp is None:
            emit(data)
        else:
            # flush each block: zstd (multi-threaded above all) would otherwise hold the
            # whole stream in memory until the end
            emit(comp.compress(data) + comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    if comp is not None:
        emit(comp.flush())
    stream.close()  # raises if the producer failed: then no END goes out, the cut is seen
    write_end(write, {"bytes": raw})
    if meter is not None:
        meter.finish()
    return raw, wire


class FrameStream(Stream):
    """An incoming volume stream: frames read (by a thread) from ``read``, decompressed,
    written into a pipe whose read end is ``fileno()``.

    ``close()`` raises if the frames did not end with a valid trailer whose byte count
    matches: a cut link or a killed sender is an error even when the consuming command
    happened to exit 0 on the truncated input.
    """

    def __init__(self, read: Reader, how: str, name: str, parent: str | None,
                 compress: str) -> None:
        if compress not in COMPRESSORS:
            raise ProtocolError(f"unknown compressor {compress!r}")
        self.how, self.name, self.parent = how, name, parent
        self.size_hint = None
        self.cleanups: list[Any] = []
        self.raw = 0
        self.wire = 0
        self.error: BaseException | None = None
        self._read = read
        self._compress = compress
        self._r, self._w = os.pipe()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dec: Any = None
        if self._compress == "zstd":
            dec = zstandard.ZstdDecompressor().decompressobj()
        try:
            while True:
                kind, payload = read_frame(self._read)
                if kind == END:
                    import json

                    trailer = json.loads(payload)
                    if trailer.get("bytes") != self.raw:
                        raise ProtocolError(
                            f"stream ended after {self.raw} bytes but the sender sent "
                            f"{trailer.get('bytes')}")
                    return
                if kind != DATA:
                    raise ProtocolError(f"unexpected frame {kind!r} inside a data stream")
                self.wire += len(payload)
                data = dec.decompress(payload) if dec is not None else payload
                view = memoryview(data)
                while view:
                    n = os.write(self._w, view)
                    view = view[n:]
                self.raw += len(data)
        except BaseException as e:  # noqa: BLE001 - handed to close() in the caller's thread
            self.error = e
        finally:
            with contextlib.suppress(OSError):
                os.close(self._w)

    def fileno(self) -> int:
        return self._r

    def close(self, check: bool = True) -> None:
        self._thread.join()
        self._release()
        if check and self.error is not None:
            if isinstance(self.error, ProtocolError):
                raise self.error
            raise ProtocolError(f"the incoming stream failed: {self.error}") from self.error

    def kill(self) -> None:
        # closing the read end makes the writer thread fail with EPIPE and stop
        self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(OSError):
                os.close(self._r)
