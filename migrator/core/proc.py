"""The one subprocess wrapper: argv lists only, a timeout, stderr kept, typed errors.

Every external command the project runs goes through ``run`` (or ``spawn`` for a process
that must be streamed). Commands for a host that lives in a network namespace are prefixed
with the namespace entry helper (``runtime/nsexec.py``), so callers never build that
prefix themselves and nothing ever goes through a shell.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrator.core.errors import CommandFailed, CommandTimeout, MissingDependency

log = logging.getLogger(__name__)

NSEXEC = Path(__file__).resolve().parent.parent / "runtime" / "nsexec.py"

# Generous default: most commands finish in well under a second; debootstrap and big copies
# pass their own timeout (or None).
DEFAULT_TIMEOUT = 120.0


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
) -> Completed:
    """Run ``argv`` to completion; raise ``CommandFailed`` on a non-zero exit when ``check``."""
    full = netns_prefix(netns) + [str(a) for a in argv]
    log.debug("run: %s", full)
    text = not isinstance(input, bytes)
    run_env = None
    if env is not None:
        run_env = dict(os.environ)
        run_env.update(env)
    try:
        cp = subprocess.run(
            full,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout,
            text=text,
            env=run_env,
            cwd=cwd,
            close_fds=True,
        )
    except FileNotFoundError as e:
        raise MissingDependency(f"required tool {argv[0]!r} is not installed") from e
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
    try:
        return subprocess.run(full, close_fds=True).returncode
    except FileNotFoundError as e:
        raise MissingDependency(f"required tool {argv[0]!r} is not installed") from e


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    output: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background (stdin closed, stdout+stderr to ``output`` or
    discarded, no inherited descriptors but ``pass_fds``); the caller owns, waits for and
    reaps the process.

    For daemons and long commands that must run beside the caller (CRIU's page server and
    lazy-pages daemon). Output goes to a file, never a pipe: ``lxc-checkpoint`` keeps its
    stdout open in the restored container, so a pipe would never see EOF.
    """
    full = netns_prefix(netns) + [str(a) for a in argv]
    log.debug("spawn: %s", full)
    run_env = None
    if env is not None:
        run_env = dict(os.environ)
        run_env.update(env)
    out = open(output, "ab") if output is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=run_env, close_fds=True, start_new_session=True, pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise MissingDependency(f"required tool {argv[0]!r} is not installed") from e
    finally:
        if output is not None and not isinstance(out, int):
            out.close()


def spawn_piped(argv: Sequence[str], *, netns: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with pipes on stdin, stdout and stderr (no inherited descriptors, own
    session); the caller streams through them, waits for and reaps the process. For a
    program that is one end of a byte protocol (OpenSSH carrying rsync's,
    ``migrator.p2c.source``)."""
    full = netns_prefix(netns) + [str(a) for a in argv]
    log.debug("spawn (piped): %s", full)
    try:
        return subprocess.Popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True,
                                start_new_session=True)
    except FileNotFoundError as e:
        raise MissingDependency(f"required tool {argv[0]!r} is not installed") from e
