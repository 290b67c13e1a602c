"""Benchmark: backups of a ~1 GiB container, in two suites (``--suite``).

``--suite chunked`` (the default): the project's chunked, encrypted repository against borg
and restic, on the same data in the same run. Both are Debian's packages (``borgbackup``,
``restic``); when one is missing the bench runs ``apt-get update`` and then ``apt-get install
-y --no-install-recommends -t trixie borgbackup restic`` itself (this machine's sources pin
bookworm first, whose borgbackup 1.2 wants a Python below 3.12, so the trixie ones: borg
1.4, restic 0.18).

Data: a stopped busybox container ``bk`` on a btrfs loop pool whose rootfs gets ``data/``:
regular files copied from this machine's ``/usr/lib`` up to ``--size-mib`` (real binaries
and libraries), and a second container ``bk2`` made from the same image with a copy of the
same ``data/``. Three datasets, backed up in this order by every lane:

1. ``first``:  ``bk`` as made;
2. ``second``: ``bk`` after ~1% of its data bytes were rewritten (half of each chosen file);
3. ``third``:  ``bk2``, the second container (another path, other inodes, the same bytes).

Lanes (every one encrypted; all three tools on a local directory, the project and restic
also on S3, a SeaweedFS cluster from ``testrigs/seaweed.py`` on 127.0.0.1):

- project: ``migrate --root ROOT backup init REPO`` (repokey: AES-256-GCM chunks, scrypt,
  MIGRATOR_PASSPHRASE), ``migrate backup create bk --repo REPO --format json`` (the generic
  format: snapshot, tar, FastCDC chunks, zstd 3, sealed), ``migrate backup restore ID --name
  NEW --pool bt --allow-privileged --repo REPO`` (on a chunked repository every chunk's
  presence is checked first and each is authenticated as it streams in, whether
  ``--verify-first`` or not: one read). REPO is a directory or ``s3://BUCKET/project``
  reached through AWS_ENDPOINT_URL and the key variables.
- borg: ``borg init --encryption=repokey REPO``, ``borg create --numeric-ids --compression
  zstd,3 REPO::NAME ROOTFS`` (zstd 3, the project's level; borg's default is lz4),
  ``borg extract --numeric-ids REPO::NAME`` in a new directory on the pool. Local only
  (borg 1.4 has no S3 backend).
- restic: ``restic init``, ``restic backup --host bench ROOTFS`` (default compression, auto),
  ``restic restore ID --target DIR`` (a new directory on the pool); local, and
  ``s3:http://127.0.0.1:PORT/restic-bench/repo`` (its bucket created first) with the
  cluster's AWS_* variables.

Every tool runs as a command (start-up, key derivation and all, as an operator runs it),
with its cache under the bench's directory (BORG_BASE_DIR, RESTIC_CACHE_DIR): borg and
restic keep a files cache and skip unchanged files by path, size, mtime and inode (the
second backup reads only what changed), the project reads and chunks the whole snapshot
every time. Restore: the ``second`` backup of ``bk`` (the latest), whole rootfs, checked
afterwards (untimed) against the source by the sha256 of every file of ``data/``.

Stored bytes: the apparent size of every file in a local repository, the bytes of every
object under the repository's prefix in the bucket, after each backup. Before every timed
run ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``; each time includes a final ``sync``.
``--repeat`` rounds (default 1 here, to keep the run short: about 6 minutes for 1 GiB),
each on fresh repositories and a fresh cluster, lanes in a rotated order; medians.
Ratios project/borg and project/restic below 1 mean the project is faster or smaller.

``--suite tar``: the earlier bench, the project's directory format against ``tar | zstd``
by hand (its default ``--repeat`` is 3):

1. full backup.   project:  ``create_backup(cts, NAME, repo, compression="zstd:3")`` (generic
                            format: snapshot, GNU tar read in-process, multi-threaded zstd,
                            sha256 of every part, fsync'ed and renamed into the repository).
                  baseline: ``tar -C ROOTFS -cf - --numeric-owner --xattrs --acls . |
                            zstd -T0 -3 -o FILE`` on the same rootfs (no snapshot, no checksum).
2. restore.       project:  ``restore_backup(...)`` as a new container on the same pool (every
                            part's sha256 checked first, tar members checked while extracting);
                            and once more per round with ``verify_first=False``
                            (``--verify-while-restoring``: checksums checked as the parts
                            stream, each part read once), against the same baseline median.
                  baseline: ``zstd -d -c FILE | tar -C DIR -x --numeric-owner --xattrs
                            --acls`` into a new directory on the same pool.
3. incremental backup after ~1% of the data bytes were rewritten, against the full one of
   the same round (``create_backup(..., incremental=True)``: file-level delta).

Everything lives in a throw-away host (``/var/tmp/migrator-bench/backup-<pid>``, netns
``mbench-bk``, 198.51.100.1/24), torn down at the end, also on failure, with the SeaweedFS
cluster (its processes by PID) and every repository. Samples go to
``bench/results/backup-chunked-<timestamp>.json`` (``backup-<timestamp>.json`` for the tar
suite).

Usage: .venv/bin/python bench/bench_backup.py [--suite chunked|tar] [--size-mib 1024]
       [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrator.backup.create import create_backup  # noqa: E402
from migrator.backup.repository import Repository  # noqa: E402
from migrator.backup.restore import restore_backup  # noqa: E402
from migrator.runtime.containers import Containers  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402
from migrator.runtime.teardown import teardown  # noqa: E402
from testrigs.seaweed import SeaweedCluster  # noqa: E402

MIB = 1 << 20
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def cold() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Any) -> tuple[float, Any]:
    cold()
    t0 = time.monotonic()
    out = fn()
    subprocess.run(["sync"], check=True)
    return time.monotonic() - t0, out


def shell_pipe(left: list[str], right: list[str]) -> None:
    """``left | right`` as two processes (what the shell would do), both checked."""
    a = subprocess.Popen(left, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert a.stdout is not None
    b = subprocess.run(right, stdin=a.stdout, capture_output=True)
    a.stdout.close()
    err_a = a.stderr.read() if a.stderr else b""
    if a.wait() or b.returncode:
        raise RuntimeError(f"{left[0]} | {right[0]} failed: {err_a!r} {b.stderr!r}")


def fill(data: Path, budget: int) -> int:
    """Copy regular files from /usr/lib into ``data`` until ``budget`` bytes."""
    data.mkdir()
    total = 0
    for dirpath, _dirs, files in os.walk("/usr/lib"):
        for f in sorted(files):
            src = Path(dirpath) / f
            if src.is_symlink() or not src.is_file():
                continue
            size = src.stat().st_size
            if size == 0 or total + size > budget:
                continue
            dst = data / f"{total:012d}-{f}"
            shutil.copyfile(src, dst)
            total += size
            if total >= budget - MIB:
                return total
    return total


def change_one_percent(data: Path, rng: random.Random) -> int:
    """Rewrite files holding ~1% of the bytes (half of each rewritten file changes)."""
    files = sorted(data.iterdir())
    target = sum(p.stat().st_size for p in files) // 100
    done = 0
    for p in rng.sample(files, len(files)):
        if done >= target:
            break
        size = p.stat().st_size
        if size > 4 * target:
            continue
        with open(p, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(size - size // 2))
        done += size
    return done


class Runs:
    """One round's timed runs (each appends its time to ``samples``)."""

    def __init__(self, cts: Containers, rootfs: Path, repo: Repository, archive: Path,
                 restored: Path, samples: dict[str, list[float]], sizes: dict[str, Any]) -> None:
        self.cts, self.rootfs, self.repo = cts, rootfs, repo
        self.archive, self.restored = archive, restored
        self.samples, self.sizes = samples, sizes

    def project_backup(self) -> None:
        s, r = timed(partial(create_backup, self.cts, "bk", self.repo, compression="zstd:3"))
        self.samples["project_backup"].append(s)
        self.sizes.update(project_stored=r.stored_bytes, project_raw=r.raw_bytes, full_id=r.id)

    def baseline_backup(self) -> None:
        s, _ = timed(partial(shell_pipe,
                             ["tar", "-C", str(self.rootfs), "-cf", "-", *TAR_FLAGS, "."],
                             ["zstd", "-q", "-T0", "-3", "-f", "-o", str(self.archive)]))
        self.samples["baseline_backup"].append(s)
        self.sizes["baseline_stored"] = self.archive.stat().st_size

    def project_restore(self) -> None:
        s, _ = timed(partial(restore_backup, self.cts, self.repo, self.sizes["full_id"],
                             "bk-r", allow_privileged=True))
        self.samples["project_restore"].append(s)

    def project_restore_streamed(self) -> None:
        s, _ = timed(partial(restore_backup, self.cts, self.repo, self.sizes["full_id"],
                             "bk-s", verify_first=False, allow_privileged=True))
        self.samples["project_restore_streamed"].append(s)

    def baseline_restore(self) -> None:
        self.restored.mkdir()
        s, _ = timed(partial(shell_pipe, ["zstd", "-q", "-d", "-c", str(self.archive)],
                             ["tar", "-C", str(self.restored), "-x", *TAR_FLAGS]))
        self.samples["baseline_restore"].append(s)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def tar_suite(args: argparse.Namespace) -> int:
    """``--suite tar``: the project's directory format against ``tar | zstd`` by hand."""
    for tool in ("tar", "zstd", "btrfs"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (run `make setup`)")
    root = Path(f"/var/tmp/migrator-bench/backup-{os.getpid()}")
    h = Host(root)
    samples: dict[str, list[float]] = {k: [] for k in (
        "project_backup", "baseline_backup", "project_restore", "baseline_restore",
        "project_incremental", "project_restore_streamed")}
    sizes: dict[str, Any] = {}
    rng = random.Random(7)
    try:
        h.init("mbench-bk", "198.51.100.1/24", None)
        h.create_pool("bt", "btrfs", None, f"{4 * args.size_mib + 1024}MiB")
        cts = Containers(h)
        cts.images.build("busybox", None, lambda m: None)
        cts.create("busybox", "bk", "bt", {"security.privileged": "true"})
        rootfs = cts.rootfs(cts.get("bk"))
        raw = fill(rootfs / "data", args.size_mib * MIB)
        sizes["data_bytes"] = raw
        print(f"data: {raw / MIB:.0f} MiB from /usr/lib in {rootfs / 'data'}", flush=True)
        pool_dir = root / "storage-pools" / "bt"
        out_dir = root / "baseline"
        out_dir.mkdir()
        for rnd in range(args.repeat):
            repo = Repository(root / f"repo-{rnd}")
            archive = out_dir / f"bk-{rnd}.tar.zst"
            restored = pool_dir / f"baseline-restore-{rnd}"

            b = Runs(cts, rootfs, repo, archive, restored, samples, sizes)
            pairs = [(b.project_backup, b.baseline_backup),
                     (b.project_restore, b.baseline_restore)]
            for pair in pairs:
                for fn in (pair if rnd % 2 == 0 else pair[::-1]):
                    fn()
            b.project_restore_streamed()
            # restored trees match the source (untimed): same files, same sizes
            want = sorted((p.name, p.stat().st_size) for p in (rootfs / "data").iterdir())
            for ct in ("bk-r", "bk-s"):
                got = sorted((p.name, p.stat().st_size)
                             for p in (cts.rootfs(cts.get(ct)) / "data").iterdir())
                assert got == want, "the project's restore differs from the source"
                cts.delete(ct, force=True)
            got = sorted((p.name, p.stat().st_size) for p in (restored / "data").iterdir())
            assert got == want, "the baseline's restore differs from the source"
            shutil.rmtree(restored)
            changed = change_one_percent(rootfs / "data", rng)
            s, r = timed(partial(create_backup, cts, "bk", repo, incremental=True,
                                 compression="zstd:3"))
            assert r.parent == sizes["full_id"], r
            samples["project_incremental"].append(s)
            sizes["incremental_stored"] = r.stored_bytes
            sizes["changed_bytes"] = changed
            for old in repo.list()[::-1]:
                repo.delete(old.id)
            for snap in cts.state.list_snapshots("bk"):
                cts.snapshot_delete("bk", snap.name)
            archive.unlink()
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s"
                                                  for k, v in samples.items()), flush=True)
    finally:
        problems = teardown(h, purge=True)
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            print("teardown problems:", problems, file=sys.stderr)
    m = {k: median(v) for k, v in samples.items()}
    mib = sizes["data_bytes"] / MIB
    out = {
        "data_mib": round(mib),
        "medians_seconds": {k: round(v, 2) for k, v in m.items()},
        "backup_mib_s": {"project": round(mib / m["project_backup"]),
                         "tar|zstd -T0 -3": round(mib / m["baseline_backup"])},
        "backup_speed_vs_baseline": round(m["baseline_backup"] / m["project_backup"], 2),
        "restore_mib_s": {"project": round(mib / m["project_restore"]),
                          "zstd -d|tar -x": round(mib / m["baseline_restore"])},
        "restore_speed_vs_baseline": round(m["baseline_restore"] / m["project_restore"], 2),
        "restore_verify_while_restoring_mib_s": round(mib / m["project_restore_streamed"]),
        "restore_verify_while_restoring_speed_vs_baseline": round(
            m["baseline_restore"] / m["project_restore_streamed"], 2),
        "compression_ratio": {"project": round(sizes["data_bytes"] / sizes["project_stored"], 2),
                              "tar|zstd -3": round(sizes["data_bytes"]
                                                   / sizes["baseline_stored"], 2)},
        "stored_mib": {"project": round(sizes["project_stored"] / MIB, 1),
                       "tar|zstd -3": round(sizes["baseline_stored"] / MIB, 1)},
        "incremental_after_1pct": {
            "changed_mib": round(sizes["changed_bytes"] / MIB, 1),
            "seconds": round(m["project_incremental"], 2),
            "stored_mib": round(sizes["incremental_stored"] / MIB, 1),
            "time_vs_full": round(m["project_incremental"] / m["project_backup"], 3)},
        "samples": samples,
    }
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"backup-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))
    return 0



# --suite chunked --------------------------------------------------------------------------
PASSPHRASE = "bench passphrase, not a secret"
REPO_PARENT = Path(__file__).resolve().parents[1]
TOOLS = {"borg": "borgbackup", "restic": "restic"}
STEPS = ("first", "second", "third")


def ensure_tools() -> dict[str, str]:
    """borg and restic from Debian's packages, installed when missing; their versions."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "-t", "trixie", *missing], check=True, env=env)
    return {"borg": run(["borg", "--version"]).strip(),
            "restic": run(["restic", "version"]).strip()}


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """``argv`` checked; its stdout (stderr in the error)."""
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {r.returncode}: "
                           f"{r.stderr[-2000:]}")
    return r.stdout


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under ``path`` (du -sb, without directories)."""
    return sum((Path(d) / f).stat().st_size for d, _dirs, files in os.walk(path)
               for f in files)


def tree_digest(data: Path) -> str:
    """sha256 over every file's name and contents under ``data``, in name order."""
    h = hashlib.sha256()
    for p in sorted(data.iterdir()):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(4 * MIB):
                h.update(block)
    return h.hexdigest()


class Lane:
    """One tool on one store: ``init``, ``backup`` (timed), ``restore`` (timed), ``stored``."""

    name = ""

    def __init__(self, bench: ChunkedBench, where: str) -> None:
        self.bench, self.where = bench, where
        self.ids: list[str] = []
        self.extra: list[dict[str, Any]] = []  # what the tool said about each backup

    @property
    def label(self) -> str:
        return f"{self.name} {self.where}"

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        if self.where == "s3":
            assert self.bench.cluster is not None
            e.update(self.bench.cluster.env())
            e.update(AWS_CONFIG_FILE="/nonexistent/aws-config",
                     AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
            e.pop("AWS_PROFILE", None)
        return e

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, container: str, step: str) -> float:
        raise NotImplementedError

    def restore(self, backup_id: str, tag: str) -> tuple[float, Path]:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError


class ProjectLane(Lane):
    name = "project"

    def __init__(self, bench: ChunkedBench, where: str) -> None:
        super().__init__(bench, where)
        self.repo = (f"s3://{bench.bucket}/project" if where == "s3"
                     else str(bench.root / "repo-project"))
        self.restored: list[str] = []

    def env(self) -> dict[str, str]:
        return {**super().env(), "MIGRATOR_PASSPHRASE": PASSPHRASE}

    def cli(self, *args: str) -> str:
        return run([str(Path(sys.executable).parent / "migrate"), "--root",
                    str(self.bench.host.root), *args], env=self.env(), cwd=REPO_PARENT)

    def init(self) -> None:
        self.cli("backup", "init", self.repo, "--format", "json")

    def backup(self, container: str, step: str) -> float:
        s, out = timed(partial(self.cli, "backup", "create", container, "--repo", self.repo,
                               "--format", "json"))
        r = json.loads(out)
        self.ids.append(r["id"])
        self.extra.append({k: r.get(k) for k in ("raw_bytes", "stored_bytes", "chunks",
                                                 "new_chunks", "seconds")})
        return s

    def restore(self, backup_id: str, tag: str) -> tuple[float, Path]:
        name = f"r-{tag}"
        s, _ = timed(partial(self.cli, "backup", "restore", backup_id, "--name", name,
                             "--pool", "bt", "--allow-privileged", "--repo", self.repo))
        self.restored.append(name)
        cts = self.bench.cts
        return s, cts.rootfs(cts.get(name))

    def drop_restored(self) -> None:
        for name in self.restored:
            self.bench.cts.delete(name, force=True)
        self.restored = []

    def stored(self) -> int:
        if self.where == "s3":
            return self.bench.bucket_bytes(self.bench.bucket, "project/")
        return tree_bytes(Path(self.repo))


class BorgLane(Lane):
    name = "borg"

    def __init__(self, bench: ChunkedBench, where: str) -> None:
        super().__init__(bench, where)
        assert where == "local", "borg 1.4 has no S3 backend"
        self.repo = bench.root / "repo-borg"

    def env(self) -> dict[str, str]:
        return {**super().env(), "BORG_PASSPHRASE": PASSPHRASE,
                "BORG_BASE_DIR": str(self.bench.root / "borg-home")}

    def init(self) -> None:
        run(["borg", "init", "--encryption=repokey", str(self.repo)], env=self.env())

    def backup(self, container: str, step: str) -> float:
        name = f"{container}-{step}"
        s, _ = timed(partial(run, ["borg", "create", "--numeric-ids", "--compression",
                                   "zstd,3", f"{self.repo}::{name}",
                                   str(self.bench.rootfs(container))], env=self.env()))
        self.ids.append(name)
        return s

    def restore(self, backup_id: str, tag: str) -> tuple[float, Path]:
        dest = self.bench.pool_dir / f"borg-restore-{tag}"
        dest.mkdir()
        s, _ = timed(partial(run, ["borg", "extract", "--numeric-ids",
                                   f"{self.repo}::{backup_id}"], env=self.env(), cwd=dest))
        return s, dest / self.bench.rootfs("bk").relative_to("/")

    def stored(self) -> int:
        return tree_bytes(self.repo)


class ResticLane(Lane):
    name = "restic"

    def __init__(self, bench: ChunkedBench, where: str) -> None:
        super().__init__(bench, where)
        if where == "s3":
            assert bench.cluster is not None
            self.repo = f"s3:{bench.cluster.endpoint}/{bench.restic_bucket}/repo"
        else:
            self.repo = str(bench.root / "repo-restic")

    def env(self) -> dict[str, str]:
        return {**super().env(), "RESTIC_PASSWORD": PASSPHRASE,
                "RESTIC_CACHE_DIR": str(self.bench.root / f"restic-cache-{self.where}")}

    def init(self) -> None:
        run(["restic", "-r", self.repo, "init"], env=self.env())

    def backup(self, container: str, step: str) -> float:
        s, out = timed(partial(run, ["restic", "-r", self.repo, "backup", "--json",
                                     "--host", "bench", str(self.bench.rootfs(container))],
                               env=self.env()))
        summary = [json.loads(line) for line in out.splitlines()
                   if line.startswith("{") and '"summary"' in line][-1]
        self.ids.append(summary["snapshot_id"])
        self.extra.append({k: summary.get(k) for k in (
            "files_new", "files_changed", "files_unmodified", "data_added",
            "data_added_packed", "total_bytes_processed")})
        return s

    def restore(self, backup_id: str, tag: str) -> tuple[float, Path]:
        dest = self.bench.pool_dir / f"restic-{self.where}-restore-{tag}"
        s, _ = timed(partial(run, ["restic", "-r", self.repo, "restore", backup_id,
                                   "--target", str(dest)], env=self.env()))
        return s, dest / self.bench.rootfs("bk").relative_to("/")

    def stored(self) -> int:
        if self.where == "s3":
            return self.bench.bucket_bytes(self.bench.restic_bucket, "repo/")
        return tree_bytes(Path(self.repo))


LANES: list[tuple[type[Lane], str]] = [(ProjectLane, "local"), (BorgLane, "local"),
                                       (ResticLane, "local"), (ProjectLane, "s3"),
                                       (ResticLane, "s3")]


class ChunkedBench:
    """The host, its two containers, the S3 cluster of a round, and the samples."""

    bucket = "migrator-bench"
    restic_bucket = "restic-bench"

    def __init__(self, root: Path, size_mib: int) -> None:
        self.root, self.size_mib = root, size_mib
        self.host = Host(root)
        self.cts = Containers(self.host)
        self.pool_dir = root / "storage-pools" / "bt"
        self.cluster: SeaweedCluster | None = None
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.stored: dict[str, dict[str, list[int]]] = {}
        self.notes: dict[str, list[Any]] = {}

    def rootfs(self, container: str) -> Path:
        return self.cts.rootfs(self.cts.get(container))

    def bucket_bytes(self, bucket: str, prefix: str) -> int:
        assert self.cluster is not None
        total = 0
        pages = self.cluster.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix)
        for page in pages:
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def setup(self) -> int:
        h, cts = self.host, self.cts
        h.init("mbench-bk", "198.51.100.1/24", None)
        # two containers, a restore at a time, and room to spare (a sparse file)
        h.create_pool("bt", "btrfs", None, f"{10 * self.size_mib + 2048}MiB")
        cts.images.build("busybox", None, lambda m: None)
        for name in ("bk", "bk2"):
            cts.create("busybox", name, "bt", {"security.privileged": "true"})
        raw = fill(self.rootfs("bk") / "data", self.size_mib * MIB)
        # the second container's copy: real copies (no reflink), other inodes, same bytes
        subprocess.run(["cp", "-a", "--reflink=never", str(self.rootfs("bk") / "data"),
                        str(self.rootfs("bk2"))], check=True)
        return raw

    def guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; on a failure the pool's space is printed first (a full pool has
        stopped a run once, with 3 GiB free by df: this says what btrfs thought)."""
        try:
            return fn()
        except BaseException:
            for argv in (["df", "-m", str(self.pool_dir)],
                         ["btrfs", "filesystem", "df", str(self.pool_dir)]):
                r = subprocess.run(argv, capture_output=True, text=True)
                print(r.stdout + r.stderr, file=sys.stderr, flush=True)
            raise

    def record(self, lane: Lane, what: str, value: float) -> None:
        self.samples.setdefault(lane.label, {}).setdefault(what, []).append(value)

    def round(self, rnd: int, rng: random.Random) -> None:
        """Fresh repositories and cluster; the three backups, then the restores."""
        self.cluster = SeaweedCluster(volumes=2 + self.size_mib // 1024, bucket=self.bucket,
                                      base=self.root / "seaweed").start()
        self.cluster.client().create_bucket(Bucket=self.restic_bucket)
        lanes = [cls(self, where) for cls, where in LANES]
        lanes = lanes[rnd % len(lanes):] + lanes[:rnd % len(lanes)]
        for lane in lanes:
            lane.init()
        for step, container in zip(STEPS, ("bk", "bk", "bk2"), strict=True):
            if step == "second":
                changed = change_one_percent(self.rootfs("bk") / "data", rng)
                self.notes.setdefault("changed_bytes", []).append(changed)
            for lane in lanes:
                s = self.guarded(partial(lane.backup, container, step))
                self.record(lane, f"backup_{step}", s)
                stored = lane.stored()
                self.stored.setdefault(lane.label, {}).setdefault(step, []).append(stored)
                print(f"  {lane.label:15} {step:6} backup {s:6.2f}s, stored "
                      f"{stored / MIB:7.1f} MiB", flush=True)
        want = tree_digest(self.rootfs("bk") / "data")
        for lane in lanes:
            s, tree = self.guarded(partial(lane.restore, lane.ids[1], f"{lane.where}-{rnd}"))
            self.record(lane, "restore", s)
            print(f"  {lane.label:15} restore {s:6.2f}s", flush=True)
            if tree_digest(tree / "data") != want:
                raise RuntimeError(f"{lane.label}: the restored data/ differs")
            if isinstance(lane, ProjectLane):
                lane.drop_restored()
            self.notes.setdefault(f"{lane.label} said", []).append(lane.extra)
        for d in self.pool_dir.glob("*-restore-*"):
            shutil.rmtree(d)
        for p in ("repo-project", "repo-borg", "repo-restic", "borg-home", "restic-cache-local",
                  "restic-cache-s3"):
            shutil.rmtree(self.root / p, ignore_errors=True)
        self.cluster.stop()
        self.cluster = None

    def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        problems = teardown(self.host, purge=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            print("teardown problems:", problems, file=sys.stderr)


def summarize(bench: ChunkedBench, data_bytes: int, versions: dict[str, str]
              ) -> dict[str, Any]:
    med = {lane: {k: median(v) for k, v in d.items()} for lane, d in bench.samples.items()}
    sto = {lane: {k: statistics.median(v) for k, v in d.items()}
           for lane, d in bench.stored.items()}
    ratios: dict[str, dict[str, float]] = {}
    for where, other in (("local", "borg local"), ("local", "restic local"),
                         ("s3", "restic s3")):
        mine = f"project {where}"
        if mine not in med or other not in med:
            continue
        r: dict[str, float] = {}
        for k in med[mine]:
            if k in med[other]:
                r[k] = round(med[mine][k] / med[other][k], 2)
        for step in STEPS:
            r[f"stored_{step}"] = round(sto[mine][step] / sto[other][step], 2)
        ratios[f"{mine} / {other}"] = r
    git = ["git", "-C", str(REPO_PARENT)]
    commit = run([*git, "rev-parse", "HEAD"]).strip()
    dirty = bool(run([*git, "status", "--porcelain", "--untracked-files=no", "migrator"]))
    return {"data_mib": round(data_bytes / MIB), "versions": versions,
            "commit": commit + (" with uncommitted changes in migrator/" if dirty else ""),
            "medians_seconds": {lane: {k: round(v, 2) for k, v in d.items()}
                                for lane, d in med.items()},
            "stored_mib_after": {lane: {k: round(v / MIB, 1) for k, v in d.items()}
                                 for lane, d in sto.items()},
            "ratios": ratios, "samples": bench.samples, "stored_bytes": bench.stored,
            "notes": bench.notes}


def table(out: dict[str, Any]) -> str:
    """The medians as a Markdown table, then the ratios."""
    med, sto = out["medians_seconds"], out["stored_mib_after"]
    head = ("| lane | 1st backup s | stored MiB | 2nd (1% changed) s | +MiB | "
            "3rd (2nd container) s | +MiB | restore s |")
    lines = [head, "|" + "---|" * 8]
    for lane, m in med.items():
        s = sto[lane]
        restore = f"{m['restore']:.2f}"
        lines.append(f"| {lane} | {m['backup_first']:.2f} | {s['first']:.1f} | "
                     f"{m['backup_second']:.2f} | {s['second'] - s['first']:.1f} | "
                     f"{m['backup_third']:.2f} | {s['third'] - s['second']:.1f} | "
                     f"{restore} |")
    lines += ["", "| ratio (< 1: project faster or smaller) | 1st | 2nd | 3rd | restore | "
              "stored after 1st | after 3rd |", "|" + "---|" * 7]
    for name, r in out["ratios"].items():
        lines.append(f"| {name} | {r['backup_first']:.2f} | {r['backup_second']:.2f} | "
                     f"{r['backup_third']:.2f} | {r['restore']:.2f} | "
                     f"{r['stored_first']:.2f} | {r['stored_third']:.2f} |")
    return "\n".join(lines)


def chunked_suite(args: argparse.Namespace) -> int:
    versions = ensure_tools()
    root = Path(f"/var/tmp/migrator-bench/backup-{os.getpid()}")
    bench = ChunkedBench(root, args.size_mib)
    rng = random.Random(7)
    try:
        data_bytes = bench.setup()
        print(f"data: {data_bytes / MIB:.0f} MiB from /usr/lib in bk and in bk2; "
              f"{versions['borg']}, {versions['restic']}", flush=True)
        for rnd in range(args.repeat):
            print(f"round {rnd + 1}", flush=True)
            bench.round(rnd, rng)
    finally:
        bench.teardown()
    out = summarize(bench, data_bytes, versions)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"backup-chunked-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=2))
    print(table(out))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--suite", choices=("chunked", "tar"), default="chunked",
                    help="chunked: against borg and restic; tar: against tar | zstd")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=None,
                    help="rounds (default: 1 for chunked, 3 for tar)")
    args = ap.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.suite == "chunked" else 3
    if os.geteuid() != 0:
        sys.exit("run as root (loop pools, namespaces, drop_caches)")
    # a SIGTERM unwinds like Ctrl-C, so the host, repositories and cluster are taken down
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for tool in ("tar", "zstd", "btrfs"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (run `make setup`)")
    return chunked_suite(args) if args.suite == "chunked" else tar_suite(args)


if __name__ == "__main__":
    sys.exit(main())
