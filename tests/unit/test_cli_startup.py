"""The command line starts fast and stays the same command line (issue 18: `migrate --help`
within 0.1 s, `migrate list` within 0.15 s; bench/bench_cli.py measures it).

Timing is not asserted here (a loaded CI machine would make it flaky); what keeps it fast is:
the heavy libraries are not imported by the CLI module, by `--help` or by `list`; the lazy
command table lists exactly the commands the modules define; and the pydantic-free value
conversion gives what typer's own gives, for every parameter of every command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
from typer import BadParameter, Context

from migrator.cli import main as coerce
from migrator.cli.main import COMMANDS, LazyGroup, app

REPO = Path(__file__).resolve().parents[2]

# what a start costs 0.01-0.3 s each to import; none is needed to list containers or to help
HEAVY = ("paramiko", "boto3", "botocore", "cryptography", "zstandard", "tqdm", "pydantic",
         "rich", "croniter", "pyfastcdc", "dateutil", "markdown_it")


def _modules_after(code: str, tmp: Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_importing_the_cli_imports_no_heavy_library(tmp_path: Path) -> None:
    mods = _modules_after("import migrator.cli.main", tmp_path)
    assert "migrator.cli.main" in mods
    assert not _heavy(mods), _heavy(mods)
    # nor any command module, nor the library behind them
    assert not {m for m in mods if m.startswith(("migrator.runtime", "migrator.backup",
                                                 "migrator.transport"))}
    assert not {m for m in mods if m.startswith("migrator.cli.")} - {
        "migrator.cli.main", "migrator.cli.context"}


RUN = """
import sys
from migrator.cli.main import app
sys.argv = ["migrate", *{args!r}]
try:
    app(standalone_mode=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
"""


def test_help_imports_no_command_module(tmp_path: Path) -> None:
    mods = _modules_after(RUN.format(args=["--help"]), tmp_path)
    assert not _heavy(mods), _heavy(mods)
    assert "migrator.cli.containers" not in mods and "migrator.runtime.host" not in mods


def test_list_imports_only_what_listing_needs(tmp_path: Path) -> None:
    args = ["--root", str(tmp_path / "root"), "list", "--format", "json"]
    mods = _modules_after(RUN.format(args=args), tmp_path)
    assert "migrator.cli.containers" in mods  # it did run the command
    # zstandard (~2 ms) comes with runtime/images.py, which Containers needs
    heavy = [m for m in _heavy(mods) if not m.startswith("zstandard")]
    assert not heavy, heavy
    assert "migrator.cli.backup" not in mods and "migrator.transport.ssh" not in mods


# --- the lazy table is the real command line ------------------------------------------------


def _full_group() -> LazyGroup:
    group = typer.main.get_command(app)
    assert isinstance(group, LazyGroup)
    for name in COMMANDS:
        assert group.get_command(None, name) is not None, name
    return group


def _first_paragraph(text: str | None) -> str:
    return " ".join((text or "").split("\n\n")[0].split())


def test_command_table_matches_the_command_modules() -> None:
    from migrator.cli.main import cli_module

    # every command a module registers is in the table, in the table's order
    defined = []
    for module in dict.fromkeys(e.module for e in COMMANDS.values() if e.group is None):
        holder = typer.Typer()
        cli_module(module).register(holder)
        defined += [(c.name, module) for c in holder.registered_commands]
    assert defined == [(n, e.module) for n, e in COMMANDS.items() if e.group is None]
    group = _full_group()
    assert list(group.commands) == list(COMMANDS)
    assert group.list_commands(None) == list(COMMANDS)
    for name, entry in COMMANDS.items():
        cmd = group.commands[name]
        assert cmd.hidden == entry.hidden, name
        assert _first_paragraph(cmd.help) == " ".join(entry.help.split()), name
        assert isinstance(cmd, typer.core.TyperGroup) == (entry.group is not None), name


def test_config_group_holds_the_host_defaults() -> None:
    config = _full_group().commands["config"]
    assert isinstance(config, typer.core.TyperGroup)
    assert {"set", "get", "unset", "show", "host"} <= set(config.commands)


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "migrator.cli.main", "no-such-command"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "No such command 'no-such-command'" in r.stderr


# --- the fast conversion equals typer's -----------------------------------------------------


def _params(cmd: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for p in cmd.params:
        out.append((f"{path} {p.name}", cmd, p))
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _params(sub, f"{path} {name}")
    return out


def _samples(annotation: Any) -> list[Any]:
    """Values a command line hands over for ``annotation``: good ones and bad ones."""
    annotation = coerce._unwrap_optional(annotation)
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        (item,) = annotation.__args__
        one = _samples(item)
        return [tuple(one[:2]), (one[0],), one[0]]
    if annotation is str:
        return ["web-1", "", "a b"]
    if annotation is int:
        return ["42", "-3", "007", "x", "1.5", " 4", 7]
    if annotation is float:
        return ["1.5", "2", "-0.25", "x", "1e3", 3.0]
    if annotation is bool:
        return [True, False]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [m.value for m in annotation] + [list(annotation)[0], "no-such-choice"]
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return ["/tmp", "relative/x", "/no/such/path", Path("/tmp")]
    return []


def _outcome(runtime: Any, value: Any, param: Any, ctx: Any) -> tuple[str, Any]:
    try:
        return "ok", runtime.coerce(value, param=param, ctx=ctx)
    except BadParameter as e:
        return "bad", e.message


def test_fast_conversion_equals_typers_for_every_parameter() -> None:
    assert coerce.install_fast_conversion()  # this typer has the builder it stands in front of
    original = coerce.original_builder()
    group = _full_group()
    checked = 0
    for where, cmd, param in _params(group):
        if not hasattr(param, "type_descriptor"):
            continue
        desc = param.type_descriptor
        fast = typer.core.build_runtime_param(desc)
        if type(fast).__name__ != "FastRuntimeParam":
            continue
        slow = original(desc)
        ctx = Context(cmd)
        for value in _samples(desc.annotation):
            assert _outcome(fast, value, param, ctx) == _outcome(slow, value, param, ctx), \
                (where, value)
            checked += 1
    assert checked > 200  # every command's parameters were seen, not a handful


def test_fast_conversion_takes_the_common_types() -> None:
    from migrator.cli.render import Format

    for annotation in (str, int, float, Path, Format, list[str], str | None):
        assert coerce.converter(annotation, typer.models.OptionInfo()) is not None, annotation
    # a constraint or a parser goes to typer itself
    assert coerce.converter(int, typer.models.OptionInfo(min=1)) is None
    assert coerce.converter(str, typer.models.OptionInfo(parser=str.upper)) is None


@pytest.mark.parametrize("argv", [["--help"], ["backup", "--help"], ["config", "host", "--help"]])
def test_help_is_plain_text(argv: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "migrator.cli.main", *argv], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: ")
    assert "╭" not in r.stdout  # no rich panels
    assert "Commands:" in r.stdout
