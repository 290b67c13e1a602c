"""The operations journal: every multi-step pipeline records what it is doing, as it goes.

An operation is ``running`` while its process works, then ``done``, or ``rolled-back`` when
its own undo ran after an error, or ``failed`` when that undo could not finish (the other
host was unreachable). A process that was killed leaves it ``running`` with a PID
that no longer exists: ``migrate recover`` finds it and, from the last stage reached,
rolls it back (before the target was committed) or completes it (after), on both hosts.
Each stage is written before the step it names starts, so the journal never claims more
than was done.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from migrator.runtime.state import OperationRecord, StateStore


def process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_alive(op: OperationRecord) -> bool:
    """Whether the process that runs ``op`` is still alive (same PID *and* start time)."""
    pid, started = op.detail.get("pid"), op.detail.get("pid_start")
    return isinstance(pid, int) and started is not None and process_start(pid) == started


class Operation:
    """Handle a pipeline uses to journal its stages and details."""

    def __init__(self, state: StateStore, rec: OperationRecord) -> None:
        self.state = state
        self.rec = rec

    @property
    def id(self) -> str:
        return self.rec.id

    def stage(self, name: str, **detail: Any) -> None:
        self.rec.stages.append(name)
        self.rec.detail.update(detail)
        with self.state.transaction():
            self.state.update_operation(self.rec)

    def note(self, **detail: Any) -> None:
        self.rec.detail.update(detail)
        with self.state.transaction():
            self.state.update_operation(self.rec)


@contextmanager
def journaled(state: StateStore, kind: str, **detail: Any) -> Iterator[Operation]:
    """Run a block as a journaled operation; its end state follows how the block ends."""
    pid = os.getpid()
    rec = OperationRecord(uuid.uuid4().hex[:12], kind, "running", [],
                          {**detail, "pid": pid, "pid_start": process_start(pid)})
    with state.transaction():
        state.add_operation(rec)
    op = Operation(state, rec)
    try:
        yield op
    except BaseException as e:
        # an undo that could not finish (the other host unreachable) is left to recover
        rec.status = "failed" if rec.detail.get("undo_incomplete") else "rolled-back"
        rec.error = f"{type(e).__name__}: {e}"
        with state.transaction():
            state.update_operation(rec)
        raise
    rec.status = "done"
    with state.transaction():
        state.update_operation(rec)


def interrupted(state: StateStore) -> list[OperationRecord]:
    """Operations to recover: left ``running`` by a process that is gone, or ``failed``
    (their undo could not finish)."""
    return [op for op in state.list_operations()
            if (op.status == "running" and not owner_alive(op)) or op.status == "failed"]
