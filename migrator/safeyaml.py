"""YAML from outside (an export's ``index.yaml``, an image's ``metadata.yaml``), read safely.

``yaml.safe_load`` builds no objects, but it still expands aliases: a document under 1 kB
whose anchors refer to each other nine levels deep becomes a billion nodes. LXD and Incus
(Go's yaml) and our own writer never emit anchors or aliases, so an alias is refused at the
first one, before anything is expanded; nesting is bounded too (the composer recurses, so a
deep enough document would otherwise end in Python's RecursionError). Callers cap the size of
the text before calling.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64


class UnsafeYaml(yaml.YAMLError):
    """A document this reader refuses (an alias, too deep): callers report it like a syntax
    error, with the document's name."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise UnsafeYaml(f"YAML aliases are not accepted ({mark})")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise UnsafeYaml(f"YAML nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(data: bytes | str) -> Any:
    """Like ``yaml.safe_load``, without aliases and with bounded nesting."""
    return yaml.load(data, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
