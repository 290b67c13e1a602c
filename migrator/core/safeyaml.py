"""YAML from outside (an export's ``index.yaml``, an image's ``metadata.yaml``), read safely.

``yaml.safe_load`` builds no objects, but it shares aliased nodes: a document under 1 kB
whose anchors refer to each other nine levels deep stands for a billion nodes, and whatever
walks the result (``str()``, a copy, a JSON dump) expands them. Aliases themselves are
legitimate (PyYAML's own dumper writes them for repeated objects, so older exports of this
tool hold some), so they are *bounded*: the node graph is measured as it would expand, before
anything is constructed, and a document that stands for more than ``MAX_NODES`` nodes, or
refers to itself, is refused. Nesting is bounded too (the composer recurses, so a deep enough
document would otherwise end in Python's RecursionError). Callers cap the size of the text
before calling. ``dump`` writes without aliases, as LXD and Incus do.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64
MAX_NODES = 1_000_000


class UnsafeYaml(yaml.YAMLError):
    """A document this reader refuses (too large once expanded, self-referring, too deep):
    callers report it like a syntax error, with the document's name."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise UnsafeYaml(f"YAML nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes ``root`` stands for with every alias expanded, without expanding:
    each node's count is computed once (iteratively: alias chains may nest deeply)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(c)] for c in _children(node))
            if size > MAX_NODES:
                raise UnsafeYaml(f"YAML aliases expand the document beyond {MAX_NODES} nodes")
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise UnsafeYaml("YAML document refers to itself through an alias")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def load(data: bytes | str) -> Any:
    """Like ``yaml.safe_load``, with aliases bounded and nesting limited."""
    loader = _Loader(data)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: Any) -> str:
    """``yaml.safe_dump`` without anchors or aliases (repeated objects written out)."""
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False)
