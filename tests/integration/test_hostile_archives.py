"""Hostile archives through the real command line: LXD/Incus exports and images.

Each archive carries one attack that a checker reading headers differently from the extractor
would miss (an old-GNU prefix, a pax path beside a sparse name, a global pax header, a hard
link to a symlink, a sparse map that claims more than it stores) or that expands without
bound (an alias bomb). ``migrate import`` / ``migrate image import`` must end with the error
that names the refusal, and leave the host exactly as it was: no record, no volume, no LXC
directory, no scratch, no image, nothing written outside. Containers here are named
``hx-*``; one host per test.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from migrator.runtime.idmap import default_idmap
from tests.integration.test_exchange import _boundary, host_state, lxd_archive, lxd_index
from tests.unit.test_safety import END, data, pax, raw_header, sparse10

R = "backup/container/rootfs"
CANARY = "etc/cron.d/hx-canary"  # what every escape below aims at, under /


def _old_gnu(name: str, kind: bytes, linkname: str = "") -> bytes:
    head = bytearray(raw_header(name, kind, linkname=linkname, fmt=tarfile.GNU_FORMAT))
    head[345:354] = b"innocent\0"  # Python's tarfile would prepend it; GNU tar does not
    head[148:156] = b" " * 8
    head[148:155] = b"%06o\0" % sum(head)
    return bytes(head)


BOMB = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
    b"%c: &%c [%s]\n" % (98 + i, 98 + i, b",".join([b"*%c" % (97 + i)] * 9)) for i in range(8))

EXPORTS: dict[str, tuple[bytes, int, str]] = {
    "old-gnu prefix": (_old_gnu(f"{R}/hx", tarfile.SYMTYPE, "/etc")
                       + raw_header(f"{R}/hx/cron.d/hx-canary", size=1) + data(b"x"), 22,
                       f"member '{R}/hx/cron.d/hx-canary' goes through the symlink '{R}/hx'"),
    "pax path beside a sparse name": (
        pax([("path", f"{R}/ok".encode()), ("GNU.sparse.name", f"/{CANARY}".encode())])
        + raw_header(f"{R}/ok", size=1) + data(b"x"), 22, "GNU sparse form other than 1.0"),
    "sparse name climbs": (sparse10(f"{R}/../../../../../{CANARY}".encode(), f"{R}/ok".encode(),
                                    [(0, 1)], 1, b"x"), 22, "climbs out of the rootfs (..)"),
    "pax linkpath": (pax([("linkpath", b"../../../../etc")])
                     + raw_header(f"{R}/l", tarfile.SYMTYPE, linkname="ok"), 22,
                     "points to '../../../../etc', which climbs out of the rootfs"),
    "global pax header": (pax([("path", f"/{CANARY}".encode())], tarfile.XGLTYPE)
                          + raw_header(f"{R}/ok", size=1) + data(b"x"), 22,
                          "pax global header that changes every later member (path)"),
    "a name twice": (raw_header(f"{R}/twice", size=1) + data(b"1")
                     + raw_header(f"{R}/twice", size=1) + data(b"2"), 22,
                     f"member '{R}/twice' appears twice"),
    "hard link to a symlink": (raw_header(f"{R}/s", tarfile.SYMTYPE, linkname="/etc")
                               + raw_header(f"{R}/h", tarfile.LNKTYPE, linkname=f"{R}/s")
                               + raw_header(f"{R}/h/cron.d/x", size=1) + data(b"x"), 22,
                               f"member '{R}/h/cron.d/x' goes through the symlink '{R}/h'"),
    "lying sparse map": (sparse10(f"{R}/big".encode(), b"x", [(0, 512), (1 << 30, 1 << 20)],
                                  (1 << 30) + (1 << 20), b"a" * 512), 22,
                         f"sparse member '{R}/big' stores 512 bytes but its map claims"),
    "device node, unprivileged": (raw_header(f"{R}/dev/null", tarfile.CHRTYPE, devmajor=1,
                                             devminor=3, mode=0o666), 22,
                                  "device nodes are refused unless the container is "
                                  "privileged"),
}


def _export(tail: bytes, src: Path, index: bytes | None = None) -> bytes:
    raw = lxd_archive(index or lxd_index("evil", {}), src, compress=False)
    return gzip.compress(raw[:_boundary(raw)] + tail + END)


def test_hostile_exports_are_refused_and_change_nothing(host, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = host.cts.images.rootfs(host.cts.images.find("busybox").fingerprint)
    host.cts.create("busybox", "hx-bystander", "dir")
    bystander = sorted(p.name for p in host.cts.rootfs(host.cts.get("hx-bystander")).iterdir())
    before = host_state(host)
    archive = tmp_path / "evil.tar.gz"
    for what, (tail, code, message) in EXPORTS.items():
        archive.write_bytes(_export(tail, src))
        r = host.cli("import", str(archive), "hx-evil")
        assert r.returncode == code, (what, r.stderr)
        assert message in r.stderr, (what, r.stderr)
        assert host_state(host) == before, what  # no record, volume, scratch, LXC dir
        assert not Path("/", CANARY).exists(), what
    # an alias bomb of < 1 kB as index.yaml: refused at once, not expanded
    assert len(BOMB) < 1024
    archive.write_bytes(_export(b"", src, BOMB))
    t0 = time.monotonic()
    r = host.cli("import", str(archive), "hx-evil")
    assert r.returncode == 21 and "YAML aliases expand the document beyond" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
    assert host_state(host) == before
    assert sorted(p.name for p in host.cts.rootfs(host.cts.get("hx-bystander")).iterdir()) \
        == bystander


def _image(entries: list[tuple[tarfile.TarInfo, bytes]], metadata: bytes | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as t:
        meta = metadata if metadata is not None else yaml.safe_dump(
            {"properties": {"os": "busybox"}}).encode()
        for info, content in [(_info("metadata.yaml", size=len(meta)), meta),
                              (_info("rootfs", tarfile.DIRTYPE), b""), *entries]:
            t.addfile(info, io.BytesIO(content) if content else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(("entries", "metadata", "message"), [
    ([(_info(f"rootfs/../../../../../{CANARY}", size=1), b"x")], None,
     "climbs out of the rootfs (..)"),
    ([(_info("rootfs/dev", tarfile.DIRTYPE), b""),
      (_info("rootfs/dev/sda", tarfile.BLKTYPE, devmajor=8, mode=0o666), b"")], None,
     "member 'rootfs/dev/sda' is a block device"),
    ([(_info("rootfs/etc", tarfile.SYMTYPE, linkname="/etc"), b""),
      (_info("rootfs/etc/cron.d/x", size=1), b"x")], None, "goes through the symlink"),
    ([], BOMB, "YAML aliases expand the document beyond"),
], ids=["traversal", "block device", "through a symlink", "alias bomb"])
def test_hostile_images_are_refused_and_change_nothing(  # type: ignore[no-untyped-def]
        host, tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]],
        metadata: bytes | None, message: str) -> None:
    images = sorted(p.name for p in host.host.images_dir.iterdir())
    records = host.cli("image", "list", "--format", "json", check=True).stdout
    path = tmp_path / "evil.tar"
    path.write_bytes(_image(entries, metadata))
    r = host.cli("image", "import", str(path), "--alias", "hx-evil")
    assert r.returncode == 14, r.stderr
    assert message in r.stderr, r.stderr
    assert sorted(p.name for p in host.host.images_dir.iterdir()) == images  # no copy left
    assert host.cli("image", "list", "--format", "json", check=True).stdout == records
    assert not Path("/", CANARY).exists()


def _map(host: int, size: int = 1000000000, ns: int = 0, gid_host: int | None = None) -> str:
    """``volatile.last_state.idmap`` as LXD 5.0 writes it (one uid and one gid range)."""
    return json.dumps([{"Isuid": True, "Isgid": False, "Hostid": host, "Nsid": ns,
                        "Maprange": size},
                       {"Isuid": False, "Isgid": True, "Hostid": host if gid_host is None
                        else gid_host, "Nsid": ns, "Maprange": size}])


def _tree(base: int, stray: int | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    """A small rootfs as LXD's generic tarball stores it: owners at ``base`` + N (``stray``:
    one more file owned by that uid)."""
    out = [_info(R, tarfile.DIRTYPE, uid=base, gid=base, mode=0o755),
           _info(f"{R}/etc", tarfile.DIRTYPE, uid=base, gid=base, mode=0o755),
           _info(f"{R}/etc/hostname", uid=base, gid=base, mode=0o644, size=3),
           _info(f"{R}/home", tarfile.DIRTYPE, uid=base, gid=base, mode=0o755),
           _info(f"{R}/home/notes", uid=base + 1000, gid=base + 1000, mode=0o600, size=3)]
    if stray is not None:
        out.append(_info(f"{R}/etc/stray", uid=stray, gid=base, mode=0o644, size=3))
    return [(i, b"hi\n" if i.isreg() else b"") for i in out]


TWO_UID_RANGES = json.dumps([{"Isuid": True, "Isgid": True, "Hostid": h, "Nsid": 0,
                              "Maprange": 65536} for h in (100000, 0)])
# what, recorded map, the tree's owners, None (imports) or the refusal
IDMAPS: list[tuple[str, str, list[tuple[tarfile.TarInfo, bytes]], str | None]] = [
    ("LXD 5.0's map, files at its base", _map(100000), _tree(100000), None),
    ("a map from 1000000", _map(1000000), _tree(1000000), None),
    ("no map: the container's view", "[]", _tree(0), None),
    ("map at 100000, files at 0", _map(100000), _tree(0),
     f"member '{R}' is owned by uid 0, outside the 65536 ids"),
    ("no map, files at 100000", "[]", _tree(100000), "is owned by uid 100000, outside"),
    ("base 0 claimed, files at 100000", _map(0), _tree(100000),
     "is owned by uid 100000, outside"),
    ("one file past the range", _map(100000), _tree(100000, stray=165536),
     f"member '{R}/etc/stray' is owned by uid 165536, outside the 65536 ids"),
    ("one file below the base", _map(100000), _tree(100000, stray=99999),
     "is owned by uid 99999, outside"),
    ("several ranges", TWO_UID_RANGES, _tree(100000), "one range for uids and one for gids"),
    ("root mapped elsewhere", _map(100000, ns=1), _tree(100000), "from container id 1"),
    ("huge range", _map(4294000000), _tree(4294000000), "past the last valid id"),
    ("uids and gids apart", _map(100000, gid_host=0), _tree(100000), "different host ids"),
    ("not JSON", "[{", _tree(100000), "is not JSON"),
]


def test_recorded_idmap_is_honoured_and_held_to_the_tree(host) -> None:  # type: ignore[no-untyped-def]
    """LXD 5.0's generic tarball stores an unprivileged rootfs at its on-disk ids and records
    the map: the map must be one sane range and every owner inside its 65536 ids; the ids
    land at this host's base. Anything else is refused and changes nothing."""
    before = host_state(host)
    archive = host.root / "idmap.tar.gz"
    here = default_idmap().base
    for what, idmap, tree, refusal in IDMAPS:
        config = {"volatile.last_state.idmap": idmap}
        archive.write_bytes(lxd_archive(lxd_index("idm", config), None, tree))
        r = host.cli("import", str(archive), "hx-idmap", "--pool", "dir")
        if refusal is None:
            assert r.returncode == 0, (what, r.stderr)
            rootfs = host.cts.rootfs(host.cts.get("hx-idmap"))
            assert os.lstat(rootfs).st_uid == here, what
            assert os.lstat(rootfs / "home/notes").st_uid == here + 1000, what
            assert os.lstat(rootfs / "home/notes").st_gid == here + 1000, what
            host.cli("delete", "--force", "hx-idmap", check=True)
        else:
            assert r.returncode == 22, (what, r.stderr)
            assert refusal in r.stderr, (what, r.stderr)
        assert host_state(host) == before, what
