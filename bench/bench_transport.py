"""Benchmark: the project's host-to-host transport against OpenSSH and rsync on the same link.

Two test hosts (``testrigs.testhosts``, prefix ``mbt``: namespaces ``mbt-a``, ``mbt-b`` on a
private 198.51.100.0/24 veth link, each with its own sshd) are brought up for the run and
taken down at the end. Every lane sends ``--size-mib`` MiB from host a's namespace to host
b's sshd and throws it away there (rsync writes it to a file, which it deletes afterwards):

- ``openssh``: ``ip netns exec mbt-a ssh -i KEY -o UserKnownHostsFile=KNOWN
  -o StrictHostKeyChecking=yes root@B 'cat > /dev/null'`` with the data on its stdin
  (OpenSSH's default cipher and no compression; the cipher is recorded in the JSON);
- ``rsync``: ``ip netns exec mbt-a rsync -e "ssh -i KEY ..." FILE root@B:BASE/b/rsync-dest``
  (file data only: a new file each time, so the whole file is sent);
- ``project none`` / ``project zstd``: ``SshTransport(...).request("sink", {"compress": c},
  stream=SendStream(["cat", FILE]), compress=c)``, the request ``migrate host check`` probes
  the link with. The transport is connected (and the agent asked ``hello``) before the
  clock starts, so a time covers: a new channel, the agent's start (a Python process),
  the stream framed, sent, checked and drained on host b, and the agent's reply. The
  agent runs this checkout's code (``PYTHONPATH``), like the client;
- ``fast-link none`` / ``fast-link zstd``: the same with ``SshTransport(fast_link=True)``: the
  frames go over a direct TCP connection negotiated through the channel, inside TLS 1.3
  whose ephemeral certificates are pinned through the channel (Python's ``ssl``, AES-256-GCM;
  ``migrator/transport/link.py``). Skipped when the checkout has no fast link.

Data, ``--size-mib`` MiB each, on tmpfs (``/dev/shm``) so reading it costs almost nothing:

- ``zero``: ``head -c N /dev/zero`` on a pipe (zstd turns it into almost nothing);
- ``random``: bytes from ``os.urandom`` (zstd can only lose time on it);
- ``half``: 64 KiB random blocks alternating with 64 KiB zero blocks (zstd halves it);
- ``tar``: ``tar -c --sort=name /usr/share /usr/lib`` cut at N (binaries and text, what a
  volume stream looks like; zstd level 1 takes it to 37% at about 330 MB/s on one core
  here, level 3 to 34% at about 190 MB/s).

The fixed cost of one transfer is measured with an empty stream (``empty`` in the JSON):
an ssh process with its handshake for OpenSSH, a channel and the agent's start for the
project. Rounds rotate the order of the lanes; medians of ``--repeat`` rounds are
reported, in MB/s (10^6 bytes per second) over the whole time of each transfer. ``cpu``
is the machine's busy time during the transfer over its duration (2.0 = two cores busy),
read from /proc/stat: on a small VM both ends share the same cores. Before each transfer
the script waits (up to 5 minutes) until the machine has been idle for half a second, so
that other work (a test run) is not measured too; ``busy_before`` in the JSON says how idle.

``--shape RATE`` (e.g. ``100mbit``) limits what host a sends on the link with a tc token
bucket (``testhosts.shape``) for the whole run, to see the lanes on a slower network. The
run then also prints what ``--compress auto`` would choose at the rate the ``fast-none``
lane measured on random data (the link's raw rate, as ``migrate host check`` measures it).

Usage: .venv/bin/python bench/bench_transport.py [--size-mib 1024] [--repeat 3]
       [--kinds zero,random,half,tar] [--shape 100mbit]
       [--lanes openssh,rsync,project-none,project-zstd,fast-none,fast-zstd]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from migrator.pipelines.remote_copy import choose_compression  # noqa: E402
from migrator.streams import SendStream  # noqa: E402
from migrator.transport.ssh import SshTransport  # noqa: E402
from testrigs import testhosts  # noqa: E402
from testrigs.testhosts import TestHostSpec  # noqa: E402

BASE = Path("/var/tmp/migrator-bench/transport")
PREFIX = "mbt"
MIB = 2**20
BLOCK = 64 << 10
RESULTS_DIR = REPO / "bench" / "results"
AGENT = f"env PYTHONPATH={REPO} {sys.executable} -m migrator.cli.main"  # this checkout
CMD_TIMEOUT = 1800
IDLE_CORES = 0.2  # busy cores below which the machine counts as idle before a transfer
SETTLE_MAX = 300.0  # seconds to wait for that

KINDS = ("zero", "random", "half", "tar")
LANES = ("openssh", "rsync", "project-none", "project-zstd", "fast-none", "fast-zstd")
LABELS = {"openssh": "openssh", "rsync": "rsync -e ssh", "project-none": "project none",
          "project-zstd": "project zstd", "fast-none": "project fast-link none",
          "fast-zstd": "project fast-link zstd"}
HAS_FAST_LINK = "fast_link" in inspect.signature(SshTransport).parameters


# data ------------------------------------------------------------------------------------
def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(4 * MIB, left)
            f.write(os.urandom(n))
            left -= n


def write_half(path: Path, size: int) -> None:
    """64 KiB of random bytes, 64 KiB of zeros, and so on."""
    zero = bytes(BLOCK)
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            n = min(BLOCK, left)
            f.write(os.urandom(n) if i % 2 == 0 else zero[:n])
            left -= n
            i += 1


def write_tar(path: Path, size: int) -> None:
    """A tar stream of /usr/share and /usr/lib, cut (or repeated) to ``size`` bytes."""
    with open(path, "wb") as f:
        while f.tell() < size:
            tar = subprocess.Popen(["tar", "-c", "--sort=name", "-f", "-", "/usr/share",
                                    "/usr/lib"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
            assert tar.stdout is not None
            while (left := size - f.tell()) and (chunk := tar.stdout.read(min(4 * MIB, left))):
                f.write(chunk)
            tar.kill()
            tar.wait()


@dataclass
class Source:
    """Where one kind of data comes from: a file, or ``head -c N /dev/zero``."""

    kind: str
    size: int
    path: Path | None

    def argv(self) -> list[str]:
        if self.path is None:
            return ["head", "-c", str(self.size), "/dev/zero"]
        return ["cat", str(self.path)]


# measuring -------------------------------------------------------------------------------
def cpu_busy() -> float:
    """Seconds of busy CPU time (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def settle(limit: float = IDLE_CORES, wait: float = SETTLE_MAX) -> float:
    """Wait (up to ``wait`` s) until the machine is idle for half a second: other work on a
    small VM (a test run) would be measured too. Returns the busy cores last seen."""
    deadline = time.monotonic() + wait
    while True:
        c0 = cpu_busy()
        time.sleep(0.5)
        busy = (cpu_busy() - c0) / 0.5
        if busy < limit or time.monotonic() > deadline:
            if busy >= limit:
                print(f"  (the machine is still busy: {busy:.2f} cores)", flush=True)
            return busy


@dataclass
class Bench:
    a: TestHostSpec
    b: TestHostSpec
    transport: SshTransport
    fast: SshTransport | None
    size: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    ssh_cipher: str | None = None

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.a.client_key),
                "-o", f"UserKnownHostsFile={self.a.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]

    def in_a(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.a.netns, *argv]

    # lanes: each runs one transfer of ``src`` and returns the bytes it reports --------------
    def openssh(self, src: Source) -> dict[str, Any]:
        argv = self.in_a([*self.ssh_argv(), f"root@{self.b.link_ip}", "cat > /dev/null"])
        feeder = subprocess.Popen(src.argv(), stdout=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        assert feeder.stdout is not None
        try:
            r = subprocess.run(argv, stdin=feeder.stdout, capture_output=True,
                               timeout=CMD_TIMEOUT)
        finally:
            feeder.stdout.close()
            feeder.wait()
        if r.returncode or feeder.returncode:
            raise RuntimeError(f"openssh lane failed ({r.returncode}/{feeder.returncode}): "
                               f"{r.stderr.decode(errors='replace').strip()}")
        return {}

    def rsync(self, src: Source) -> dict[str, Any]:
        assert src.path is not None
        dest = self.b.home / "rsync-dest"
        argv = self.in_a(["rsync", "-e", " ".join(self.ssh_argv()), str(src.path),
                          f"root@{self.b.link_ip}:{dest}"])
        try:
            r = subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT,
                               stdin=subprocess.DEVNULL)
            if r.returncode:
                raise RuntimeError(f"rsync lane failed ({r.returncode}): "
                                   f"{r.stderr.decode(errors='replace').strip()}")
            got = dest.stat().st_size
            if got != src.size:
                raise RuntimeError(f"rsync wrote {got} bytes, not {src.size}")
        finally:
            dest.unlink(missing_ok=True)
        return {}

    def project(self, src: Source, compress: str, fast: bool = False) -> dict[str, Any]:
        t = self.fast if fast else self.transport
        assert t is not None
        stream = SendStream(src.argv(), "probe", "probe")
        reply = t.request("sink", {"compress": compress}, stream=stream, compress=compress)
        if reply["raw"] != src.size:
            raise RuntimeError(f"the agent received {reply['raw']} bytes, not {src.size}")
        link = getattr(t, "last_link", "channel")
        if fast and link != "tcp":
            raise RuntimeError(f"the fast link was not used: {getattr(t, 'link_failed', '')}")
        return {"wire": int(reply["wire"]), "link": link}

    def lane(self, name: str) -> Callable[[Source], dict[str, Any]]:
        if name == "openssh":
            return self.openssh
        if name == "rsync":
            return self.rsync
        fast = name.startswith("fast-")
        compress = name.split("-", 1)[1]
        return lambda src: self.project(src, compress, fast)

    def measure(self, lane: str, src: Source, rnd: int) -> dict[str, Any]:
        fn = self.lane(lane)
        busy_before = settle(wait=SETTLE_MAX)
        c0, t0 = cpu_busy(), time.perf_counter()
        extra = fn(src)
        seconds = time.perf_counter() - t0
        cpu = (cpu_busy() - c0) / seconds
        sample = {"kind": src.kind, "lane": lane, "round": rnd, "bytes": src.size,
                  "seconds": seconds, "cpu_cores": cpu, "busy_before": busy_before, **extra}
        self.samples.append(sample)
        rate = f"{src.size / seconds / 1e6:7.0f} MB/s" if src.size else ""
        print(f"  round {rnd + 1} {src.kind:6s} {LABELS[lane]:13s} {seconds:7.3f}s {rate} "
              f"cpu {cpu:.2f}" + (f" wire {extra['wire'] / MIB:.0f} MiB"
                                  if "wire" in extra else ""), flush=True)
        return sample

    def record_cipher(self) -> None:
        """What OpenSSH negotiated (from ``ssh -v``), for the record."""
        r = subprocess.run(self.in_a([*self.ssh_argv(), "-v", f"root@{self.b.link_ip}",
                                      "true"]),
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", r.stderr)
        self.ssh_cipher = f"{m.group(1)} (MAC {m.group(2)})" if m else None

    def project_cipher(self) -> str | None:
        assert self.transport.client is not None
        t = self.transport.client.get_transport()
        if t is None:
            return None
        return f"{t.local_cipher} (MAC {'<implicit>' if 'gcm' in t.local_cipher else t.local_mac})"


# report ------------------------------------------------------------------------------------
def summarize(bench: Bench, kinds: list[str], lanes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for kind in [*kinds, "empty"]:
        for lane in lanes:
            s = [x for x in bench.samples if x["kind"] == kind and x["lane"] == lane]
            if not s:
                continue
            sec = statistics.median(x["seconds"] for x in s)
            row = {"kind": kind, "lane": lane, "bytes": s[0]["bytes"], "median_s": sec,
                   "mb_per_s": s[0]["bytes"] / sec / 1e6 if s[0]["bytes"] else None,
                   "cpu_cores": statistics.median(x["cpu_cores"] for x in s),
                   "seconds": [x["seconds"] for x in s]}
            if "wire" in s[0]:
                row["wire_bytes"] = statistics.median(x["wire"] for x in s)
            rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]], size_mib: int) -> None:
    by = {(r["kind"], r["lane"]): r for r in rows}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        ref = by.get((kind, "openssh"))
        parts = []
        for lane in LANES:
            r = by.get((kind, lane))
            if r is None:
                continue
            if kind == "empty":
                parts.append(f"{LABELS[lane]} {r['median_s'] * 1000:.0f} ms")
                continue
            part = f"{LABELS[lane]} {r['mb_per_s']:.0f} MB/s"
            notes = []
            if lane not in ("openssh", "rsync") and ref is not None:
                notes.append(f"ratio {r['mb_per_s'] / ref['mb_per_s']:.2f} vs openssh")
            if lane.endswith("zstd") and "wire_bytes" in r:
                notes.append(f"wire {r['wire_bytes'] / MIB:.0f} MiB")
            if notes:
                part += f" ({', '.join(notes)})"
            parts.append(part)
        head = "empty transfer (fixed cost)" if kind == "empty" else f"{kind} {size_mib} MiB"
        print(f"{head}: {', '.join(parts)}")


def print_auto_choice(rows: list[dict[str, Any]]) -> None:
    """What ``--compress auto`` picks at the link rate measured here (random data over the
    fast link is the raw rate, the same figure ``migrate host check`` stores)."""
    raw = next((r for r in rows if r["kind"] == "random" and r["lane"] == "fast-none"), None)
    if raw is None:
        return
    comp, why = choose_compression({"compressors": ["zstd", "none"]}, "auto",
                                   raw["bytes"] / raw["median_s"])
    print(f"--compress auto at this link rate: {comp} ({why})")


def write_json(rows: list[dict[str, Any]], bench: Bench, args: argparse.Namespace,
               elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"transport-{stamp}.json"
    import paramiko
    import zstandard

    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    data = {
        "benchmark": "transport",
        "timestamp": stamp,
        "size_mib": args.size_mib,
        "repeat": args.repeat,
        "kinds": args.kinds,
        "lanes": args.lanes,
        "shape": args.shape,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paramiko": paramiko.__version__,
        "zstandard": zstandard.__version__,
        "openssh": ssh_v,
        "openssh_cipher": bench.ssh_cipher,
        "project_cipher": bench.project_cipher(),
        "timing": "whole transfer (ssh process or agent channel included), medians of rounds",
        "elapsed_s": elapsed,
        "rows": rows,
        "samples": bench.samples,
    }
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


# main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="data per transfer [1024]")
    ap.add_argument("--repeat", type=int, default=3, help="rounds [3]")
    ap.add_argument("--settle", type=float, default=SETTLE_MAX, metavar="SECONDS",
                    help=f"most seconds to wait for an idle machine before each transfer "
                         f"[{SETTLE_MAX:.0f}]")
    ap.add_argument("--kinds", default=",".join(KINDS), help="zero,random,half")
    ap.add_argument("--lanes", default=",".join(LANES),
                    help="openssh,rsync,project-none,project-zstd")
    ap.add_argument("--shape", default=None, metavar="RATE",
                    help="limit what host a sends on the link to RATE (tc tbf), e.g. 100mbit")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.lanes = [x for x in args.lanes.split(",") if x]
    if args.size_mib < 1 or args.repeat < 1:
        ap.error("--size-mib and --repeat must be at least 1")
    if bad := [k for k in args.kinds if k not in KINDS] + \
            [x for x in args.lanes if x not in LANES]:
        ap.error(f"unknown kind or lane: {', '.join(bad)}")
    return args


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global SETTLE_MAX
    SETTLE_MAX = args.settle
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces and sshd need it)")
    for tool in ("ssh", "rsync", "ip", testhosts.SSHD):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (run `make setup`)")
    signal.signal(signal.SIGTERM, _sigterm)
    size = args.size_mib * MIB
    data_dir = Path(f"/dev/shm/migrator-bench-transport-{os.getpid()}")
    transport: SshTransport | None = None
    fast: SshTransport | None = None
    rc = 0
    t0 = time.monotonic()
    try:
        problems = testhosts.down(BASE, PREFIX)  # the leftovers of a crashed run, if any
        if problems:
            sys.exit(f"cannot clear an earlier run: {problems}")
        a, b = testhosts.up(("a", "b"), BASE, pools=("dir",), images=(), prefix=PREFIX)
        if args.shape:
            print(f"link shaped: {testhosts.shape(a, args.shape)}", flush=True)
        data_dir.mkdir(mode=0o700)
        sources = {"zero": Source("zero", size, None)}
        if "random" in args.kinds:
            sources["random"] = Source("random", size, data_dir / "random.bin")
            write_random(data_dir / "random.bin", size)
        if "half" in args.kinds:
            sources["half"] = Source("half", size, data_dir / "half.bin")
            write_half(data_dir / "half.bin", size)
        if "tar" in args.kinds:
            sources["tar"] = Source("tar", size, data_dir / "usr.tar")
            write_tar(data_dir / "usr.tar", size)
        empty = Source("empty", 0, None)
        transport = SshTransport("b", b.link_ip, key=str(a.client_key),
                                 remote_root=str(b.root), command=AGENT,
                                 known_hosts=a.known_hosts, netns=a.netns)
        transport.request("hello")  # connected, host key checked, agent works
        fast = None
        if HAS_FAST_LINK and any(x.startswith("fast-") for x in args.lanes):
            fast = SshTransport("b", b.link_ip, key=str(a.client_key), remote_root=str(b.root),
                                command=AGENT, known_hosts=a.known_hosts, netns=a.netns,
                                fast_link=True)
            fast.request("hello")
        elif not HAS_FAST_LINK:
            args.lanes = [x for x in args.lanes if not x.startswith("fast-")]
        bench = Bench(a, b, transport, fast, size)
        bench.record_cipher()
        print(f"hosts {a.netns} -> {b.netns} ({b.link_ip}) up in {time.monotonic() - t0:.1f}s; "
              f"{args.size_mib} MiB per transfer, {args.repeat} round(s); openssh cipher "
              f"{bench.ssh_cipher}, project cipher {bench.project_cipher()}", flush=True)
        lanes = list(args.lanes)
        for rnd in range(args.repeat):
            order = lanes[rnd % len(lanes):] + lanes[:rnd % len(lanes)]
            for lane in order:
                if lane != "rsync":
                    bench.measure(lane, empty, rnd)
            for kind in args.kinds:
                for lane in order:
                    if lane == "rsync" and sources[kind].path is None:
                        continue  # rsync sends files; the zero stream is a pipe
                    bench.measure(lane, sources[kind], rnd)
        rows = summarize(bench, args.kinds, lanes)
        elapsed = time.monotonic() - t0
        print()
        print_rows(rows, args.size_mib)
        print_auto_choice(rows)
        print(f"\nMB/s = 10^6 bytes / median seconds of {args.repeat} round(s), whole "
              f"transfer; total {elapsed:.1f}s")
        print(f"results: {write_json(rows, bench, args, elapsed)}")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        if transport is not None:
            transport.close()
        if fast is not None:
            fast.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        problems = testhosts.down(BASE, PREFIX)
        left = problems + testhosts.leftovers(BASE, PREFIX)
        with contextlib.suppress(OSError):
            BASE.parent.rmdir()  # only when no other bench lives there
        if data_dir.exists():
            left.append(f"directory {data_dir}")
        if left:
            print(f"cleanup left: {'; '.join(left)}", file=sys.stderr)
            rc = rc or 1
        else:
            print("cleanup verified: no namespace, sshd, mount or directory left")
    return rc


if __name__ == "__main__":
    sys.exit(main())
