"""``evacuate_argv``: the far host's evacuation command line, made from a client's request.
Every value is checked first; nothing of the request reaches the argv unchecked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from migrator.core.errors import InvalidInput
from migrator.pipelines.evacuate import evacuate_argv

ROOT = Path("/var/lib/migrator")


def test_a_good_request_becomes_the_local_command() -> None:
    argv = evacuate_argv(ROOT, {"to": ["host-b", "host-c"], "parallel": 2, "dry_run": True,
                                "pool": "fast", "mode": "post-copy", "compress": "zstd"})
    assert argv[2:] == ["migrator.cli.main", "--root", str(ROOT), "evacuate", "local",
                        "--format", "json", "--to", "host-b,host-c", "--parallel", "2",
                        "--dry-run", "--target-pool", "fast", "--mode", "post-copy",
                        "--compress", "zstd"]


@pytest.mark.parametrize("req", [
    {"to": ["c;reboot"]}, {"to": ["--restore"]}, {"to": "host-b"}, {"to": ["b"] * 65},
    {"parallel": 0}, {"parallel": 17}, {"parallel": True}, {"parallel": "2"},
    {"dry_run": "yes"}, {"restore": 1}, {"as_name": "../a"}, {"pool": "p q"},
    {"mode": "live; rm -rf /"}, {"compress": "gzip"},
])
def test_a_hostile_value_is_refused(req: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        evacuate_argv(ROOT, req)
