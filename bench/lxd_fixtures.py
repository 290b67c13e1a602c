"""LXD compatibility, both ways, against a real LXD 5.0.2 (``testrigs.lxd``), and the small
LXD-made archives the test suite imports (``tests/fixtures/lxd/``).

Why a script and not the suite: the suite must not need LXD, so the archives LXD makes are
committed, and what only a live LXD can show (our exports importing and starting there) is
run here and recorded in ``bench/README.md`` ("LXD compatibility").

One run:

1. LXD up in its own network namespace (install if needed; dir pool, btrfs pool on a loop
   file; the fixtures' tiny image and the project's busybox image imported from files).
2. ``fixtures``: containers from the tiny image (dir/btrfs x privileged/unprivileged, and
   two unprivileged ones with a snapshot ``before`` taken before the first start), each
   started once (LXD shifts an unprivileged rootfs on disk at its first start, not its
   snapshots), stopped, snapshotted as ``s0``, then given ``/etc/motd`` (so the snapshots and
   the container differ), then exported in every kind the suite covers, into ``--out``.
3. ``here``: each fixture imported by ``migrate import`` on a project host and started (the
   suite does the same with more checks, ``tests/integration/test_lxd_fixtures.py``).
4. ``into-lxd``: busybox containers made here (unprivileged with a snapshot, privileged)
   exported by ``migrate export`` (gzip, zstd, none, instance-only, optimized btrfs),
   imported by ``lxc import`` and started by LXD, their ownership and snapshots checked
   inside LXD (``lxc exec ... stat``, ``lxc query``).
5. Everything torn down: LXD (daemon, namespace, loop device, its directory), the project
   host. A table is printed (markdown) and written as JSON with ``--json``.

    python bench/lxd_fixtures.py [--out tests/fixtures/lxd] [--json results.json]
                                 [--skip-fixtures]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from migrator.core import proc  # noqa: E402
from migrator.core.errors import MigratorError  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402
from migrator.runtime.images import ImageStore  # noqa: E402
from migrator.runtime.teardown import teardown  # noqa: E402
from testrigs.lxd import BUSYBOX_IMAGE, LxdRig, tiny_image  # noqa: E402

MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
MOTD = "written after s0\n"


@dataclass(frozen=True)
class Kind:
    """One LXD export kind: the fixture's file name, its source and ``lxc export`` flags."""

    file: str
    source: str  # udir, pdir, ubt, pbt
    flags: tuple[str, ...] = ()

    @property
    def privileged(self) -> bool:
        return self.source.startswith("p")

    @property
    def optimized(self) -> bool:
        return "--optimized-storage" in self.flags

    @property
    def snapshots(self) -> list[str]:
        early = ["before"] if SOURCES[self.source][2] else []
        return [] if "--instance-only" in self.flags else [*early, "s0"]


# name: pool, privileged, a snapshot "before" its first start (LXD shifts only the
# container's rootfs at a start: that snapshot stays at 0+N and records "[]")
SOURCES = {"udir": ("dir", False, False), "pdir": ("dir", True, False),
           "ubt": ("bt", False, False), "pbt": ("bt", True, False),
           "umix": ("dir", False, True), "umixbt": ("bt", False, True)}
KINDS = [
    Kind("dir-unpriv-gzip.tar.gz", "udir"),
    Kind("dir-unpriv-zstd.tar.zst", "udir", ("--compression", "zstd")),
    Kind("dir-unpriv-none.tar", "udir", ("--compression", "none")),
    Kind("dir-unpriv-instance-only.tar.gz", "udir", ("--instance-only",)),
    Kind("dir-priv-gzip.tar.gz", "pdir"),
    Kind("btrfs-unpriv-gzip.tar.gz", "ubt"),
    Kind("btrfs-unpriv-optimized.tar.gz", "ubt", ("--optimized-storage",)),
    Kind("btrfs-priv-optimized.tar.gz", "pbt", ("--optimized-storage",)),
    Kind("dir-unpriv-mixed.tar.gz", "umix"),
    Kind("btrfs-unpriv-mixed-optimized.tar.gz", "umixbt", ("--optimized-storage",)),
]


@dataclass
class Row:
    direction: str
    kind: str
    result: str = "not run"
    details: list[str] = field(default_factory=list)


def make_fixtures(rig: LxdRig, out: Path, work: Path) -> list[Row]:
    """The LXD-made archives, from the tiny image (a few kB of rootfs)."""
    rig.import_image(tiny_image(work / "tiny.tar.gz", work / "tiny"), "tiny")
    for name, (pool, privileged, early) in SOURCES.items():
        rig.lxc("init", "tiny", name, "-s", pool,
                *(["-c", "security.privileged=true"] if privileged else []))
        if early:
            rig.lxc("snapshot", name, "before")
        rig.lxc("start", name)
        rig.lxc("stop", name, "--timeout", "20")
        rig.lxc("snapshot", name, "s0")
        push = proc.run(["lxc", "file", "push", "-", f"{name}/etc/motd"], input=MOTD,
                        env=rig.env)
        assert push.returncode == 0
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in KINDS:
        target = out / kind.file
        target.unlink(missing_ok=True)
        rig.lxc("export", kind.source, str(target), *kind.flags)
        rows.append(Row("LXD export", kind.file, "made",
                        [f"{target.stat().st_size} bytes",
                         f"lxc export {kind.source} {kind.file} {' '.join(kind.flags)}".strip()]))
    return rows


@contextlib.contextmanager
def project_host(base: Path) -> Iterator[Host]:
    """A project host (namespace, bridge, dir and btrfs pools, busybox), torn down after."""
    tag = uuid.uuid4().hex[:6]
    h = Host(base / f"host-{tag}")
    try:
        h.init(f"mlx-{tag}", "192.0.2.1/24", None)
        h.create_pool("dir", "dir", None, None)
        h.create_pool("btrfs", "btrfs", None, "2GiB")
        ImageStore(h.images_dir, h.state).build("busybox", None, lambda m: None)
        yield h
    finally:
        problems = teardown(h, purge=True)
        if problems:
            print("teardown problems:", problems, file=sys.stderr)


def migrate(h: Host, *args: str, check: bool = True) -> proc.Completed:
    return proc.run([*MIGRATE, "--root", str(h.root), *args], timeout=600, check=check,
                    cwd=REPO)


def import_here(h: Host, fixtures: Path) -> list[Row]:
    """Each LXD fixture through ``migrate import``, started, its snapshots and owners checked."""
    from migrator.runtime.containers import Containers
    from migrator.runtime.idmap import default_idmap

    rows = []
    for i, kind in enumerate(KINDS):
        row = Row("LXD -> here", kind.file)
        rows.append(row)
        name = f"lx{i}"
        args = ["import", str(fixtures / kind.file), name, "--format", "json",
                "--pool", "btrfs" if kind.optimized else "dir"]
        if kind.privileged:
            args.append("--allow-privileged")
        r = migrate(h, *args, check=False)
        if r.returncode != 0:
            row.result, row.details = "refused", [r.stderr.strip()[-300:]]
            continue
        try:
            r = migrate(h, "start", name, check=False)
            if r.returncode != 0:
                log = h.lxcpath / name / "lxc.log"
                errors = [x for x in log.read_text(errors="replace").splitlines()
                          if " ERROR " in x] if log.exists() else []
                row.result = "imports, does not start"
                row.details = [r.stderr.strip()[-300:], *errors[-4:]]
                continue
            cts = Containers(h)
            rec = cts.get(name)
            root = cts.rootfs(rec)
            base = 0 if kind.privileged else default_idmap().base
            init = root / "sbin/init"
            owner = (init.stat().st_uid, (root / "home/user/notes.txt").stat().st_uid)
            snaps = [s.name for s in h.state.list_snapshots(name)]
            ok = (owner == (base, base + 1000) and snaps == kind.snapshots
                  and (root / "etc/motd").read_text() == MOTD
                  and cts.status(name).upper() == "RUNNING")
            row.result = "imports, starts" if ok else "imports, WRONG"
            row.details = [f"owners {owner} (want {(base, base + 1000)})",
                           f"snapshots {snaps}", f"state {cts.status(name)}"]
        except MigratorError as e:
            row.result, row.details = "error", [str(e)[-300:]]
        finally:
            migrate(h, "delete", "--force", name, check=False)
    return rows


OURS = [  # (file, source container, migrate export flags, lxc import pool)
    ("ours-unpriv-gzip.tar.gz", "mx-u", ("--compression", "gzip"), "dir"),
    ("ours-unpriv-zstd.tar.zst", "mx-u", ("--compression", "zstd"), "dir"),
    ("ours-unpriv-none.tar", "mx-u", ("--compression", "none"), "dir"),
    ("ours-unpriv-instance-only.tar.gz", "mx-u", ("--compression", "gzip",
                                                  "--instance-only"), "dir"),
    ("ours-priv-gzip.tar.gz", "mx-p", ("--compression", "gzip"), "dir"),
    ("ours-unpriv-optimized.tar.gz", "mx-ub", ("--compression", "gzip", "--optimized"), "bt"),
    ("ours-priv-optimized.tar.gz", "mx-pb", ("--compression", "gzip", "--optimized"), "bt"),
]


def export_into_lxd(h: Host, rig: LxdRig, work: Path) -> list[Row]:
    """Busybox containers made here, exported by ``migrate export``, imported and started by
    LXD; inside LXD, /bin/busybox must be owned by the container's root and s0 present."""
    from migrator.runtime.containers import Containers

    cts = Containers(h)
    for name, pool, privileged in (("mx-u", "dir", False), ("mx-p", "dir", True),
                                   ("mx-ub", "btrfs", False), ("mx-pb", "btrfs", True)):
        migrate(h, "create", "busybox", name, "-p", pool,
                *(["-c", "security.privileged=true"] if privileged else []))
        migrate(h, "snapshot", "create", name, "s0")
        (cts.rootfs(cts.get(name)) / "etc/motd").write_text(MOTD)
    rows = []
    for i, (file, source, flags, pool) in enumerate(OURS):
        row = Row("here -> LXD", file)
        rows.append(row)
        archive = work / file
        r = migrate(h, "export", source, str(archive), *flags, check=False)
        if r.returncode != 0:
            row.result, row.details = "export failed", [r.stderr.strip()[-300:]]
            continue
        name = f"ours{i}"
        r = rig.lxc("import", str(archive), name, "--storage", pool, check=False)
        if r.returncode != 0:
            row.result, row.details = "LXD refuses", [r.stderr.strip()[-300:]]
            continue
        try:
            r = rig.lxc("start", name, check=False, timeout=120)
            if r.returncode != 0:
                row.result, row.details = "imports, does not start", [r.stderr.strip()[-300:]]
                continue
            stat = rig.lxc("exec", name, "--", "stat", "-c", "%u:%g", "/bin/busybox",
                           check=False, timeout=60).stdout.strip()
            motd = rig.lxc("exec", name, "--", "cat", "/etc/motd", check=False,
                           timeout=60).stdout
            info = json.loads(rig.lxc("query", f"/1.0/instances/{name}?recursion=1").stdout)
            snaps = [s["name"] for s in json.loads(
                rig.lxc("query", f"/1.0/instances/{name}/snapshots?recursion=1").stdout)]
            want = [] if "--instance-only" in flags else ["s0"]
            host_uid = _init_uid(rig, name)
            privileged = info["expanded_config"].get("security.privileged") == "true"
            ok = stat == "0:0" and motd == MOTD and snaps == want and \
                (host_uid == 0) == privileged
            row.result = "imports, starts" if ok else "imports, starts, WRONG"
            row.details = [f"/bin/busybox {stat} inside", f"snapshots {snaps}",
                           f"init's host uid {host_uid}", f"size {archive.stat().st_size}"]
        except MigratorError as e:
            row.result, row.details = "error", [str(e)[-300:]]
        finally:
            rig.lxc("delete", "--force", name, check=False, timeout=120)
    return rows


def _init_uid(rig: LxdRig, name: str) -> int:
    pid = rig.init_pid(name)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return -1


def table(rows: list[Row]) -> str:
    lines = ["| direction | archive | result | details |", "|---|---|---|---|"]
    lines += [f"| {r.direction} | `{r.kind}` | {r.result} | {'; '.join(r.details)} |"
              for r in rows]
    return "\n".join(lines)


def timed(what: str, fn: Callable[[], list[Row]]) -> list[Row]:
    t0 = time.monotonic()
    rows = fn()
    print(f"{what}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/lxd")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-fixtures", action="store_true",
                    help="keep the committed fixtures; run the checks only")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (LXD, namespaces, pools)", file=sys.stderr)
        return 2
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="lxd-compat-", dir="/var/tmp"))
    os.chmod(work, 0o711)  # an unprivileged container's root must reach the host's pools
    try:
        with LxdRig() as rig:
            print(f"LXD {rig.version()} up in netns {rig.netns}", file=sys.stderr)
            rig.import_image(BUSYBOX_IMAGE, "busybox")
            if not args.skip_fixtures:
                rows += timed("fixtures", lambda: make_fixtures(rig, args.out, work))
            with project_host(work) as h:
                rows += timed("LXD -> here", lambda: import_here(h, args.out))
                rows += timed("here -> LXD", lambda: export_into_lxd(h, rig, work))
            version = rig.version()
    except MigratorError as e:
        print(f"error: {e}\n{table(rows)}", file=sys.stderr)
        return 1
    finally:
        proc.run(["rm", "-rf", "--one-file-system", str(work)], check=False, timeout=None)
    print(f"LXD {version}\n\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    bad = [r for r in rows if r.result not in ("made", "imports, starts")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
