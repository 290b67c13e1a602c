"""Benchmark: ``migrate p2c`` of a ~1 GB machine against rsync over OpenSSH of the same tree.

Two test hosts (``testrigs.testhosts``, prefix ``mbp``) and the p2c test machine
(``testrigs.testmachine``: debootstrapped Debian, ~250 MB, plus ``--data-mb`` of incompressible
files in /var/lib/appdata, its own network/mount/PID namespaces) on their private switch.
Each round, in the same run:

- ``p2c``: ``migrate --root A p2c root@MACHINE NAME --to b --no-start --format json`` from
  host a (inventory, two rsync passes relayed by host a's process between the machine's sshd
  and host b's agent, fixups, uid shift, record); ``p2c pass 1`` is its first rsync pass
  alone (the part comparable with the baseline). The first boot is timed apart
  (``p2c+boot``: the same without ``--no-start``) in the last round only;
- ``rsync``: what a user could do by hand, the floor: on host b (its namespace),
  ``rsync -aHAX --numeric-ids -e "ssh -i KEY -o UserKnownHostsFile=KNOWN" root@MACHINE:/
  DIR/`` with the same exclusions p2c derives from the machine's mounts (/proc, /sys, /dev,
  /run, /tmp contents), into a directory on host b's disk. One pass, no fixups, no shift.

Before each lane the target is emptied and the page cache dropped (``/proc/sys/vm/
drop_caches``) so both read the machine's disk alike. Medians of ``--repeat`` rounds.

Usage: .venv/bin/python bench/bench_p2c.py [--data-mb 750] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from migrator.p2c.inventory import Mount, exclude_rules  # noqa: E402
from testrigs import testhosts, testmachine  # noqa: E402

BASE = Path("/var/tmp/migrator-bench/p2c")
PREFIX = "mbp"
MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
AGENT = f"{sys.executable} -m migrator.cli.main"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPO,
                          **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-mb", type=int, default=750)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=REPO / "bench/results/p2c.json")
    args = ap.parse_args()

    testhosts.down(BASE, PREFIX)
    results: dict[str, list[float]] = {"p2c": [], "p2c pass 1": [], "p2c+boot": [],
                                       "rsync": []}
    detail: dict[str, object] = {}
    try:
        a, b = testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX)
        with testmachine.running(BASE / "machine", PREFIX, a.client_key,
                                 data_mb=args.data_mb) as m:
            known = a.root / "ssh" / "known_hosts"
            known.parent.mkdir(exist_ok=True)
            shutil.copy(a.known_hosts, known)
            with open(known, "a") as f:
                f.write(m.known_hosts_line())
            run([*MIGRATE, "--root", str(a.root), "host", "add", "b", b.link_ip, "--key",
                 str(a.client_key), "--remote-root", str(b.root), "--command", AGENT])
            p2c = [*MIGRATE, "--root", str(a.root), "p2c", f"root@{m.ip}", "bench", "--to",
                   "b", "--key", str(a.client_key), "--format", "json"]
            dry = json.loads(run([*p2c, "--dry-run"]).stdout)["inventory"]
            detail["size"] = dry["total_size"]
            rules = exclude_rules([Mount(**mt) for mt in dry["mounts"]], [])
            dest = BASE / "b" / "rsync-dest"
            rsync = ["nsenter", f"--net=/run/netns/{b.netns}", "rsync", "-aHAX",
                     "--numeric-ids", *[f"--filter={r}" for r in rules], "-e",
                     f"ssh -i {a.client_key} -o UserKnownHostsFile={known} "
                     "-o StrictHostKeyChecking=yes -o BatchMode=yes",
                     f"root@{m.ip}:/", f"{dest}/"]
            for i in range(args.repeat):
                last = i == args.repeat - 1
                lanes = ["p2c", "rsync"] if i % 2 == 0 else ["rsync", "p2c"]
                for lane in lanes:
                    shutil.rmtree(dest, ignore_errors=True)
                    subprocess.run([*MIGRATE, "--root", str(b.root), "delete", "--force",
                                    "bench"], capture_output=True, cwd=REPO)
                    drop_caches()
                    t0 = time.monotonic()
                    if lane == "rsync":
                        run(rsync)
                        results["rsync"].append(time.monotonic() - t0)
                    else:
                        out = json.loads(run([*p2c, "--no-start"]).stdout)
                        results["p2c"].append(time.monotonic() - t0)
                        results["p2c pass 1"].append(out["passes"][0]["seconds"])
                        detail["p2c_passes"] = out["passes"]
                    print(f"round {i + 1} {lane}: {results[lane][-1]:.1f}s", file=sys.stderr)
                if last:
                    subprocess.run([*MIGRATE, "--root", str(b.root), "delete", "--force",
                                    "bench"], capture_output=True, cwd=REPO)
                    drop_caches()
                    t0 = time.monotonic()
                    out = json.loads(run(p2c).stdout)
                    results["p2c+boot"].append(time.monotonic() - t0)
                    detail["boot"] = out["boot"]
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run([*MIGRATE, "--root", str(b.root), "delete", "--force", "bench"],
                           capture_output=True, cwd=REPO)
    finally:
        problems = testhosts.down(BASE, PREFIX)
        if problems:
            print(f"teardown problems: {problems}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    size = int(detail["size"])  # type: ignore[call-overload]
    print(f"\nmachine: {size / 1e6:.0f} MB to transfer; medians of {args.repeat} round(s)\n")
    print("| lane | seconds | MB/s | vs rsync |\n|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {size / v / 1e6:.0f} | {v / med['rsync']:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "medians": med, "detail": detail,
                                     "machine": platform.node(), "data_mb": args.data_mb},
                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
