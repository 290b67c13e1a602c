"""``migrate p2c`` against a real machine the runtime did not make.

Two test hosts (``mt9-a``, ``mt9-b``) and a debootstrapped Debian "physical machine" on the
same switch (``testrigs.testmachine``: its own network, mount and PID namespaces, an ext4 root
disk, a btrfs disk at /srv/archive holding one file on a bad sector, sshd and a web page).
Host a's CLI converts the machine into a container on host b.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrigs import testmachine
from testrigs.testhosts import TestHostSpec
from testrigs.testmachine import BAD_FILE, WEB_PAGE, TestMachine, http_get
from tests.integration.test_remote import host_pair

BASE = Path("/var/tmp/migrator-tests/p2c")
PREFIX = "mt9"
AGENT = f"{sys.executable} -m migrator.cli.main"
MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
REPO = Path(__file__).resolve().parents[2]
DATA_MB = 300  # on top of the ~250 MB system: time enough to cut a transfer halfway


@pytest.fixture(scope="module")
def world(image_cache) -> Iterator[tuple[TestHostSpec, TestHostSpec, TestMachine]]:  # type: ignore[no-untyped-def]
    with host_pair(BASE, PREFIX, ("dir",), ()) as (a, b), \
            testmachine.running(BASE / "machine", PREFIX, a.client_key, data_mb=DATA_MB,
                                bad_file=True) as machine:
        (a.root / "ssh").mkdir(exist_ok=True)
        shutil.copy(a.known_hosts, a.root / "ssh" / "known_hosts")
        with open(a.root / "ssh" / "known_hosts", "a") as f:
            f.write(machine.known_hosts_line())
        cli(a, "host", "add", "b", b.link_ip, "--key", str(a.client_key), "--remote-root",
            str(b.root), "--command", AGENT)
        yield a, b, machine


def cli(spec: TestHostSpec, *args: str, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*MIGRATE, "--root", str(spec.root), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"migrate {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r


def p2c_args(a: TestHostSpec, m: TestMachine, name: str, *more: str) -> list[str]:
    return ["p2c", f"root@{m.ip}", name, "--to", "b", "--key", str(a.client_key), *more]


def containers(spec: TestHostSpec) -> list[str]:
    return [c["name"] for c in json.loads(cli(spec, "list", "--format", "json").stdout)]


def volume(b: TestHostSpec, name: str) -> Path:
    return b.root / "storage-pools" / "dir" / "containers" / name


def du(path: Path) -> int:
    r = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else 0


@contextlib.contextmanager
def cleanup(b: TestHostSpec, *names: str) -> Iterator[None]:
    """Delete the named containers (or partial volumes) on b, whatever the test did."""
    try:
        yield
    finally:
        for n in names:
            if n in containers(b):
                cli(b, "delete", "--force", n, check=False)
            shutil.rmtree(volume(b, n), ignore_errors=True)


def test_dry_run_shows_the_inventory_and_changes_nothing(world) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    before = containers(b)
    r = cli(a, *p2c_args(a, m, "dry1", "--dry-run"))
    out = r.stdout + r.stderr
    assert "Debian GNU/Linux 12 (bookworm)" in out and "init systemd" in out, out
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| /")}
    assert "| yes " in rows["/"] and "ext4" in rows["/"], rows
    assert "| yes " in rows["/srv/archive"] and "btrfs" in rows["/srv/archive"], rows
    for skipped in ("/proc", "/sys", "/dev", "/run", "/tmp"):
        assert "| no " in rows[skipped], rows[skipped]
    assert "to transfer:" in out and "p2c-web.service" in out, out
    js = json.loads(cli(a, *p2c_args(a, m, "dry1", "--dry-run", "--format", "json")).stdout)
    inv = js["inventory"]
    assert inv["total_size"] > DATA_MB << 20
    assert inv["init"] == "systemd" and inv["os_id"] == "debian"
    assert containers(b) == before
    assert not volume(b, "dry1").exists()
    ops = json.loads(cli(a, "operations", "--all", "--format", "json").stdout)
    assert not [o for o in ops if o["container"] == "dry1"]


def test_p2c_boots_and_serves_the_same_page(world) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    original = http_get(f"{PREFIX}-a", m.ip, "/index.html")
    assert original == WEB_PAGE
    # a hostile machine: links at names the conversion writes, aimed at the host's cron
    planted = {rel: Path(f"/etc/cron.d/p2c-canary-{Path(rel).name}")
               for rel in ("root/p2c-report.txt", "etc/systemd/system/systemd-udevd.service")}
    for rel, target in planted.items():
        (m.rootfs_view / rel).symlink_to(target)
    with cleanup(b, "pm1"), _unplant(m, planted):
        r = cli(a, *p2c_args(a, m, "pm1", "--format", "json"))
        res = json.loads(r.stdout)
        assert res["status"] == "RUNNING", res
        assert res["boot"] in ("running", "degraded"), res
        assert res["unreadable"] == [BAD_FILE], res
        assert len(res["passes"]) == 2
        # the machine's files came over the direct data link (b is an "auto" host)
        assert res["passes"][0]["link"] == "tcp", res["passes"]
        assert res["passes"][1]["bytes"] < res["passes"][0]["bytes"] / 10, res["passes"]
        ip = res["ipv4"]
        assert http_get(f"{PREFIX}-b", ip, "/index.html") == original
        rootfs = volume(b, "pm1") / "rootfs"
        report = (rootfs / "root/p2c-report.txt").read_text()
        assert "/etc/fstab: commented out LABEL=pm-root / ext4" in report
        assert "masked systemd-udevd.service" in report
        assert BAD_FILE in report
        assert f"First boot: systemd is {res['boot']}" in report
        if res["boot"] == "degraded":  # only for reasons the report lists
            assert res["failed_units"] and all(u in report for u in res["failed_units"])
        fstab = (rootfs / "etc/fstab").read_text()
        assert "# p2c: LABEL=pm-root" in fstab and "\n/dev/vdb1" not in fstab
        assert os.readlink(rootfs / "etc/systemd/system/systemd-timesyncd.service") == "/dev/null"
        # unprivileged: the tree was shifted into the host's idmap
        base = (rootfs / "root").stat().st_uid
        assert base > 0 and (rootfs / "etc/passwd").stat().st_uid == base
        assert not (rootfs / BAD_FILE.lstrip("/")).exists()
        assert (rootfs / "srv/archive/good.txt").read_text() == "this file reads fine\n"
        assert (rootfs / "var/lib/appdata").is_dir()
        assert not any(t.exists() for t in planted.values())  # nothing written on the host
        assert not (rootfs / "root/p2c-report.txt").is_symlink()


@contextlib.contextmanager
def _unplant(m: TestMachine, planted: dict[str, Path]) -> Iterator[None]:
    try:
        yield
    finally:
        for rel, target in planted.items():
            (m.rootfs_view / rel).unlink(missing_ok=True)
            target.unlink(missing_ok=True)


def _cut_halfway(a: TestHostSpec, b: TestHostSpec, m: TestMachine, name: str) -> int:
    """Start a conversion and kill the machine's rsync sender once about half is across."""
    total = json.loads(cli(a, *p2c_args(a, m, name, "--dry-run", "--format", "json")).stdout)[
        "inventory"]["total_size"]
    p = subprocess.Popen([*MIGRATE, "--root", str(a.root), *p2c_args(a, m, name)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while du(volume(b, name)) < total * 0.45:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the transfer did not progress"
            time.sleep(0.1)
        senders = m.processes("rsync")
        assert senders, "no rsync sender on the machine"
        for pid in senders:
            os.kill(pid, signal.SIGKILL)
        _out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0, err
    assert "--resume" in err, err
    return total


def test_a_cut_transfer_resumes_without_starting_over(world) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    with cleanup(b, "pm2"):
        total = _cut_halfway(a, b, m, "pm2")
        partial = du(volume(b, "pm2"))
        ops = json.loads(cli(a, "operations", "--format", "json").stdout)
        cut = [o for o in ops if o["container"] == "pm2"]
        assert cut and cut[0]["status"] in ("failed", "interrupted"), ops
        again = cli(a, *p2c_args(a, m, "pm2"), check=False)
        assert again.returncode == 6 and "--resume" in again.stderr, again.stderr
        r = cli(a, *p2c_args(a, m, "pm2", "--resume", "--no-start", "--format", "json"))
        res = json.loads(r.stdout)
        assert res["resumed"] == cut[0]["id"]
        first = res["passes"][0]
        # only what was missing crossed: well under the whole tree
        assert first["bytes"] < total - partial * 0.8, (first, total, partial)
        assert first["bytes"] < total * 0.75, (first, total)
        assert res["status"] == "STOPPED" and "pm2" in containers(b)
        after = json.loads(cli(a, "operations", "--all", "--format", "json").stdout)
        assert {o["id"]: o["status"] for o in after}[cut[0]["id"]] == "resumed"


def test_recover_removes_a_cut_conversion(world) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    with cleanup(b, "pm3"):
        _cut_halfway(a, b, m, "pm3")
        assert volume(b, "pm3").exists()
        ops = json.loads(cli(a, "operations", "--format", "json").stdout)
        op = next(o for o in ops if o["container"] == "pm3")
        r = cli(a, "recover", op["id"])
        assert "rolled back" in r.stderr, r.stderr
        assert not volume(b, "pm3").exists()
        assert "pm3" not in containers(b)


def test_strict_refuses_unreadable_files(world) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    with cleanup(b, "pm4"):
        r = cli(a, *p2c_args(a, m, "pm4", "--strict", "--exclude", "/var/lib/appdata"),
                check=False)
        assert r.returncode == 8 and BAD_FILE in r.stderr, r.stderr
        assert not volume(b, "pm4").exists() and "pm4" not in containers(b)


def test_clear_errors_before_anything_moves(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b, m = world
    before = containers(b)
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
                   check=True)
    r = cli(a, *p2c_args(a, m, "e1")[:-2], "--key", str(wrong), "--dry-run", check=False)
    assert r.returncode == 24 and "refused our login" in r.stderr, r.stderr

    known = a.root / "ssh" / "known_hosts"
    saved = known.read_text()
    try:
        known.write_text("".join(line for line in saved.splitlines(keepends=True)
                                 if not line.startswith(m.ip + " ")))
        r = cli(a, *p2c_args(a, m, "e1", "--dry-run"), check=False)
        assert r.returncode == 17 and "is unknown" in r.stderr and "SHA256:" in r.stderr, \
            r.stderr
        other = wrong.with_name("wrong_key.pub").read_text().split()
        known.write_text(known.read_text() + f"{m.ip} {other[0]} {other[1]}\n")
        r = cli(a, *p2c_args(a, m, "e1", "--dry-run"), check=False)
        assert r.returncode == 17 and "CHANGED" in r.stderr, r.stderr
    finally:
        known.write_text(saved)

    bins = m.rootfs_view / "usr/bin"
    moved = [t for t in ("rsync", "tar") if (bins / t).exists()]
    try:
        for t in moved:
            (bins / t).rename(bins / f"{t}.p2c-test")
        r = cli(a, *p2c_args(a, m, "e1"), check=False)
        assert r.returncode == 10 and "has no rsync (nor tar)" in r.stderr, r.stderr
    finally:
        for t in moved:
            (bins / f"{t}.p2c-test").rename(bins / t)
    assert containers(b) == before and not volume(b, "e1").exists()



def test_p2c_to_this_host_privileged(world) -> None:  # type: ignore[no-untyped-def]
    """``--to local``: the in-process agent serves the same requests; ids kept as they are."""
    a, _b, m = world
    with cleanup(a, "pm5"):
        r = cli(a, "p2c", f"root@{m.ip}", "pm5", "--to", "local", "--key", str(a.client_key),
                "--privileged", "--no-start", "--exclude", "/var/lib/appdata",
                "--format", "json")
        res = json.loads(r.stdout)
        assert res["target"] == "local:pm5" and res["status"] == "STOPPED", res
        assert "pm5" in containers(a)
        rootfs = volume(a, "pm5") / "rootfs"
        assert (rootfs / "etc/passwd").stat().st_uid == 0
        assert (rootfs / "var/lib/appdata").exists() is False
        assert "privileged: yes" in (rootfs / "root/p2c-report.txt").read_text()
