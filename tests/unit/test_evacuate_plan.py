"""An evacuation's placement (``pipelines/evacuate.place``, pure) and its record: running
containers go where the most memory is free and the pool has room, stopped ones where the
pool has the most room, each placement taken off the target's figures (so containers
spread), and what fits nowhere stays with the reason."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from migrator.core.errors import InvalidState
from migrator.pipelines.evacuate import (
    Candidate,
    Outcome,
    Target,
    forget,
    load_record,
    place,
    record_path,
    remember,
)
from migrator.pipelines.remote_target import memory_info

G = 1 << 30
M = 1 << 20


def where(placements: list) -> dict[str, str | None]:  # type: ignore[type-arg]
    return {p.name: p.to for p in placements}


def test_running_containers_spread_by_free_memory() -> None:
    targets = [Target("b", "default", 100 * G, 4 * G), Target("c", "default", 100 * G, 4 * G)]
    cands = [Candidate(f"r{i}", "RUNNING", 1 * G, 10 * M) for i in range(4)]
    got = place(cands, targets)
    assert [p.to for p in got] == ["b", "c", "b", "c"]  # ties go to the earlier target
    assert all(p.how == "live" and p.pool == "default" for p in got)


def test_differences_below_the_noise_do_not_decide() -> None:
    # b reads 100 MiB more free than c: the same, for placement; they take turns
    targets = [Target("b", "default", 10 * G, 4 * G + 100 * M),
               Target("c", "default", 10 * G + 50 * M, 4 * G)]
    got = place([Candidate(f"r{i}", "RUNNING", 16 * M, M) for i in range(4)] +
                [Candidate(f"s{i}", "STOPPED", 0, M) for i in range(2)], targets)
    # equals take turns; the first turn goes to the one with more room in its pool (c)
    assert [p.to for p in got] == ["c", "b", "c", "b", "c", "b"]
    # beyond it, memory decides even against the count
    targets[0].mem_available = 5 * G
    assert [p.to for p in place([Candidate(f"r{i}", "RUNNING", 16 * M, M)
                                 for i in range(3)], targets)] == ["b", "b", "b"]


def test_the_most_free_memory_wins_and_the_biggest_goes_first() -> None:
    targets = [Target("b", "default", 100 * G, 2 * G), Target("c", "default", 100 * G, 3 * G)]
    cands = [Candidate("small", "RUNNING", 1 * G, M), Candidate("big", "RUNNING", 2500 * M, M)]
    got = where(place(cands, targets))
    # big first: only c holds 2.5 G; then small: b has 2 G, c 0.5 G left
    assert got == {"small": "b", "big": "c"}


def test_memory_and_pool_room_both_limit_a_running_container() -> None:
    targets = [Target("b", "default", 1 * G, 8 * G),  # memory, but no room in the pool
               Target("c", "fast", 10 * G, 2 * G)]
    got = place([Candidate("r", "RUNNING", 1 * G, 512 * M)], targets)
    assert (got[0].to, got[0].pool) == ("c", "fast")
    # the pool holds rootfs and memory (the images of a live move): 1.5 G > 1 G on b
    nowhere = place([Candidate("huge", "RUNNING", 9 * G, M)], targets)
    assert nowhere[0].to is None and nowhere[0].how == "stayed"
    assert "no target has room" in nowhere[0].reason


def test_an_agent_without_memory_figures_ranks_last_but_is_used() -> None:
    targets = [Target("old", "default", 100 * G, None), Target("new", "default", 10 * G, G)]
    got = where(place([Candidate("a", "RUNNING", 512 * M, M),
                       Candidate("b", "RUNNING", 768 * M, M)], targets))
    assert got == {"b": "new", "a": "old"}  # new has 256 M left after b: a goes to old


def test_stopped_containers_go_where_the_pool_has_most_room_or_stay() -> None:
    targets = [Target("b", "default", 5 * G, 64 * G), Target("c", "default", 6 * G, 1 * G)]
    cands = [Candidate("s1", "STOPPED", 0, 2 * G), Candidate("s2", "STOPPED", 0, 2 * G),
             Candidate("f", "FROZEN", 10 * M, M)]
    got = place(cands, targets)
    assert where(got) == {"s1": "c", "s2": "b", "f": None}  # c: 6 G, then b: 5 G > 4 G
    assert [p.how for p in got] == ["stateless", "stateless", "stayed"]
    assert "frozen" in got[2].reason
    kept = place(cands[:1], targets, running_only=True)
    assert kept[0].to is None and "--running-only" in kept[0].reason


def test_no_target_means_everything_stays() -> None:
    got = place([Candidate("r", "RUNNING", M, M)], [])
    assert got[0].to is None and got[0].reason == "no target host"


def test_the_record_is_private_and_survives_each_step(tmp_path: Path) -> None:
    remember(tmp_path, Outcome("c1", "local", "b", "live"), True, False)
    remember(tmp_path, Outcome("c2", "local", "c", "stateless"), False, True)
    remember(tmp_path, Outcome("c3", "local", None, "stayed"), False, False)
    remember(tmp_path, Outcome("c4", "local", "b", "failed"), True, False)
    path = record_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rec = load_record(tmp_path)
    assert sorted(rec) == ["c1", "c2"]
    assert (rec["c1"]["to"], rec["c1"]["how"], rec["c2"]["privileged"]) == ("b", "live", True)
    forget(tmp_path, "c1")
    assert sorted(load_record(tmp_path)) == ["c2"]
    forget(tmp_path, "c2")
    assert not path.exists() and load_record(tmp_path) == {}
    path.write_text(json.dumps(["not", "a", "record"]))
    with pytest.raises(InvalidState):
        load_record(tmp_path)


def test_an_outcome_is_one_json_record() -> None:
    d = Outcome("c1", "local", "b", "live", "live (post-copy)", 0.4, 3.2).as_dict()
    assert set(d) >= {"name", "from", "to", "how", "reason", "downtime", "seconds", "error"}
    assert (d["from"], d["to"], d["how"], d["downtime"]) == ("local", "b", "live", 0.4)
    assert "exit_code" not in d


def test_memory_info_reads_meminfo(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:        8000 kB\nMemFree:  10 kB\nMemAvailable:    6000 kB\n")
    assert memory_info(f) == {"mem_total": 8000 * 1024, "mem_available": 6000 * 1024}
    assert memory_info(tmp_path / "absent") == {}
    real = memory_info()
    assert 0 < real["mem_available"] <= real["mem_total"]
