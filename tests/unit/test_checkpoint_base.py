"""migrator.checkpoint.base: CRIU config files, /proc parsers, pre-freeze problems, images."""

from __future__ import annotations

import pytest

from migrator.checkpoint import base
from migrator.checkpoint.base import Task, criu_config, find_problems, listening_ports

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 0100007F:0016 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0
"""

STATUS = """Name:\tcounter
State:\tT (stopped)
Uid:\t100000\t100000\t100000\t100000
NSpid:\t27248\t8
NSpgid:\t23288\t0
NSsid:\t21843\t0
"""


def test_criu_config_one_option_a_line() -> None:
    assert criu_config(*base.dump_options()) == "leave-stopped\nenable-fs ramfs\n"
    lazy = base.dump_options(True, "127.0.0.1", 2777)
    assert criu_config(*lazy) == ("leave-stopped\nenable-fs ramfs\nlazy-pages\n"
                                  "address 127.0.0.1\nport 2777\n")
    assert base.restore_options(True) == ["mntns-compat-mode", "lazy-pages"]
    for bad in ("--leave-running", "a\nb", ""):
        with pytest.raises(ValueError):
            criu_config(bad)
    with pytest.raises(ValueError):
        base.dump_options(True)


def test_listening_ports_only_listen_state() -> None:
    assert listening_ports(TCP) == {8080}
    assert listening_ports("") == set()


def test_parse_status_reads_uids_and_namespaced_ids() -> None:
    t = base.parse_status(27248, STATUS, "uts:[1]", "user:[2]")
    assert (t.name, t.state, t.uids, t.nssid, t.nspgid) == ("counter", "T", (100000,) * 4, 0, 0)


def _task(pid: int, uid: int = 0, uts: str = "u1", user: str = "n1", sid: int = 1,
          state: str = "S") -> Task:
    return Task(pid, f"p{pid}", state, (uid,) * 4, sid, sid, uts, user)


def test_find_problems_names_each_kind() -> None:
    init = _task(10)
    assert find_problems([init, _task(11)], init, 0) == []
    tasks = [init, _task(11, uid=1000), _task(12, uts="u2"), _task(13, user="n2"),
             _task(14, sid=0), _task(15, state="T")]
    problems = find_problems(tasks, init, 0)
    assert [p.pid for p in problems] == [11, 12, 13, 14, 15]
    assert "non-root" in problems[0].what and "rlimit" in problems[0].hint
    assert "UTS" in problems[1].what and "ProtectHostname" in problems[1].hint
    assert "setsid" in problems[3].hint
    # unprivileged: the container's root is the idmap base
    assert find_problems([_task(10, uid=100000)], _task(10, uid=100000), 100000) == []


def test_log_tail_prefers_errors_and_skips_harmless_rlimit() -> None:
    log = ("(0.1) info\nError (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE\n"
           "(0.2) Error (criu/net.c:1823): net: Can't restore link: -1\n(0.3) done\n")
    assert base.log_tail(log) == ["(0.2) Error (criu/net.c:1823): net: Can't restore link: -1"]
    assert base.log_tail("a\nb\nc\n", 2) == ["b", "c"]


def test_images_dir_is_private_and_removable(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(base, "SHM_BASE", tmp_path / "shm")
    d = base.images_dir(tmp_path / "hostroot", "c1-live")
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700
    assert ((tmp_path / "shm").stat().st_mode & 0o777) == 0o711
    other = base.images_dir(tmp_path / "other-host", "c1-live")
    assert other != d
    (d / "core-1.img").write_bytes(b"x" * 10)
    assert base.images_dir(tmp_path / "hostroot", "c1-live") == d  # same dir, kept
    assert base.tree_bytes(d) == 10
    base.remove_images_dir(d)
    assert not d.exists()
    with pytest.raises(ValueError):
        base.remove_images_dir(tmp_path)
    with pytest.raises(ValueError):
        base.images_dir(tmp_path, "../x")
