"""The SSH transport (paramiko): one connection per remote host, one channel per request.

Host keys are checked against the state root's ``known_hosts``; an unknown key is refused
with its SHA-256 fingerprint shown, and only recorded when the caller explicitly accepts it
(``--accept-host-key``, ``migrate host trust``). A changed key is always refused. The
connection gets keepalives and bigger windows than paramiko's default (2 MiB), which
limit throughput on fast links. Each request runs ``migrate --root R agent`` on its own
exec channel; the argv is quoted with ``shlex.join`` because sshd hands exec requests to
the login shell, and the agent validates everything it receives again.

Throughput: AES-GCM is preferred (no separate HMAC pass; ~20% more throughput in paramiko
than aes128-ctr + hmac-sha2-256 here). Even so an upload through paramiko is bound by the
Python work per SSH packet (sshd allows 32 KiB per packet on a session channel): about
200 MB/s on one core here, against about 250-300 MB/s for OpenSSH's own client. With
``fast_link=True`` the upload's frames go over a direct TCP connection instead, inside
TLS 1.3 whose two ephemeral certificates are exchanged and pinned through the channel
(``link.py``). When that connection cannot be made the channel carries them, and this
process remembers it for that host (``link_failed``): later transfers of the same run do
not wait for a link again, and the pipelines note it in the operation's log.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import shlex
import socket
import threading
from pathlib import Path
from typing import Any

import paramiko

from migrator.core import errors
from migrator.core.netns import socket_in_netns
from migrator.streams import ProgressMeter, Stream
from migrator.transport import link as tls
from migrator.transport.base import CallHandler, EventHandler
from migrator.transport.datapath import send_frames
from migrator.transport.frames import (
    PROTOCOL,
    ProtocolError,
    read_json,
    write_json,
    write_link,
)
from migrator.transport.replies import clean_event, clean_text, parse_reply, remote_error

log = logging.getLogger(__name__)

# hosts whose direct data link failed in this process (see ``SshTransport.link_failed``)
_LINK_FAILED: dict[tuple[str, str, str, int], str] = {}
WINDOW = 64 << 20
MAX_PACKET = 32768
KEEPALIVE = 15
CONNECT_TIMEOUT = 15.0
# tried first when the server offers them (paramiko's own order starts with aes*-ctr)
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
EARLY_REPLY_WAIT = 30.0  # seconds for the agent's error after the fast link broke


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _Remember(paramiko.MissingHostKeyPolicy):
    """Refuse unknown keys, but remember the key so the error can show it (or accept it)."""

    def __init__(self, accept: bool, expect: str | None = None) -> None:
        self.accept = accept
        self.expect = expect  # accept only the key with this fingerprint
        self.seen: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        self.seen = key
        if not self.accept or (self.expect and fingerprint(key) != self.expect):
            raise paramiko.SSHException(f"unknown host key for {hostname}")
        client.get_host_keys().add(hostname, key.get_name(), key)


#: requests with a data stream whose agent may serve another request after a successful
#: reply: their receiver reads the stream to its END trailer before it answers
#: (``streams.receive_with``), so nothing of it is left on the channel
SESSION_STREAMS = frozenset({"receive", "receive_images"})


def session_goes_on(asked: bool, reply: dict[str, Any]) -> bool:
    """Whether the agent that sent ``reply`` waits for another request on its channel: only
    when this end asked (``asked``), the reply is a success and it says so with ``true``
    itself. The marker is taken out of the reply (it is the transport's, not the op's)."""
    said = reply.pop("session", None)
    return asked and said is True and reply.get("ok") is True


class SshTransport:
    """A connection to one inventory host's agent."""

    def __init__(self, name: str, address: str, port: int = 22, user: str = "root",
                 key: str | None = None, remote_root: str | None = None,
                 command: str | None = None, known_hosts: Path | None = None,
                 netns: str | None = None, accept_host_key: bool = False,
                 timeout: float = CONNECT_TIMEOUT, fast_link: bool = False,
                 expect_fingerprint: str | None = None) -> None:
        self.name = name
        self.expect_fingerprint = expect_fingerprint  # with accept: only this key
        self.address, self.port, self.user, self.key = address, port, user, key
        self.remote_root = remote_root
        self.command = command or "migrate"
        self.known_hosts = known_hosts
        self.netns = netns
        self.accept_host_key = accept_host_key
        self.timeout = timeout
        self.fast_link = fast_link  # uploads over a direct TCP link (link.py), opt-in
        self.data_link = "tcp" if fast_link else "ssh"  # the inventory's setting (auto/tcp/ssh)
        self.link_rate: float | None = None  # bytes/s measured by `host check`, if known
        self.last_link = ""  # what carried the last upload: "channel" or "tcp"
        self.client: paramiko.SSHClient | None = None
        self._warm: list[Any] = []  # agents started ahead of their request (warm())
        self._keep_warm = 0  # how many warm() asked to keep ready
        self._warm_lock = threading.Lock()  # a request may run beside another (live.py)
        self.last_raw = self.last_wire = 0  # bytes of the last upload: produced, on the wire

    # connection ---------------------------------------------------------------------------
    def _socket(self) -> socket.socket:
        return connect_tcp(f"{self.name} at {self.address}:{self.port}", self.address,
                           self.port, self.netns, self.timeout, "is the host up and sshd "
                           "listening? check the address with `migrate host list`")

    def connect(self) -> SshTransport:
        if self.client is not None:
            return self
        self.client = open_client(self.name, self.address, self.port, self.user, self.key,
                                  self._socket(), self.known_hosts, self.accept_host_key,
                                  self.timeout, expect_fingerprint=self.expect_fingerprint)
        return self

    def connection(self) -> paramiko.Transport:
        """The open SSH connection (connecting first if need be), whose channels carry the
        requests and, in a post-copy live migration, the page stream's forward."""
        self.connect()
        assert self.client is not None
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise errors.NetworkError(f"the connection to {self.name} is closed")
        return transport

    def host_key(self) -> str:
        self.connect()
        assert self.client is not None
        transport = self.client.get_transport()
        assert transport is not None
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {fingerprint(key)}"

    def close(self) -> None:
        self._warm = []  # their channels close with the connection
        self._keep_warm = 0
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> SshTransport:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # requests -----------------------------------------------------------------------------
    @staticmethod
    def _early_reply(chan: paramiko.Channel) -> dict[str, Any] | None:
        try:
            reply = read_json(chan.recv)
        except (ProtocolError, OSError, EOFError):
            return None
        return reply if not reply.get("ok") else None

    @property
    def link_failed(self) -> str:
        """Why the direct data link to this host failed in this process ("" if it did
        not): then no link is offered again and the channel carries the data."""
        return _LINK_FAILED.get(self._link_key(), "")

    @link_failed.setter
    def link_failed(self, why: str) -> None:
        if why:
            _LINK_FAILED[self._link_key()] = why
        else:
            _LINK_FAILED.pop(self._link_key(), None)

    def _link_key(self) -> tuple[str, str, str, int]:
        return (self.netns or "", self.name, self.address, self.port)

    def _offer_link(self, transport: paramiko.Transport, chan: paramiko.Channel
                    ) -> tuple[Any, dict[str, Any] | None]:
        """Offer the agent a fast data link (``link.py``): (the link or None, the agent's
        error reply if it sent one instead of its answer). Without a link the frames go on
        the channel, and a host whose link failed is not offered one again."""
        if self.link_failed:
            return None, None

        try:  # on the address the SSH connection leaves from: the host can reach it
            offer = tls.LinkOffer(transport.sock.getsockname()[0], self.netns)
        except OSError as e:
            self._link_down(f"cannot listen for the data link: {e}")
            return None, None
        link = None
        try:
            write_link(chan.sendall, offer.describe())
            answer = self._link_answer(chan, tls.ACCEPT_WAIT)
            if answer is None:
                self._link_down(f"{self.name} did not answer the data link offer within "
                                f"{tls.ACCEPT_WAIT:.0f}s")
                return None, None
            if "event" not in answer:
                return None, answer  # the agent's reply (an error) came instead
            if answer.get("error") or not answer.get("cert"):
                self._link_down(f"{self.name} could not make the data link: "
                                f"{clean_text(str(answer.get('error')))}")
                return None, None
            link = offer.accept(tls.decode_cert(answer["cert"]), tls.ACCEPT_WAIT,
                                give_up=lambda: chan.recv_ready() or chan.exit_status_ready()
                                or chan.closed)
        finally:
            offer.close()
            if offer.dropped:
                log.warning("%s: dropped %d connection(s) to the data link that were not "
                            "its agent (no TLS, a wrong certificate, or silent)",
                            self.name, offer.dropped)
        if link is None:
            why = (f"{self.name} did not connect back to {offer.address}:{offer.port} "
                   f"within {tls.ACCEPT_WAIT:.0f}s")
            if chan.recv_ready():  # the agent gave up first: its reason, or its error
                answer = self._link_answer(chan, tls.ACCEPT_WAIT)
                if answer is not None and "event" not in answer:
                    return None, answer
                if answer is not None and answer.get("error"):
                    why = f"{self.name} could not make the data link: " \
                          f"{clean_text(str(answer['error']))}"
            self._link_down(why)
        return link, None

    def _link_answer(self, chan: paramiko.Channel, wait: float) -> dict[str, Any] | None:
        """The agent's next message about the link (an event), or its reply, or None
        when nothing came within ``wait`` seconds."""
        chan.settimeout(wait)
        try:
            msg = read_json(chan.recv)
        except TimeoutError:
            return None
        finally:
            chan.settimeout(None)
        if "event" in msg and msg.get("event") != "link":
            raise ProtocolError(f"{self.name} sent {str(msg.get('event'))[:40]!r} where a "
                                "data link answer belongs")
        return msg

    def _link_down(self, why: str) -> None:
        self.link_failed = why
        log.warning("%s; using the SSH channel for %s from now on", why, self.name)

    def _open_agent(self, transport: paramiko.Transport) -> Any:
        """A new channel running the agent (which starts, then waits for its request)."""
        try:
            chan = transport.open_session(timeout=self.timeout)
            chan.exec_command(shlex.join(self.agent_argv()))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise errors.NetworkError(f"cannot open a channel to {self.name}: {e}",
                                      "the connection dropped; retry") from e
        return chan

    def warm(self, n: int) -> None:
        """Keep ``n`` agents started ahead of the requests to come, from now until ``close``.

        Each agent costs ~0.3 s to start (sshd's session, Python and its imports): paid
        inside every request, that is most of a short request's time, and a live migration
        must not spend it while the container is down. A warm agent just waits for its
        request on stdin; each request that takes one starts its successor at once, so the
        start-up overlaps the request before it."""
        self._keep_warm = max(self._keep_warm, n)
        self._top_up()

    def _top_up(self) -> None:
        transport = self.connection()
        with self._warm_lock:
            while len(self._warm) < self._keep_warm:
                self._warm.append(self._open_agent(transport))

    def _take_agent(self, transport: paramiko.Transport) -> Any:
        """A warm agent when there is one (then its successor is started), else a new one."""
        with self._warm_lock:
            chan = None
            while self._warm and chan is None:
                chan = self._warm.pop(0)
                if chan.closed or chan.exit_status_ready() or chan.eof_received:
                    chan.close()  # its agent ended while it waited (killed, restarted)
                    chan = None
        if chan is None:
            return self._open_agent(transport)
        if len(self._warm) < self._keep_warm - 1:
            self._top_up()  # else after the request, if it used its agent up (``request``)
        return chan

    def _replace_used(self) -> None:
        """A request ended its agent: start its successor now that the request is over (not
        while it ran: a migration's requests run while the container is down, and a Python
        starting beside them slows them)."""
        if self._keep_warm and self.client is not None:
            with contextlib.suppress(errors.NetworkError):
                self._top_up()

    def agent_argv(self) -> list[str]:
        argv = [*shlex.split(self.command)]
        if self.remote_root:
            argv += ["--root", self.remote_root]
        return [*argv, "agent"]

    def open_raw(self, op: str, args: dict[str, Any]) -> Any:
        """Start a request whose channel then carries another protocol (``rsync_receive``):
        the agent's "ready" reply is read here, the open channel is returned."""
        transport = self.connection()
        chan = self._take_agent(transport)
        self._replace_used()  # this one goes to another protocol for good
        try:
            write_json(chan.sendall, {"op": op, "protocol": PROTOCOL, **args})
            reply = read_json(chan.recv)
        except (OSError, EOFError, ProtocolError, paramiko.SSHException) as e:
            chan.close()
            raise errors.NetworkError(f"{self.name} closed the channel during {op!r}: {e}",
                                      "the agent or the link died; retry") from e
        if reply.get("ok") is not True:
            chan.close()
            raise remote_error(self.name, reply.get("error"))
        return chan

    def request(self, op: str, args: dict[str, Any] | None = None, stream: Stream | None = None,
                compress: str = "none", meter: ProgressMeter | None = None,
                on_event: EventHandler | None = None, on_call: CallHandler | None = None
                ) -> dict[str, Any]:
        """Run one agent request (with a volume stream to upload, if given); its reply.

        A long request may report events before its reply (``{"event": ...}`` messages,
        e.g. "restored" while post-copy pages still flow): each goes to ``on_event``. A
        pull sends requests back (``{"call": ...}``, see ``reverse.py``): ``on_call`` serves
        each with the channel's reader and writer."""
        transport = self.connection()
        chan = self._take_agent(transport)
        # a request with no calls back, and no stream or one whose receiver reads it to
        # its trailer, leaves the agent in a known state: it may serve the next request
        # too (see ``agent.py``)
        session = on_call is None and (stream is None or op in SESSION_STREAMS)
        keep = False
        try:
            write_json(chan.sendall, {"op": op, "protocol": PROTOCOL,
                                      **({"session": True} if session else {}),
                                      **(args or {})})
            if stream is not None:
                link, early = self._offer_link(transport, chan) if self.fast_link \
                    else (None, None)
                if early is not None:  # the agent refused before the data: say why
                    stream.kill()
                    return parse_reply(self.name, op, early)
                self.last_link = "channel" if link is None else "tcp"
                try:
                    self.last_raw, self.last_wire = send_frames(
                        stream, chan.sendall if link is None else link, compress, meter)
                except (OSError, EOFError) as e:
                    # the agent stopped reading: its reply (an error) says why
                    if link is not None:  # the channel is still open: do not wait forever
                        chan.settimeout(EARLY_REPLY_WAIT)
                    reply = self._early_reply(chan)
                    if reply is None:
                        raise
                    stream.kill()
                    raise remote_error(self.name, reply.get("error") or {}) from e
                finally:
                    if link is not None:
                        link.close()
            try:
                reply = read_json(chan.recv)
                while ("event" in reply or "call" in reply) and "ok" not in reply:
                    if "call" in reply:
                        if on_call is None:
                            raise ProtocolError(f"{self.name} sent an unexpected call")
                        on_call(reply, chan.recv, chan.sendall)
                    elif on_event is not None:
                        on_event(clean_event(reply))  # shown: no escape sequences
                    reply = read_json(chan.recv)
                keep = session_goes_on(session, reply)
            except ProtocolError as e:
                # the exit status may arrive just after the EOF: give it a moment
                status = chan.exit_status if chan.status_event.wait(5) else None
                if status == 127:
                    raise errors.MissingDependency(
                        f"the migrate program is not installed on {self.name} "
                        f"({self.command!r} not found)",
                        "install the same version there, or set its path: "
                        "`migrate host add ... --command /path/to/migrate`") from e
                raise errors.NetworkError(
                    f"{self.name} closed the channel during {op!r}: {e.message}",
                    "the agent or the link died; the source is untouched, retry when "
                    "the link is back") from e
        except (OSError, EOFError) as e:
            raise errors.NetworkError(
                f"the connection to {self.name} broke during {op!r}: {e or type(e).__name__}",
                "the source is untouched; `migrate recover` cleans up the far side once it is "
                "reachable, then retry") from e
        except paramiko.SSHException as e:
            raise errors.NetworkError(f"SSH error talking to {self.name}: {e}") from e
        finally:
            if not keep:
                chan.close()
                self._replace_used()
        try:
            parsed = parse_reply(self.name, op, reply)  # checked before anything reads it
        except BaseException:
            chan.close()
            raise
        if keep:
            self._give_back(chan)
        return parsed

    def _give_back(self, chan: Any) -> None:
        """An agent whose session goes on (its reply said so) waits for the next request:
        first in line, as it is surely ready (a warm one may still be starting)."""
        with self._warm_lock:
            if self.client is not None and not chan.closed and not chan.exit_status_ready():
                self._warm.insert(0, chan)
                return
        chan.close()


def connect_tcp(what: str, address: str, port: int, netns: str | None, timeout: float,
                hint: str) -> socket.socket:
    """The TCP connection an SSH session runs on, made from ``netns`` when given (the
    host's namespace, so a test host or a demo reaches only its own link); a failure is a
    ``NetworkError`` naming ``what`` with ``hint``."""
    try:
        if netns:
            return socket_in_netns(netns, (address, port), timeout)
        return socket.create_connection((address, port), timeout)
    except OSError as e:
        raise errors.NetworkError(f"cannot reach {what}: {e.strerror or e}", hint) from e


def open_client(label: str, address: str, port: int, user: str, key: str | None,
                sock: socket.socket, known_hosts: Path | None, accept_host_key: bool,
                timeout: float = CONNECT_TIMEOUT, password: str | None = None,
                trust_hint: str | None = None,
                expect_fingerprint: str | None = None) -> paramiko.SSHClient:
    """An authenticated paramiko client on ``sock``, the host key checked against
    ``known_hosts``: a changed key is refused, an unknown one refused with its fingerprint
    unless ``accept_host_key`` (then recorded). With ``expect_fingerprint`` the key must
    also have that SHA-256 fingerprint, the one the operator checked on the host; any other
    is refused with both shown and nothing recorded. Used for agents and p2c sources."""
    client = paramiko.SSHClient()
    hostkey_name = address if port == 22 else f"[{address}]:{port}"
    if known_hosts and known_hosts.exists():
        client.load_host_keys(str(known_hosts))
    policy = _Remember(accept_host_key, expect_fingerprint)
    client.set_missing_host_key_policy(policy)

    def transport_factory(s: Any, **kw: Any) -> paramiko.Transport:
        t = paramiko.Transport(s, default_window_size=WINDOW,
                               default_max_packet_size=MAX_PACKET, **kw)
        opts = t.get_security_options()
        have = tuple(opts.ciphers)
        opts.ciphers = tuple(c for c in CIPHERS if c in have) + \
            tuple(c for c in have if c not in CIPHERS)
        return t

    try:
        client.connect(
            address, port, username=user, key_filename=key, password=password,
            sock=sock, timeout=timeout, banner_timeout=timeout,
            auth_timeout=timeout, allow_agent=key is None and password is None,
            look_for_keys=key is None and password is None,
            transport_factory=transport_factory,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        sock.close()
        raise errors.HostKeyError(
            f"the SSH key of {label} ({address}) CHANGED: it is now "
            f"{fingerprint(e.key)}, the recorded one is {fingerprint(e.expected_key)}",
            "someone may be intercepting the connection; if the host was reinstalled, "
            "remove its line from the known_hosts file and trust it again",
        ) from e
    except paramiko.AuthenticationException as e:
        client.close()
        sock.close()
        raise errors.AuthenticationFailed(
            f"{user}@{address} refused our login: {e}",
            "check the user and the key (--key) and that its public half is in "
            f"~{user}/.ssh/authorized_keys there") from e
    except paramiko.SSHException as e:
        client.close()
        sock.close()
        if policy.seen is not None and expect_fingerprint and \
                fingerprint(policy.seen) != expect_fingerprint:
            raise _wrong_key(label, address, policy.seen, expect_fingerprint) from e
        if policy.seen is not None and not accept_host_key:
            raise errors.HostKeyError(
                f"the SSH key of {label} ({address}) is unknown: "
                f"{policy.seen.get_name()} {fingerprint(policy.seen)}",
                trust_hint or f"check the fingerprint on the host, then `migrate host "
                f"trust {label}` or pass --accept-host-key",
            ) from e
        raise errors.NetworkError(f"SSH to {label} failed: {e}",
                                  "check the user and key in `migrator host list`") from e
    except OSError as e:
        client.close()
        sock.close()
        raise errors.NetworkError(f"SSH to {label} failed: {e}") from e
    transport = client.get_transport()
    assert transport is not None
    server_key = transport.get_remote_server_key()
    if expect_fingerprint and fingerprint(server_key) != expect_fingerprint:
        client.close()  # a key already in known_hosts, but not the one the operator named
        sock.close()
        raise _wrong_key(label, address, server_key, expect_fingerprint)
    if policy.seen is not None and accept_host_key and known_hosts:
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        keys = paramiko.HostKeys()
        if known_hosts.exists():
            keys.load(str(known_hosts))
        keys.add(hostkey_name, policy.seen.get_name(), policy.seen)
        keys.save(str(known_hosts))
        known_hosts.chmod(0o600)
    transport.set_keepalive(KEEPALIVE)
    return client


def _wrong_key(label: str, address: str, key: paramiko.PKey,
               expected: str) -> errors.HostKeyError:
    return errors.HostKeyError(
        f"the SSH key of {label} ({address}) is {key.get_name()} {fingerprint(key)}, not "
        f"the expected {expected}: refused, nothing recorded",
        "compare with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` run on the host "
        "itself; a different key may mean someone is intercepting the connection")
