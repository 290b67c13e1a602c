"""LXD's ``volatile.last_state.idmap``: how the files of an archive are shifted on the
exporting host's disk, written by an export and checked by an import.

A send stream carries the ids as they are on the exporting host's disk, and so does LXD
5.0's generic tarball of an unprivileged container (100000+N, not the container's view), so
the index says by how much; ``migrate export``'s generic sections hold the container's view
and say ``[]``. The one design decision: the archive decides this itself and every file is
shifted by it, so only one plain range is accepted (``disk_shift``), and the files are then
held to it (``archive_reader`` as members pass, ``runtime.treecheck`` for send streams).
"""

from __future__ import annotations

import json

from migrator.core.errors import UnsafeArchive
from migrator.runtime import idmap


def lxd_idmap(base: int) -> str:
    """``volatile.last_state.idmap`` as LXD writes it: how the files on disk are shifted."""
    entries = [{"Isuid": uid, "Isgid": not uid, "Hostid": base, "Nsid": 0,
                "Maprange": idmap.MAP_SIZE} for uid in (True, False)]
    return json.dumps(entries, separators=(",", ":")) if base else "[]"


def disk_shift(config: dict[str, str]) -> int:
    """The uid an archive's native streams store for the container's root: LXD's
    ``volatile.last_state.idmap`` (absent or ``[]``: not shifted on disk).

    The archive decides this itself, and every file of its streams is shifted by it, so
    only one plain range is accepted: one uid and one gid entry (or one entry for both),
    from container id 0, at the same host id, covering the 65536 ids a container maps.
    Anything else is ``UnsafeArchive``; the tree is then held to the range it claims
    (``migrator.runtime.treecheck``, ``all_owners``)."""
    raw = config.get("volatile.last_state.idmap") or "[]"

    def refuse(why: str) -> UnsafeArchive:
        return UnsafeArchive(f"the archive's volatile.last_state.idmap {raw[:200]!r} {why}",
                             "only a single id range starting at container id 0 is "
                             "accepted; nothing was imported")
    try:
        entries = json.loads(raw)
    except ValueError:
        raise refuse("is not JSON") from None
    if entries == []:
        return 0
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise refuse("is not a list of id ranges")
    uids = [e for e in entries if e.get("Isuid") is True]
    gids = [e for e in entries if e.get("Isgid") is True]
    if len(uids) != 1 or len(gids) != 1 or len(entries) > 2:
        raise refuse("is not one range for uids and one for gids")
    for e in (uids[0], gids[0]):
        host, ns, size = e.get("Hostid"), e.get("Nsid"), e.get("Maprange")
        if not (type(host) is int and type(ns) is int and type(size) is int):
            raise refuse("has a range that is not three integers")
        if ns != 0 or size < idmap.MAP_SIZE or not 0 <= host <= 2**32 - 1 - idmap.MAP_SIZE:
            raise refuse(f"maps {size} ids from container id {ns} to host id {host}, not "
                         f"{idmap.MAP_SIZE} or more from 0 to a valid host id")
        if host + size > 2**32 - 1:  # LXD maps 1e9 ids from 1000000; ids are 32 bits
            raise refuse(f"maps {size} ids from host id {host}, past the last valid id")
    if uids[0]["Hostid"] != gids[0]["Hostid"]:
        raise refuse("maps uids and gids to different host ids")
    return int(uids[0]["Hostid"])
