"""Host evacuation across three test hosts over real SSH (``mt16e-a`` -> b, c, and back).

Host a holds six containers: three privileged busybox counters (``tests/workloads/counter.c``,
16 MB each), one running container CRIU cannot dump (a process whose session leader is
outside it: started by ``migrate exec`` without ``setsid``) and two stopped ones. The
evacuation spreads them over b and c (live where it can, with their memory; stateless
where it cannot, saying why), records where each went, and ``--restore`` brings every one
back to a. ``--dry-run`` changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrigs import testhosts
from testrigs.testhosts import TestHostSpec
from tests.conftest import IN_CI
from tests.integration.test_live import assert_kept_memory, launch_counting, state
from tests.integration.test_remote import add_to_inventory, build_workload, m

BASE = Path("/var/tmp/migrator-tests/evacuate")
PREFIX = "mt16e"
COUNTERS = ("r1", "r2", "r3")
EVERY = sorted((*COUNTERS, "n1", "s1", "s2"))


@pytest.fixture(scope="module")
def counter(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return build_workload(tmp_path_factory, "counter")


@pytest.fixture(scope="module")
def trio(image_cache) -> Iterator[tuple[TestHostSpec, ...]]:  # type: ignore[no-untyped-def]
    """Hosts a, b, c, each in the others' inventory, and a in its own (how b and c reach it
    to send a running container back: ``--restore`` finds it); torn down after."""
    if os.geteuid() != 0 or shutil.which("/usr/sbin/sshd") is None:
        msg = "evacuation tests need root and sshd (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    testhosts.down(BASE, PREFIX)
    try:
        specs = testhosts.up(("a", "b", "c"), BASE, pools=("dir",), images=("busybox",),
                             prefix=PREFIX)
        for x in specs:
            add_to_inventory(x, *(y for y in specs if y is not x or x.name == "a"))
        yield tuple(specs)
    finally:
        problems = testhosts.down(BASE, PREFIX)
        assert not problems, problems
        assert testhosts.leftovers(BASE, PREFIX) == []


@pytest.fixture
def hosts(trio):  # type: ignore[no-untyped-def]
    yield trio
    for spec in trio:
        _rc, out, _e = m(spec, "list", "--format", "json")
        for c in json.loads(out):
            m(spec, "delete", "--force", c["name"])
        (spec.root / "evacuation.json").unlink(missing_ok=True)
    for spec in trio:
        _rc, out, _e = m(spec, "operations", "--format", "json")
        assert json.loads(out) == [], out  # nothing interrupted left behind


def listing(spec: TestHostSpec) -> dict[str, str]:
    _rc, out, _e = m(spec, "list", "--format", "json")
    return {c["name"]: c["state"] for c in json.loads(out)}


def evacuate(spec: TestHostSpec, *args: str) -> list[dict]:  # type: ignore[type-arg]
    _rc, out, _e = m(spec, "evacuate", "local", *args, "--format", "json")
    return json.loads(out)


def test_evacuate_three_hosts_and_restore(hosts, counter) -> None:  # type: ignore[no-untyped-def]
    a, b, c = hosts
    for n in COUNTERS:
        launch_counting(a, counter, n, mb=16, pool="dir")
    m(a, "launch", "busybox", "n1", "-p", "dir", "-c", "security.privileged=true")
    m(a, "exec", "n1", "--", "/bin/sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 &")
    for n in ("s1", "s2"):
        m(a, "create", "busybox", n, "-p", "dir")
    m(a, "snapshot", "create", "s1", "snap0")
    before = listing(a)
    assert before == {**dict.fromkeys((*COUNTERS, "n1"), "RUNNING"),
                      "s1": "STOPPED", "s2": "STOPPED"}

    # the plan: where and how each would go, and nothing changes
    # every inventory host but a's entry for itself (its agent names a's own id)
    plan = {p["name"]: p for p in evacuate(a, "--dry-run")}
    assert {n: p["how"] for n, p in plan.items()} == {
        **dict.fromkeys(COUNTERS, "live"), "n1": "stateless", "s1": "stateless",
        "s2": "stateless"}
    assert "session" in plan["n1"]["reason"], plan["n1"]
    assert {plan[n]["to"] for n in COUNTERS} == {"b", "c"}  # spread by free memory
    assert listing(a) == before and listing(b) == {} and listing(c) == {}
    assert not (a.root / "evacuation.json").exists()

    # running only: the stopped ones stay
    counts = {n: state(a, n) for n in COUNTERS}
    recs = {r["name"]: r for r in evacuate(a, "--to", "b,c", "--running-only", "-j", "2")}
    assert {n: r["how"] for n, r in recs.items()} == {
        **dict.fromkeys(COUNTERS, "live"), "n1": "stateless", "s1": "stayed", "s2": "stayed"}
    assert all(r["from"] == "local" for r in recs.values())
    assert all(recs[n]["downtime"] is not None and recs[n]["error"] is None for n in COUNTERS)
    assert "session" in recs["n1"]["reason"] and recs["s1"]["to"] is None
    assert listing(a) == {"s1": "STOPPED", "s2": "STOPPED"}
    where = {n: recs[n]["to"] for n in (*COUNTERS, "n1")}
    assert set(where.values()) == {"b", "c"}
    spec = {"b": b, "c": c}
    for n in COUNTERS:
        assert listing(spec[where[n]])[n] == "RUNNING"
        assert_kept_memory(spec[where[n]], n, counts[n])
    assert listing(spec[where["n1"]])["n1"] == "RUNNING"
    record = a.root / "evacuation.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600

    # then the stopped ones too
    recs2 = {r["name"]: r for r in evacuate(a, "--to", "b,c")}
    assert {r["how"] for r in recs2.values()} == {"stateless"} and set(recs2) == {"s1", "s2"}
    assert listing(a) == {}
    where |= {n: recs2[n]["to"] for n in ("s1", "s2")}
    assert all(listing(spec[where[n]])[n] == "STOPPED" for n in ("s1", "s2"))
    _rc, out, _e = m(spec[where["s1"]], "snapshot", "list", "s1", "--format", "json")
    assert [s["name"] for s in json.loads(out)] == ["snap0"]
    assert sorted(json.loads(record.read_text())["containers"]) == EVERY

    # back again: live where they run, pulled where they are stopped
    counts = {n: state(spec[where[n]], n) for n in COUNTERS}
    back = {r["name"]: r for r in evacuate(a, "--restore")}  # b and c reach it as "a"
    assert {n: r["how"] for n, r in back.items()} == {
        **dict.fromkeys((*COUNTERS, "n1"), "live"), "s1": "stateless", "s2": "stateless"}
    assert all(r["to"] == "local" and r["from"] == where[n] for n, r in back.items())
    assert listing(a) == before and listing(b) == {} and listing(c) == {}
    for n in COUNTERS:
        assert_kept_memory(a, n, counts[n])
    assert not record.exists()
    rc, _out, err = m(a, "evacuate", "local", "--restore", "--as", "a")
    assert rc == 0 and "nothing evacuated" in err


def test_a_failure_is_named_and_the_container_stays(hosts, counter) -> None:  # type: ignore[no-untyped-def]
    a, b, _c = hosts
    launch_counting(a, counter, "r1", mb=16, pool="dir")
    with contextlib.ExitStack() as undo:
        # the same name on b: its live plan and a stateless move both refuse it
        m(b, "create", "busybox", "r1", "-p", "dir")
        undo.callback(lambda: m(b, "delete", "--force", "r1", check=False))
        rc, out, err = m(a, "evacuate", "local", "--to", "b", "--format", "json", check=False)
    assert rc != 0 and "FAILED: r1" in err, err
    (rec,) = json.loads(out)
    assert (rec["name"], rec["how"], rec["to"]) == ("r1", "failed", "b")
    assert "already exists" in rec["error"]
    rc, _out, err = m(a, "evacuate", "local", "--to", "a", check=False)
    assert rc != 0 and "a is this host" in err
    assert listing(a) == {"r1": "RUNNING"}
    assert not (a.root / "evacuation.json").exists()
    rc, _out, err = m(a, "evacuate", "host-x", check=False)
    assert rc == 4 and "'host-x' is not in the inventory" in err, err


def test_another_host_evacuates_itself(hosts, counter) -> None:  # type: ignore[no-untyped-def]
    """``migrate evacuate a`` typed on b: a evacuates itself (its inventory, its record),
    its lines shown on b with its name; ``--restore`` from b brings everything back."""
    a, b, c = hosts
    launch_counting(a, counter, "r1", mb=16, pool="dir")
    m(a, "create", "busybox", "s1", "-p", "dir")
    count = state(a, "r1")
    _rc, out, err = m(b, "evacuate", "a", "--to", "c", "--format", "json")
    recs = {r["name"]: r for r in json.loads(out)}
    assert {n: (r["how"], r["to"]) for n, r in recs.items()} == {
        "r1": ("live", "c"), "s1": ("stateless", "c")}, recs
    assert "a: evacuating 2 of 2" in err, err
    assert listing(a) == {} and listing(c) == {"r1": "RUNNING", "s1": "STOPPED"}
    assert_kept_memory(c, "r1", count)
    assert (a.root / "evacuation.json").exists() and not (b.root / "evacuation.json").exists()
    # values are checked on a before its command line is made: nothing else runs
    rc, _out, err = m(b, "evacuate", "a", "--to", "c,--restore", check=False)
    assert rc == 3 and "invalid" in err.lower(), err
    assert listing(c) == {"r1": "RUNNING", "s1": "STOPPED"}
    count = state(c, "r1")
    rc, out, err = m(b, "evacuate", "a", "--restore")
    assert rc == 0 and "r1: live c -> local" in err, err
    assert listing(a) == {"r1": "RUNNING", "s1": "STOPPED"} and listing(c) == {}
    assert_kept_memory(a, "r1", count)
