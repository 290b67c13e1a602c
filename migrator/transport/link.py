"""The fast data link: one upload's frames over a direct TCP connection, inside TLS 1.3.

Why it exists: paramiko sends in SSH channel packets of at most 32 KiB (the size OpenSSH's
sshd allows on a session channel) and spends several Python calls on each, so one upload
over the SSH channel stays near 200 MB/s on one core, below OpenSSH on the same link. Here
the frames go through Python's ``ssl`` (OpenSSL) a megabyte per call: OpenSSL cuts them
into TLS records and seals them with AES-GCM at GB/s. The link is opt-in
(``SshTransport(fast_link=True)``): it needs the agent's host to reach the client's address
on an ephemeral port, and it opens a listening port for a few seconds.

No cryptography is made here: TLS 1.3 does all of it. What this module decides is whom to
trust, and that comes from the SSH channel, which is encrypted and whose host key was
checked:

1. The sender (the side that offers) makes an ephemeral EC P-256 key and a self-signed
   certificate, listens on the local address of its SSH connection (port 0, in its network
   namespace) and sends a LINK frame on the channel:
   ``{"address", "port", "tls": "1.3", "cert": <its certificate, DER, base64>}``.
2. The receiver makes its own ephemeral key and certificate, answers on the channel with
   ``{"event": "link", "cert": ...}`` and connects. If it cannot, it says why:
   ``{"event": "link", "error": ...}``.
3. Each end trusts exactly the other's certificate (loaded as the only CA; hostnames are
   not checked, the certificate is the identity) and checks after the handshake that the
   peer's certificate has the SHA-256 fingerprint it was given: mutual authentication,
   pinned through the channel. TLS 1.3 only; OpenSSL's default suite order puts
   AES-256-GCM first, which runs on AES-NI.
4. The sender accepts concurrently: every connection to its port gets a non-blocking TLS
   handshake, and the first one that completes with the pinned certificate wins. A stranger
   that connected first, sends garbage, holds a socket open without a word or presents
   another certificate is dropped without delaying the real peer. Everything ends by one
   deadline, ``ACCEPT_WAIT``.

TLS protects what crosses the link: a changed, dropped, replayed or reordered record fails
its authentication (``ProtocolError``), and a connection cut without TLS's close_notify is
an error too, not the end of the stream (besides, the frames' END trailer counts the bytes).

Nothing is lost if the link cannot be made: the receiver that cannot connect goes on
reading the SSH channel, and the sender that gets no valid connection within the deadline
sends the frames there (slower, never wrong), and remembers not to offer that host a link
again (``SshTransport.link_failed``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import os
import secrets
import selectors
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from migrator.core.netns import call_in_netns
from migrator.transport.frames import ProtocolError

TLS = "1.3"
ACCEPT_WAIT = 10.0  # seconds the sender waits for the receiver's connection, strangers or not
CONNECT_TIMEOUT = 5.0  # seconds the receiver tries to connect (less than ACCEPT_WAIT)
HANDSHAKE_TIMEOUT = 5.0  # one connection's TLS handshake, on either side
CLOSE_TIMEOUT = 5.0  # the sender waits this long for the receiver to take its close_notify
RECV_CHUNK = 1 << 20  # ciphertext the receiver reads from the socket at once
MAX_PENDING = 256  # connections in handshake at once; beyond it the oldest is dropped
MAX_CERT = 4096  # bytes of a peer certificate (a P-256 one is about 400)
# Validity of an ephemeral certificate. The pin, not the dates, is what makes it trusted;
# the window only bounds how long a leaked key could matter, and is wide enough that two
# hosts whose clocks disagree by some hours still agree it is valid.
VALIDITY = datetime.timedelta(days=1)
KEEPALIVE = 15


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint, as logs and errors show it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def _tune(sock: socket.socket) -> None:
    """TCP keepalives, so that a peer that vanished is noticed on an idle link."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def decode_cert(value: Any) -> bytes:
    """A peer certificate as it came through the channel (base64 DER), checked to parse."""
    try:
        der = base64.b64decode(str(value), validate=True)
        if not 0 < len(der) <= MAX_CERT:
            raise ValueError(f"{len(der)} bytes")
        x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise ProtocolError(f"malformed data link certificate: {e}") from e
    return der


class Identity:
    """An ephemeral key and its self-signed certificate: one end of one link."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migrator data link")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - VALIDITY).not_valid_after(now + VALIDITY)
                .sign(self._key, hashes.SHA256()))
        self.der = cert.public_bytes(serialization.Encoding.DER)
        self.fingerprint = fingerprint(self.der)

    def encoded(self) -> str:
        return base64.b64encode(self.der).decode()

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM: for a program that reads its key from a
        file (criu's page stream, ``checkpoint.base.CriuTls``), which the caller keeps 0600."""
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def context(self, server: bool, peer: bytes) -> ssl.SSLContext:
        """A TLS 1.3 context that shows this identity and trusts only ``peer``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the certificate is the identity, not a name
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=peer)
        if server:
            ctx.num_tickets = 0  # no resumption; and nothing unread left at the receiver
        # ``ssl`` loads keys only from files: the key goes to a private temporary file,
        # encrypted under a random password, and is removed as soon as it is loaded
        password = secrets.token_bytes(32)
        pem = self._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(password))
        cert_pem = ssl.DER_cert_to_PEM_cert(self.der).encode()
        fd, path = tempfile.mkstemp(prefix="migrator-link-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem + cert_pem)
            ctx.load_cert_chain(path, path, password)
        finally:
            os.unlink(path)
        return ctx


def _pinned(sock: ssl.SSLSocket | ssl.SSLObject, peer: bytes) -> bool:
    return _same(sock.getpeercert(binary_form=True) or b"", peer)


# the sending side ----------------------------------------------------------------------------
def listen(address: str, netns: str | None = None) -> socket.socket:
    """A listening TCP socket on ``address`` (port 0: the kernel picks), made in ``netns``
    when given: the address the SSH connection leaves from, which the far host reaches."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                          socket.SOCK_STREAM)
        try:
            s.bind((address, 0))
            s.listen(64)
        except BaseException:
            s.close()
            raise
        return s

    return call_in_netns(netns, make) if netns else make()


class LinkOffer:
    """A listening socket and an identity: what the sender offers for one upload."""

    def __init__(self, address: str, netns: str | None = None) -> None:
        self.listener: socket.socket | None = listen(address, netns)
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.identity = Identity()
        self.dropped = 0  # connections refused: strangers, wrong certificates, too slow

    def describe(self) -> dict[str, Any]:
        """The LINK frame's payload (it goes only inside the SSH channel)."""
        return {"address": self.address, "port": self.port, "tls": TLS,
                "cert": self.identity.encoded()}

    def accept(self, peer: bytes, wait: float = ACCEPT_WAIT,
               give_up: Callable[[], bool] = lambda: False) -> LinkWriter | None:
        """The receiver's authenticated connection (its certificate is ``peer``), or None
        after ``wait`` seconds or as soon as ``give_up()`` is true. Handshakes run side by
        side, so strangers cannot hold the real peer up. The listener is closed either way.
        """
        assert self.listener is not None
        ctx = self.identity.context(True, peer)
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, _Handshake] = {}
        deadline = time.monotonic() + wait
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while (left := deadline - time.monotonic()) > 0 and not give_up():
                for key, _ in sel.select(min(0.1, left)):
                    if key.fileobj is self.listener:
                        self._take(sel, ctx, pending)
                        continue
                    hs = pending[key.fileobj]  # type: ignore[index]
                    done = hs.step()
                    if done is None:
                        self._drop(sel, hs, pending)  # garbage, a wrong certificate, a reset
                    elif done:
                        if _same(hs.obj.getpeercert(binary_form=True) or b"", peer):
                            sel.unregister(hs.raw)
                            del pending[hs.raw]
                            hs.raw.setblocking(True)
                            _tune(hs.raw)
                            return LinkWriter(hs.raw, hs.obj, hs.outgoing)
                        self._drop(sel, hs, pending)
                now = time.monotonic()
                for hs in [h for h in pending.values() if h.until < now]:
                    self._drop(sel, hs, pending)  # silent, or too slow
            return None
        finally:
            for hs in list(pending.values()):
                self._drop(sel, hs, pending)
            sel.close()
            self.close()

    def _take(self, sel: selectors.BaseSelector, ctx: ssl.SSLContext,
              pending: dict[socket.socket, _Handshake]) -> None:
        assert self.listener is not None
        while True:
            try:
                raw, _peer = self.listener.accept()
            except OSError:  # nothing more waiting (or the listener failed)
                return
            raw.setblocking(False)
            if len(pending) >= MAX_PENDING:  # a flood: the oldest attempt makes room
                self._drop(sel, next(iter(pending.values())), pending)
            pending[raw] = _Handshake(raw, ctx)
            sel.register(raw, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector, hs: _Handshake,
              pending: dict[socket.socket, _Handshake]) -> None:
        if pending.pop(hs.raw, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(hs.raw)
            self.dropped += 1
        hs.raw.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _same(got: bytes, want: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(got).digest(), hashlib.sha256(want).digest())


class _Handshake:
    """One incoming connection's TLS handshake, driven without blocking. TLS runs over
    memory buffers (``ssl.MemoryBIO``) on this side, so that later each frame goes to the
    kernel as one write of a megabyte rather than one per 16 KiB record: over a veth or a
    NIC that halves the kernel's work per byte (bench_transport)."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.until = time.monotonic() + HANDSHAKE_TIMEOUT

    def step(self) -> bool | None:
        """Feed what arrived: True once the handshake is complete, False while it goes
        on, None when this connection is to be dropped."""
        try:
            data = self.raw.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return None
        if not data:
            return None
        self.incoming.write(data)
        try:
            self.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except (ssl.SSLError, ValueError):
            return None
        out = self.outgoing.read()
        try:  # handshake messages are small: they fit the empty send buffer at once
            if out and self.raw.send(out) != len(out):
                return None
        except OSError:
            return None
        return done


class LinkWriter:
    """Writes what it is given into the TLS connection: a ``Writer`` for ``send_frames``.
    Each call is sealed in memory (OpenSSL cuts it into records) and goes to the socket as
    one ``sendall``."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO
                 ) -> None:
        self.sock, self._tls, self._out = sock, tls, outgoing
        self.sent = 0  # payload bytes written

    def version(self) -> str | None:
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def __call__(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)
        self.sock.sendall(self._out.read())
        self.sent += len(data)

    def close(self) -> None:
        """close_notify (the receiver tells a finished stream from a cut one), then wait
        briefly for the receiver to close its end, so that nothing is reset in flight."""
        with contextlib.suppress(OSError, ValueError, ssl.SSLError):
            with contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()
            self.sock.settimeout(CLOSE_TIMEOUT)
            self.sock.sendall(self._out.read())
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(65536):
                pass
        self.sock.close()


# the receiving side --------------------------------------------------------------------------
def answer(offer: Any) -> tuple[Identity, bytes, dict[str, Any]]:
    """Check a LINK offer and make this end's identity: (identity, the sender's certificate,
    the event that carries this end's certificate back through the channel)."""
    if not isinstance(offer, dict) or offer.get("tls") != TLS:
        raise ProtocolError("unknown data link offer (this end speaks TLS 1.3 only)")
    peer = decode_cert(offer.get("cert"))
    me = Identity()
    return me, peer, {"event": "link", "cert": me.encoded()}


def connect(offer: dict[str, Any], me: Identity, peer: bytes) -> LinkReader:
    """Connect to a sender's offer as ``me``, trusting only ``peer``; raises OSError or
    ProtocolError when the link cannot be made (the caller then stays on the channel)."""
    try:
        address, port = str(offer["address"]), int(offer["port"])
    except (KeyError, ValueError, TypeError) as e:
        raise ProtocolError(f"malformed data link offer: {e}") from e
    if not 0 < port < 65536 or len(address) > 255:
        raise ProtocolError("malformed data link offer")
    ctx = me.context(False, peer)
    raw = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    try:
        raw.settimeout(HANDSHAKE_TIMEOUT)
        reader = LinkReader(raw, ctx)
        reader.handshake()
    except ssl.SSLError as e:
        raw.close()
        raise ProtocolError(f"the data link's TLS handshake failed: {e.reason or e}") from e
    except BaseException:
        raw.close()
        raise
    if not _pinned(reader.tls, peer):  # the CA check already held; this is the pin itself
        raw.close()
        raise ProtocolError("the data link's peer showed another certificate than the "
                            "one offered through SSH")
    raw.settimeout(None)
    _tune(raw)
    return reader


class LinkReader:
    """Reads the TLS connection: a ``Reader`` for the frame parser. Each call returns
    exactly ``n`` bytes (the frame parser asks only for bytes its frames promised) or fewer
    only at the end of the stream; TLS errors become ``ProtocolError``.

    TLS runs over memory buffers here too, as on the sending side: the socket is read a
    megabyte at a time and OpenSSL opens the records from memory, instead of two small
    reads of the socket per 16 KiB record (which capped the receiver's rate)."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = raw
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=False)
        self._buf = bytearray(RECV_CHUNK)
        self.received = 0

    def _flush(self) -> None:
        out = self._out.read()
        if out:
            self.sock.sendall(out)

    def _fill(self) -> None:
        """More ciphertext from the socket into OpenSSL's buffer (EOF marked as such)."""
        k = self.sock.recv_into(self._buf)
        if k:
            self._in.write(memoryview(self._buf)[:k])
        else:
            self._in.write_eof()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if self._in.eof:
                    raise ssl.SSLEOFError("the sender closed during the handshake") from None
                self._fill()
                continue
            self._flush()
            return

    def __call__(self, n: int) -> memoryview:
        buf = bytearray(n)  # a buffer per call: pieces handed out stay valid
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                try:
                    k = cast(int, self.tls.read(n - got, view[got:]))  # into the buffer
                except ssl.SSLWantReadError:
                    self._flush()  # TLS 1.3 may answer post-handshake messages
                    if self._in.eof:
                        raise ssl.SSLEOFError("EOF without close_notify") from None
                    self._fill()
                    continue
                except ssl.SSLZeroReturnError:
                    break  # close_notify: the end; the frame parser says if it was early
                if not k:
                    break
                got += k
        except ssl.SSLEOFError as e:
            raise ProtocolError("the data link was cut (no TLS close_notify)",
                                "the peer or the network went away; nothing was "
                                "committed") from e
        except ssl.SSLError as e:
            raise ProtocolError(f"the data link failed TLS checks: {e.reason or e}",
                                "the data was changed on the way; nothing was committed") \
                from e
        except OSError as e:
            raise ProtocolError(f"the data link failed: {e}",
                                "the peer or the network went away; nothing was "
                                "committed") from e
        self.received += got
        return view[:got]

    def close(self) -> None:
        self.sock.close()
