"""Benchmark: backup and restore of a ~1 GiB container against ``tar | zstd`` by hand.

Scenarios, each project run next to its baseline on the same data in the same run:

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

Data: a stopped busybox container on a btrfs loop pool (the snapshot a backup starts from
is then instant, as on any CoW pool) whose rootfs gets ``data/``: regular files copied from
this machine's ``/usr/lib`` up to ``--size-mib`` (real binaries and libraries, so zstd has
something realistic to compress). Before every timed run: ``sync`` and
``echo 3 > /proc/sys/vm/drop_caches``; each time includes a final ``sync``. Rounds alternate
which side goes first; medians are reported with the ratios project/baseline (< 1: faster)
and the compressed sizes (ratio raw/stored).

Everything lives in a throw-away host (``/var/tmp/migrator-bench/backup-<pid>``, netns
``mbench-bk``, 198.51.100.1/24), torn down at the end, also on failure. The samples go to
``bench/results/backup-<timestamp>.json``.

Usage: .venv/bin/python bench/bench_backup.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
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


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop pools, namespaces, drop_caches)")
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


if __name__ == "__main__":
    sys.exit(main())
