"""Sockets opened inside another network namespace, without moving the calling thread.

A host may live in a network namespace (all test hosts do), so reaching its sshd means
connecting from inside that namespace. ``setns(CLONE_NEWNET)`` changes only the calling
*thread*, and, unlike joining a mount or user namespace, it is allowed in a multi-threaded
process. So the work is done in a short-lived worker thread that enters the namespace, runs
one function (create and connect a socket) and exits. A socket keeps the namespace it was
created in for its whole life, so any thread may use it afterwards, e.g. as ``sock=`` for
``paramiko.SSHClient.connect``. The caller's own thread never changes namespace.

Needs CAP_SYS_ADMIN (root). Errors are plain ``OSError``s, as from ``socket`` itself.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """``/run/netns/NAME``, the bind mount ``ip netns add`` makes; refuses path tricks."""
    if not netns or "/" in netns or netns in (".", ".."):
        raise ValueError(f"invalid network namespace name {netns!r}")
    return os.path.join(NETNS_DIR, netns)


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a new thread that has joined ``netns``; return its result or raise."""
    path = netns_path(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # FileNotFoundError: no such namespace
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into network namespace {netns!r}: {os.strerror(err)}")
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            error.append(e)

    try:
        t = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if error:
        raise error[0]
    return result[0]


def socket_in_netns(
    netns: str, address: tuple[str, int], timeout: float | None = None
) -> socket.socket:
    """A TCP socket connected to ``address`` from inside ``netns``.

    ``timeout`` bounds the connect only; the socket is returned in blocking mode (callers
    such as paramiko set their own timeouts).
    """

    def connect() -> socket.socket:
        s = socket.create_connection(address, timeout=timeout)
        s.settimeout(None)
        return s

    return call_in_netns(netns, connect)
