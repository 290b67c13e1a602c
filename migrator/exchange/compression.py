"""The compressions an archive may have, both ways: an export writes zstd, gzip (LXD's
default) or none; an import detects zstd, gzip, xz or none by the first bytes.

The one design decision: a damaged or cut compressed stream is ``CorruptBackup`` wherever
the decompressor notices it, and a zstd frame cut short is an error too (zstandard's
``stream_reader`` just ends early there, which would pass for a short tar).
"""

from __future__ import annotations

import gzip
import io
import lzma
from collections.abc import Callable
from typing import IO, Any, BinaryIO

import zstandard

from migrator.core.errors import CorruptBackup, InvalidInput
from migrator.streams import CHUNK, ProgressMeter

COMPRESSIONS = ("zstd", "gzip", "none")
_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz"}


def check_compression(compression: str) -> None:
    """Refuse a compression an export cannot write (before anything is written)."""
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r}", "use zstd, gzip or none")


def compressing(out: BinaryIO, compression: str) -> tuple[Any, list[Callable[[], object]]]:
    """A writer that compresses into ``out``, and what to call (in order) to finish it;
    ``out`` itself stays open."""
    check_compression(compression)
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3, threads=-1)
        writer = cctx.stream_writer(out, closefd=False)  # type: ignore[arg-type]
        return writer, [writer.close]
    if compression == "gzip":
        gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
        return gz, [gz.close]
    return out, []


class _ChunkReader(io.RawIOBase):
    """A raw reader over ``_read``: ``BufferedReader`` fills its buffer through
    ``readinto``, so each wrapper below only says how it takes one chunk."""

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n


class _Counting(_ChunkReader):
    """Counts the (compressed) bytes read from the input, for progress."""

    def __init__(self, src: IO[bytes], meter: ProgressMeter) -> None:
        super().__init__()
        self._src = src
        self._meter = meter

    def _read(self, n: int) -> bytes:
        data = self._src.read(n)
        self._meter.advance(len(data))
        return data


class _Decompressed(_ChunkReader):
    """A decompressor's output, with its errors (cut or damaged input) as CorruptBackup."""

    def __init__(self, src: Any, kind: str) -> None:
        super().__init__()
        self._src = src
        self._kind = kind

    def _read(self, n: int) -> bytes:
        try:
            return self._src.read(n)
        except (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError) as e:
            raise CorruptBackup(f"the {self._kind} stream is damaged or cut short ({e})",
                                "nothing was imported; fetch the archive again") from None


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after the other, like ``zstd -dc``; a frame cut short is an error
    (zstandard's stream_reader just ends early there, which would pass for a short tar)."""

    def __init__(self, src: IO[bytes]) -> None:
        super().__init__()
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: Any = None  # the frame being decoded
        self._out = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            # small reads bound the output a highly compressed piece can expand to
            data = self._src.read(256 << 10)
            if not data:
                if self._obj is not None and not self._obj.eof:
                    raise zstandard.ZstdError("the last frame is incomplete")
                return 0
            out = bytearray()
            while data:
                if self._obj is None or self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                out += self._obj.decompress(data)
                data = self._obj.unused_data if self._obj.eof else b""
            self._out, self._pos = memoryview(out), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


def open_archive(src: BinaryIO, meter: ProgressMeter) -> tuple[BinaryIO, str]:
    """The decompressed archive and its compression, detected by magic bytes."""
    raw = io.BufferedReader(_Counting(src, meter), CHUNK)
    head = raw.peek(6)[:6]
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), "none")
    if kind == "zstd":
        inner: Any = _ZstdFrames(raw)
    elif kind == "gzip":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")
    elif kind == "xz":
        inner = lzma.LZMAFile(raw)  # noqa: SIM115 - lives as long as the import
    else:
        return raw, kind
    return io.BufferedReader(_Decompressed(inner, kind), CHUNK), kind  # type: ignore[return-value]
