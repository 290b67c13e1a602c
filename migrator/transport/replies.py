"""Replies from the far side of an agent channel: one gate before anything reads them.

The far side is another host (its agent, or in a pull the client serving calls), so its
replies are input like any other: a hostile one could name an error class meant to make
this host exit with a code of its choosing, fill a terminal with escape sequences, or hand
``choose_pool`` a list where a name belongs. Every reply goes through :func:`parse_reply`:

- ``{"ok": true, ...}`` is checked against the shape of the request's answer where this
  side reads fields from it (``hello``, ``container_state``, ``receive``,
  ``commit_container``, a delegated copy's result): wrong types are a ``ProtocolError``;
- anything else is an error: :func:`remote_error` turns ``{"type", "message", "hint"}``
  into one of the known ``MigratorError`` classes (``errors.error_classes``: an unknown
  name, a class whose constructor is not ``(message, hint)``, or ``ProtocolError``, which
  names this side's own channel, becomes ``RemoteError``), with the message and
  hint cut to :data:`MAX_TEXT` characters and stripped of escape sequences and control
  characters (:func:`clean_text`), because the CLI prints them.

The one design decision: the gate checks what this side *reads*, not the whole reply, so an
agent of a newer version may add fields without breaking an older client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from migrator.core import errors
from migrator.transport.frames import ProtocolError

MAX_TEXT = 2000  # characters of a message or hint from the far side that are shown
MAX_NAME = 255  # a name, a driver, a method, a status

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other two-byte escapes, and the C1
# controls (U+0080-U+009F: a terminal may take U+009B for CSI)
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as printable text: escape sequences and control characters removed (tabs
    and newlines kept), cut to ``limit`` characters with an ellipsis."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    text = _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_reply(e: BaseException) -> dict[str, Any]:
    """The reply that carries ``e`` to the far side (``{"ok": false, "error": ...}``), which
    :func:`remote_error` turns back into the same class there."""
    if isinstance(e, errors.MigratorError):
        return {"ok": False, "error": {"type": type(e).__name__, "message": e.message,
                                       "hint": e.hint}}
    return {"ok": False, "error": {"type": type(e).__name__, "message": str(e), "hint": None}}


def remote_error(host: str, err: Any) -> errors.MigratorError:
    """The far side's error, as the same (known) class with its exit code; every other
    ``type`` becomes ``RemoteError``."""
    if not isinstance(err, dict):
        return errors.RemoteError(f"on {clean_text(host, MAX_NAME)}: the agent failed "
                                  "without saying why (malformed error reply)")
    kind = err.get("type")
    cls = errors.error_classes().get(kind) if isinstance(kind, str) else None
    # every class but CommandFailed takes (message, hint); a far command's failure is the
    # far side's own error here, with no argv or exit code of this host's. A ProtocolError
    # says a frame this side read was malformed (callers take it for their own channel or
    # link failing): the far side's report of its own is its failure too
    if cls is None or cls in (errors.CommandFailed, ProtocolError):
        cls = errors.RemoteError
    msg = f"on {clean_text(host, MAX_NAME)}: {clean_text(err.get('message'))}"
    hint = err.get("hint")
    return cls(msg, clean_text(hint) if isinstance(hint, str) and hint else None)


# shapes of the answers this side reads ------------------------------------------------------
def _want(op: str, obj: dict[str, Any], key: str, kind: type | tuple[type, ...],
          optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    # bool is an int subclass: a count must not be True
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in
                                       (kind if isinstance(kind, tuple) else (kind,))):
        raise ProtocolError(f"the {op!r} reply has a malformed {key!r} "
                            f"({type(value).__name__})",
                            "the far side is not a compatible migrate agent")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ProtocolError(f"the {op!r} reply's {key!r} is {len(value)} characters long")
    return value


def _names(op: str, obj: dict[str, Any], key: str, optional: bool = False) -> list[str]:
    items = _want(op, obj, key, list, optional) or []
    if not all(isinstance(i, str) and 0 < len(i) <= MAX_NAME for i in items):
        raise ProtocolError(f"the {op!r} reply's {key!r} must be a list of names")
    return list(items)


def _hello(op: str, r: dict[str, Any]) -> None:
    _want(op, r, "version", str)
    _want(op, r, "protocol", int)
    for p in _want(op, r, "pools", list):
        if not isinstance(p, dict):
            raise ProtocolError(f"the {op!r} reply's pools must be objects")
        for key in ("name", "driver"):
            if len(_want(op, p, key, str)) > MAX_NAME:
                raise ProtocolError(f"the {op!r} reply's pool {key} is too long")
        _names(op, p, "types")
        _want(op, p, "free", int)
        _want(op, p, "subsecond_mtimes", bool, optional=True)
    _names(op, r, "compressors")
    _names(op, r, "links", optional=True)
    _want(op, r, "rsync", bool, optional=True)
    _want(op, r, "criu", str, optional=True)
    feats = _want(op, r, "criu_features", dict, optional=True) or {}
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in feats.items()):
        raise ProtocolError(f"the {op!r} reply's criu_features must map names to booleans")
    _want(op, r, "network", str, optional=True)
    _want(op, r, "overlay_vni", int, optional=True)
    if len(_want(op, r, "host_id", str, optional=True) or "") > MAX_NAME:
        raise ProtocolError(f"the {op!r} reply's host_id is too long")
    for key in ("mem_total", "mem_available"):  # bytes; an older agent sends neither
        if (_want(op, r, key, int, optional=True) or 0) < 0:
            raise ProtocolError(f"the {op!r} reply's {key!r} is negative")


def _container_state(op: str, r: dict[str, Any]) -> None:
    if not _want(op, r, "exists", bool):
        return
    _want(op, r, "pool", str)
    _want(op, r, "status", str)
    _want(op, r, "ipv4", str, optional=True)
    for s in _want(op, r, "snapshots", list):
        if not isinstance(s, dict):
            raise ProtocolError(f"the {op!r} reply's snapshots must be objects")
        _want(op, s, "name", str)
        _want(op, s, "uuid", str, optional=True)


def _receive(op: str, r: dict[str, Any]) -> None:
    _want(op, r, "raw", int)
    _want(op, r, "wire", int)


def _commit(op: str, r: dict[str, Any]) -> None:
    _want(op, r, "ipv4", str)


def _settle(op: str, r: dict[str, Any]) -> None:
    # "whole" sends the migration forward and the source's copy is killed: a boolean only
    _want(op, r, "whole", bool)


def _page_identity(op: str, r: dict[str, Any]) -> None:
    _want(op, r, "cert", str)  # capped like every text; decoded by link.decode_cert


def _evacuate(op: str, r: dict[str, Any]) -> None:
    if not all(isinstance(row, dict) for row in _want(op, r, "rows", list)):
        raise ProtocolError(f"the {op!r} reply's rows must be objects")
    if not 0 <= _want(op, r, "exit_code", int) <= 255:
        raise ProtocolError(f"the {op!r} reply's exit code is out of range")


SHAPES: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "hello": _hello,
    "container_state": _container_state,
    "receive": _receive,
    "commit_container": _commit,
    "live_settle": _settle,
    "page_identity": _page_identity,
    "evacuate": _evacuate,
}


def parse_reply(host: str, op: str, reply: Any) -> dict[str, Any]:
    """The far side's answer to ``op``: checked and returned, or its error raised."""
    if not isinstance(reply, dict):
        raise ProtocolError(f"{clean_text(host, MAX_NAME)} answered {op!r} with a "
                            f"{type(reply).__name__}, not an object")
    if reply.get("ok") is not True:
        raise remote_error(host, reply.get("error"))
    shape = SHAPES.get(op)
    if shape is not None:
        shape(op, reply)
    return reply


def clean_event(event: dict[str, Any], depth: int = 4) -> dict[str, Any]:
    """An event (``{"event": ...}``, shown or turned into progress) with every text in it
    cleaned and capped; nesting deeper than ``depth`` is dropped."""
    def clean(value: Any, level: int) -> Any:
        if isinstance(value, str):
            return clean_text(value)
        if isinstance(value, dict):
            return {clean_text(k, MAX_NAME): clean(v, level + 1) for k, v in value.items()} \
                if level < depth else {}
        if isinstance(value, list):
            return [clean(v, level + 1) for v in value] if level < depth else []
        return value
    return {clean_text(k, MAX_NAME): clean(v, 1) for k, v in event.items()}


def copy_result(host: str, result: Any) -> dict[str, Any]:
    """A copy's result as another host reports it (a pull, a copy between two other hosts):
    only the known fields, each of its type, text cleaned, since the CLI prints it."""
    if not isinstance(result, dict):
        raise ProtocolError(f"{clean_text(host, MAX_NAME)} sent a malformed copy result")
    out: dict[str, Any] = {}
    for key in ("source", "target", "pool", "method", "verified", "operation", "negotiated"):
        value = result.get(key)
        out[key] = None if value is None else clean_text(value, MAX_NAME * 2)
    for key in ("bytes",):
        value = result.get(key)
        out[key] = value if isinstance(value, int) and not isinstance(value, bool) \
            and value >= 0 else 0
    for key in ("seconds", "downtime"):
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            out[key] = float(value)
        else:
            out[key] = 0.0 if key == "seconds" else None
    for key in ("snapshots_added", "snapshots_skipped", "notes"):
        items = result.get(key)
        out[key] = [clean_text(i, MAX_TEXT if key == "notes" else MAX_NAME)
                    for i in (items if isinstance(items, list) else [])[:10000]]
    for key in ("source", "target", "pool", "method"):
        out[key] = out[key] or ""
    return out
