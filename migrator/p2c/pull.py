"""The transfer of a machine's tree: rsync on the target host, the sender on the machine,
this process (the client) relaying bytes between the two. Nothing is staged here.

rsync has one client and one server. The client (the receiver) runs on the target host,
inside the agent's ``p2c_pull`` request, writing straight into the container's volume;
its ``--rsh`` is ``migrator.transport.rsync_shim``, which hands rsync's pipes to the agent
(``rsync_relay.shim_socket``/``receive_pipes``, the same hand-off a cross-driver refresh
uses). The agent then announces the server argv to the client (an ``rsync`` event) and
carries rsync's bytes as DATA frames on its channel. The client checks that argv against a
short allow-list (``rsync_relay.sender_args``: a read-only sender of ``/``), runs it on the
machine over an SSH exec channel and relays frames to and from it; END frames carry each
side's end (and the sender's exit status, which the shim then exits with).

What this buys: numeric ids, hard links, ACLs, xattrs and sparse files (``-aHAXS
--numeric-ids``); a second pass that sends only what changed during the first; ``--resume``
(``--partial``, the same volume again: only what is missing crosses); and per-file read
errors (rsync's exit 23, the files named on its stderr) reported instead of fatal.

A machine without rsync is refused (``MissingDependency``) rather than copied with tar: tar
would have no delta pass and a resume would start over, which is what this command promises
not to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrator.core import errors
from migrator.streams import ProgressMeter, run_watched
from migrator.transport.frames import (
    DATA,
    END,
    JSON,
    LINK,
    ProtocolError,
    Reader,
    Writer,
    pack,
    read_frame,
    write_link,
)
from migrator.transport.rsync_relay import (
    SHIM_WAIT,
    receive_pipes,
    release_shim,
    sender_args,
    shim_rsh,
    shim_socket,
    start_client,
)

if TYPE_CHECKING:  # paramiko: the agent imports this module, the client alone relays
    from migrator.p2c.source import SourceMachine

CHUNK = 1 << 20
RSYNC_FLAGS = ["-aHAXS", "--numeric-ids", "--delete", "--partial", "--stats",
               "--info=progress2", "--no-inc-recursive"]
PROGRESS_EVERY = 0.25  # seconds between progress events on the channel
_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%")
_STATS = re.compile(r"^(Literal data|Matched data|Total bytes received|Total bytes sent|"
                    r"Total file size|Number of regular files transferred): ([\d,]+)")
# rsync's per-file read errors (on the client's stderr, forwarded from the sender)
_UNREADABLE = [
    re.compile(r'^rsync: (?:\[sender\] )?(?:send_files failed to open|read errors mapping|'
               r'opendir|readlink_stat|readlink|link_stat) "(.+?)"(?: failed)?:? '),
    re.compile(r"^ERROR: (.+) failed verification -- update discarded"),
]
_VANISHED = re.compile(r'^file has vanished: "(.+)"')
_RULE = re.compile(r"^- /[^\n\r\x00]*$")


def check_rules(rules: Any) -> list[str]:
    """Filter rules from the client: exclusions of anchored paths only."""
    if not isinstance(rules, list) or not all(isinstance(r, str) and _RULE.match(r)
                                              for r in rules):
        raise errors.InvalidInput("p2c filter rules must be '- /path' exclusions")
    return list(rules)


def parse_rsync_errors(stderr: str) -> tuple[list[str], list[str]]:
    """(unreadable files, vanished files) from rsync's stderr; paths as on the source."""
    unreadable: dict[str, None] = {}
    vanished: dict[str, None] = {}
    for line in stderr.splitlines():
        line = line.strip()
        m = _VANISHED.match(line)
        if m:
            vanished["/" + m.group(1).lstrip("/")] = None
            continue
        for rx in _UNREADABLE:
            m = rx.match(line)
            if m:
                unreadable["/" + m.group(1).lstrip("/")] = None
                break
    return list(unreadable), list(vanished)


def parse_stats(stdout: str) -> dict[str, int]:
    stats = {}
    for line in stdout.splitlines():
        m = _STATS.match(line.strip())
        if m:
            stats[m.group(1)] = int(m.group(2).replace(",", ""))
    return stats


# the target host's side (inside the agent's p2c_pull) ----------------------------------------
def serve_pull(dest: Path, rules: list[str], read: Reader, write: Writer) -> dict[str, Any]:
    """Run the rsync client into ``dest`` with its transport relayed over this channel."""
    lock = threading.Lock()

    def send(kind: bytes, payload: bytes) -> None:
        with lock:
            write(pack(kind, payload))

    last = [0.0]

    def on_line(line: str) -> None:
        m = _PROGRESS.match(line)
        now = time.monotonic()
        if m and now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            send(JSON, json.dumps({"event": "progress",
                                   "done": int(m.group(1).replace(",", ""))}).encode())

    with shim_socket() as (listener, path):
        argv = ["rsync", *RSYNC_FLAGS, *[f"--filter={r}" for r in rules], "--rsh",
                shim_rsh(path), "source:/", f"{dest}/"]

        runner, outcome = start_client(
            listener, lambda: dict(zip(("rc", "out", "err"), run_watched(argv, on_line),
                                       strict=True)))
        listener.settimeout(SHIM_WAIT)
        try:
            conn, _ = listener.accept()
        except OSError:
            runner.join()
            if "error" in outcome:
                raise outcome["error"] from None
            raise errors.CommandFailed(argv, outcome.get("rc", 255),
                                       outcome.get("err", "")) from None
        status = 255
        with conn:
            from_rsync, to_rsync, args = receive_pipes(conn)
            up = threading.Thread(target=_upload, args=(from_rsync, send), daemon=True)
            try:
                send(JSON, json.dumps({"event": "rsync", "args": args}).encode())
                up.start()
                status = _download(read, to_rsync,
                                   lambda ev: send(JSON, json.dumps(ev).encode()))
            finally:
                with contextlib.suppress(OSError):
                    os.close(to_rsync)
                release_shim(conn, status)
                if up.is_alive():
                    up.join(30)
                with contextlib.suppress(OSError):
                    os.close(from_rsync)
        runner.join()
    if "error" in outcome:
        raise outcome["error"]
    rc, out, err = outcome["rc"], outcome["out"], outcome["err"]
    unreadable, vanished = parse_rsync_errors(err)
    stats = parse_stats(out)
    if rc not in (0, 23, 24) or (rc == 23 and not unreadable):
        if "No space left" in err:
            raise errors.NoSpace(f"rsync into {dest}: no space left on the target pool")
        raise errors.CommandFailed(argv[:1] + RSYNC_FLAGS, rc, err.strip(),
                                   "the transfer was cut; `migrate p2c ... --resume` "
                                   "continues it")
    drop_unreadable(dest, unreadable)
    return {"rc": rc, "unreadable": unreadable, "vanished": vanished,
            "literal": stats.get("Literal data", 0),
            "received": stats.get("Total bytes received", 0),
            "files": stats.get("Number of regular files transferred", 0),
            "size": stats.get("Total file size", 0)}


def drop_unreadable(dest: Path, paths: list[str]) -> None:
    """Remove what rsync left of files it could not read (``--partial`` keeps a file whose
    unreadable blocks came as zeros): skipped means absent, never silently wrong."""
    for p in paths:
        parts = [x for x in p.split("/") if x]
        if not parts or ".." in parts:
            continue
        here = dest
        for part in parts[:-1]:
            here = here / part
            if here.is_symlink() or not here.is_dir():
                break
        else:
            victim = here / parts[-1]
            if victim.is_file() and not victim.is_symlink():
                victim.unlink()


def _upload(fd: int, send: Callable[[bytes, bytes], None]) -> None:
    """rsync's output -> DATA frames to the client; END when rsync closes it."""
    n = 0
    try:
        while chunk := os.read(fd, CHUNK):
            send(DATA, chunk)
            n += len(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        send(END, json.dumps({"bytes": n}).encode())


def _download(read: Reader, fd: int, answer: Callable[[dict[str, Any]], None]) -> int:
    """DATA frames from the client -> rsync's input, until END (the sender's exit status).
    A LINK frame moves the rest onto the client's direct data link (``transport/link.py``)
    when it can be made (this end's certificate, or why not, goes back through ``answer``);
    otherwise the frames keep coming on the channel."""
    alive = True  # False once rsync is gone: the rest is read and dropped up to the END
    link: Any = None
    try:
        while True:
            kind, payload = read_frame(read if link is None else link)
            if kind == LINK and link is None:
                # cryptography (~70 ms) only when a link is made: agents import this module
                from migrator.transport import link as tls

                try:
                    me, peer, event = tls.answer(json.loads(payload))
                    answer(event)
                    link = tls.connect(json.loads(payload), me, peer)
                except (OSError, ProtocolError, ValueError) as e:
                    answer({"event": "link", "error": str(e) or type(e).__name__})
            elif kind == DATA:
                view = memoryview(payload)
                while alive and view:
                    try:
                        view = view[os.write(fd, view):]
                    except OSError:
                        alive = False
            elif kind == END:
                trailer = json.loads(bytes(payload) or b"{}")
                status = trailer.get("status", 255)
                return status if isinstance(status, int) and status >= 0 else 255
            else:
                raise ProtocolError(f"unexpected frame {kind!r} in an rsync relay")
    finally:
        if link is not None:
            link.close()


# the client's side ---------------------------------------------------------------------------
def relay(chan: Any, source: SourceMachine, meter: ProgressMeter | None,
          link_from: tuple[str, str | None] | None = None) -> tuple[dict[str, Any], int]:
    """Relay between the agent's ``p2c_pull`` channel and the sender on ``source``; the
    agent's reply and the bytes relayed (both directions).

    ``link_from`` (an address and network namespace to listen in) offers the agent the
    direct data link for the bulk direction, the machine's files: records of up to a
    megabyte sealed in OpenSSL instead of 32 KiB SSH packets built in Python (bench_p2c)."""
    src_chan: Any = None
    pump: threading.Thread | None = None
    moved = [0, 0]  # to the source, from the source
    link_used = [False]
    answers: queue.Queue[dict[str, Any]] = queue.Queue()  # the agent's link answers

    def from_source() -> None:
        status = 255
        write: Callable[[bytes], Any] = chan.sendall
        link = None
        try:
            if link_from is not None:
                # cryptography (~70 ms) only when a link is made: agents import this module
                from migrator.transport import link as tls

                offer = tls.LinkOffer(*link_from)
                try:
                    write_link(chan.sendall, offer.describe())
                    ans = answers.get(timeout=tls.ACCEPT_WAIT)
                    if ans.get("cert"):
                        link = offer.accept(tls.decode_cert(ans["cert"]),
                                            give_up=lambda: not answers.empty())
                except (queue.Empty, ProtocolError):
                    link = None
                finally:
                    offer.close()
                if link is not None:
                    write, link_used[0] = link, True
            while data := src_chan.recv(CHUNK):
                write(pack(DATA, data))
                moved[1] += len(data)
            status = src_chan.recv_exit_status()
        except OSError:
            pass
        with contextlib.suppress(OSError):
            write(pack(END, json.dumps({"status": status}).encode()))
        if link is not None:
            link.close()

    try:
        while True:
            kind, payload = read_frame(chan.recv)
            if kind == DATA:
                if src_chan is not None:
                    with contextlib.suppress(OSError):
                        src_chan.sendall(payload)
                moved[0] += len(payload)
            elif kind == END:
                if src_chan is not None:
                    with contextlib.suppress(OSError):
                        src_chan.shutdown_write()
            elif kind == JSON:
                msg = json.loads(payload)
                if msg.get("event") == "link":
                    answers.put(msg)
                elif msg.get("event") == "progress" and meter is not None:
                    meter.set_done(int(msg.get("done", 0)))
                elif msg.get("event") == "rsync" and src_chan is None:
                    src_chan = source.open_bulk(sender_args(msg.get("args")))
                    pump = threading.Thread(target=from_source, daemon=True)
                    pump.start()
                elif "ok" in msg and "event" not in msg:
                    if pump is not None:
                        pump.join(10)  # its END went out; link_used is final
                    msg["link"] = "tcp" if link_used[0] else "channel"
                    return msg, moved[0] + moved[1]
            else:
                raise ProtocolError(f"unexpected frame {kind!r} from the agent")
    finally:
        if src_chan is not None:
            src_chan.close()
        if pump is not None:
            pump.join(10)
