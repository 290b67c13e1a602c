"""Benchmark: live migration of a running container between two test hosts, against the same
migration run by hand with ``lxc-checkpoint`` and rsync.

Two test hosts (``testrigs.testhosts``, prefix ``mb``: namespaces ``mb-a``, ``mb-b`` on a
private 198.51.100.0/24 veth link, each with its own sshd, a btrfs pool and the busybox
image) are brought up for the run and taken down at the end, also after a failure or Ctrl-C.
Host a has host b in its inventory (``migrate host add``, host key trusted), as in
``tests/integration/test_live.py``.

For every size in ``--sizes`` (MB of touched memory) each method gets a fresh privileged
busybox container on host a's btrfs pool (``-c security.privileged=true``; with
``--unprivileged`` an unprivileged one, the default of ``migrate launch``) running
``tests/workloads/counter.c`` (built
with ``gcc -static -O2``, started with ``setsid /counter MB /root/state 50`` through
``migrate exec``): MB megabytes of a known pattern, re-checked every 50 ms, and a state file
``count=N bad=B pid=P start=S``. The methods:

- ``stop-and-copy``: ``migrate --root A live local b NAME --mode stop-and-copy --format
  json``; downtime and stages from its JSON (downtime: freeze to the restore's return),
  total = the command's wall time;
- ``post-copy``: the same with ``--mode post-copy`` (total includes every page arriving);
- ``baseline``: what an operator would do by hand, following ``../shared/design.md``
  ("What is real here"): rsync the rootfs to host b while the container runs (``rsync
  -aHAX --numeric-ids --sparse --delete -e ssh``); then, timed as the downtime,
  ``lxc-checkpoint -s -D IMAGES -n NAME -P LXCPATH`` in host a's namespace (plain: the source
  is killed after the dump), ``rsync -a`` of the images directory to host b, the same rootfs
  rsync again (CRIU checks open files' sizes), and ``lxc-checkpoint -r`` in host b's
  namespace with ``CRIU_CONFIG_FILE`` holding ``mntns-compat-mode`` and its output to a
  file. Every lxc command runs through ``migrator/core/nsexec.py`` (the host's netns with a
  matching /sys and cgroups), as ``LxcDriver`` does. Host b gets the container's LXC config
  copied with ``lxc.rootfs.path`` rewritten (the bridge has the same name on both hosts).
  Images live in /dev/shm on both sides, like the project's. Total = pre-sync + downtime;
- ``move``: stateless, ``migrate --root A move NAME b --format json`` (stop, final sync,
  start on b: the counter process does not survive, so only the state file is checked).

Every copy crosses the link through host b's sshd (the project over its SSH transport, the
baseline with rsync over OpenSSH). After each live migration the counter must keep counting
on host b from where it was (same ``start``, higher ``count``, ``bad=0``); the state before and
after is printed. Then the container is deleted on both hosts.

``--unprivileged``: the hand-run baseline cannot restore such a container here (criu 4.1.1
creates the veth from inside the user namespace, which this kernel refuses; the project
moves in a veth the target made): its failure is reported as what the baseline cannot do,
not as a failed run. Post-copy into an unprivileged container needs
``vm.unprivileged_userfaultfd = 1`` on the target: the bench sets it for the run when
post-copy is among the methods and puts the old value back at the end.

``--systemd``: the container is Debian bookworm with systemd as init (the test image
``debian/bookworm``, launched with ``--wait`` until systemd says it is running) instead of
busybox; the counter runs the same way beside systemd's own services.

``--shape 1gbit`` shapes host a's side of the link (``testhosts.shape``: a tc tbf qdisc at
that rate, burst 256kb, latency 50ms, on link0 in host a's namespace) for the whole run; the
qdisc is removed at the end.

Each run writes ``bench/results/live-<timestamp>.json``.

Usage: .venv/bin/python bench/bench_live.py [--sizes 64,256,1024] [--methods
       stop-and-copy,post-copy,baseline,move] [--shape 1gbit]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testrigs import testhosts  # noqa: E402
from testrigs.testhosts import TestHostSpec  # noqa: E402

BASE = Path("/var/tmp/migrator-bench/live")
PREFIX = "mb"
POOL = "btrfs"
RESULTS_DIR = REPO / "bench" / "results"
WORKLOAD = REPO / "tests" / "workloads" / "counter.c"
NSEXEC = REPO / "migrator" / "core" / "nsexec.py"
MIGRATE = [sys.executable, "-m", "migrator.cli.main"]
AGENT = f"env PYTHONPATH={REPO} {sys.executable} -m migrator.cli.main"  # this checkout
CMD_TIMEOUT = 900
METHODS = ("stop-and-copy", "post-copy", "baseline", "move")
UFFD = Path("/proc/sys/vm/unprivileged_userfaultfd")
SYSTEMD_IMAGE = "debian/bookworm"
SHORT = {"stop-and-copy": "sc", "post-copy": "pc", "baseline": "bl", "move": "mv"}


class BenchError(Exception):
    """A step of one measurement failed; the message says which and why."""


def run(argv: list[str | Path], check: bool = True, timeout: float = CMD_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(str(a) for a in argv)}` -> {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()}")
    return r


def m(spec: TestHostSpec, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([*MIGRATE, "--root", spec.root, *args], check=check)


def in_ns(netns: str, argv: list[str | Path]) -> list[str | Path]:
    """``argv`` in ``netns`` with a /sys and cgroups to match: how every lxc-* runs here."""
    return [sys.executable, "-S", NSEXEC, netns, "--", *argv]


# the workload ------------------------------------------------------------------------------
def rootfs(spec: TestHostSpec, name: str) -> Path:
    return spec.root / "storage-pools" / POOL / "containers" / name / "rootfs"


def read_state(root: Path) -> dict[str, int]:
    text = (root / "root" / "state").read_text()
    return {k: int(v) for k, v in (f.split("=") for f in text.split())}


def wait_count(root: Path, above: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    last: dict[str, int] | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = read_state(root)
            if last["count"] > above:
                return last
        time.sleep(0.05)
    raise BenchError(f"the counter in {root} stopped at {last} (waited for count > {above})")


def fmt_state(s: dict[str, int]) -> str:
    return f"count={s['count']} bad={s['bad']} start={s['start']}"


def launch_counting(a: TestHostSpec, counter: Path, name: str, mb: int,
                    privileged: bool = True, image: str = "busybox") -> dict[str, int]:
    # --wait: a systemd container counts as up once systemd says it is running
    m(a, "launch", image, name, "-p", POOL, *(["--wait"] if image != "busybox" else []),
      *(["-c", "security.privileged=true"] if privileged else []))
    dest = rootfs(a, name) / "counter"
    shutil.copy(counter, dest)
    dest.chmod(0o755)
    m(a, "exec", name, "--", "/bin/sh", "-c",
      f"setsid /counter {mb} /root/state 50 </dev/null >/dev/null 2>&1 &")
    # the pattern is written before the first count: wait until the whole buffer is touched
    return wait_count(rootfs(a, name), 3, timeout=120)


def check_kept_memory(root: Path, before: dict[str, int]) -> tuple[str, bool]:
    """The counter goes on where it was: same start, higher count, no bad page."""
    now = wait_count(root, before["count"])
    later = wait_count(root, now["count"])
    ok = now["start"] == before["start"] and later["bad"] == 0
    return f"before {fmt_state(before)} -> after {fmt_state(later)}", ok


# the hosts -----------------------------------------------------------------------------------
@dataclass
class Bench:
    a: TestHostSpec
    b: TestHostSpec
    counter: Path
    shm: Path  # images of the baseline, both sides
    shape: str | None = None
    privileged: bool = True
    image: str = "busybox"
    shaped = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    def ssh(self) -> str:
        return (f"ssh -F /dev/null -i {self.a.client_key} -o UserKnownHostsFile="
                f"{self.a.known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes")

    def in_a(self, argv: list[str | Path]) -> list[str | Path]:
        return ["ip", "netns", "exec", self.a.netns, *argv]

    def pair(self) -> None:
        """Host a knows host b (inventory entry, trusted host key), as the tests set it up."""
        (self.a.root / "ssh").mkdir(exist_ok=True)
        shutil.copy(self.a.known_hosts, self.a.root / "ssh" / "known_hosts")
        m(self.a, "host", "add", "b", self.b.link_ip, "--key", str(self.a.client_key),
          "--remote-root", str(self.b.root), "--command", AGENT)

    def shape_link(self) -> None:
        print(f"link shaped: {testhosts.shape(self.a, self.shape)}", flush=True)
        self.shaped = True

    def unshape_link(self) -> None:
        if self.shaped:
            testhosts.shape(self.a, None)
            self.shaped = False

    def clean(self, name: str) -> None:
        """The container gone from both hosts, the baseline's copy on b included."""
        lxcpath = self.b.root / "lxc"
        if (lxcpath / name).exists():
            run(in_ns(self.b.netns, ["lxc-stop", "-k", "-P", lxcpath, "-n", name]), check=False)
            shutil.rmtree(lxcpath / name, ignore_errors=True)
        shutil.rmtree(self.b.home / "baseline" / name, ignore_errors=True)
        for tag in ("a", "b"):
            shutil.rmtree(self.shm / f"{tag}-{name}", ignore_errors=True)
        for spec in (self.a, self.b):
            r = m(spec, "list", "--format", "json", check=False)
            if r.returncode == 0 and name in {c["name"] for c in json.loads(r.stdout)}:
                m(spec, "delete", "--force", name, check=False)

    # methods: each returns (downtime, total, extra) ------------------------------------------
    def live(self, name: str, mode: str) -> tuple[float, float, dict[str, Any]]:
        t0 = time.monotonic()
        r = m(self.a, "live", "local", "b", name, "--mode", mode, "--format", "json")
        total = time.monotonic() - t0
        res = json.loads(r.stdout)
        res = res[0] if isinstance(res, list) else res
        if res.get("downtime") is None:
            raise BenchError(f"no downtime in {res}")
        return float(res["downtime"]), total, {"result": res}

    def move(self, name: str) -> tuple[float, float, dict[str, Any]]:
        t0 = time.monotonic()
        r = m(self.a, "move", name, "b", "--format", "json")
        total = time.monotonic() - t0
        res = json.loads(r.stdout)
        if res.get("downtime") is None:
            raise BenchError(f"no downtime in {res}")
        return float(res["downtime"]), total, {"result": res}

    def baseline(self, name: str) -> tuple[float, float, dict[str, Any]]:
        a, b = self.a, self.b
        a_lxc, b_lxc = a.root / "lxc", b.root / "lxc"
        src_root = rootfs(a, name)
        dst_root = b.home / "baseline" / name / "rootfs"
        a_img, b_img = self.shm / f"a-{name}", self.shm / f"b-{name}"
        for d in (dst_root, a_img, b_img):
            d.mkdir(parents=True, mode=0o700)  # untimed: the target dirs exist
        # host b's LXC config: host a's with the rootfs and the log moved (the bridge has
        # the same name on both hosts)
        conf = (a_lxc / name / "config").read_text()
        conf, n = re.subn(r"^lxc\.rootfs\.path\s*=.*$", f"lxc.rootfs.path = dir:{dst_root}",
                          conf, flags=re.M)
        conf = conf.replace(f"{a_lxc}/", f"{b_lxc}/")  # lxc.log.file
        if n != 1 or str(a.root) in conf:
            raise BenchError(f"cannot rewrite host a's LXC config for host b:\n{conf}")
        (b_lxc / name).mkdir(mode=0o700)
        (b_lxc / name / "config").write_text(conf)
        restore_conf = self.shm / "criu-restore.conf"
        restore_conf.write_text("mntns-compat-mode\n")
        dest = f"root@{b.link_ip}"
        rsync_root = self.in_a(["rsync", "-aHAX", "--numeric-ids", "--sparse", "--delete",
                                "-e", self.ssh(), f"{src_root}/", f"{dest}:{dst_root}/"])
        t0 = time.monotonic()
        run(rsync_root)  # pre-sync, the container running
        presync = time.monotonic() - t0
        steps: dict[str, float] = {"presync": presync}

        def step(label: str, argv: list[str | Path], env: dict[str, str] | None = None,
                 output: Path | None = None) -> None:
            s = time.monotonic()
            if output is None:
                run(argv)
            else:  # lxc-checkpoint -r: output to a file (the container keeps its stdout)
                with open(output, "wb") as out:
                    p = subprocess.run([str(x) for x in argv], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, env=env,
                                       timeout=CMD_TIMEOUT, cwd=REPO)
                if p.returncode != 0:
                    log = b_img / "restore.log"
                    tail = log.read_text(errors="replace").splitlines()[-8:] \
                        if log.exists() else []
                    raise BenchError(f"{label} -> {p.returncode}: "
                                     f"{output.read_text(errors='replace').strip()}\n  "
                                     + "\n  ".join(tail))
            steps[label] = time.monotonic() - s

        freeze = time.monotonic()
        step("dump", in_ns(a.netns, ["lxc-checkpoint", "-s", "-D", a_img, "-n", name,
                                     "-P", a_lxc]))
        step("images", self.in_a(["rsync", "-a", "--numeric-ids", "-e", self.ssh(),
                                  f"{a_img}/", f"{dest}:{b_img}/"]))
        step("final-sync", rsync_root)
        step("restore", in_ns(b.netns, ["lxc-checkpoint", "-r", "-D", b_img, "-n", name,
                                        "-P", b_lxc]),
             env={**os.environ, "CRIU_CONFIG_FILE": str(restore_conf)},
             output=self.shm / f"restore-{name}.out")
        downtime = time.monotonic() - freeze
        image_bytes = sum(f.stat().st_size for f in a_img.rglob("*") if f.is_file())
        return downtime, presync + downtime, {"stages": steps, "image_bytes": image_bytes,
                                              "target_rootfs": str(dst_root)}

    # one measurement -----------------------------------------------------------------------
    def measure(self, size: int, method: str) -> dict[str, Any]:
        name = f"{SHORT[method]}{size}"
        row: dict[str, Any] = {"size_mb": size, "method": method, "container": name}
        try:
            before = launch_counting(self.a, self.counter, name, size, self.privileged,
                                     self.image)
            if method == "baseline":
                downtime, total, extra = self.baseline(name)
                target = Path(extra["target_rootfs"])
            elif method == "move":
                downtime, total, extra = self.move(name)
                target = rootfs(self.b, name)
            else:
                downtime, total, extra = self.live(name, method)
                target = rootfs(self.b, name)
            row |= {"downtime_s": downtime, "total_s": total, **extra}
            if method == "move":  # stateless: the counter is gone, its last state file came
                after = read_state(target)
                time.sleep(0.3)
                again = read_state(target)
                ok = after["start"] == before["start"] and again == after
                row["check"] = (f"stateless: state file {fmt_state(after)} (counter not "
                                "running after the restart, as expected)")
            else:
                row["check"], ok = check_kept_memory(target, before)
            row["ok"] = ok
            stages = extra.get("stages") or extra.get("result", {}).get("stages") or {}
            print(f"  {size:5d} MB {method:13s} down {downtime:6.2f}s total {total:6.2f}s "
                  f"{'ok' if ok else 'FAILED CHECK'}: {row['check']}", flush=True)
            if stages:
                print("        stages: " + ", ".join(
                    f"{k} {_secs(v):.2f}s" for k, v in stages.items()), flush=True)
        except (BenchError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
            row |= {"ok": False, "error": str(e)}
            if method == "baseline" and not self.privileged:
                row["impossible"] = True  # by hand, criu cannot restore its veth here
                print(f"  {size:5d} MB {method:13s} not possible by hand: {e}", flush=True)
            else:
                print(f"  {size:5d} MB {method:13s} FAILED: {e}", flush=True)
        finally:
            self.clean(name)
        self.rows.append(row)
        return row


def _secs(v: Any) -> float:
    if isinstance(v, dict):
        return float(v.get("seconds", 0.0))
    return float(v)


# report ------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'size MB':>7}  {'method':13s}  {'downtime s':>10}  {'total s':>8}  check")
    for r in rows:
        if "error" in r:
            what = "not possible by hand" if r.get("impossible") else "FAILED"
            print(f"{r['size_mb']:7d}  {r['method']:13s}  {'-':>10}  {'-':>8}  {what}")
            continue
        print(f"{r['size_mb']:7d}  {r['method']:13s}  {r['downtime_s']:10.2f}  "
              f"{r['total_s']:8.2f}  {'ok' if r['ok'] else 'FAILED'}")
    by = {(r["size_mb"], r["method"]): r for r in rows if "error" not in r}
    sizes = list(dict.fromkeys(r["size_mb"] for r in rows))
    print("\nratios, project / hand-run baseline (below 1: the project is faster):")
    for size in sizes:
        base = by.get((size, "baseline"))
        if base is None:
            continue
        parts = []
        for method in ("stop-and-copy", "post-copy"):
            found = by.get((size, method))
            if found is not None:
                r = found
                parts.append(f"{method} downtime {r['downtime_s'] / base['downtime_s']:.2f}, "
                             f"total {r['total_s'] / base['total_s']:.2f}")
        print(f"  {size} MB: " + "; ".join(parts))


def write_json(bench: Bench, args: argparse.Namespace, elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"live-{stamp}.json"
    criu = run(["criu", "--version"], check=False).stdout.strip().replace("\n", "; ")
    lxc = run(["lxc-checkpoint", "--version"], check=False).stdout.strip()
    data = {"benchmark": "live", "timestamp": stamp, "sizes_mb": args.sizes,
            "methods": args.methods, "shape": args.shape, "cpus": os.cpu_count(),
            "kernel": platform.release(), "criu": criu, "lxc": lxc,
            "python": platform.python_version(), "elapsed_s": elapsed, "rows": bench.rows}
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


# main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sizes", default="64,256,1024", help="MB of touched memory [64,256,1024]")
    ap.add_argument("--methods", default=",".join(METHODS), help=",".join(METHODS))
    ap.add_argument("--unprivileged", action="store_true",
                    help="unprivileged containers (migrate launch's default)")
    ap.add_argument("--systemd", action="store_true",
                    help=f"Debian with systemd as init ({SYSTEMD_IMAGE}) instead of busybox")
    ap.add_argument("--shape", default=None, metavar="RATE",
                    help="shape host a's side of the link with tbf at RATE (e.g. 1gbit)")
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        ap.error("--sizes: a comma-separated list of integers")
    args.methods = [x for x in args.methods.split(",") if x]
    if not args.sizes or any(s < 1 for s in args.sizes):
        ap.error("--sizes must be at least 1")
    if bad := [x for x in args.methods if x not in METHODS]:
        ap.error(f"unknown method: {', '.join(bad)}")
    if args.shape is not None and not re.fullmatch(r"\d+(\.\d+)?[kmg]?(bit|bps)", args.shape):
        ap.error("--shape: a tc rate such as 1gbit or 500mbit")
    return args


def bench_image(args: argparse.Namespace) -> str:
    return SYSTEMD_IMAGE if args.systemd else "busybox"


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, sshd and CRIU need it)")
    for tool in ("gcc", "rsync", "ssh", "ip", "tc", "criu", "lxc-checkpoint", testhosts.SSHD):
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            sys.exit(f"{tool} is not installed (run `make setup`)")
    signal.signal(signal.SIGTERM, _sigterm)
    work = Path(tempfile.mkdtemp(prefix="migrator-bench-live-"))
    shm = Path(f"/dev/shm/migrator-bench-live-{os.getpid()}")
    bench: Bench | None = None
    uffd_old: str | None = None
    rc = 0
    t0 = time.monotonic()
    try:
        problems = testhosts.down(BASE, PREFIX)  # the leftovers of a crashed run, if any
        if problems:
            sys.exit(f"cannot clear an earlier run: {problems}")
        counter = work / "counter"
        run(["gcc", "-static", "-O2", "-o", counter, WORKLOAD])
        a, b = testhosts.up(("a", "b"), BASE, pools=(POOL,), images=(bench_image(args),),
                            prefix=PREFIX)
        shm.mkdir(mode=0o700)
        bench = Bench(a, b, counter, shm, args.shape, privileged=not args.unprivileged,
                      image=bench_image(args))
        if args.unprivileged and "post-copy" in args.methods:
            uffd_old = UFFD.read_text().strip()
            UFFD.write_text("1")
        bench.pair()
        if args.shape:
            bench.shape_link()
        print(f"hosts {a.netns} -> {b.netns} ({b.link_ip}) up in {time.monotonic() - t0:.1f}s; "
              f"sizes {args.sizes} MB; link {'shaped ' + args.shape if args.shape else 'unshaped'}",
              flush=True)
        for size in args.sizes:
            for method in args.methods:
                bench.measure(size, method)
        elapsed = time.monotonic() - t0
        print_table(bench.rows)
        print(f"\ndowntime: freeze (dump start) to the restore's return; total: the whole "
              f"command (baseline: pre-sync + downtime); run {elapsed:.0f}s")
        print(f"results: {write_json(bench, args, elapsed)}")
        failed = [r for r in bench.rows if not r["ok"] and not r.get("impossible")]
        for r in failed:
            print(f"FAILED {r['size_mb']} MB {r['method']}: {r.get('error') or r.get('check')}",
                  file=sys.stderr)
        rc = 1 if failed else 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        if bench is not None:
            bench.unshape_link()
        if uffd_old is not None:
            UFFD.write_text(uffd_old)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        problems = testhosts.down(BASE, PREFIX)
        left = problems + testhosts.leftovers(BASE, PREFIX)
        with contextlib.suppress(OSError):
            BASE.parent.rmdir()  # only when no other bench lives there
        left += [f"directory {d}" for d in (work, shm) if d.exists()]
        if left:
            print(f"cleanup left: {'; '.join(left)}", file=sys.stderr)
            rc = rc or 1
        else:
            print("cleanup verified: no namespace, sshd, container, mount or directory left")
    return rc


if __name__ == "__main__":
    sys.exit(main())
