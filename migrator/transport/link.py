"""The fast data link: one upload's frames over a direct TCP connection, AES-256-GCM sealed.

Why it exists: paramiko sends in SSH channel packets of at most 32 KiB (the size OpenSSH's
sshd allows on a session channel) and spends several Python calls on each, so one upload
over the SSH channel stays near 200 MB/s on one core, below OpenSSH on the same link. Here
the same frames travel in records of up to 4 MiB: the per-record Python work is spread over
a megabyte and the encryption runs in OpenSSL at GB/s. The link is opt-in
(``SshTransport(fast_link=True)``): it needs the agent's host to reach the client's
address on an ephemeral port, and it opens a listening port for a few seconds.

The handshake is carried by the SSH channel, which is encrypted and whose host key was
checked, so nothing secret crosses the TCP connection in the clear:

1. The client listens on the local address of its SSH connection (port 0, in its network
   namespace), draws a 32-byte random secret and sends a LINK frame on the channel:
   ``{"address", "port", "secret" (base64), "cipher": "aes-256-gcm"}``.
2. The agent connects and sends HMAC-SHA256(secret, "agent"). The client compares it with
   ``hmac.compare_digest``; on a match it closes the listener (one connection is ever
   accepted) and answers HMAC-SHA256(secret, "client"), which the agent checks in turn.
   A connection that sends anything else, or nothing in time, is dropped.
3. Then the frames flow as records: a 4-byte length L, then L bytes of AES-256-GCM output
   (ciphertext and 16-byte tag) under a key derived from the secret, with the record
   counter as nonce and the length as associated data. A changed, dropped, replayed or
   reordered record fails its tag; a cut link fails the frame checks (no END trailer).

Nothing is lost if the link cannot be made: the agent that cannot connect (or finish the
handshake) goes on reading the SSH channel, and the client that gets no valid connection
within ``ACCEPT_WAIT`` seconds sends the frames there (slower, never wrong).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from migrator.transport.frames import HEADER_SIZE, MAX_DATA, ProtocolError

CIPHER = "aes-256-gcm"
TAG = 16
RECORD_MAX = HEADER_SIZE + MAX_DATA  # one frame per record: what one write of send_frames is
ACCEPT_WAIT = 10.0  # seconds the client waits for the agent's connection
CONNECT_TIMEOUT = 5.0  # seconds the agent tries to connect (less than ACCEPT_WAIT)
HANDSHAKE_TIMEOUT = 5.0
KEEPALIVE = 15
_LEN = struct.Struct(">I")


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"migrator-link-v1 " + label, hashlib.sha256).digest()


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


def _tune(sock: socket.socket) -> None:
    """TCP keepalives, so that a peer that vanished is noticed on an idle link."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def _recv_exactly(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; the bytes received (fewer only at end of stream)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            break
        got += n
    return got


# client side -------------------------------------------------------------------------------
class LinkOffer:
    """A listening socket and a secret: what the client offers the agent for one upload."""

    def __init__(self, address: str, netns: str | None = None) -> None:
        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                              socket.SOCK_STREAM)
            try:
                s.bind((address, 0))
                s.listen(4)
            except BaseException:
                s.close()
                raise
            return s

        if netns:
            from migrator.netns import call_in_netns

            self.listener: socket.socket | None = call_in_netns(netns, listen)
        else:
            self.listener = listen()
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.secret = secrets.token_bytes(32)

    def describe(self) -> dict[str, Any]:
        """The LINK frame's payload (it goes only inside the SSH channel)."""
        return {"address": self.address, "port": self.port, "cipher": CIPHER,
                "secret": base64.b64encode(self.secret).decode()}

    def accept(self, wait: float = ACCEPT_WAIT,
               give_up: Callable[[], bool] = lambda: False) -> LinkWriter | None:
        """The agent's authenticated connection, or None after ``wait`` seconds (or as soon
        as ``give_up()`` is true). The listener is closed either way."""
        assert self.listener is not None
        want = _derive(self.secret, b"agent")
        deadline = time.monotonic() + wait
        try:
            self.listener.settimeout(0.1)
            while time.monotonic() < deadline and not give_up():
                try:
                    conn, _peer = self.listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic())))
                try:
                    got = bytearray(len(want))
                    n = _recv_exactly(conn, memoryview(got))
                except OSError:
                    n = 0
                if n == len(want) and hmac.compare_digest(bytes(got), want):
                    self.close()  # exactly one connection is ever accepted
                    try:
                        conn.sendall(_derive(self.secret, b"client"))
                        conn.settimeout(None)
                        _tune(conn)
                    except OSError:
                        conn.close()
                        return None
                    return LinkWriter(conn, _derive(self.secret, b"data"))
                conn.close()  # a stranger, or too slow: keep waiting for the agent
            return None
        finally:
            self.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


class LinkWriter:
    """Seals what it is given into records on the link: a ``Writer`` for ``send_frames``."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock = sock
        self._aes = algorithms.AES(key)
        self._seq = 0
        self._out = bytearray(_LEN.size + RECORD_MAX + TAG + 16)
        self.sent = 0  # bytes on the wire, records included

    def __call__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for i in range(0, len(view), RECORD_MAX):
            self._record(view[i:i + RECORD_MAX])

    def _record(self, chunk: memoryview) -> None:
        n = len(chunk)
        out = memoryview(self._out)
        _LEN.pack_into(self._out, 0, n + TAG)
        enc = Cipher(self._aes, modes.GCM(_nonce(self._seq))).encryptor()
        enc.authenticate_additional_data(bytes(out[:_LEN.size]))
        enc.update_into(chunk, out[_LEN.size:])  # type: ignore[arg-type]  # any buffer
        enc.finalize()
        end = _LEN.size + n
        out[end:end + TAG] = enc.tag
        self._seq += 1
        self.sock.sendall(out[:end + TAG])
        self.sent += end + TAG

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()


# agent side --------------------------------------------------------------------------------
def connect(offer: dict[str, Any]) -> LinkReader:
    """Connect to a client's offer and authenticate both ways; raises OSError or
    ProtocolError when the link cannot be made (the caller then stays on the channel)."""
    if offer.get("cipher") != CIPHER:
        raise ProtocolError(f"unknown link cipher {offer.get('cipher')!r}")
    try:
        secret = base64.b64decode(str(offer["secret"]), validate=True)
        address, port = str(offer["address"]), int(offer["port"])
    except (KeyError, ValueError, TypeError) as e:
        raise ProtocolError(f"malformed link offer: {e}") from e
    if len(secret) != 32 or not 0 < port < 65536:
        raise ProtocolError("malformed link offer")
    sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(_derive(secret, b"agent"))
        want = _derive(secret, b"client")
        got = bytearray(len(want))
        if _recv_exactly(sock, memoryview(got)) != len(want) or \
                not hmac.compare_digest(bytes(got), want):
            raise ProtocolError("the link's peer did not prove it holds the secret")
        sock.settimeout(None)
        _tune(sock)
    except BaseException:
        sock.close()
        raise
    return LinkReader(sock, _derive(secret, b"data"))


class LinkReader:
    """Opens the records: a ``Reader`` for the frame parser. The pieces it returns are
    views of each record's own buffer, valid for as long as the caller keeps them."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock = sock
        self._aes = algorithms.AES(key)
        self._seq = 0
        self._ct = bytearray(RECORD_MAX + TAG)
        self._plain = memoryview(b"")
        self.received = 0

    def __call__(self, n: int) -> memoryview:
        if not self._plain and not self._next():
            return memoryview(b"")
        piece = self._plain[:n]
        self._plain = self._plain[n:]
        return piece

    def _next(self) -> bool:
        head = bytearray(_LEN.size)
        got = _recv_exactly(self.sock, memoryview(head))
        if got == 0:
            return False  # the end of the link; the frame parser says if that was early
        if got < _LEN.size:
            raise ProtocolError("the data link closed in the middle of a record")
        (length,) = _LEN.unpack(head)
        if not TAG <= length <= RECORD_MAX + TAG:
            raise ProtocolError(f"data link record of {length} bytes is out of bounds")
        ct = memoryview(self._ct)[:length]
        if _recv_exactly(self.sock, ct) < length:
            raise ProtocolError("the data link closed in the middle of a record")
        n = length - TAG
        dec = Cipher(self._aes, modes.GCM(_nonce(self._seq), bytes(ct[n:]))).decryptor()
        dec.authenticate_additional_data(bytes(head))
        plain = bytearray(n + 16)  # a buffer per record: pieces handed out stay valid
        dec.update_into(ct[:n], plain)  # type: ignore[arg-type]  # any buffer
        try:
            dec.finalize()
        except InvalidTag:
            raise ProtocolError("a data link record failed authentication",
                                "the data was changed on the way; nothing was committed") \
                from None
        self._seq += 1
        self.received += _LEN.size + length
        self._plain = memoryview(plain)[:n]
        return True

    def close(self) -> None:
        self.sock.close()
