"""migrator.exchange: the pure parts (index parsing, config conversion, compression
sniffing)."""

from __future__ import annotations

import gzip
import io
import lzma

import pytest
import yaml
import zstandard

from migrator.core.errors import CorruptBackup, InvalidInput, UnsafeArchive
from migrator.exchange.compression import open_archive
from migrator.exchange.layout import BackupFormatError, parse_index
from migrator.exchange.lxd_config import convert_config
from migrator.exchange.lxd_idmap import disk_shift, lxd_idmap
from migrator.streams import ProgressMeter


def index(**over: object) -> bytes:
    doc: dict[str, object] = {
        "name": "c1", "backend": "btrfs", "pool": "default", "snapshots": ["snap0", "snap1"],
        "optimized": True, "optimized_header": True, "type": "container",
        "config": {"container": {"name": "c1", "config": {"security.privileged": "false"},
                                 "expanded_config": {"security.privileged": "true"}},
                   "snapshots": [{"name": "c1/snap0", "created_at": "2025-01-01T00:00:00Z"}]},
    }
    doc.update(over)
    return yaml.safe_dump(doc).encode()


def test_parse_index_reads_what_lxd_writes() -> None:
    idx = parse_index(index())
    assert idx.name == "c1" and idx.optimized and idx.backend == "btrfs"
    assert idx.snapshots == ["snap0", "snap1"]
    assert idx.privileged  # from expanded_config: a profile may set it
    assert "snap0" in idx.snapshot_docs  # "c1/snap0" as older LXD names them


@pytest.mark.parametrize(
    ("over", "error", "message"),
    [
        ({"type": "virtual-machine"}, InvalidInput, "holds a virtual-machine"),
        ({"config": None}, BackupFormatError, "no embedded config"),
        ({"snapshots": ["../x"]}, InvalidInput, "invalid snapshot name"),
        ({"snapshots": ["a", "a"]}, CorruptBackup, "lists a snapshot twice"),
        ({"name": 7}, CorruptBackup, "has no name"),
    ],
)
def test_parse_index_refuses(over: dict[str, object], error: type[Exception],
                             message: str) -> None:
    with pytest.raises(error, match=message):
        parse_index(index(**over))


def test_parse_index_refuses_non_yaml() -> None:
    with pytest.raises(CorruptBackup, match="not valid YAML"):
        parse_index(b"name: [unclosed")
    with pytest.raises(CorruptBackup, match="not a YAML mapping"):
        parse_index(b"- a\n- b\n")


def test_convert_config_keeps_what_runs_here_and_reports_the_rest() -> None:
    conf, dropped = convert_config({
        "security.privileged": "True", "limits.memory": "1GiB", "limits.cpu": "0-3",
        "user.a": "b", "image.os": "Debian", "volatile.idmap.base": "1000000",
        "raw.lxc": "lxc.x = y", "limits.processes": "500",
    })
    assert conf == {"security.privileged": "true", "limits.memory": str(1 << 30),
                    "user.a": "b", "image.os": "Debian"}
    assert [d.split("=")[0] for d in dropped] == ["limits.cpu", "limits.processes", "raw.lxc"]
    assert all("(" in d for d in dropped)  # each says why


@pytest.mark.parametrize(
    ("compress", "kind"),
    [
        (lambda b: zstandard.ZstdCompressor().compress(b), "zstd"),
        (gzip.compress, "gzip"),
        (lzma.compress, "xz"),
        (lambda b: b, "none"),
    ],
)
def test_compression_is_detected_by_magic(compress, kind: str) -> None:  # type: ignore[no-untyped-def]
    payload = b"x" * 100_000 + b"end"
    events = []
    meter = ProgressMeter(events.append, "import", None, every=0)
    stream, found = open_archive(io.BytesIO(compress(payload)), meter)
    assert found == kind
    assert stream.read() == payload
    assert meter.done == len(compress(payload))


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress,
                                      lambda b: zstandard.ZstdCompressor().compress(b)])
def test_a_cut_compressed_stream_is_corrupt(compress) -> None:  # type: ignore[no-untyped-def]
    data = compress(bytes(range(256)) * 4000)
    stream, _ = open_archive(io.BytesIO(data[: len(data) // 2]),
                             ProgressMeter(lambda e: None, "import"))
    with pytest.raises(CorruptBackup, match="damaged or cut short"):
        stream.read()


def test_disk_idmap_round_trips_through_lxds_key() -> None:
    assert disk_shift({"volatile.last_state.idmap": lxd_idmap(100000)}) == 100000
    assert lxd_idmap(0) == "[]"
    assert disk_shift({"volatile.last_state.idmap": "[]"}) == 0
    assert disk_shift({}) == 0
    lxd = ('[{"Isuid":true,"Isgid":false,"Hostid":1000000,"Nsid":0,"Maprange":1000000000},'
           '{"Isuid":false,"Isgid":true,"Hostid":1000000,"Nsid":0,"Maprange":1000000000}]')
    assert disk_shift({"volatile.last_state.idmap": lxd}) == 1000000
    both = '[{"Isuid":true,"Isgid":true,"Hostid":100000,"Nsid":0,"Maprange":65536}]'
    assert disk_shift({"volatile.last_state.idmap": both}) == 100000


@pytest.mark.parametrize(("claimed", "why"), [
    ("not json", "is not JSON"),
    ('{"Hostid": 0}', "is not a list"),
    ('[{"Isuid":true,"Isgid":false,"Hostid":100000,"Nsid":0,"Maprange":65536}]',
     "one range for uids and one for gids"),
    ('[{"Isuid":true,"Isgid":true,"Hostid":-100000,"Nsid":0,"Maprange":65536}]',
     "to host id -100000"),
    ('[{"Isuid":true,"Isgid":true,"Hostid":100000,"Nsid":1000,"Maprange":65536}]',
     "from container id 1000"),
    ('[{"Isuid":true,"Isgid":true,"Hostid":100000,"Nsid":0,"Maprange":10}]', "maps 10 ids"),
    ('[{"Isuid":true,"Isgid":true,"Hostid":"100000","Nsid":0,"Maprange":65536}]',
     "not three integers"),
    ('[{"Isuid":true,"Isgid":false,"Hostid":100000,"Nsid":0,"Maprange":65536},'
     '{"Isuid":false,"Isgid":true,"Hostid":0,"Nsid":0,"Maprange":65536}]', "different host"),
    ('[{"Isuid":true,"Isgid":true,"Hostid":100000,"Nsid":0,"Maprange":65536},'
     '{"Isuid":true,"Isgid":true,"Hostid":0,"Nsid":0,"Maprange":65536}]', "one range"),
    # LXD's own 1e9 ids are fine from 1000000, not past the 32-bit ids
    ('[{"Isuid":true,"Isgid":true,"Hostid":4294000000,"Nsid":0,"Maprange":1000000000}]',
     "past the last valid id"),
])
def test_an_archives_idmap_must_be_one_sane_range(claimed: str, why: str) -> None:
    with pytest.raises(UnsafeArchive, match=why):
        disk_shift({"volatile.last_state.idmap": claimed})


def test_parse_index_bounds_yaml_aliases() -> None:
    # PyYAML's own dumper writes aliases for repeated objects (older exports hold some)
    shared = {"security.privileged": "true"}
    doc = yaml.safe_load(index())
    doc["config"]["container"]["config"] = doc["config"]["container"]["expanded_config"] = \
        shared
    assert b"*id001" in yaml.safe_dump(doc).encode()
    assert parse_index(yaml.safe_dump(doc).encode()).privileged
    # an alias bomb of < 1 kB (9 to the 9th nodes) is refused before anything walks it
    bomb = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
        b"%c: &%c [%s]\n" % (98 + i, 98 + i, b",".join([b"*%c" % (97 + i)] * 9))
        for i in range(8))
    assert len(bomb) < 1024
    with pytest.raises(CorruptBackup, match="YAML aliases expand the document beyond"):
        parse_index(bomb)
    with pytest.raises(CorruptBackup, match="refers to itself"):
        parse_index(b"name: &a [*a]\n")
    with pytest.raises(CorruptBackup, match="nested deeper than 64"):
        parse_index(b"name: " + b"[" * 100 + b"]" * 100 + b"\n")
