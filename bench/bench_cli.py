"""Benchmark: what a `migrate` command costs before it does anything (issue 18's goals:
`migrate --help` within 0.1 s, `migrate list` on an idle host within 0.15 s).

Each row is one process started and waited for, as an operator's shell starts it, repeated
``--runs`` times (rounds interleave the rows, so a busy moment hits all of them alike); the
table gives median, min and max wall time:

* ``python -c pass``: the interpreter alone (the floor every row stands on).
* ``import migrator.cli.main``: the CLI module alone.
* ``migrate --help``, ``migrate backup --help``: help, no state root touched.
* ``migrate list`` (table and ``--format json``) on an empty host: a state root with no
  container and no network namespace.
* ``migrate list`` on a host in its own network namespace with ``--containers`` privileged
  busybox containers, all stopped, then all running (the state shown is checked each time:
  STOPPED, then RUNNING).

Goals are printed with each row they apply to and whether the median meets them.

``--tree DIR`` times another checkout's code with this venv (``PYTHONPATH=DIR``), e.g. a
``git worktree`` of an older commit, for before/after figures on the same machine and host.

Everything lives in a throw-away host (``/var/tmp/migrator-bench-cli-<pid>``, netns
``mbcli<pid % 10000>``, bridge 198.51.100.1/24) torn down at the end, also after a failure or
Ctrl-C; the script then checks that no namespace or mount of it is left. Samples go to
``bench/results/cli-<timestamp>.json`` (ignored by git).

Usage: sudo .venv/bin/python bench/bench_cli.py [--runs 15] [--containers 3] [--tree DIR]
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scratchhost import interrupt, tear_down  # noqa: E402

from migrator.runtime.containers import Containers  # noqa: E402
from migrator.runtime.host import Host  # noqa: E402

SUBNET = "198.51.100.1/24"  # TEST-NET-2 only, inside the bench's own namespace
IMAGE = "busybox"
POOL = "bench"
RESULTS_DIR = REPO / "bench" / "results"
GOALS = {"migrate --help": 0.10, "migrate list, empty host": 0.15,
         "migrate list, {n} stopped": 0.15}


def run(argv: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd="/",
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    run(argv, env)
    return time.perf_counter() - t


def states(migrate: list[str], root: Path, env: dict[str, str]) -> dict[str, str]:
    out = run([*migrate, "--root", str(root), "list", "--format", "json"], env).stdout
    return {c["name"]: c["state"] for c in json.loads(out)}


def bench(rows: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, list[float]]:
    """One untimed warm-up of each row, then ``runs`` interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for argv in rows.values():
        run(argv, env)
    for _ in range(runs):
        for name, argv in rows.items():
            samples[name].append(timed(argv, env))
    return samples


def setup(root: Path, netns: str, n: int) -> tuple[Host, Containers, list[str]]:
    host = Host(root)
    host.init(netns, SUBNET, None)
    host.create_pool(POOL, "dir")
    cts = Containers(host)
    cts.images.build(IMAGE, None, lambda _msg: None)
    names = [f"cli-{i}" for i in range(n)]
    for name in names:
        cts.create(IMAGE, name, POOL, {"security.privileged": "true"})
    return host, cts, names


def summarize(samples: dict[str, list[float]], n: int) -> list[dict[str, Any]]:
    goals = {k.format(n=n): v for k, v in GOALS.items()}
    rows = []
    for name, xs in samples.items():
        med = statistics.median(xs)
        goal = goals.get(name)
        rows.append({"row": name, "median": med, "min": min(xs), "max": max(xs),
                     "goal": goal, "met": None if goal is None else med <= goal})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'':36} {'median':>8} {'min':>8} {'max':>8}   goal")
    for r in rows:
        goal = "" if r["goal"] is None else \
            f"<= {r['goal']:.2f} s {'met' if r['met'] else 'NOT met'}"
        print(f"{r['row']:36} {r['median']:7.3f}s {r['min']:7.3f}s {r['max']:7.3f}s   {goal}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", "-n", type=int, default=15, help="timed rounds [15]")
    ap.add_argument("--containers", type=int, default=3, help="containers on the host [3]")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose code is timed")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.containers < 1:
        ap.error("need --runs >= 1 and --containers >= 1")
    if os.geteuid() != 0:
        sys.exit("run as root (LXC and network namespaces need it)")
    migrate_exe = Path(sys.executable).with_name("migrate")
    if not migrate_exe.exists():
        sys.exit(f"{migrate_exe} not found; run with the project's venv python")
    tree = args.tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("MIGRATOR_ROOT", None)
    migrate = [str(migrate_exe)]
    pid = os.getpid()
    base = Path(f"/var/tmp/migrator-bench-cli-{pid}")
    netns = f"mbcli{pid % 10000}"
    if base.exists() or Path(f"/run/netns/{netns}").exists():
        sys.exit(f"{base} or netns {netns} already exists; not touching someone else's")
    signal.signal(signal.SIGTERM, interrupt)
    host: Host | None = None
    n = args.containers
    t0 = time.monotonic()
    try:
        print(f"code {tree}; host {base}, netns {netns}; {args.runs} rounds", flush=True)
        empty = base / "empty"
        full = base / "host"
        host, cts, names = setup(full, netns, n)
        run([*migrate, "--root", str(empty), "list"], env)  # makes the empty state root
        py = [sys.executable]
        rows = {
            "python -c pass": [*py, "-c", "pass"],
            "import migrator.cli.main": [*py, "-c", "import migrator.cli.main"],
            "migrate --help": [*migrate, "--help"],
            "migrate backup --help": [*migrate, "backup", "--help"],
            "migrate list, empty host": [*migrate, "--root", str(empty), "list"],
            "migrate list --format json, empty": [*migrate, "--root", str(empty), "list",
                                                  "--format", "json"],
            f"migrate list, {n} stopped": [*migrate, "--root", str(full), "list"],
        }
        seen = states(migrate, full, env)
        assert seen == dict.fromkeys(names, "STOPPED"), seen
        samples = bench(rows, env, args.runs)
        for name in names:
            cts.start(name)
        running = {f"migrate list, {n} running": [*migrate, "--root", str(full), "list"],
                   "migrate info, running": [*migrate, "--root", str(full), "info", names[0]]}
        seen = states(migrate, full, env)
        assert seen == dict.fromkeys(names, "RUNNING"), seen
        samples.update(bench(running, env, args.runs))
        seen = states(migrate, full, env)
        assert seen == dict.fromkeys(names, "RUNNING"), seen
        rows_out = summarize(samples, n)
        elapsed = time.monotonic() - t0
        print()
        print_table(rows_out)
        print(f"\nmedian, min, max of {args.runs} runs each (one process each, wall time); "
              f"total {elapsed:.1f}s")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"cli-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({
            "tree": str(tree), "runs": args.runs, "containers": n, "rows": rows_out,
            "samples": samples, "python": platform.python_version(),
            "kernel": platform.release(), "cpus": os.cpu_count()}, indent=1))
        print(f"results: {out}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        left = tear_down(base, netns, host)
        if left:
            print(f"LEFT BEHIND: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
