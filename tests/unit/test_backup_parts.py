"""migrator.backup.parts: a part never decompresses past the raw size its index declares.

The repository is a stand-in that hands out the part's bytes (pure logic: no backend runs).
"""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import zstandard

from migrator.backup.model import PartInfo
from migrator.backup.parts import PartStream, open_decompressed, read_small
from migrator.core.errors import CorruptBackup

BOMB = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))  # 64 MiB of zeros


class OnePart:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def open_part(self, backup_id: str, rel: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def part(stored: bytes, raw_size: int) -> PartInfo:
    return PartInfo("p0.tar.zst", "tar", "snap0", None, len(stored),
                    hashlib.sha256(stored).hexdigest(), raw_size)


def test_a_part_that_decompresses_beyond_its_declared_size_is_refused_at_that_byte() -> None:
    assert len(BOMB) < 64 << 10
    reader, _ = open_decompressed(OnePart(BOMB), "b1", part(BOMB, 100_000), "zstd:3")  # type: ignore[arg-type]
    got = 0
    with pytest.raises(CorruptBackup, match="part p0.tar.zst decompresses beyond the 100000 "
                                            "bytes its index declares"):
        while chunk := reader.read(1 << 16):
            got += len(chunk)
    assert got <= 100_000


def test_the_stream_a_restore_reads_stops_there_too() -> None:
    stream = PartStream(OnePart(BOMB), "b1", part(BOMB, 100_000), "zstd:3", "tar", "snap0",  # type: ignore[arg-type]
                        None)
    got = 0
    while chunk := os.read(stream.fileno(), 1 << 16):
        got += len(chunk)
    with pytest.raises(CorruptBackup, match="decompresses beyond the 100000 bytes"):
        stream.close()
    assert got <= 100_000


def test_a_part_shorter_than_declared_is_corrupt() -> None:
    stored = zstandard.ZstdCompressor().compress(b"x" * 1000)
    stream = PartStream(OnePart(stored), "b1", part(stored, 2000), "zstd:3", "tar", "s", None)  # type: ignore[arg-type]
    while os.read(stream.fileno(), 1 << 16):
        pass
    with pytest.raises(CorruptBackup, match="holds 1000 bytes, its index says 2000"):
        stream.close()
    with pytest.raises(CorruptBackup, match="decompresses beyond the 10 bytes"):
        read_small(OnePart(stored), "b1", part(stored, 10), "zstd:3")  # type: ignore[arg-type]
