"""Volume streams over the framed protocol: compress and frame on one side, check and
unframe on the other into a pipe a storage backend's ``receive`` reads like any stream.

Compression is zstd (the ``zstandard`` library) or none, as negotiated. The END trailer
carries the raw byte count; the receiving side compares it with what it decoded, so a
truncated stream fails the receive instead of being committed.

Throughput choices (measured with ``bench/bench_transport.py`` on a 2-vCPU VM):

- the stream is read in 1 MiB blocks into one buffer behind room for the header, and an
  uncompressed frame is handed to the writer as a memoryview: no copy in Python, and one
  write per megabyte instead of one per 64 KiB pipe read (paramiko cut each of those into
  two full SSH packets and a 133-byte one);
- zstd level 1, not 3: on volume data (binaries and text) level 3 compresses about 190 MB/s
  on one core and level 1 about 330 MB/s for 12% more bytes, so level 3 is the slower of
  the two on any link faster than about 65 MB/s; zstd's own worker threads gain nothing
  when every block is flushed, so one thread reads and compresses while the caller's
  thread sends (zstd releases the GIL);
- receiving, a DATA payload is passed on to the pipe piece by piece as it arrives, never
  gathered into one bytes object first; the pipes are grown to 1 MiB.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import zstandard

from migrator.core.errors import CallRefused, MigratorError
from migrator.streams import ProgressMeter, Stream
from migrator.transport.frames import (
    DATA,
    END,
    HEADER_SIZE,
    LINK,
    MAX_DATA,
    DataWriter,
    ProtocolError,
    Reader,
    pack,
    pack_header_into,
    read_exactly,
    read_header,
    write_end,
)

COMPRESSORS = ("zstd", "none")
ZSTD_LEVEL = 1  # see the module docstring
ZSTD_THREADS = 0  # zstd's own workers: none, the block is compressed in _Compressor's thread
BLOCK = 1 << 20  # stream bytes per DATA frame (before compression)
PIECE = 256 << 10  # most bytes asked of the reader at once when receiving
PIPE_SIZE = 1 << 20
QUEUE_BLOCKS = 4  # compressed blocks waiting to be sent


def _pipe_size(fd: int, size: int = PIPE_SIZE) -> None:
    """Grow a pipe (best effort: above fs.pipe-max-size it takes CAP_SYS_RESOURCE)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def _fill(fd: int, view: memoryview, stopped: threading.Event | None = None) -> int:
    """Read ``fd`` into ``view`` until it is full or the stream ends; the bytes read."""
    got = 0
    while got < len(view) and not (stopped is not None and stopped.is_set()):
        n = os.readv(fd, [view[got:]])
        if not n:
            break
        got += n
    return got


def send_frames(
    stream: Stream, write: DataWriter, compress: str, meter: ProgressMeter | None = None,
    level: int = ZSTD_LEVEL,
) -> tuple[int, int]:
    """Read ``stream`` to its end and write it as DATA frames + END; returns (raw, wire).

    Uncompressed, blocks of ``BLOCK`` bytes are read into one buffer behind room for the
    frame header, so each frame goes to ``write`` as one memoryview, without a copy. With
    zstd a second thread reads and compresses while this one writes (zstd releases the GIL).
    """
    if compress not in COMPRESSORS:
        raise ProtocolError(f"unknown compressor {compress!r}")
    fd = stream.fileno()
    _pipe_size(fd)  # the producer runs ahead while a block is on its way
    raw = wire = 0
    if compress == "zstd":
        blocks = _Compressor(fd, level)
        try:
            for n, out in blocks:
                raw += n
                if meter is not None and n:
                    meter.advance(n)
                wire += _emit(write, out)
        finally:
            blocks.stop()
    else:
        buf = bytearray(HEADER_SIZE + BLOCK)
        view = memoryview(buf)
        body = view[HEADER_SIZE:]
        while n := _fill(fd, body):
            raw += n
            if meter is not None:
                meter.advance(n)
            pack_header_into(buf, DATA, n)
            write(view[:HEADER_SIZE + n])
            wire += n
    stream.close()  # raises if the producer failed: then no END goes out, the cut is seen
    write_end(write, {"bytes": raw})
    if meter is not None:
        meter.finish()
    return raw, wire


class _Compressor:
    """Reads and compresses a stream in its own thread: yields (raw bytes, zstd bytes).

    Each block is flushed: zstd would otherwise hold much of the stream before emitting
    anything (all of it, multi-threaded), and the receiver could not start.
    """

    def __init__(self, fd: int, level: int) -> None:
        self._fd = os.dup(fd)  # its own: the caller may close the stream while it reads
        self._comp = zstandard.ZstdCompressor(level=level, threads=ZSTD_THREADS).compressobj()
        self._queue: queue.Queue[tuple[int, bytes] | BaseException | None] = \
            queue.Queue(QUEUE_BLOCKS)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zstd", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[int, bytes] | BaseException | None) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            buf = bytearray(BLOCK)
            view = memoryview(buf)
            comp = self._comp
            while n := _fill(self._fd, view, self._stopped):
                out = comp.compress(view[:n]) + comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                if not self._put((n, out)):
                    return
            self._put((0, comp.flush()))
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - raised in the writing thread
            self._put(e)
        finally:
            os.close(self._fd)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Make the thread end (it may be waiting for room in the queue)."""
        self._stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()


def _refused_link(payload: bytes) -> CallRefused:
    """The error for a LINK offer where none may be followed, naming where it pointed."""
    try:
        offer = json.loads(payload)
        where = f"{str(offer['address'])[:64]}:{int(offer['port'])}"
    except (ValueError, KeyError, TypeError):
        where = "an address the sender named"
    return CallRefused(f"refused a data link offer to {where!r}: a pull never connects "
                       "where the host it pulls from points")


def _emit(write: DataWriter, out: bytes) -> int:
    """``out`` as DATA frames of at most MAX_DATA bytes; the payload bytes written."""
    for i in range(0, len(out), MAX_DATA):
        write(pack(DATA, out[i:i + MAX_DATA]))
    return len(out)


class FrameStream(Stream):
    """An incoming volume stream: frames read (by a thread) from ``read``, decompressed,
    written into a pipe whose read end is ``fileno()``.

    ``close()`` raises if the frames did not end with a valid trailer whose byte count
    matches: a cut link or a killed sender is an error even when the consuming command
    happened to exit 0 on the truncated input.

    ``check`` (an object with ``feed(memoryview)`` and ``finish()``, e.g. a tar checker)
    sees every decoded piece before it enters the pipe, so a piece it refuses never reaches
    the consumer; if it has an ``out`` queue (a checker that writes what it approved anew),
    the pipe gets what it queues there instead of the input. ``follow_link=False`` refuses
    a LINK offer instead of connecting to the address it names (a pull: the sender is the
    host being pulled from, which must not choose where this host connects).
    """

    def __init__(self, read: Reader, how: str, name: str, parent: str | None,
                 compress: str, check: Any = None, follow_link: bool = True,
                 answer: Callable[[dict[str, Any]], None] | None = None) -> None:
        if compress not in COMPRESSORS:
            raise ProtocolError(f"unknown compressor {compress!r}")
        self.how, self.name, self.parent = how, name, parent
        self.size_hint = None
        self.cleanups: list[Any] = []
        self.raw = 0
        self.wire = 0
        self.error: BaseException | None = None
        self.link = "channel"  # or "tcp": where the data came (see link.py)
        self.link_error = ""  # why an offered link could not be made
        self._read = read
        self._compress = compress
        self._check = check
        self._follow_link = follow_link
        self._answer = answer  # where a LINK offer is answered (link.py): the channel back
        self._r, self._w = os.pipe()
        _pipe_size(self._w)
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dec: Any = None
        if self._compress == "zstd":
            dec = zstandard.ZstdDecompressor().decompressobj()
        read = self._read
        link: Any = None
        try:
            while True:
                kind, length = read_header(read)
                if kind == LINK:
                    if not self._follow_link:
                        raise _refused_link(read_exactly(read, length))
                    if link is not None or self.wire or self.link_error:
                        raise ProtocolError("a link offer must come before the data")
                    link = self._connect(json.loads(read_exactly(read, length)))
                    if link is not None:
                        read = link
                    continue
                if kind == END:
                    trailer = json.loads(read_exactly(read, length))
                    if trailer.get("bytes") != self.raw:
                        raise ProtocolError(
                            f"stream ended after {self.raw} bytes but the sender sent "
                            f"{trailer.get('bytes')}")
                    if self._check is not None:
                        self._check.finish()
                        self._drain(b"")
                    return
                if kind != DATA:
                    raise ProtocolError(f"unexpected frame {kind!r} inside a data stream")
                # the payload is passed on piece by piece as it arrives, never gathered
                while length:
                    piece = read(min(length, PIECE))
                    if not piece:
                        raise ProtocolError("the connection closed in the middle of a message",
                                            "the peer or the link went away; nothing was "
                                            "committed")
                    length -= len(piece)
                    self.wire += len(piece)
                    data = dec.decompress(piece) if dec is not None else piece
                    self.raw += len(data)
                    if self._check is None:
                        self._put(data)
                    elif data:
                        self._check.feed(memoryview(data))  # before the consumer sees it
                        self._drain(data)
        except BaseException as e:  # noqa: BLE001 - handed to close() in the caller's thread
            self.error = e
        finally:
            with contextlib.suppress(OSError):
                os.close(self._w)
            if link is not None:
                link.close()

    def _connect(self, offer: Any) -> Any:
        """The sender's fast link (``link.py``), or None: then the data stays on ``read``.
        This end's certificate goes back through ``answer`` before it connects, and so does
        the reason when the link cannot be made (the sender then stops waiting for it)."""
        # cryptography (~70 ms) only when a link is made: agents import this module
        from migrator.transport import link as tls

        if self._answer is None:
            self.link_error = "this receiver cannot answer a data link offer"
            return None
        try:
            me, peer, event = tls.answer(offer)
        except ProtocolError as e:
            self.link_error = e.message
            self._answer({"event": "link", "error": self.link_error})
            return None
        self._answer(event)
        try:
            link = tls.connect(offer, me, peer)
        except (OSError, ProtocolError) as e:
            self.link_error = (e.message if isinstance(e, ProtocolError) else str(e)) \
                or type(e).__name__
            self._answer({"event": "link", "error": self.link_error})
            return None
        self.link = "tcp"
        return link

    def _put(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._w, view)
            view = view[n:]

    def _drain(self, data: bytes | memoryview) -> None:
        """Pass on what the checker approved: its rewritten output, or ``data`` as is."""
        out = getattr(self._check, "out", None)
        if out is None:
            self._put(data)
            return
        while out:
            self._put(out.popleft())

    def fileno(self) -> int:
        return self._r

    def close(self, check: bool = True) -> None:
        self._thread.join()
        self._release()
        if check and self.error is not None:
            if isinstance(self.error, MigratorError):  # a cut, a refused member or link
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
