"""The machine being converted, reached over SSH: nothing is installed there.

``user@machine[:port]`` is validated once into a ``SourceSpec``. The connection is the same
host-key-checked paramiko client as every other (``migrator.transport.ssh.open_client``: an
unknown key is refused showing its fingerprint unless accepted, a changed key always). Every
command runs on its own exec channel; sshd hands an exec request to the login shell, so the
argv is joined with ``shlex.join`` (each argument quoted) and never holds shell syntax of
ours. Only tools a Debian/RHEL base system has are used: cat, readlink, du, ls, ip, rsync
(or tar).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from migrator.core import errors, proc
from migrator.transport.ssh import CONNECT_TIMEOUT, connect_tcp, open_client

_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
TRUST_HINT = ("compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the "
              "machine, then run again with --accept-host-key")
NOT_FOUND = 127  # a POSIX shell's status for a command that does not exist
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceSpec:
    """``user@machine[:port]``, checked: a user name, a host name or IPv4 address, a port."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        user, at, rest = text.rpartition("@")
        if not at:
            user, rest = "root", text
        host, colon, port_s = rest.partition(":")
        if not _USER.match(user):
            raise errors.InvalidInput(f"invalid user name {user!r} in {text!r}",
                                      "write the source as user@machine[:port]")
        if not host or not _HOST.match(host):
            raise errors.InvalidInput(f"invalid machine name {host!r} in {text!r}",
                                      "write the source as user@machine[:port]")
        port = 22
        if colon:
            if not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise errors.InvalidInput(f"invalid port {port_s!r} in {text!r}")
            port = int(port_s)
        return cls(user, host, port)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


class SourceMachine:
    """An SSH connection to the machine being converted."""

    def __init__(self, spec: SourceSpec, key: str | None, known_hosts: Path,
                 accept_host_key: bool = False, netns: str | None = None,
                 password: str | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
        self.spec = spec
        self.key, self.password = key, password
        self.known_hosts = known_hosts
        self.accept_host_key = accept_host_key
        self.netns = netns
        self.timeout = timeout
        self.client: paramiko.SSHClient | None = None

    def _socket(self) -> socket.socket:
        return connect_tcp(f"{self.spec.host}:{self.spec.port}", self.spec.host,
                           self.spec.port, self.netns, self.timeout,
                           "is the machine up and its sshd listening?")

    def connect(self) -> SourceMachine:
        if self.client is None:
            self.client = open_client(str(self.spec), self.spec.host, self.spec.port,
                                      self.spec.user, self.key, self._socket(),
                                      self.known_hosts, self.accept_host_key, self.timeout,
                                      self.password, TRUST_HINT)
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> SourceMachine:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_exec(self, argv: list[str]) -> Any:
        """An exec channel running ``argv`` (each argument quoted for the login shell)."""
        self.connect()
        assert self.client is not None
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise errors.NetworkError(f"the connection to {self.spec} is closed")
        try:
            chan = transport.open_session(timeout=self.timeout)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise errors.NetworkError(f"cannot run {argv[0]!r} on {self.spec}: {e}",
                                      "the connection dropped; retry") from e
        return chan

    def open_bulk(self, argv: list[str]) -> Any:
        """A channel for a bulk byte stream (rsync's): OpenSSH's client when it is here
        and a key (or agent) is used, else a paramiko exec channel like ``open_exec``.

        Why: a relay through paramiko decrypts every 32 KiB packet in Python, and the
        client relays both hops on one core (bench_p2c: ~42 MB/s); ``ssh`` does its half
        in C and this process only copies pipes. The same ``known_hosts`` file decides
        (``StrictHostKeyChecking=yes``; the key was checked by paramiko before), and the
        command is the same quoted string."""
        ssh = shutil.which("ssh")
        if ssh is None or self.password is not None:
            return self.open_exec(argv)
        opts = ["-T", "-x", "-a", "-p", str(self.spec.port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ServerAliveInterval=15",
                "-o", "LogLevel=ERROR"]
        if self.key:
            opts += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        p = proc.spawn_piped([ssh, *opts, "-l", self.spec.user, "--", self.spec.host,
                              shlex.join(argv)], netns=self.netns)
        return PipeChannel(p)

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        """Run ``argv`` there to completion; its status and output (never raises on status)."""
        chan = self.open_exec(argv)
        chan.settimeout(timeout)
        out, err = bytearray(), bytearray()
        try:
            chan.shutdown_write()
            # stderr is buffered by paramiko meanwhile (these commands say little there)
            while data := chan.recv(READ_CHUNK):
                out += data
            while data := chan.recv_stderr(READ_CHUNK):
                err += data
            status = chan.recv_exit_status()
        except (TimeoutError, OSError, paramiko.SSHException) as e:
            raise errors.NetworkError(f"{argv[0]!r} on {self.spec} did not finish: {e}") from e
        finally:
            chan.close()
        return Result(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def read(self, path: str) -> str | None:
        """A small file's text, or None when it cannot be read."""
        r = self.run(["cat", "--", path])
        return r.stdout if r.status == 0 else None

    def has(self, tool: str) -> bool:
        """Whether ``tool`` runs there (``--version`` answers; 127 is "not found")."""
        return self.run([tool, "--version"]).status != NOT_FOUND


class PipeChannel:
    """An ``ssh`` child seen as a channel (``recv``/``sendall``/``shutdown_write``/
    ``recv_exit_status``/``close``, what ``migrator.p2c.pull.relay`` uses of paramiko's)."""

    PIPE_SIZE = 1 << 20

    def __init__(self, p: proc.Child) -> None:
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        self.p = p
        self.stdin, self.stdout = p.stdin.fileno(), p.stdout.fileno()
        for fd in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):  # best effort: fs.pipe-max-size may refuse
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        self.err = bytearray()
        # drained all along: a chatty stderr must never block the child
        self._errs = threading.Thread(target=self._drain_stderr, daemon=True)
        self._errs.start()

    def _drain_stderr(self) -> None:
        assert self.p.stderr is not None
        with contextlib.suppress(OSError):
            while data := os.read(self.p.stderr.fileno(), 65536):
                self.err += data

    def recv(self, n: int) -> bytes:
        return os.read(self.stdout, n)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdin, view):]

    def shutdown_write(self) -> None:
        assert self.p.stdin is not None
        with contextlib.suppress(OSError):
            self.p.stdin.close()

    def recv_exit_status(self) -> int:
        status = self.p.wait()
        self._errs.join(5)
        return status if status >= 0 else 255

    def stderr_text(self) -> str:
        return self.err.decode(errors="replace")

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
