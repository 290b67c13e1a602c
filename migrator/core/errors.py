"""One error hierarchy for the whole project.

Every error a user can meet is a ``MigratorError`` subclass carrying a distinct exit code and
a hint. Only ``migrator.cli.main`` turns them into exit codes; library code just raises.
``retryable`` separates what may succeed on a second try (a lost connection) from what will
not (bad input, no space): pipelines decide retry and rollback on it.

``ALL_ERRORS`` is the table of exit codes, one class per code. A refinement that belongs to
one subject is defined beside it and keeps its parent's code (``ConfigRefused`` in
``runtime/config.py`` exits as ``InvalidInput``); :func:`error_classes` finds every class,
refinements too, by walking the subclasses, so this floor imports nothing above it. The wire
(``transport/replies.py``) turns a far side's error back into its class through it.
"""

from __future__ import annotations


class MigratorError(Exception):
    """Base of every error the tool reports to a user."""

    exit_code = 1
    retryable = False
    hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidInput(MigratorError):
    """A name, value or argument that can never be valid."""

    exit_code = 3


class NotFound(MigratorError):
    """A container, pool, image, snapshot or host that does not exist."""

    exit_code = 4


class AlreadyExists(MigratorError):
    """Creating something whose name is taken."""

    exit_code = 5


class InvalidState(MigratorError):
    """The object exists but is in the wrong state (running when it must be stopped...)."""

    exit_code = 6


class Protected(MigratorError):
    """A protection setting refuses the operation."""

    exit_code = 7


class CommandFailed(MigratorError):
    """An external command (lxc-*, btrfs, debootstrap...) exited non-zero."""

    exit_code = 8

    def __init__(
        self, argv: list[str], returncode: int, stderr: str, hint: str | None = None
    ) -> None:
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\n  " + "\n  ".join(tail)) if tail else ""
        super().__init__(f"command {argv[0]!r} failed with exit code {returncode}{detail}", hint)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class CommandTimeout(MigratorError):
    """An external command did not finish in time."""

    exit_code = 9
    retryable = True


class MissingDependency(MigratorError):
    """A required system tool or kernel feature is absent."""

    exit_code = 10
    hint = "run `make setup` (scripts/setup-host.sh) as root to install what the tool needs"


class StorageError(MigratorError):
    """A storage pool operation failed (mount, subvolume, copy)."""

    exit_code = 11


class NoSpace(StorageError):
    """The target has not enough free space."""

    exit_code = 12
    hint = "free space on the pool or grow it, then retry"


class ContainerError(MigratorError):
    """LXC failed to start, stop or otherwise drive a container."""

    exit_code = 13


class ImageError(MigratorError):
    """An image could not be built, read or is malformed."""

    exit_code = 14


class StateStoreError(MigratorError):
    """The state database is unreadable, locked or from a newer version."""

    exit_code = 15


class NetworkError(MigratorError):
    """Bridge, namespace or address allocation failed; a connection failed or dropped."""

    exit_code = 16


class AuthenticationFailed(NetworkError):
    """The SSH server refused our login (wrong user, key or password)."""

    exit_code = 24


class HostKeyError(MigratorError):
    """A remote host's SSH key is unknown or does not match the one on record."""

    exit_code = 17


class RemoteError(MigratorError):
    """The agent on the other host failed; the message is its own."""

    exit_code = 18


class CheckpointError(MigratorError):
    """CRIU could not checkpoint, restore or serve the pages of a container."""

    exit_code = 19
    hint = (
        "read the CRIU log named in the message; the container's tasks on the source are "
        "kept stopped, not killed, until the target runs, so a rollback thaws them"
    )


class BackupError(MigratorError):
    """A backup repository or backup cannot be used (locked, missing part, wrong format)."""

    exit_code = 20


class CorruptBackup(BackupError):
    """A backup's bytes do not match its index: flipped, truncated or missing parts."""

    exit_code = 21
    hint = "`migrate backup verify --all` lists every damaged backup; restore an older one"


class UnsafeArchive(BackupError):
    """An archive holds a member that would escape or abuse the target (``..``, absolute
    paths, links out of the rootfs, device nodes in an unprivileged container)."""

    exit_code = 22
    hint = "the archive was refused before anything was written; do not trust its source"


class JobsFailed(MigratorError):
    """Some scheduled jobs failed; the others ran (each failure is listed)."""

    exit_code = 23
    hint = "`migrate schedule status` shows each job's last error"


class ImportsFailed(MigratorError):
    """Some containers of a batch import (``import-lxc --all``) failed; the others were
    imported (each failure is listed)."""

    exit_code = 25
    hint = "fix each listed container and import it by name"


class CallRefused(MigratorError):
    """A call from another host that the operation in progress does not allow: during a
    pull, a call aimed at anything but the container being pulled (``transport/reverse``)."""

    exit_code = 26
    hint = ("the operation was stopped and what it had written here was removed; the other "
            "host does not behave like a migrate agent: do not trust it")


#: one class per exit code (``migrate --help`` lists them); refinements are not here
ALL_ERRORS: tuple[type[MigratorError], ...] = (
    MigratorError,
    InvalidInput,
    NotFound,
    AlreadyExists,
    InvalidState,
    Protected,
    CommandFailed,
    CommandTimeout,
    MissingDependency,
    StorageError,
    NoSpace,
    ContainerError,
    ImageError,
    StateStoreError,
    NetworkError,
    AuthenticationFailed,
    HostKeyError,
    RemoteError,
    CheckpointError,
    BackupError,
    CorruptBackup,
    UnsafeArchive,
    JobsFailed,
    ImportsFailed,
    CallRefused,
)


def error_classes() -> dict[str, type[MigratorError]]:
    """Every error class this process has loaded, by name: ``ALL_ERRORS`` and the refinements
    defined beside their subject (which share their parent's exit code). Names are unique in
    the tree (``tests/unit/test_errors.py`` checks it), so a name from the far side means one
    class."""
    found: dict[str, type[MigratorError]] = {}
    todo: list[type[MigratorError]] = [MigratorError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found
