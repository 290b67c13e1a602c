"""What the CLI writes: messages for people on stderr, results on stdout.

Every command module prints through these, so the split between the two streams (a
script reads stdout, a person reads stderr) is decided in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import typer


def say(msg: str) -> None:
    """A message for the person at the terminal (stderr: it never mixes with results)."""
    typer.echo(msg, err=True)


def print_json(obj: Any) -> None:
    """A result as indented JSON on stdout; values JSON cannot hold are written as text."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def print_fields(fields: Mapping[str, Any], sort: bool = False) -> None:
    """A single record as ``key: value`` lines on stdout (``--format table`` of one item)."""
    for k in sorted(fields) if sort else fields:
        typer.echo(f"{k}: {fields[k]}")
