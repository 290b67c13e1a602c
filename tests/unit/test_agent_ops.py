"""The agent's table of handlers (``agent.HOMES``), which names each request's module
instead of importing them all at start: it must say exactly what the modules' own tables
say, every name must resolve to a callable, and the agent alone must not import the
heavy modules until a request of theirs comes."""

from __future__ import annotations

import importlib
import subprocess
import sys

from migrator import agent

TABLES = {
    "migrator.pipelines.remote_target": "TARGET_OPS",
    "migrator.pipelines.live_target": "LIVE_OPS",
    "migrator.p2c.target": "P2C_OPS",
}


def test_the_table_says_what_each_module_serves() -> None:
    for module, table in TABLES.items():
        theirs = set(getattr(importlib.import_module(module), table))
        ours = {op for op, home in agent.HOMES.items() if home == (module, table)}
        assert ours == theirs, (module, ours ^ theirs)


def test_every_request_resolves_to_its_handler() -> None:
    for op, (module, name) in agent.HOMES.items():
        found = getattr(importlib.import_module(module), name)
        want = found[op] if isinstance(found, dict) else found
        assert callable(want), op
        assert agent.handler_for(op) is want, op
    assert agent.handler_for("no-such-op") is None
    assert agent.handler_for("__class__") is None


def test_watched_requests_are_live_migrations() -> None:
    from migrator.pipelines.live_target import WATCHED_OPS

    assert agent.WATCHED_OPS == WATCHED_OPS


def test_starting_an_agent_imports_no_handler_module() -> None:
    """What ``migrate agent`` imports before its first request: none of the modules whose
    handlers it has not been asked for (each cost start-up time)."""
    code = ("import sys, migrator.agent; print('\\n'.join(m for m in sys.modules "
            "if m.startswith('migrator.')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, check=True).stdout.split())
    heavy = {"migrator.backup.remote", "migrator.backup.sshstore", "migrator.p2c.target",
             "migrator.pipelines.delegated", "migrator.pipelines.evacuate",
             "migrator.pipelines.live_target", "migrator.transport.link"}
    assert not heavy & loaded, heavy & loaded
