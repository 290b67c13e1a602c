"""Benchmark: the project's container copy and refresh against the tools an operator would use.

Each scenario runs the project (``migrator.pipelines.copy.copy_container``, in-process) and a
baseline
on the same data, in the same run, and reports the ratio project time / baseline time
(< 1: the project is faster).

1. btrfs -> btrfs full copy (two btrfs loop pools).
   project:  ``copy_container(cts, src, dst, pool=b2)``: native btrfs send/receive through the
             project's splice pump; it also carries the container's snapshot ``base``.
   baseline: ``btrfs send SNAP | btrfs receive DIR``, SNAP being a read-only snapshot of the
             same subvolume (taken untimed), DIR on the same target pool.
2. btrfs -> btrfs refresh after ~1% of the files were rewritten.
   project:  ``copy_container(..., refresh=True)`` (incremental from the shared ``base``).
   baseline: ``btrfs send -p PARENT SNAP | btrfs receive DIR``; PARENT is the snapshot the
             baseline's full copy sent, SNAP a new read-only snapshot (taken untimed).
3. dir -> dir full copy.  project: copy (rsync method: ``cp -a`` into the new target, then
   rsync); baseline: ``rsync -aHAX --numeric-ids --sparse SRC/ DST/``.
4. dir -> dir refresh after ~1% of the files were rewritten. project: refresh; baseline:
   ``rsync -aHAX --numeric-ids --sparse --delete SRC/ DST/`` over the baseline's earlier copy.
5. dir -> btrfs full copy (cross-driver, rsync). baseline: the rsync of 3 into a fresh
   btrfs subvolume (created untimed).

Data: a stopped busybox container (``Containers.create``) per source pool whose rootfs gets a
``data/`` directory of ``--files`` files of random bytes, ``--size-mib`` MiB in all (both
sources get identical bytes), then one snapshot ``base`` (``Containers.snapshot_create``).
"1% change": max(1, files/100) files spread over the set are rewritten with new random bytes
of the same size; no snapshot is taken (a refresh sends the live state).

Method: every timed run starts from the same state. A full copy runs with the source as it
was at ``base``; the 1% change follows, then the refresh of that copy; then the target is
deleted (``Containers.delete``, ``btrfs subvolume delete``, ``rm -rf``) and the source put
back to ``base`` (``Containers.snapshot_restore``), all untimed. Before every timed run the
btrfs cleaner is waited for (``btrfs filesystem sync`` then ``btrfs subvolume sync``) and the
caches are dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) so both sides start cold.
A time covers the operation and then a ``sync``: data left dirty in the page cache is paid
for by whoever wrote it (a btrfs snapshot flushes its subvolume, so the project pays that
inside its copy while ``btrfs receive`` leaves it to the sync; the JSON has both parts).
Rounds alternate project/baseline, the order flipping every round; medians are reported.
Results are checked after every run, untimed (file names and sizes; the contents of the
rewritten files).

Everything lives in one throw-away host (``/var/tmp/migrator-bench/storage-<pid>``, netns
``mbench-st``, bridge 198.51.100.1/24) torn down at the end, also on failure or Ctrl-C.
Every sample goes to ``bench/results/storage-<timestamp>.json``.

Usage: .venv/bin/python bench/bench_storage.py [--size-mib N] [--files N] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scratchhost import interrupt, mounts_under, tear_down  # noqa: E402

from migrator.pipelines.copy import CopyResult, copy_container  # noqa: E402
from migrator.runtime.containers import Containers  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402

BASE_DIR = Path("/var/tmp/migrator-bench")
NETNS = "mbench-st"
SUBNET = "198.51.100.1/24"  # TEST-NET-2 only
IMAGE = "busybox"
MIB = 2**20
CHUNK = 4 * MIB
CMD_TIMEOUT = 3600
RESULTS_DIR = REPO / "bench" / "results"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

RSYNC = ["rsync", "-aHAX", "--numeric-ids", "--sparse"]

# scenario key -> (what is measured, baseline label)
SCENARIOS = {
    "btrfs-full": ("btrfs full copy", "btrfs send|receive"),
    "btrfs-refresh": ("btrfs refresh", "btrfs send -p|receive"),
    "dir-full": ("dir full copy", "rsync -aHAX"),
    "dir-refresh": ("dir refresh", "rsync -aHAX --delete"),
    "dir-btrfs-full": ("dir -> btrfs full copy", "rsync -aHAX into a subvolume"),
}


# helpers -------------------------------------------------------------------------------------
def run(argv: list[str | Path], check: bool = True) -> str:
    """Run a command; return stdout, raise with stderr on failure."""
    full = [str(a) for a in argv]
    cp = subprocess.run(full, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


def pipeline(send: list[str | Path], receive: list[str | Path]) -> None:
    """``send | receive`` as two processes joined by a pipe (what the shell would do)."""
    a, b = [str(x) for x in send], [str(x) for x in receive]
    with tempfile.TemporaryFile() as err_a, tempfile.TemporaryFile() as err_b:
        sender = subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=err_a)
        assert sender.stdout is not None
        try:
            receiver = subprocess.Popen(b, stdin=sender.stdout, stdout=subprocess.DEVNULL,
                                        stderr=err_b)
        except BaseException:
            sender.kill()
            sender.wait()
            raise
        sender.stdout.close()  # the receiver holds the read end now
        try:
            rc_b = receiver.wait(timeout=CMD_TIMEOUT)
            rc_a = sender.wait(timeout=CMD_TIMEOUT)
        except BaseException:
            for p in (sender, receiver):
                p.kill()
                p.wait()
            raise
        if rc_a or rc_b:
            err_a.seek(0)
            err_b.seek(0)
            raise RuntimeError(
                f"{' '.join(a)} | {' '.join(b)} failed ({rc_a}|{rc_b}): "
                f"{err_a.read().decode(errors='replace').strip()} "
                f"{err_b.read().decode(errors='replace').strip()}")


def split_sizes(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def write_random(paths: list[Path], size: int) -> None:
    """The same fresh random bytes into every path (created or truncated)."""
    files = [open(p, "wb") for p in paths]  # noqa: SIM115 - closed below
    try:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            for f in files:
                f.write(chunk)
            left -= len(chunk)
    finally:
        for f in files:
            f.close()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def listing(data: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(data.iterdir())}


# the data ------------------------------------------------------------------------------------
@dataclass
class Data:
    """What every source container's ``data/`` holds, and which files a 1% change rewrites."""

    sizes: dict[str, int]
    changed: list[str]

    @classmethod
    def plan(cls, size_mib: int, files: int) -> Data:
        sizes = {f"blob-{i:04d}.bin": n
                 for i, n in enumerate(split_sizes(size_mib * MIB, files))}
        k = max(1, round(files / 100))
        step = files // k
        names = list(sizes)
        return cls(sizes, [names[j * step + step // 2] for j in range(k)])

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def changed_bytes(self) -> int:
        return sum(self.sizes[n] for n in self.changed)

    def fill(self, rootfs_dirs: list[Path]) -> None:
        dirs = []
        for rootfs in rootfs_dirs:
            st = rootfs.stat()  # owned like the rootfs (the shifted root when unprivileged)
            d = rootfs / "data"
            d.mkdir()
            dirs.append((d, st.st_uid, st.st_gid))
        for name, size in self.sizes.items():
            write_random([d / name for d, _, _ in dirs], size)
            for d, uid, gid in dirs:
                os.chown(d / name, uid, gid)
        for d, uid, gid in dirs:
            os.chown(d, uid, gid)

    def change(self, rootfs: Path) -> None:
        """Rewrite the ~1% with new random bytes of the same sizes (owner and mode kept)."""
        for name in self.changed:
            write_random([rootfs / "data" / name], self.sizes[name])

    def check_copy(self, src: Path, dst: Path, what: str) -> None:
        """Untimed: the copy has every file at its size (and the changed ones' content)."""
        want = listing(src / "data")
        if want != self.sizes:
            raise RuntimeError(f"source {src} does not hold the planned data")
        got = listing(dst / "data")
        if got != want:
            raise RuntimeError(f"{what}: {dst}/data differs from the source in names or sizes")
        for name in self.changed:
            if sha256(src / "data" / name) != sha256(dst / "data" / name):
                raise RuntimeError(f"{what}: {dst}/data/{name} differs from the source")


# the bench host ------------------------------------------------------------------------------
@dataclass
class Bench:
    host: Host
    cts: Containers
    data: Data
    samples: list[dict[str, Any]] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)  # sources changed since ``base``

    def pool_path(self, pool: str) -> Path:
        return Path(self.host.state.get_pool(pool).config["path"])

    def volume(self, name: str) -> Path:
        """A container's volume directory (the one holding ``rootfs``)."""
        return self.cts.rootfs(self.cts.get(name)).parent

    def rootfs(self, name: str) -> Path:
        return self.cts.rootfs(self.cts.get(name))

    # state between runs ----------------------------------------------------------------------
    def pristine(self, source: str) -> None:
        if source in self.dirty:
            self.cts.snapshot_restore(source, "base")
            self.dirty.discard(source)

    def change(self, source: str) -> None:
        self.data.change(self.rootfs(source))
        self.dirty.add(source)

    def cold(self) -> None:
        """Wait for the btrfs cleaners, write everything back, drop the page cache."""
        for pool in ("b1", "b2"):
            # a commit first wakes the cleaner; alone, subvolume sync waits for the 30 s commit
            run(["btrfs", "filesystem", "sync", self.pool_path(pool)])
            run(["btrfs", "subvolume", "sync", self.pool_path(pool)])
        os.sync()
        DROP_CACHES.write_text("3\n")

    # one timed run ---------------------------------------------------------------------------
    def measure(self, scenario: str, lane: str, rnd: int, fn: Callable[[], Any]) -> Any:
        self.cold()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        os.sync()
        t2 = time.perf_counter()
        sample: dict[str, Any] = {"scenario": scenario, "lane": lane, "round": rnd,
                                  "seconds": t2 - t0, "op_s": t1 - t0, "sync_s": t2 - t1}
        if isinstance(out, CopyResult):
            sample.update(bytes=out.bytes, method=out.method, result=out.as_dict())
        self.samples.append(sample)
        extra = f", {out.bytes} bytes via {out.method}" if isinstance(out, CopyResult) else ""
        print(f"  round {rnd + 1} {lane:8s} {SCENARIOS[scenario][0]:24s} "
              f"{t2 - t0:7.2f}s (sync {t2 - t1:.2f}s{extra}) [caches dropped before]",
              flush=True)
        return out

    # scenarios 1+2 and 3+4: full copy, 1% change, refresh --------------------------------------
    def project_pair(self, kind: str, rnd: int, src: str, dst: str, pool: str) -> None:
        self.pristine(src)
        self.measure(f"{kind}-full", "project", rnd,
                     lambda: copy_container(self.cts, src, dst, pool=pool))
        self.data.check_copy(self.rootfs(src), self.rootfs(dst), f"project {kind} copy")
        self.change(src)
        self.measure(f"{kind}-refresh", "project", rnd,
                     lambda: copy_container(self.cts, src, dst, refresh=True))
        self.data.check_copy(self.rootfs(src), self.rootfs(dst), f"project {kind} refresh")
        self.cts.delete(dst)
        self.pristine(src)

    def btrfs_baseline_pair(self, rnd: int, src: str) -> None:
        self.pristine(src)
        snaps = self.pool_path("b1") / "raw-snaps"
        recv = self.pool_path("b2") / "raw-recv"
        snaps.mkdir(exist_ok=True)
        recv.mkdir(exist_ok=True)
        s0, s1 = snaps / "s0", snaps / "s1"
        run(["btrfs", "subvolume", "snapshot", "-r", self.volume(src), s0])
        self.measure("btrfs-full", "baseline", rnd,
                     lambda: pipeline(["btrfs", "send", s0], ["btrfs", "receive", recv]))
        self.data.check_copy(self.rootfs(src), recv / "s0" / "rootfs", "btrfs send|receive")
        self.change(src)
        run(["btrfs", "subvolume", "snapshot", "-r", self.volume(src), s1])
        self.measure("btrfs-refresh", "baseline", rnd,
                     lambda: pipeline(["btrfs", "send", "-p", s0, s1],
                                      ["btrfs", "receive", recv]))
        self.data.check_copy(self.rootfs(src), recv / "s1" / "rootfs", "btrfs send -p|receive")
        for sub in (recv / "s1", recv / "s0", s1, s0):
            run(["btrfs", "subvolume", "delete", sub])
        self.pristine(src)

    def dir_baseline_pair(self, rnd: int, src: str) -> None:
        self.pristine(src)
        target = self.pool_path("d2") / "raw-copy"
        self.measure("dir-full", "baseline", rnd,
                     lambda: run([*RSYNC, f"{self.volume(src)}/", f"{target}/"]))
        self.data.check_copy(self.rootfs(src), target / "rootfs", "rsync")
        self.change(src)
        self.measure("dir-refresh", "baseline", rnd,
                     lambda: run([*RSYNC, "--delete", f"{self.volume(src)}/", f"{target}/"]))
        self.data.check_copy(self.rootfs(src), target / "rootfs", "rsync --delete")
        run(["rm", "-rf", "--one-file-system", target])
        self.pristine(src)

    # scenario 5: dir -> btrfs ----------------------------------------------------------------
    def project_cross(self, rnd: int, src: str, dst: str) -> None:
        self.pristine(src)
        self.measure("dir-btrfs-full", "project", rnd,
                     lambda: copy_container(self.cts, src, dst, pool="b2"))
        self.data.check_copy(self.rootfs(src), self.rootfs(dst), "project dir -> btrfs copy")
        self.cts.delete(dst)

    def baseline_cross(self, rnd: int, src: str) -> None:
        self.pristine(src)
        target = self.pool_path("b2") / "raw-sub"
        run(["btrfs", "subvolume", "create", target])
        self.measure("dir-btrfs-full", "baseline", rnd,
                     lambda: run([*RSYNC, f"{self.volume(src)}/", f"{target}/"]))
        self.data.check_copy(self.rootfs(src), target / "rootfs", "rsync into a subvolume")
        run(["btrfs", "subvolume", "delete", target])


# report --------------------------------------------------------------------------------------
def summarize(bench: Bench, size_mib: int) -> list[dict[str, Any]]:
    rows = []
    for key, (what, baseline) in SCENARIOS.items():
        proj = [s for s in bench.samples if s["scenario"] == key and s["lane"] == "project"]
        base = [s for s in bench.samples if s["scenario"] == key and s["lane"] == "baseline"]
        if not proj or not base:
            continue
        p = statistics.median(s["seconds"] for s in proj)
        b = statistics.median(s["seconds"] for s in base)
        rows.append({
            "scenario": key, "what": what, "baseline": baseline, "size_mib": size_mib,
            "changed_bytes": bench.data.changed_bytes if key.endswith("refresh") else None,
            "project_median_s": p, "baseline_median_s": b, "ratio": p / b if b else None,
            "project_sync_median_s": statistics.median(s["sync_s"] for s in proj),
            "baseline_sync_median_s": statistics.median(s["sync_s"] for s in base),
            "project_bytes": [s["bytes"] for s in proj],
            "project_method": proj[0]["method"],
            "project_notes": sorted({n for s in proj for n in s["result"]["notes"]}),
        })
    return rows


def print_rows(rows: list[dict[str, Any]], data: Data) -> None:
    for r in rows:
        if r["changed_bytes"] is None:
            head = f"{r['what']} {r['size_mib']} MiB"
            p = f"{r['project_median_s']:.2f}s ({r['size_mib'] / r['project_median_s']:.0f} MiB/s)"
            b = (f"{r['baseline_median_s']:.2f}s "
                 f"({r['size_mib'] / r['baseline_median_s']:.0f} MiB/s)")
        else:
            head = (f"{r['what']} after changing {r['changed_bytes'] / MIB:.0f} of "
                    f"{r['size_mib']} MiB ({len(data.changed)}/{len(data.sizes)} files)")
            p = f"{r['project_median_s']:.2f}s"
            b = f"{r['baseline_median_s']:.2f}s"
        print(f"{head}: project {p}, {r['baseline']} {b}, ratio {r['ratio']:.2f}")
        sizes = ", ".join(f"{n}" for n in r["project_bytes"])
        print(f"    project reported bytes (CopyResult.bytes): {sizes} via "
              f"{r['project_method']}; median final sync: project "
              f"{r['project_sync_median_s']:.2f}s, baseline {r['baseline_sync_median_s']:.2f}s")
        for note in r["project_notes"]:
            print(f"    project note: {note}")


def write_json(rows: list[dict[str, Any]], bench: Bench, args: argparse.Namespace,
               elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"storage-{stamp}.json"
    data = {
        "benchmark": "storage",
        "timestamp": stamp,
        "size_mib": args.size_mib,
        "files": args.files,
        "repeat": args.repeat,
        "data_bytes": bench.data.total,
        "changed_files": bench.data.changed,
        "changed_bytes": bench.data.changed_bytes,
        "image": IMAGE,
        "kernel": platform.release(),
        "btrfs_progs": run(["btrfs", "--version"], check=False).splitlines()[0:1],
        "rsync": run(["rsync", "--version"], check=False).splitlines()[0:1],
        "timing": "operation + sync, caches dropped before each run; medians of rounds",
        "elapsed_s": elapsed,
        "rows": rows,
        "samples": bench.samples,
    }
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


# setup and cleanup ---------------------------------------------------------------------------
def setup(host: Host, data: Data, size_mib: int) -> Bench:
    """Network, image, pools b1 b2 (btrfs) d1 d2 (dir), and the two source containers."""
    host.init(NETNS, SUBNET, None)
    cts = Containers(host)
    cts.images.build(IMAGE, None, lambda _msg: None)
    btrfs_size = f"{3 * size_mib + 512}MiB"  # ~3x the data, plus metadata headroom
    for pool, driver in (("b1", "btrfs"), ("b2", "btrfs"), ("d1", "dir"), ("d2", "dir")):
        host.create_pool(pool, driver, None, btrfs_size if driver == "btrfs" else None)
    bench = Bench(host, cts, data)
    for name, pool in (("src-b", "b1"), ("src-d", "d1")):
        cts.create(IMAGE, name, pool)
    data.fill([bench.rootfs("src-b"), bench.rootfs("src-d")])
    for name in ("src-b", "src-d"):
        cts.snapshot_create(name, "base")
    return bench


def cleanup(root: Path, host: Host | None) -> list[str]:
    """Tear the host down (best effort, every step); return what is still left over."""
    tear_down(root, NETNS, host)  # the namespace is ours: main() refuses to start otherwise
    with contextlib.suppress(OSError):
        BASE_DIR.rmdir()  # only when no other bench host lives there
    return leftovers(root)


def leftovers(root: Path) -> list[str]:
    left = [f"mount {m}" for m in mounts_under(root)]
    loops = run(["losetup", "-a"], check=False)
    left += [f"loop {line}" for line in loops.splitlines() if str(root) in line]
    if NETNS in run(["ip", "netns", "list"], check=False).split():
        left.append(f"netns {NETNS}")
    if root.exists():
        left.append(f"directory {root}")
    return left


# main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="data in each container [1024]")
    ap.add_argument("--files", type=int, default=64, help="number of data files [64]")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per scenario [3]")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.files < 1 or args.repeat < 1:
        ap.error("--size-mib, --files and --repeat must be at least 1")
    if args.files > args.size_mib * MIB:
        ap.error("more files than bytes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root (btrfs loop pools, network namespaces and drop_caches need it)")
    for tool in ("btrfs", "rsync", "mkfs.btrfs", "losetup", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (run `make setup`)")
    root = BASE_DIR / f"storage-{os.getpid()}"
    if root.exists() or Path(f"/run/netns/{NETNS}").exists():
        sys.exit(f"{root} or netns {NETNS} already exists (another run, or the leftover of a "
                 f"crashed one: `ip netns del {NETNS}`); not touching it")
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, interrupt)
    data = Data.plan(args.size_mib, args.files)
    host: Host | None = None
    t0 = time.monotonic()
    rc = 0
    try:
        print(f"host {root}, netns {NETNS}, {args.size_mib} MiB in {args.files} files, "
              f"{args.repeat} round(s); a change rewrites {len(data.changed)} file(s), "
              f"{data.changed_bytes / MIB:.1f} MiB ({100 * data.changed_bytes / data.total:.1f}%)",
              flush=True)
        print("before every timed run: btrfs filesystem sync + subvolume sync, then "
              "`sync; echo 3 > /proc/sys/vm/drop_caches` (caches dropped)", flush=True)
        host = Host(root)  # made first so that the finally block can always tear it down
        bench = setup(host, data, args.size_mib)
        print(f"set up in {time.monotonic() - t0:.1f}s", flush=True)
        for rnd in range(args.repeat):
            # project first in even rounds, baseline first in odd ones
            order = (0, 1) if rnd % 2 == 0 else (1, 0)
            pairs = [
                (partial(bench.project_pair, "btrfs", rnd, "src-b", "dst-b", "b2"),
                 partial(bench.btrfs_baseline_pair, rnd, "src-b")),
                (partial(bench.project_pair, "dir", rnd, "src-d", "dst-d", "d2"),
                 partial(bench.dir_baseline_pair, rnd, "src-d")),
                (partial(bench.project_cross, rnd, "src-d", "dst-x"),
                 partial(bench.baseline_cross, rnd, "src-d")),
            ]
            for pair in pairs:
                for i in order:
                    pair[i]()
        rows = summarize(bench, args.size_mib)
        elapsed = time.monotonic() - t0
        print()
        print_rows(rows, data)
        print(f"\nratio = project median / baseline median over {args.repeat} round(s); "
              f"times include a final sync; total {elapsed:.1f}s")
        print(f"results: {write_json(rows, bench, args, elapsed)}")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        rc = 130
    finally:
        left = cleanup(root, host)
        if left:
            print(f"cleanup left: {'; '.join(left)}", file=sys.stderr)
            rc = rc or 1
        else:
            print("cleanup verified: no mount, loop device, netns or directory left")
    return rc


if __name__ == "__main__":
    sys.exit(main())
