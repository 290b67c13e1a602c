"""The one subprocess wrapper: argv lists only, a timeout, stderr kept, typed errors.

Every external command the project runs goes through here: ``run`` to completion,
``start_process`` (and its shapes ``spawn`` and ``spawn_piped``) for a child that is
streamed or runs beside the caller, ``exec_replace`` for a process that becomes another
program. Commands for a host that lives in a network namespace are prefixed with the
namespace entry helper (``core/nsexec.py``), so callers never build that prefix
themselves and nothing ever goes through a shell; one that only talks to the namespace's
sockets may enter just the network namespace instead (``run(..., mounts=False)``). A
program that is not installed is reported once, here, as ``MissingDependency`` naming it
(``missing_tool``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, TypeAlias

from migrator.core.errors import CommandFailed, CommandTimeout, MissingDependency
from migrator.core.netns import call_in_netns, netns_path

log = logging.getLogger(__name__)

NSEXEC = Path(__file__).resolve().parent / "nsexec.py"

# Generous default: most commands finish in well under a second; debootstrap and big copies
# pass their own timeout (or None).
DEFAULT_TIMEOUT = 120.0

#: a running child process with byte pipes, as ``start_process`` returns it
Child: TypeAlias = "subprocess.Popen[bytes]"
#: what a child's stdin, stdout or stderr may be: ``PIPE``, ``DEVNULL``, ``STDOUT``, a
#: descriptor or an open file
Redirect: TypeAlias = "int | IO[bytes] | None"
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
#: what ``Child.wait(timeout)`` raises when the child is still running
TimeoutExpired = subprocess.TimeoutExpired


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def netns_prefix(netns: str | None) -> list[str]:
    """argv prefix that runs a command inside ``netns`` with a matching /sys and cgroups."""
    if not netns:
        return []
    # -S: skip site import, the helper only needs the standard library (start-up ~15 ms).
    return [sys.executable, "-S", str(NSEXEC), netns, "--"]


def missing_tool(tool: str) -> MissingDependency:
    """The error for a program that is not installed (its class hint says how to install
    what the tool needs)."""
    return MissingDependency(f"required tool {tool!r} is not installed")


@contextlib.contextmanager
def _tool_must_exist(argv: Sequence[str]) -> Iterator[None]:
    """Turn the ``FileNotFoundError`` of starting ``argv`` into ``missing_tool``."""
    try:
        yield
    except FileNotFoundError as e:
        raise missing_tool(str(argv[0])) from e


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """The caller's environment with ``env`` on top (``None``: inherit it unchanged)."""
    if env is None:
        return None
    merged = dict(os.environ)
    merged.update(env)
    return merged


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = True,
    hint: str | None = None,
    cwd: str | Path | None = None,
    mounts: bool = True,
) -> Completed:
    """Run ``argv`` to completion; raise ``CommandFailed`` on a non-zero exit when ``check``.

    ``mounts=False`` enters only ``netns``'s network namespace, not a private mount namespace
    with its /sys and cgroups: enough for a command that only talks to sockets of the
    namespace (``lxc-ls``, ``lxc-info``), and ~15 ms cheaper, because the child is started
    from a thread that joined the namespace (``core/netns.py``) instead of through the
    ``nsexec`` helper, a Python process of its own.
    """
    light = bool(netns) and not mounts
    full = ([] if light else netns_prefix(netns)) + [str(a) for a in argv]
    log.debug("run%s: %s", f" (in netns {netns})" if light else "", full)
    text = not isinstance(input, bytes)

    def start() -> subprocess.CompletedProcess[Any]:
        return subprocess.run(
            full,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout,
            text=text,
            env=_merged_env(env),
            cwd=cwd,
            close_fds=True,
        )

    try:
        if light:
            assert netns
            try:
                cp = call_in_netns(netns, start)
            except FileNotFoundError as e:
                if e.filename != netns_path(netns):
                    raise missing_tool(str(argv[0])) from e
                # what the nsexec helper answers for a namespace that is gone
                gone = f"nsexec: network namespace {netns!r} not found ({e.strerror})\n"
                cp = subprocess.CompletedProcess(full, 125, "", gone)
        else:
            with _tool_must_exist(argv):
                cp = start()
    except subprocess.TimeoutExpired as e:
        raise CommandTimeout(f"command {argv[0]!r} did not finish within {timeout:.0f}s") from e
    out = cp.stdout if isinstance(cp.stdout, str) else (cp.stdout or b"").decode(errors="replace")
    err = cp.stderr if isinstance(cp.stderr, str) else (cp.stderr or b"").decode(errors="replace")
    result = Completed(list(full), cp.returncode, out or "", err or "")
    if check and cp.returncode != 0:
        raise CommandFailed(list(argv), cp.returncode, result.stderr or result.stdout, hint)
    return result


def run_interactive(argv: Sequence[str], *, netns: str | None = None) -> int:
    """Run with the caller's stdin/stdout/stderr (``exec``, ``shell``); return the exit code."""
    full = netns_prefix(netns) + [str(a) for a in argv]
    log.debug("run (interactive): %s", full)
    with _tool_must_exist(argv):
        return subprocess.run(full, close_fds=True).returncode


def start_process(
    argv: Sequence[str],
    *,
    stdin: Redirect = DEVNULL,
    stdout: Redirect = DEVNULL,
    stderr: Redirect = DEVNULL,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
) -> Child:
    """Start ``argv`` with the given stdin, stdout and stderr and no inherited descriptors
    but ``pass_fds``; the caller streams through it, waits for and reaps it.

    ``new_session`` puts the child in a session (and process group) of its own, so that a
    terminal's Ctrl-C reaches only this process, and the child with all it starts can be
    killed as one group.
    """
    full = netns_prefix(netns) + [str(a) for a in argv]
    log.debug("start: %s", full)
    with _tool_must_exist(argv):
        return subprocess.Popen(
            full, stdin=stdin, stdout=stdout, stderr=stderr, env=_merged_env(env), cwd=cwd,
            close_fds=True, start_new_session=new_session, pass_fds=tuple(pass_fds),
        )


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    output: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start ``argv`` in the background (stdin closed, stdout+stderr to ``output`` or
    discarded, no inherited descriptors but ``pass_fds``, a session of its own); the
    caller owns, waits for and reaps the process.

    For daemons and long commands that must run beside the caller (CRIU's page server and
    lazy-pages daemon). Output goes to a file, never a pipe: ``lxc-checkpoint`` keeps its
    stdout open in the restored container, so a pipe would never see EOF.
    """
    if output is None:
        return start_process(argv, stdout=DEVNULL, stderr=STDOUT, netns=netns, env=env,
                             pass_fds=pass_fds, new_session=True)
    with open(output, "ab") as out:
        return start_process(argv, stdout=out, stderr=STDOUT, netns=netns, env=env,
                             pass_fds=pass_fds, new_session=True)


def spawn_piped(argv: Sequence[str], *, netns: str | None = None) -> Child:
    """Start ``argv`` with pipes on stdin, stdout and stderr (no inherited descriptors, own
    session); the caller streams through them, waits for and reaps the process. For a
    program that is one end of a byte protocol (OpenSSH carrying rsync's,
    ``migrator.p2c.source``)."""
    return start_process(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, netns=netns,
                         new_session=True)


def wait_or_kill(child: Child, timeout: float | None = None) -> int:
    """Wait for ``child`` and return its exit code; on any interruption (a timeout, Ctrl-C,
    an error in the caller) kill and reap it first, so that no child outlives its owner."""
    try:
        return child.wait(timeout=timeout)
    except BaseException:
        child.kill()
        child.wait()
        raise


def exec_replace(argv: Sequence[str]) -> NoReturn:
    """Become ``argv`` (``execvp``): this process's descriptors, environment and pid carry
    on in the program, as when the agent hands its SSH channel to ``rsync --server``.
    Returns only by raising (``missing_tool`` for a program that is not installed)."""
    full = [str(a) for a in argv]
    log.debug("exec: %s", full)
    try:
        os.execvp(full[0], full)
    except FileNotFoundError as e:
        raise missing_tool(full[0]) from e
