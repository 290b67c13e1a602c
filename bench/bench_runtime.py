"""Benchmark: the runtime's container operations against the same work done with raw LXC.

What is compared, per storage pool driver (dir, btrfs), with privileged busybox containers:

* launch   -- create + start until RUNNING.
  project: ``Containers.launch`` in-process (library) and ``migrate launch`` (cli).
  raw:     copy the image rootfs (``cp -a --reflink=auto`` on dir, ``btrfs subvolume snapshot``
           of the pool's cached image volume on btrfs), write the very config the project
           renders (``migrator.runtime.lxc.render_config``), ``lxc-start`` + ``lxc-wait -s
           RUNNING``.
* snapshot -- of the running container.
  project: ``Containers.snapshot_create`` / ``migrate snapshot create``.
  raw:     two baselines. "native" is the like-for-like one and the one the ratio of the
           first snapshot row uses: ``cp -a --reflink=auto`` (dir) or ``btrfs subvolume
           snapshot -r`` (btrfs). "lxc-copy -s" is what LXC itself offers; with a ``dir:``
           rootfs it makes an overlay clone over the live rootfs (O(1), not a point-in-time
           copy), so it is shown for reference only. Which one LXC made is printed.
* delete   -- of the running container with its snapshot.
  project: ``Containers.delete(force=True)`` / ``migrate delete --force``.
  raw:     ``lxc-stop -k`` + ``lxc-destroy`` (removes the rootfs copy and the snapshot).

Why: to see what the project's bookkeeping (state database, staged undo, config rendering,
state checks, the CLI's start-up) costs over the bare LXC calls on the same pool. Both sides
run every lxc-* command through the same network-namespace helper (``netns_prefix``), so
that cost is in both columns. Raw containers live in their own LXC path inside the pool
(``<pool>/raw-lxc``), on the same filesystem as the project's volumes.

One untimed warm-up round runs first (it also creates the btrfs pool's image volume the raw
side snapshots). Medians of N rounds are reported; every sample goes to the JSON file.

Everything lives in one throw-away host (``/var/tmp/migrator-bench-<pid>``, netns
``mbench<pid % 10000>``, bridge 198.51.100.1/24) that is torn down at the end, also on
failure or Ctrl-C.

Usage: .venv/bin/python bench/bench_runtime.py [--iterations N] [--drivers dir,btrfs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scratchhost import interrupt, tear_down  # noqa: E402

from migrator.backends import VolumeRef  # noqa: E402
from migrator.core.proc import netns_prefix  # noqa: E402
from migrator.runtime.containers import Containers  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402
from migrator.runtime.lxc import ContainerSpec, render_config  # noqa: E402

SUBNET = "198.51.100.1/24"  # TEST-NET-2 only
RAW_IP = "198.51.100.200"  # far above the project's allocations (.10 up)
IMAGE = "busybox"
PRIVILEGED = {"security.privileged": "true"}
BTRFS_POOL_SIZE = "2GiB"
CMD_TIMEOUT = 60
RESULTS_DIR = REPO / "bench" / "results"

Samples = dict[tuple[str, str, str], list[float]]  # (operation, driver, lane) -> seconds


# helpers -------------------------------------------------------------------------------------
def run(argv: list[str | Path], netns: str | None = None, check: bool = True) -> str:
    """Run a command (inside ``netns`` when given); return stdout, raise with stderr."""
    full = netns_prefix(netns) + [str(a) for a in argv]
    cp = subprocess.run(full, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# the project side ----------------------------------------------------------------------------
class ProjectLib:
    """The runtime library, in-process."""

    lane = "library"

    def __init__(self, cts: Containers, pool: str) -> None:
        self.cts, self.pool = cts, pool

    def launch(self, name: str) -> None:
        self.cts.launch(IMAGE, name, self.pool, dict(PRIVILEGED))

    def snapshot(self, name: str) -> None:
        self.cts.snapshot_create(name, "snap0")

    def delete(self, name: str) -> None:
        self.cts.delete(name, force=True)


class ProjectCli:
    """The ``migrate`` command, one process per operation."""

    lane = "cli"

    def __init__(self, root: Path, pool: str) -> None:
        exe = Path(sys.executable).with_name("migrate")
        if not exe.exists():
            raise RuntimeError(f"{exe} not found; run with the project's venv python")
        self.base = [str(exe), "--root", str(root)]
        self.pool = pool

    def launch(self, name: str) -> None:
        run([*self.base, "launch", IMAGE, name, "-p", self.pool,
             "-c", "security.privileged=true"])

    def snapshot(self, name: str) -> None:
        run([*self.base, "snapshot", "create", name, "snap0"])

    def delete(self, name: str) -> None:
        run([*self.base, "delete", name, "--force"])


# the raw LXC side ----------------------------------------------------------------------------
class RawLxc:
    """The same containers made with lxc-* tools and plain file copies, in ``<pool>/raw-lxc``."""

    lane = "raw"

    def __init__(self, host: Host, cts: Containers, pool: str) -> None:
        backend = host.backend(pool)
        self.driver = backend.name
        self.netns = host.netns
        self.network = host.network_config()
        image = cts.images.find(IMAGE)
        self.init = str(image.properties.get("init", "busybox"))
        self.image_rootfs = cts.images.rootfs(image.fingerprint)
        # btrfs: the shifted-by-0 (privileged) image volume Containers._populate_volume keeps
        self.image_volume = backend.volume_path(VolumeRef("image", f"{image.fingerprint}-0"))
        self.lxcpath = Path(host.state.get_pool(pool).config["path"]) / "raw-lxc"
        self.lxcpath.mkdir(exist_ok=True)
        self.copy_kind = "unknown"

    def _lxc(self, tool: str, name: str, *args: str) -> str:
        return run([tool, "-P", str(self.lxcpath), "-n", name, *args], netns=self.netns)

    def rootfs(self, name: str) -> Path:
        d = self.lxcpath / name
        return d / "vol" / "rootfs" if self.driver == "btrfs" else d / "rootfs"

    def launch(self, name: str) -> None:
        d = self.lxcpath / name
        d.mkdir(mode=0o700)
        if self.driver == "btrfs":
            run(["btrfs", "subvolume", "snapshot", self.image_volume, d / "vol"])
        else:
            run(["cp", "-a", "--reflink=auto", self.image_rootfs, d / "rootfs"])
        spec = ContainerSpec(name=name, rootfs=self.rootfs(name), log_file=d / "lxc.log",
                             init=self.init, ipv4=RAW_IP, network=self.network, idmap=None)
        (d / "config").write_text(render_config(spec))
        self._lxc("lxc-start", name)
        self._lxc("lxc-wait", name, "-s", "RUNNING", "-t", "30")

    def snapshot(self, name: str) -> None:
        """Native, like-for-like snapshot (kept in the container's directory)."""
        d = self.lxcpath / name
        if self.driver == "btrfs":
            run(["btrfs", "subvolume", "snapshot", "-r", d / "vol", d / "snap"])
        else:
            run(["cp", "-a", "--reflink=auto", d / "rootfs", d / "snap"])

    def lxc_copy_snapshot(self, name: str) -> None:
        self._lxc("lxc-copy", name, "-s", "-a", "-N", f"{name}-snap")

    def drop_lxc_copy_snapshot(self, name: str) -> None:
        """Untimed: remove the clone (and note which backing store LXC chose for it)."""
        conf = (self.lxcpath / f"{name}-snap" / "config").read_text()
        for line in conf.splitlines():
            if line.startswith("lxc.rootfs.path"):
                self.copy_kind = line.split("=", 1)[1].strip().split(":", 1)[0]
        self._lxc("lxc-destroy", f"{name}-snap")

    def delete(self, name: str) -> None:
        self._lxc("lxc-stop", name, "-k")
        self._lxc("lxc-destroy", name)
        if (self.lxcpath / name).exists():
            raise RuntimeError(f"lxc-destroy left {self.lxcpath / name} behind")

    def destroy_all(self) -> None:
        """Cleanup: stop and destroy whatever raw containers exist (clones first)."""
        if not self.lxcpath.is_dir():
            return
        names = run(["lxc-ls", "-P", str(self.lxcpath), "-1"], netns=self.netns,
                    check=False).split()
        for name in sorted(names, key=lambda n: not n.endswith("-snap")):
            run(["lxc-stop", "-P", str(self.lxcpath), "-n", name, "-k"], netns=self.netns,
                check=False)
            run(["lxc-destroy", "-P", str(self.lxcpath), "-n", name], netns=self.netns,
                check=False)


# one round -----------------------------------------------------------------------------------
def project_round(lane: ProjectLib | ProjectCli, driver: str, name: str,
                  samples: Samples) -> None:
    samples[("launch", driver, lane.lane)].append(timed(lambda: lane.launch(name)))
    samples[("snapshot", driver, lane.lane)].append(timed(lambda: lane.snapshot(name)))
    samples[("delete", driver, lane.lane)].append(timed(lambda: lane.delete(name)))


def raw_round(raw: RawLxc, driver: str, name: str, samples: Samples) -> None:
    samples[("launch", driver, "raw")].append(timed(lambda: raw.launch(name)))
    samples[("snapshot", driver, "raw")].append(timed(lambda: raw.snapshot(name)))
    samples[("snapshot", driver, "raw lxc-copy")].append(
        timed(lambda: raw.lxc_copy_snapshot(name)))
    raw.drop_lxc_copy_snapshot(name)
    samples[("delete", driver, "raw")].append(timed(lambda: raw.delete(name)))


def bench_driver(driver: str, lanes: list[Any], iterations: int, samples: Samples) -> None:
    warmup: Samples = defaultdict(list)
    for i in range(-1, iterations):  # round -1 is the untimed warm-up
        into = warmup if i < 0 else samples
        tag = "w" if i < 0 else str(i)
        for lane in lanes:
            name = f"{driver[0]}{lane.lane[0]}{tag}"  # e.g. dl0, bc3, dr1
            if isinstance(lane, RawLxc):
                raw_round(lane, driver, name, into)
            else:
                project_round(lane, driver, name, into)
        print(f"  {driver}: round {'warm-up' if i < 0 else i + 1} done", flush=True)


# report --------------------------------------------------------------------------------------
def summarize(samples: Samples, drivers: list[str], copy_kinds: dict[str, str]) -> list[dict]:
    rows = []
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    for driver in drivers:
        for op in ("launch", "snapshot", "delete"):
            baselines = [("raw", _baseline_name(op, driver))]
            if op == "snapshot":
                baselines.append(("raw lxc-copy",
                                  f"lxc-copy -s ({copy_kinds.get(driver, '?')})"))
            for via in ("library", "cli"):
                # the overlay reference is shown once, against the library
                for raw_lane, baseline in baselines[: 1 if via == "cli" else None]:
                    p, r = med.get((op, driver, via)), med.get((op, driver, raw_lane))
                    if p is None or r is None:
                        continue
                    rows.append({"operation": op, "driver": driver, "via": via,
                                 "baseline": baseline, "project_median_s": p,
                                 "raw_median_s": r, "ratio": p / r if r else None})
    return rows


def _baseline_name(op: str, driver: str) -> str:
    copy = "btrfs snapshot" if driver == "btrfs" else "cp -a --reflink=auto"
    return {
        "launch": f"{copy} + lxc-start/wait",
        "snapshot": "btrfs snapshot -r" if driver == "btrfs" else "cp -a --reflink=auto",
        "delete": "lxc-stop -k + lxc-destroy",
    }[op]


def print_table(rows: list[dict]) -> None:
    head = ("operation", "driver", "via", "raw LXC baseline", "project (s)", "raw (s)", "ratio")
    body = [(r["operation"], r["driver"], r["via"], r["baseline"],
             f"{r['project_median_s']:.4f}", f"{r['raw_median_s']:.4f}",
             f"{r['ratio']:.2f}" if r["ratio"] is not None else "-") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    def fmt(cells: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(fmt(b))


def write_json(rows: list[dict], samples: Samples, args: argparse.Namespace,
               elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"runtime-{stamp}.json"
    data = {
        "benchmark": "runtime",
        "timestamp": stamp,
        "iterations": args.iterations,
        "drivers": args.drivers,
        "image": IMAGE,
        "config": PRIVILEGED,
        "kernel": platform.release(),
        "lxc": run(["lxc-start", "--version"], check=False).strip(),
        "elapsed_s": elapsed,
        "rows": rows,
        "samples": [{"operation": o, "driver": d, "lane": lane, "seconds": v}
                    for (o, d, lane), v in sorted(samples.items())],
    }
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


# setup and cleanup ---------------------------------------------------------------------------
def setup_host(root: Path, netns: str, drivers: list[str]) -> tuple[Host, Containers]:
    host = Host(root)
    host.init(netns, SUBNET, None)
    cts = Containers(host)
    cts.images.build(IMAGE, None, lambda _msg: None)
    for driver in drivers:
        host.create_pool(f"bench-{driver}", driver,
                         size=BTRFS_POOL_SIZE if driver == "btrfs" else None)
    return host, cts


def cleanup(root: Path, netns: str, host: Host | None, raws: list[RawLxc]) -> None:
    """Best effort, every step: raw containers, the project host, then whatever is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
    for raw in raws:
        try:
            raw.destroy_all()
        except Exception as e:  # noqa: BLE001 - keep cleaning
            print(f"cleanup: raw containers in {raw.lxcpath}: {e}", file=sys.stderr)
    tear_down(root, netns, host)


# main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", "-n", type=int, default=5, help="timed rounds [5]")
    ap.add_argument("--drivers", default="dir,btrfs", help="comma-separated [dir,btrfs]")
    args = ap.parse_args(argv)
    args.drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    if args.iterations < 1 or not args.drivers or set(args.drivers) - {"dir", "btrfs"}:
        ap.error("need --iterations >= 1 and --drivers from dir,btrfs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root (LXC, network namespaces and loop mounts need it)")
    pid = os.getpid()
    root = Path(f"/var/tmp/migrator-bench-{pid}")
    netns = f"mbench{pid % 10000}"
    if root.exists() or Path(f"/run/netns/{netns}").exists():
        sys.exit(f"{root} or netns {netns} already exists; not touching someone else's")
    signal.signal(signal.SIGTERM, interrupt)
    host: Host | None = None
    raws: list[RawLxc] = []
    t0 = time.monotonic()
    try:
        print(f"host {root}, netns {netns}, {args.iterations} rounds + 1 warm-up", flush=True)
        host, cts = setup_host(root, netns, args.drivers)
        samples: Samples = defaultdict(list)
        copy_kinds = {}
        for driver in args.drivers:
            pool = f"bench-{driver}"
            raw = RawLxc(host, cts, pool)
            raws.append(raw)
            # project lanes go first: their warm-up launch creates the btrfs image volume
            # the raw lane snapshots
            lanes = [ProjectLib(cts, pool), ProjectCli(root, pool), raw]
            bench_driver(driver, lanes, args.iterations, samples)
            copy_kinds[driver] = raw.copy_kind
        rows = summarize(samples, args.drivers, copy_kinds)
        elapsed = time.monotonic() - t0
        print()
        print_table(rows)
        print(f"\nratio = project median / raw LXC median over {args.iterations} round(s); "
              f"total {elapsed:.1f}s")
        print(f"results: {write_json(rows, samples, args, elapsed)}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup(root, netns, host, raws)


if __name__ == "__main__":
    sys.exit(main())
