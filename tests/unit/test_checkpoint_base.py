"""migrator.checkpoint.base: CRIU config files, /proc parsers, pre-freeze problems, images."""

from __future__ import annotations

import pytest

from migrator.checkpoint import base
from migrator.checkpoint.base import Task, criu_config, find_problems, listening_ports
from tests.conftest import unavailable

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
    assert criu_config(*base.dump_options()) == ("leave-stopped\nenable-fs ramfs\n"
                                                 "tcp-established\n")
    lazy = base.dump_options(True, "127.0.0.1", 2777)
    assert criu_config(*lazy) == ("leave-stopped\nenable-fs ramfs\ntcp-established\n"
                                  "lazy-pages\naddress 127.0.0.1\nport 2777\n")
    assert base.restore_options(True) == ["mntns-compat-mode", "tcp-established", "lazy-pages"]
    assert "tcp-established" in base.restore_options()
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


def test_tcp_note_says_when_peers_lose_their_connections() -> None:
    assert "carried (" in base.live_tcp_note(True)
    assert "lose" in base.live_tcp_note(False)


# inotify watches (checkpoint/watches.py) ---------------------------------------------------
FDINFO = """pos:\t0
flags:\t02004000
mnt_id:\t15
ino:\t1057
inotify wd:2 ino:2f51 sdev:44 mask:80c ignored_mask:0 fhandle-bytes:14 fhandle-type:4d f_handle:51
inotify wd:1 ino:101 sdev:44 mask:800 ignored_mask:0 fhandle-bytes:14 fhandle-type:4d f_handle:01
inotify wd:3 ino:zz sdev:44 mask:800
"""
MOUNTINFO = """565 512 0:68 /containers/d1/rootfs / rw,noatime shared:45 - btrfs /dev/loop2 rw
566 565 0:96 / /dev rw - tmpfs none rw
"""


def test_inotify_watches_and_the_root_mount_are_read_from_proc_text() -> None:
    from migrator.checkpoint import base as watches

    assert watches.parse_inotify(FDINFO) == {(0x44, 0x2F51), (0x44, 0x101)}
    assert watches.parse_inotify("pos:\t0\nflags:\t02\n") == set()
    assert watches.root_mount(MOUNTINFO) == ("btrfs", 68)  # the watch's sdev (0x44)
    assert watches.root_mount("566 565 0:96 / /dev rw - tmpfs none rw\n") is None


def test_a_swapped_link_goes_back_once_and_only_over_the_copy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import os

    from migrator.checkpoint import base as watches
    from migrator.runtime.inroot import RootDir

    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr").mkdir()
    (root / "usr" / "zone").write_bytes(b"TZif")
    os.symlink("/usr/zone", root / "etc" / "localtime")
    with RootDir(root) as r:  # what unpin does once the link is found watched
        st = r.lstat(watches.LOCALTIME)
        assert st is not None
        r.write_bytes(watches.LOCALTIME, b"TZif", 0o644, owner=(st.st_uid, st.st_gid))
    assert not (root / "etc" / "localtime").is_symlink()
    assert (root / "etc" / "localtime").read_bytes() == b"TZif"
    record = tmp_path / "record.json"
    record.write_text(json.dumps({watches.LOCALTIME: {"target": "/usr/zone", "uid": os.getuid(),
                                                      "gid": os.getgid()}}))
    assert watches.pin_back(root, record) == [watches.LOCALTIME]
    assert os.readlink(root / "etc" / "localtime") == "/usr/zone"
    assert not record.exists() and sorted(os.listdir(root / "etc")) == ["localtime"]
    assert watches.pin_back(root, record) == []  # no record: nothing to do
    # the container replaced the file meanwhile with a link of its own: left alone
    record.write_text(json.dumps({watches.LOCALTIME: {"target": "/elsewhere", "uid": 0,
                                                      "gid": 0}}))
    assert watches.pin_back(root, record) == []
    assert os.readlink(root / "etc" / "localtime") == "/usr/zone"


def test_unpin_leaves_a_root_that_is_not_btrfs_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from migrator.checkpoint import base as watches

    (tmp_path / "etc").mkdir()
    os.symlink("/usr/zone", tmp_path / "etc" / "localtime")
    record = tmp_path / "r.json"
    # this process's own root is what it reads: not btrfs on the test machines' / (ext4,
    # overlay), and a missing pid reads as no mount at all
    assert watches.unpin(tmp_path, 2**22 + 1, [], [record]) == []
    assert not record.exists() and os.path.islink(tmp_path / "etc" / "localtime")


def test_the_socket_option_shim_builds_and_keeps_its_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        unavailable("no C compiler (scripts/setup-host.sh installs gcc)")
    so = base.sockopt_shim(tmp_path)
    assert so is not None and so.exists() and so.suffix == ".so"
    assert base.sockopt_shim(tmp_path) == so  # built once
    assert sorted(p.name for p in tmp_path.iterdir()) == [so.name]  # nothing else left


def test_repair_off_lets_a_connection_in_repair_mode_send_again() -> None:
    import os
    import socket

    if os.geteuid() != 0:
        unavailable("TCP repair mode needs CAP_NET_ADMIN (run as root)")
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    try:
        cli.setsockopt(socket.SOL_TCP, base.TCP_REPAIR, 1)  # what criu's dump leaves
        with pytest.raises(OSError):
            cli.send(b"x")  # in repair mode with no queue chosen: EINVAL
        assert base.repair_off([os.getpid()]) >= 2  # both ends here, the listener refuses
        cli.send(b"ping")
        assert peer.recv(4) == b"ping"
    finally:
        for s in (cli, peer, srv):
            s.close()


def test_socket_inodes_and_a_process_holding_inet_sockets() -> None:
    import os
    import socket

    table = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
             "  timeout inode\n"
             "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
             "     0        0 4242 1 0000000000000000 100 0 0 10 0\n"
             "   1: 0100007F:0016 0100007F:D2F0 06 00000000:00000000 03:00000F1C 00000000"
             "     0        0 0 3 0000000000000000\n")
    assert base.socket_inodes(table) == {4242}  # a time-wait entry has no socket
    before = base.inet_sockets([os.getpid()])
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        assert base.inet_sockets([os.getpid()]) == before + 1
    finally:
        srv.close()
    assert base.inet_sockets([]) == 0


def test_lazy_pages_complete_needs_the_closing_line_and_no_error() -> None:
    """The lazy-pages daemon's log stands in for its exit status when the agent that
    started it is gone: only its closing line with no error before it counts as whole."""
    from migrator.checkpoint.lxc import lazy_pages_complete

    start = ("(00.2286) Connecting to server 198.51.100.10:38959\n"
             "(00.2303) tls: TLS handshake completed\n"
             "(00.2655) pr6-1 Read 668000 1 pages\n")
    done = start + "(04.0512) page-xfer: Disconnect from the page server\n"
    assert lazy_pages_complete(done)
    assert not lazy_pages_complete("")  # killed before it said anything
    assert not lazy_pages_complete(start)  # killed while it fetched
    assert not lazy_pages_complete(
        start + "(01.19) Error (criu/uffd.c:1234): uffd: 6-11: failed to read pages\n"
        "(01.19) page-xfer: Disconnect from the page server\n")
