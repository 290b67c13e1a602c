"""migrator.cli.render: table, JSON and CSV output."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from migrator.cli.render import Format, human_size, render, table

ROWS: list[dict[str, Any]] = [
    {"name": "web-1", "state": "RUNNING", "ipv4": "192.0.2.10", "extra": 1},
    {"name": "db", "state": "STOPPED", "ipv4": None},
]
COLS = ["name", "state", "ipv4"]


def test_table_layout() -> None:
    out = render(ROWS, COLS, Format.table)
    assert out.splitlines() == [
        "+-------+---------+------------+",
        "| NAME  | STATE   | IPV4       |",
        "+-------+---------+------------+",
        "| web-1 | RUNNING | 192.0.2.10 |",
        "| db    | STOPPED |            |",
        "+-------+---------+------------+",
    ]


def test_table_lines_have_equal_width() -> None:
    rows = [{"a": "x" * 30, "b": 7}, {"a": "", "b": 123456}]
    lines = table(rows, ["a", "b"]).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "| 123456 |" in lines[-2]


def test_table_empty_rows_shows_header() -> None:
    assert render([], COLS, Format.table).splitlines() == [
        "+------+-------+------+",
        "| NAME | STATE | IPV4 |",
        "+------+-------+------+",
        "+------+-------+------+",
    ]


def test_table_missing_key_is_blank() -> None:
    out = render([{"name": "x"}], ["name", "pool"], Format.table)
    assert "| x    |      |" in out


def test_json_round_trips_rows() -> None:
    out = render(ROWS, COLS, Format.json)
    assert json.loads(out) == ROWS  # JSON keeps every field, not only the table columns


def test_json_non_serialisable_values_become_strings() -> None:
    from pathlib import Path

    out = json.loads(render([{"path": Path("/srv/x"), "n": 1.5}], ["path"], Format.json))
    assert out == [{"path": "/srv/x", "n": 1.5}]


def test_json_empty() -> None:
    assert json.loads(render([], COLS, Format.json)) == []


def test_csv() -> None:
    out = render(ROWS, COLS, Format.csv)
    assert list(csv.reader(io.StringIO(out))) == [
        ["name", "state", "ipv4"],
        ["web-1", "RUNNING", "192.0.2.10"],
        ["db", "STOPPED", ""],
    ]
    assert not out.endswith("\n")  # typer.echo adds the final newline


def test_csv_unix_line_endings() -> None:
    out = render(ROWS, COLS, Format.csv)
    assert out == "name,state,ipv4\nweb-1,RUNNING,192.0.2.10\ndb,STOPPED,"


def test_csv_quotes_awkward_values() -> None:
    rows = [{"name": 'a,"b"', "note": "line1\nline2"}]
    out = render(rows, ["name", "note"], Format.csv)
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed == [["name", "note"], ['a,"b"', "line1\nline2"]]


def test_csv_empty_rows_is_header_only() -> None:
    out = render([], COLS, Format.csv)
    assert list(csv.reader(io.StringIO(out))) == [["name", "state", "ipv4"]]


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_format_accepts_plain_strings(fmt: str) -> None:
    # typer hands over the enum; the string values compare equal to it
    assert Format(fmt) == fmt
    assert render(ROWS, COLS, Format(fmt))


@pytest.mark.parametrize(
    "n,expected",
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (10 * 2**30, "10.0GiB"),
        (2**40, "1.0TiB"),
        (5 * 2**50, "5120.0TiB"),
    ],
)
def test_human_size(n: int, expected: str) -> None:
    assert human_size(n) == expected
