"""Byte streams between storage pools: a sending child process, a pump, a receiving child.

A ``SendStream`` owns the process that produces a volume stream (``btrfs send``, ``zfs
send``, ``tar --create``) and its stderr; ``receive_with`` starts the consuming process and
``pump`` moves the bytes between them with ``splice(2)`` (no copy through Python), counting
them for progress and for the caller's report. A failed child on either end becomes a
``CommandFailed`` naming the command and its stderr; a receiver that dies mid-stream makes
the sender see EPIPE, which is reported as the receiver's error, not the sender's.

The same objects will be carried by host-to-host transports: anything with ``fileno()`` can
be the source of a pump.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from migrator.core import proc
from migrator.core.errors import CommandFailed, NoSpace

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class ProgressEvent:
    """Where a long transfer is: bytes so far, total when known, rate and ETA."""

    phase: str
    done: int
    total: int | None
    rate: float  # bytes per second since the phase started
    eta: float | None  # seconds, when the total is known


class Progress(Protocol):
    def __call__(self, event: ProgressEvent) -> None: ...


def no_progress(event: ProgressEvent) -> None:
    """The default callback: library calls never print."""


class ProgressMeter:
    """Turns byte counts into throttled ``ProgressEvent``s for one phase of a transfer."""

    def __init__(
        self, callback: Progress, phase: str, total: int | None = None, every: float = 0.2
    ) -> None:
        self.callback = callback
        self.phase = phase
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._every = every

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._emit(now)

    def set_done(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.advance(done - self.done)

    def finish(self) -> None:
        if self.total is not None and self.done > self.total:
            self.total = self.done
        self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - self.done, 0) / rate
        self.callback(ProgressEvent(self.phase, self.done, self.total, rate, eta))


class Stream:
    """A volume stream to be consumed through ``fileno()``: what receivers accept.

    ``name``/``parent`` say which snapshot it carries and against which base (``None`` for a
    full stream); ``how`` is the migration type. ``close()`` confirms the producer finished
    well (raising otherwise); ``kill()`` abandons it. Both are idempotent.
    """

    how: str
    name: str
    parent: str | None
    size_hint: int | None

    def fileno(self) -> int:
        raise NotImplementedError

    def close(self, check: bool = True) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class FedStream(Stream):
    """A stream that a thread of this process writes into a pipe (a backup part checked and
    decompressed, an image through the tar guard): the receiver reads the pipe like a child's
    stdout. Subclasses say what to write (``produce``) and may turn an error into their own
    (``translate``); the pipe, the thread and the error live here once.

    The read end is closed once only: after that its number may belong to another file.
    """

    error: BaseException | None = None

    def start_feeding(self, thread_name: str, pipe_size: int | None = None) -> None:
        self.error = None
        self._r, self._w = os.pipe()
        self._r_open = True
        if pipe_size:  # a bigger pipe means fewer, larger reads; best effort
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, pipe_size)
        self._thread = threading.Thread(target=self._feed, daemon=True, name=thread_name)
        self._thread.start()

    def produce(self, write: Callable[[bytes | memoryview], None]) -> None:
        """Write the whole stream with ``write``; raise on any problem."""
        raise NotImplementedError

    def translate(self, e: BaseException) -> BaseException:
        """The error ``close()`` reports for ``e`` raised by ``produce``."""
        return e

    def after_feed(self) -> None:
        """Runs in the feeding thread once it is done, whatever happened."""

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]

    def _feed(self) -> None:
        try:
            self.produce(self._write_all)
        except BrokenPipeError:
            pass  # the consumer stopped reading: it reports its own error
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.error = self.translate(e)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._w)
            self.after_feed()

    def fileno(self) -> int:
        return self._r

    def _close_read_end(self) -> None:
        if self._r_open:
            self._r_open = False
            with contextlib.suppress(OSError):
                os.close(self._r)

    def close(self, check: bool = True) -> None:
        self._thread.join()
        self._close_read_end()
        if check and self.error is not None:
            raise self.error

    def kill(self) -> None:
        self._close_read_end()  # the feeder's next write fails with EPIPE and it stops
        self._thread.join()


class SendStream(Stream):
    """A running producer of a volume stream; read it through ``fileno()`` or ``pump``.

    ``name``/``parent`` say which snapshot it carries and against which base (``None`` for a
    full stream); ``how`` is the migration type. ``cleanups`` run when the stream is closed
    (a temporary clone a zfs snapshot was read through, for instance).
    """

    def __init__(
        self,
        argv: Sequence[str],
        how: str,
        name: str,
        parent: str | None = None,
        cwd: str | None = None,
        size_hint: int | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.how = how
        self.name = name
        self.parent = parent
        self.size_hint = size_hint
        self.cleanups: list[Callable[[], object]] = []
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the stream
        try:
            self.proc = proc.start_process(self.argv, stdout=proc.PIPE, stderr=self._stderr,
                                           cwd=cwd)
        except BaseException:  # not started: release what it was given, then report
            self._stderr.close()
            raise

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def close(self, check: bool = True) -> None:
        """Wait for the producer; raise if it failed (when ``check``). Runs cleanups."""
        try:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            rc = self.proc.wait()
            if check and rc != 0:
                raise CommandFailed(self.argv, rc, self.stderr_text())
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the producer if still running and release everything (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the real error
                log.warning("stream cleanup failed: %s", e)
        self._stderr.close()


def pump(src: Stream | IO[bytes], dst_fd: int, meter: ProgressMeter | None = None) -> int:
    """Copy everything from ``src`` to ``dst_fd``; return the byte count.

    ``splice`` moves pipe-to-pipe data inside the kernel; anything it cannot handle falls
    back to read/write. A broken pipe on the destination raises ``BrokenPipeError`` for the
    caller to turn into the receiver's error.
    """
    src_fd = src.fileno()
    total = 0
    use_splice = hasattr(os, "splice")
    while True:
        if use_splice:
            try:
                n = os.splice(src_fd, dst_fd, CHUNK)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS):
                    use_splice = False
                    continue
                raise
            if n == 0:
                break
        else:
            data = os.read(src_fd, CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                w = os.write(dst_fd, view)
                view = view[w:]
            n = len(data)
        total += n
        if meter is not None:
            meter.advance(n)
    if meter is not None:
        meter.finish()
    return total


@dataclass
class TransferStats:
    """What a transfer moved: bytes on the wire and per-volume methods, for reports."""

    bytes: int = 0
    methods: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def receive_with(
    argv: Sequence[str],
    stream: Stream,
    meter: ProgressMeter | None = None,
    cwd: str | None = None,
    no_space_markers: tuple[str, ...] = ("No space left", "out of space"),
    fatal_stderr: tuple[str, ...] = (),
) -> int:
    """Run the receiving command fed by ``stream``; both must succeed. Returns bytes moved.

    On any failure both processes are gone when this returns and the error names the side
    that failed first: a receiver that exits early is the cause of the sender's EPIPE.
    """
    full = [str(a) for a in argv]
    with tempfile.TemporaryFile() as err:
        try:
            rproc = proc.start_process(full, stdin=proc.PIPE, stderr=err, cwd=cwd)
        except BaseException:  # not started: release what it was given, then report
            stream.kill()
            raise
        assert rproc.stdin is not None
        moved = 0
        pump_error: BaseException | None = None
        try:
            moved = pump(stream, rproc.stdin.fileno(), meter)
        except BrokenPipeError as e:
            pump_error = e
        except BaseException as e:
            pump_error = e
        finally:
            with contextlib.suppress(OSError):
                rproc.stdin.close()
        if pump_error is not None and not isinstance(pump_error, BrokenPipeError):
            rproc.kill()
            rproc.wait()
            stream.kill()
            raise pump_error
        rc = proc.wait_or_kill(rproc)
        if pump_error is not None and rc == 0 and _only_zeros_left(stream):
            pump_error = None  # tar stops at its end marker; what it left is record padding
        if pump_error is not None:
            stream.kill()
        err.seek(0)
        rerr = err.read().decode(errors="replace").strip()
        if rc != 0:
            stream.kill()
            if any(m in rerr for m in no_space_markers):
                raise NoSpace(f"receiving failed: no space left on the target pool ({rerr})",
                              "free space on the target pool or pick another pool")
            raise CommandFailed(full, rc, rerr)
        if pump_error is not None:
            raise CommandFailed(full, rc, "receiver stopped reading before the stream ended")
        if any(m in rerr for m in fatal_stderr):
            stream.kill()
            raise CommandFailed(full, rc, rerr)
        stream.close()
        return moved


def _only_zeros_left(stream: Stream | IO[bytes]) -> bool:
    """Drain the rest of ``stream``; True when it held nothing but zero bytes."""
    fd = stream.fileno()
    while True:
        data = os.read(fd, CHUNK)
        if not data:
            return True
        if data.count(0) != len(data):
            return False


def run_watched(argv: Sequence[str], on_line: Callable[[str], None]) -> tuple[int, str, str]:
    """Run a command, feeding each stdout line (split on CR or LF) to ``on_line``.

    Used for rsync, whose ``--info=progress2`` lines end in carriage returns.
    """
    full = [str(a) for a in argv]
    with tempfile.TemporaryFile() as err:
        p = proc.start_process(full, stdout=proc.PIPE, stderr=err)
        assert p.stdout is not None
        out: list[str] = []
        buf = b""

        def reader() -> None:
            nonlocal buf
            assert p.stdout is not None
            while True:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                while True:
                    cut = min((i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0),
                              default=-1)
                    if cut < 0:
                        break
                    line = buf[:cut].decode(errors="replace")
                    buf = buf[cut + 1:]
                    if line.strip():
                        out.append(line)
                        on_line(line)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        rc = proc.wait_or_kill(p)
        t.join()
        if buf.strip():
            out.append(buf.decode(errors="replace"))
        err.seek(0)
        return rc, "\n".join(out), err.read().decode(errors="replace")
