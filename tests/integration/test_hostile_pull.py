"""A hostile source host during a pull, and a hostile agent reply, over real SSH.

Host a pulls (``migrate copy evil:pulled pulled``) from host b, whose "agent" is
``hostile_agent.py`` (host a's inventory names it as host b's agent command, so b's real
sshd runs it). It answers the pull by sending calls aimed at another container on host a
(the victim, with a file, a snapshot and a recorded config), a LINK offer to an address of
its choosing, or tar data escaping the pulled container's rootfs. Each case must end with
a clear typed error naming the refused call, and, checked from the outside: the victim's
files, snapshots, record and LXC config unchanged, no new container record or volume, the
victim still stopped, nothing written outside its place, nothing connected to.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testrigs.testhosts import TestHostSpec
from tests.integration.test_remote import host_pair, m
from tests.integration.treecmp import signature

BASE = Path("/var/tmp/migrator-tests/hostile-pull")
PREFIX = "mth"
SCRIPT = Path(__file__).with_name("hostile_agent.py")
POOL = "btrfs"


@pytest.fixture(scope="module")
def pair(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir", POOL), ("busybox",)) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def setup(pair) -> Iterator[tuple[TestHostSpec, Path]]:  # type: ignore[no-untyped-def]
    """Host a with a victim container, and host b in its inventory as "evil" whose agent
    is the hostile script reading its case from ``case``."""
    a, b = pair
    case = BASE / "case.json"
    (a.root / "ssh").mkdir(exist_ok=True)
    shutil.copy(a.known_hosts, a.root / "ssh" / "known_hosts")
    m(a, "host", "add", "evil", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", f"{sys.executable} {SCRIPT} {case}")
    m(a, "create", "busybox", "victim", "-p", POOL)
    (rootfs(a, "victim") / "precious").write_text("the only copy\n")
    m(a, "snapshot", "create", "victim", "v0")
    yield a, case
    m(a, "delete", "--force", "victim")
    m(a, "host", "remove", "evil")


def rootfs(spec: TestHostSpec, name: str) -> Path:
    return spec.root / "storage-pools" / POOL / "containers" / name / "rootfs"


def outside_view(a: TestHostSpec) -> dict[str, Any]:
    """Everything a hostile pull could have changed on host a, read from the outside."""
    _rc, info, _e = m(a, "info", "victim", "--format", "json")
    _rc, snaps, _e = m(a, "snapshot", "list", "victim", "--format", "json")
    _rc, listed, _e = m(a, "list", "--format", "json")
    pools = a.root / "storage-pools"
    return {
        "info": json.loads(info),
        "snapshots": json.loads(snaps),
        "containers": sorted(c["name"] for c in json.loads(listed)),
        "lxc_config": (a.root / "lxc" / "victim" / "config").read_bytes(),
        "tree": signature(rootfs(a, "victim")),
        "snapshot_dirs": sorted(p.name for p in (pools / POOL / "containers-snapshots" /
                                                 "victim").iterdir()),
        "volumes": sorted(str(p.relative_to(pools)) for p in pools.glob("*/containers*/*")),
        "lxc_dirs": sorted(p.name for p in (a.root / "lxc").iterdir()),
    }


def pull(a: TestHostSpec, case: Path, kind: str, **extra: Any) -> tuple[int, str]:
    case.write_text(json.dumps({"kind": kind, "victim": "victim", "pulled": "pulled",
                                "pool": POOL, **extra}))
    rc, _out, err = m(a, "copy", "evil:pulled", "pulled", "-p", POOL, check=False)
    return rc, err


@pytest.mark.parametrize(("kind", "refused"), [
    ("receive", "'receive' call aimed at 'victim'"),
    ("delete", "'delete_snapshot' call aimed at 'victim'"),
    ("commit", "'commit_container' call aimed at 'victim'"),
])
def test_calls_aimed_at_another_container_are_refused(setup, kind: str,  # type: ignore[no-untyped-def]
                                                      refused: str) -> None:
    a, case = setup
    before = outside_view(a)
    rc, err = pull(a, case, kind)
    assert rc == 26, err  # CallRefused
    assert refused in err and "pulling 'pulled'" in err and "do not trust" in err, err
    after = outside_view(a)
    assert after == before
    assert after["containers"] == ["victim"] and after["info"]["state"] == "STOPPED"
    assert after["info"]["config"].get("user.owned") is None
    assert not any("pulled" in v for v in after["volumes"])


def test_a_refresh_may_not_delete_the_targets_own_snapshots(setup) -> None:  # type: ignore[no-untyped-def]
    a, case = setup
    m(a, "create", "busybox", "pulled", "-p", POOL)
    m(a, "snapshot", "create", "pulled", "s0")
    try:
        before = outside_view(a)
        case.write_text(json.dumps({"kind": "delete-own", "victim": "victim",
                                    "pulled": "pulled", "pool": POOL}))
        rc, _out, err = m(a, "copy", "evil:pulled", "pulled", "--refresh", check=False)
        assert rc == 26, err
        assert "'delete_snapshot' call aimed at 'pulled'" in err, err
        assert "'s0' was not received by this pull" in err, err
        assert outside_view(a) == before
        _rc, out, _e = m(a, "snapshot", "list", "pulled", "--format", "json")
        assert [s["name"] for s in json.loads(out)] == ["s0"]
        assert (a.root / "storage-pools" / POOL / "containers-snapshots" / "pulled" /
                "s0").is_dir()
    finally:
        m(a, "delete", "--force", "pulled")


def test_a_link_offer_is_refused_and_never_connected(setup) -> None:  # type: ignore[no-untyped-def]
    a, case = setup
    before = outside_view(a)
    with socket.socket() as listener:  # where the hostile host points the client
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        rc, err = pull(a, case, "link", address="127.0.0.1", port=port)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody came
    assert rc == 26, err
    assert f"refused a data link offer to '127.0.0.1:{port}'" in err, err
    assert outside_view(a) == before  # the pulled container's partial volume is gone too


@pytest.mark.parametrize(("kind", "refused"), [
    ("tar", "cron"),
    ("device", "block device"),
])
def test_pulled_tar_data_goes_through_the_guard(setup, kind: str, refused: str) -> None:  # type: ignore[no-untyped-def]
    a, case = setup
    outside = BASE / "outside"
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir()
    before = outside_view(a)
    rc, err = pull(a, case, kind, outside=str(outside))
    assert rc == 22, err  # UnsafeArchive
    assert refused in err, err
    assert list(outside.iterdir()) == []  # nothing written through the planted link
    assert outside_view(a) == before


def test_a_hostile_error_reply_is_cleaned(setup) -> None:  # type: ignore[no-untyped-def]
    a, case = setup
    message = ("\x1b]0;owned\x07\x1b[2J\x1b[1;31mdisk wiped\x1b[0m\r\x00" + "A" * 50_000)
    rc, err = pull(a, case, "reply", message=message)
    assert rc == 18, err  # RemoteError: not SystemExit, not an exit code of its choosing
    assert "disk wiped" in err and "on evil:" in err
    assert "\x1b" not in err and "\x07" not in err and "\x00" not in err and "\r" not in err
    assert "owned" not in err and len(err) < 6000


def test_an_honest_pull_still_works_with_the_victim_untouched(setup, pair) -> None:  # type: ignore[no-untyped-def]
    """The same hosts with host b's real agent: the pull goes through (control case)."""
    a, case = setup
    _a, b = pair
    m(a, "host", "add", "honest", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", f"{sys.executable} -m migrator.cli.main")
    try:
        m(b, "create", "busybox", "pulled", "-p", "dir")
        (b.root / "storage-pools" / "dir" / "containers" / "pulled" / "rootfs" /
         "hello").write_text("hi\n")
        before = outside_view(a)
        m(a, "copy", "honest:pulled", "pulled", "-p", POOL)
        assert (rootfs(a, "pulled") / "hello").read_text() == "hi\n"
        after = outside_view(a)
        assert after["tree"] == before["tree"] and after["snapshots"] == before["snapshots"]
        assert after["lxc_config"] == before["lxc_config"]
    finally:
        m(a, "delete", "--force", "pulled", check=False)
        m(b, "delete", "--force", "pulled", check=False)
        m(a, "host", "remove", "honest")


@pytest.mark.parametrize("src_pool", ["btrfs", "dir"])  # a native stream / a tar stream
def test_a_device_node_in_a_pulled_container_is_refused(setup, pair, src_pool: str) -> None:  # type: ignore[no-untyped-def]
    """Host b's real agent sends an unprivileged container whose rootfs holds a block
    device node with a host disk's numbers: btrfs to btrfs it comes as a native stream,
    which only the inspection before the commit sees; dir to btrfs as tar, which the tar
    guard refuses on the way in. Either way nothing is recorded or left here."""
    a, _case = setup
    _a, b = pair
    m(a, "host", "add", "honest", b.link_ip, "--key", str(a.client_key), "--remote-root",
      str(b.root), "--command", f"{sys.executable} -m migrator.cli.main")
    try:
        m(b, "create", "busybox", "devs", "-p", src_pool)
        disk = b.root / "storage-pools" / src_pool / "containers" / "devs" / "rootfs" / "disk"
        os.mknod(disk, 0o666 | stat.S_IFBLK, os.makedev(7, 0))
        before = outside_view(a)
        rc, _out, err = m(a, "copy", "honest:devs", "devs", "-p", POOL, check=False)
        assert rc == 22, err  # UnsafeArchive
        assert "disk" in err and "device" in err, err
        # which wall stopped it: the inspection of what arrived, or the tar guard
        assert ("pulled from honest" in err) == (src_pool == "btrfs"), err
        assert outside_view(a) == before  # no record, no volume, the victim as it was
    finally:
        m(b, "delete", "--force", "devs", check=False)
        m(a, "host", "remove", "honest")
