"""Pieces that several callers share: rsync's exact-copy options (the copy and the check
after it must agree), the page tunnel's one relay loop, the import's chunk readers and the
inventory's reading of ``ip -j``."""

from __future__ import annotations

import gzip
import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from migrator.backends.generic import rsync_exact, rsync_tree
from migrator.core.errors import CorruptBackup, StorageError
from migrator.exchange.compression import open_archive
from migrator.p2c.inventory import _ip_json
from migrator.pipelines.target_check import verify_trees
from migrator.streams import ProgressMeter
from migrator.transport.tunnel import PageTunnel


def test_rsync_exact_options() -> None:
    assert rsync_exact() == ["-aHSAX", "--numeric-ids", "--delete", "--modify-window=-1"]
    assert rsync_exact(xattrs=False, exact_times=False, checksum=True) == [
        "-aHS", "--numeric-ids", "--delete", "--checksum"]


def test_the_check_after_a_copy_sees_what_the_copy_wrote(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"one")
    dst.mkdir()
    rsync_tree(src, dst)
    assert verify_trees(src, dst, xattrs=True)
    # same length, mtime a fraction of a second later: only the exact-time rule sees it
    st = os.stat(src / "d" / "f")
    (src / "d" / "f").write_bytes(b"two")
    os.utime(src / "d" / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    with pytest.raises(StorageError, match="verification failed"):
        verify_trees(src, dst, xattrs=True)
    rsync_tree(src, dst)
    assert verify_trees(src, dst, xattrs=True, full=True)
    assert (dst / "d" / "f").read_bytes() == b"two"


class _Chan:
    """The paramiko channel calls the relay makes, over one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while piece := sock.recv(1 << 16):
        out += piece
    return out


def test_relay_counts_both_ways_and_half_closes() -> None:
    tunnel = PageTunnel(None, socket.socket)  # type: ignore[arg-type]
    target, chan_end = socket.socketpair()
    server, sock = socket.socketpair()
    chan = _Chan(chan_end)
    try:
        server.sendall(b"p" * 5000)
        server.shutdown(socket.SHUT_WR)
        tunnel._down(chan, sock)  # type: ignore[arg-type]
        assert _read_all(target) == b"p" * 5000  # the target sees the end of the pages
        target.sendall(b"request")
        target.shutdown(socket.SHUT_WR)
        tunnel._up(chan, sock)  # type: ignore[arg-type]
        assert _read_all(server) == b"request"
        assert (tunnel.to_target, tunnel.to_source, tunnel.error) == (5000, 7, None)
    finally:
        for s in (target, chan_end, server, sock):
            s.close()


def test_relay_keeps_the_first_error() -> None:
    tunnel = PageTunnel(None, socket.socket)  # type: ignore[arg-type]
    target, chan_end = socket.socketpair()
    server, sock = socket.socketpair()
    try:
        server.sendall(b"pages")
        server.shutdown(socket.SHUT_WR)

        class Broken(_Chan):
            def sendall(self, data: bytes) -> None:
                raise OSError("link cut")

        tunnel._down(Broken(chan_end), sock)  # type: ignore[arg-type]
        tunnel._fail("a later error")
        assert tunnel.error == "page stream to the target broke: link cut"
        assert tunnel.to_target == 0
    finally:
        for s in (target, chan_end, server, sock):
            s.close()


def _meter() -> ProgressMeter:
    return ProgressMeter(lambda _event: None, "import")


def test_archive_readers_count_the_input_and_decompress() -> None:
    data = b"tar bytes " * 10000
    packed = gzip.compress(data)
    meter = _meter()
    out, kind = open_archive(io.BytesIO(packed), meter)
    assert (kind, out.read(), meter.done) == ("gzip", data, len(packed))
    plain = _meter()
    out, kind = open_archive(io.BytesIO(data), plain)
    assert (kind, out.read(), plain.done) == ("none", data, len(data))


def test_a_cut_compressed_archive_is_corrupt() -> None:
    packed = gzip.compress(os.urandom(50000))
    out: Any
    out, _kind = open_archive(io.BytesIO(packed[: len(packed) // 2]), _meter())
    with pytest.raises(CorruptBackup, match="gzip stream is damaged or cut short"):
        out.read()


def test_ip_json_is_a_list_or_nothing() -> None:
    assert _ip_json('[{"ifname": "eth0"}]') == [{"ifname": "eth0"}]
    assert _ip_json("") == [] and _ip_json("not json") == [] and _ip_json('{"a": 1}') == []
