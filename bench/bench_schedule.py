"""Benchmark: one scheduler tick over many containers' schedules (snapshots on btrfs).

1. ``--count`` stopped busybox containers on a btrfs pool, each with
   ``snapshots.schedule=@daily`` and ``snapshots.schedule.stopped=true``.
2. A first tick (``Scheduler.tick(now=T0)``) sees every schedule (nothing due yet): the
   scheduler's own overhead when nothing is due, with every container to look at.
3. A tick a day later: every container's snapshot is due. Reported: total and per container,
   against the same number of plain ``btrfs subvolume snapshot -r`` calls on the same volumes
   (what a cron script looping over the containers would do; no records, no names, no expiry).
4. Another tick a minute later: nothing due again (now with 2 x count snapshot records).

Everything lives in a throw-away host (``/var/tmp/migrator-bench/schedule-<pid>``, netns
``mbench-sc``, 198.18.0.0/16), torn down at the end, also on failure. Results also go to
``bench/results/schedule-<timestamp>.json``.

Usage: .venv/bin/python bench/bench_schedule.py [--count N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrator.backup.scheduler import Scheduler  # noqa: E402
from migrator.runtime.containers import Containers  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402
from migrator.runtime.images import ImageStore  # noqa: E402
from migrator.runtime.teardown import teardown  # noqa: E402

DAY = 86400.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()
    root = Path(f"/var/tmp/migrator-bench/schedule-{__import__('os').getpid()}")
    h = Host(root)
    out: dict[str, object] = {"count": args.count}
    try:
        h.init("mbench-sc", "198.18.0.1/16", None)  # RFC 2544 benchmark range: room for 1000
        h.create_pool("bt", "btrfs", None, "6GiB")
        ImageStore(h.images_dir, h.state).build("busybox", None, lambda m: None)
        cts = Containers(h)
        t0 = time.monotonic()
        for i in range(args.count):
            name = f"sc{i:04d}"
            cts.create("busybox", name, "bt", {})
            cts.config_set(name, {"snapshots.schedule": "@daily",
                                  "snapshots.schedule.stopped": "true"})
        out["setup_seconds"] = round(time.monotonic() - t0, 1)
        sched = Scheduler(cts)
        t_start = time.time() - 2 * DAY

        r = sched.tick(t_start)
        out["idle_first_sight_seconds"] = round(r.seconds, 3)
        r = sched.tick(t_start + DAY)
        ok = sum(1 for j in r.results if j.result == "ok")
        assert ok == args.count, f"only {ok} of {args.count} snapshots taken"
        out["due_tick_seconds"] = round(r.seconds, 2)
        out["per_container_ms"] = round(r.seconds / args.count * 1000, 1)
        r = sched.tick(t_start + DAY + 60)
        assert not r.results, r.results
        out["idle_tick_seconds"] = round(r.seconds, 3)

        # baseline: a shell loop's worth of plain btrfs snapshots of the same volumes
        pool = root / "storage-pools" / "bt"
        base_dir = pool / "bench-baseline"
        base_dir.mkdir()
        t0 = time.monotonic()
        for i in range(args.count):
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r",
                            str(pool / "containers" / f"sc{i:04d}"),
                            str(base_dir / f"sc{i:04d}")], check=True,
                           capture_output=True)
        out["baseline_btrfs_snapshot_seconds"] = round(time.monotonic() - t0, 2)
        out["ratio_due_tick_vs_btrfs_loop"] = round(
            float(out["due_tick_seconds"]) / float(out["baseline_btrfs_snapshot_seconds"]), 2)
        for i in range(args.count):
            subprocess.run(["btrfs", "subvolume", "delete", str(base_dir / f"sc{i:04d}")],
                           check=False, capture_output=True)
    finally:
        problems = teardown(h, purge=True)
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            print("teardown problems:", problems, file=sys.stderr)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"schedule-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
