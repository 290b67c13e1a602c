"""The tree's shape, checked without running it: what ARCHITECTURE.md promises a reader
(every module named, imports flowing downward, one subprocess wrapper) stays true as the
code moves, because a reader finds behaviour by these names alone.

Everything here reads source files (``ast``), except the import-linter check, which runs
``lint-imports`` on a copy of the tree: a contract that never fails would prove nothing, so
the test breaks it on purpose.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from migrator.core import proc
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "migrator"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES: dict[str, Path] = {_module_name(p): p for p in _sources()}


# --- (a) every module is named in ARCHITECTURE.md ------------------------------------------


def _named(text: str, rel: str) -> bool:
    """``rel`` (``runtime/containers.py``, ``core/``) occurs as a path of its own, optionally
    written from the repository root (``migrator/agent.py``), not as the tail of another path
    (``agent.py`` inside ``transport/agent.py``) or the head of a longer one (``core/`` in
    ``core/proc.py`` names the module, not the package)."""
    pattern = r"(?<![\w./-])(?:migrator/)?" + re.escape(rel) + r"(?![\w.])"
    return re.search(pattern, text) is not None


def test_architecture_names_every_module_and_package() -> None:
    text = ARCHITECTURE.read_text()
    missing = []
    for path in _sources():
        rel = path.relative_to(PKG)
        if _is_package(path):
            if rel.parent == Path("."):
                continue  # migrator/ itself
            name = f"{rel.parent.as_posix()}/"
        else:
            name = rel.as_posix()
        if not _named(text, name):
            missing.append(name)
    assert not missing, f"ARCHITECTURE.md does not name: {', '.join(missing)}"


# --- the import graph, imports inside functions included --------------------------------


def _walk_skipping_type_checking(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except the bodies of ``if TYPE_CHECKING:`` blocks (never run, so no
    cycle at run time; the ``else`` branch does run and is walked)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _known_prefix(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the tree (``import a.b.c`` of a
    package with no module ``c`` still runs ``a.b``)."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _imports(path: Path) -> list[tuple[str, int]]:
    """The tree's modules ``path`` imports, with the line of each import.

    ``from pkg import sub`` is an import of the submodule ``pkg.sub``, not of ``pkg``'s
    ``__init__``, unless a name that is not a submodule is imported with it."""
    me = _module_name(path)
    package = me if _is_package(path) else me.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    tree = ast.parse(path.read_text(), str(path))
    for node in _walk_skipping_type_checking(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(alias.name)
                if target:
                    found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in MODULES:
                    found.append((sub, node.lineno))
                else:
                    target = _known_prefix(base)
                    if target:
                        found.append((target, node.lineno))
    return found


GRAPH: dict[str, list[tuple[str, int]]] = {name: _imports(p) for name, p in MODULES.items()}


# --- (b) nothing below the CLI imports the agent ------------------------------------------


def test_nothing_below_the_cli_imports_the_agent() -> None:
    """The agent is the top floor of the library: it imports the pipelines' far-end halves
    to dispatch to them, so a pipeline importing it would close a cycle. The CLI is the one
    floor above it (``migrate agent`` runs it, ``p2c --to local`` takes its in-process
    transport), as the import-linter contract in pyproject.toml has it."""
    importers = sorted(
        f"{MODULES[name].relative_to(ROOT)}:{line}"
        for name, edges in GRAPH.items()
        for target, line in edges
        if target == "migrator.agent" and name != "migrator.agent"
        and not name.startswith("migrator.cli.")
    )
    assert not importers, f"migrator.agent imported from below the CLI: {importers}"


# --- (c) the layers contract holds, and breaks on an upward import -----------------------


def _lint_imports(tree: Path) -> proc.Completed:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        unavailable("lint-imports (import-linter) is not installed: `make setup`")
    return proc.run([str(exe)], cwd=tree, env={"PYTHONPATH": str(tree)}, check=False,
                    timeout=120)


def test_lint_imports_fails_on_an_upward_import(tmp_path: Path) -> None:
    shutil.copytree(PKG, tmp_path / "migrator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    with (tmp_path / "migrator/core/names.py").open("a") as f:
        f.write("import migrator.cli.main  # noqa\n")
    broken = _lint_imports(tmp_path)
    out = broken.stdout + broken.stderr
    assert broken.returncode != 0, out
    assert "BROKEN" in out and "Layers: imports flow downward only" in out, out
    assert "migrator.core.names -> migrator.cli.main" in out, out


# --- (d) no import cycle, imports inside functions counted --------------------------------


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing
    itself): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    graph = {name: {t for t, _ in edges} for name, edges in GRAPH.items()}
    cycles = _cycles(graph)
    detail = [
        [f"{MODULES[m].relative_to(ROOT)}:{line} -> {t}"
         for m in cycle for t, line in GRAPH[m] if t in cycle]
        for cycle in cycles
    ]
    assert not cycles, f"import cycles: {detail}"


def test_relative_and_submodule_imports_resolve() -> None:
    """The resolution the cycle check rests on: ``from pkg import sub`` is the submodule,
    ``from pkg import name`` the package, and a relative import is resolved from the
    importing module's package."""
    edges = {t for t, _ in GRAPH["migrator.cli.main"]}
    assert "migrator.cli.containers" in edges  # from migrator.cli import (..., containers, ...)
    assert "migrator.cli" not in edges
    assert "migrator.core.errors" in edges


# --- (e) one subprocess wrapper -----------------------------------------------------------

# Starting a program another way than core/proc.py would skip its argv-only rule, its
# timeouts and its missing-tool mapping.
_PROCESS_CALLS = re.compile(r"^(exec\w*|spawn\w*|posix_spawnp?|system|popen)$")
# core/nsexec.py is not library code but the small script proc.py runs in front of a
# command for a host in a network namespace: after setns and the mounts it must *become*
# that command (os.execvp), so the command keeps the namespaces it set up.
_MAY_EXEC = {"core/nsexec.py"}


def test_only_core_proc_starts_processes() -> None:
    offences = []
    for path in _sources():
        rel = path.relative_to(PKG).as_posix()
        if rel == "core/proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"migrator/{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                if any(a.name.split(".")[0] == "subprocess" for a in node.names):
                    offences.append(f"{where} imports subprocess")
            elif isinstance(node, ast.ImportFrom):
                if node.module == "subprocess":
                    offences.append(f"{where} imports from subprocess")
                elif node.module == "os":
                    for a in node.names:
                        if _PROCESS_CALLS.match(a.name):
                            offences.append(f"{where} imports os.{a.name}")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "os" and _PROCESS_CALLS.match(node.attr)
                  and not (rel in _MAY_EXEC and node.attr.startswith("exec"))):
                offences.append(f"{where} uses os.{node.attr}")
    assert not offences, offences
