"""A real "physical machine" for the p2c tests and bench, made without the runtime.

A debootstrapped Debian bookworm (systemd-sysv, openssh-server, rsync, iproute2, ifupdown,
udev, systemd-timesyncd, busybox and a web page of its own served by ``p2c-web.service``) is
built once and cached as a tarball under ``/var/cache/migrator/p2c``. Each start unpacks it
onto its own ext4 disk (a loop image, so ``/`` is a real block-device filesystem, as on a
server), optionally with a second disk (btrfs) mounted at ``/srv/archive``, and boots it:

- its own network namespace (``PREFIX-pm``), a veth ``eth0`` plugged into the test hosts'
  switch bridge (``testrigs.testhosts``) with a TEST-NET address;
- its own mount and PID namespaces (``unshare --mount --pid --fork --kill-child``); the
  first process there (``python -m testrigs.testmachine boot``) mounts the disks, /proc, /sys,
  /dev, /run and /tmp, chroots into the disk and starts sshd and the web service itself
  (PID 1 is not systemd here, as on these test machines), then reaps children.

Tear-down kills exactly the ``unshare`` process it started: ``--kill-child`` takes the
namespace's PID 1 with it, the kernel ends every other process of that PID namespace, the
mount namespace goes with its last process (loop devices are auto-cleared), and the network
namespace is deleted. A bad disk is made honestly: a file on the btrfs disk whose data
blocks are overwritten in the image, so reading it fails with EIO (checksum mismatch).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from migrator.backends.generic import tar_exact_options
from migrator.core import proc
from migrator.core.errors import MigratorError, NetworkError
from migrator.core.netns import netns_path, socket_in_netns
from migrator.runtime import network
from migrator.runtime.images import DEBIAN_MIRROR

RECIPE_VERSION = 1  # bump when the machine's build changes
PACKAGES = ["systemd-sysv", "openssh-server", "rsync", "iproute2", "ifupdown", "udev",
            "systemd-timesyncd", "busybox"]
MACHINE_IP = "198.51.100.50"
WEB_PAGE = "<html><body><h1>p2c test machine</h1><p>served by busybox httpd</p></body></html>\n"
WEB_ARGV = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/srv/www"]
BAD_FILE = "/srv/archive/bad-sector.bin"
BOOT_WAIT = 30.0  # seconds for the machine's sshd to answer after start


def cache_path() -> Path:
    base = Path(os.environ.get("MIGRATOR_P2C_CACHE", "/var/cache/migrator/p2c"))
    return base / f"machine-bookworm-v{RECIPE_VERSION}-{os.uname().machine}.tar.zst"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _customize(rootfs: Path) -> None:
    """What makes it look like a small server: a web service, static network, a hostname."""
    _write(rootfs / "srv/www/index.html", WEB_PAGE)
    _write(rootfs / "etc/systemd/system/p2c-web.service",
           "[Unit]\nDescription=The test machine's web page\nAfter=network.target\n\n"
           f"[Service]\nExecStart={' '.join(WEB_ARGV)}\nRestart=on-failure\n\n"
           "[Install]\nWantedBy=multi-user.target\n")
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "p2c-web.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/systemd/system/p2c-web.service")
    _write(rootfs / "etc/hostname", "pm1\n")
    _write(rootfs / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 pm1\n")
    _write(rootfs / "etc/network/interfaces",
           "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n"
           f"    address {MACHINE_IP}/24\n")
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each start makes its own host key


def build(log: object = None) -> Path:
    """The machine's root tarball, built with debootstrap once per machine (cached)."""
    out = cache_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="p2c-machine-", dir=out.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=1800)
        _customize(rootfs)
        partial = out.with_name(out.name + ".partial")
        proc.run(["tar", *tar_exact_options(), "--sparse", "-I", "zstd -T0 -3 -q",
                  "-C", str(rootfs), "-cf", str(partial), "."], timeout=None)
        partial.replace(out)
    return out


@dataclass
class TestMachine:
    """One running machine: where it lives and how to reach it."""

    __test__ = False

    home: Path
    netns: str
    switch_netns: str
    ip: str
    client_key: Path  # authorized for root
    host_key_line: str  # "ssh-ed25519 AAAA..." of its sshd
    pid: int = 0  # the unshare process this module started
    port: int = 22
    data_mb: int = 0
    bad_file: str | None = None

    @property
    def rootfs_view(self) -> Path:
        """The machine's / as seen from outside (through its PID 1's root)."""
        return Path(f"/proc/{self.init_pid()}/root")

    def init_pid(self) -> int:
        kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        if not kids:
            raise NetworkError("the test machine's init is gone")
        return int(kids[0])

    def processes(self, comm: str) -> list[int]:
        """Host PIDs of the machine's processes named ``comm``."""
        mine = os.readlink(f"/proc/{self.init_pid()}/ns/pid")
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.readlink(d / "ns/pid") == mine and (d / "comm").read_text().strip() == comm:
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    def known_hosts_line(self) -> str:
        return f"{self.ip} {self.host_key_line}\n"


def http_get(netns: str, ip: str, path: str = "/", timeout: float = 5.0) -> str:
    """A plain HTTP/1.0 GET from inside ``netns``; the body."""
    sock = socket_in_netns(netns, (ip, 80), timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise NetworkError(f"GET {path} from {ip}: {head[:80]!r}")
    return body.decode(errors="replace")


def _ip(netns: str, *args: str, check: bool = True) -> proc.Completed:
    return proc.run(["ip", "-n", netns, *args], check=check)


def _make_disk(img: Path, size_mb: int, fstype: str) -> None:
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    if fstype == "ext4":
        proc.run(["mkfs.ext4", "-q", "-F", "-L", "pm-root", str(img)], timeout=120)
    else:
        proc.run(["mkfs.btrfs", "-q", "-f", "-L", "pm-archive", str(img)], timeout=120)


@contextlib.contextmanager
def _mounted(img: Path, at: Path) -> Iterator[Path]:
    at.mkdir(parents=True, exist_ok=True)
    proc.run(["mount", "-o", "loop", str(img), str(at)])
    try:
        yield at
    finally:
        proc.run(["umount", str(at)], check=False)


def _fill(root: Path, data_mb: int) -> None:
    """``data_mb`` of incompressible files in a few sizes (the bench's ~1 GB machine)."""
    d = root / "var/lib/appdata"
    d.mkdir(parents=True, exist_ok=True)
    left = data_mb << 20
    i = 0
    sizes = [64 << 20, 4 << 20, 256 << 10, 16 << 10]
    while left > 0:
        n = min(sizes[i % len(sizes)], left)
        with open(d / f"blob-{i:05d}.bin", "wb") as f:
            f.write(os.urandom(n))
        left -= n
        i += 1


def _corrupt_bad_file(img: Path, marker: bytes) -> None:
    """Overwrite the marker's data blocks in the btrfs image: a bad sector under one file."""
    data = bytearray(img.read_bytes())
    at = data.find(marker)
    if at < 0:
        raise MigratorError("the bad-sector marker was not found in the btrfs image")
    while at >= 0:
        data[at:at + len(marker)] = bytes(len(marker))
        at = data.find(marker, at + 1)
    img.write_bytes(bytes(data))


def prepare(home: Path, client_key: Path, data_mb: int = 0, bad_file: bool = False,
            root_mb: int = 2048) -> dict[str, str]:
    """Disks for a fresh machine under ``home``; returns the boot config."""
    tarball = build()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    mnt = home / "mnt"
    root_img = home / "root.img"
    _make_disk(root_img, max(root_mb, data_mb + 1024), "ext4")
    keydir = home / "keys"
    keydir.mkdir(exist_ok=True)
    hostkey = keydir / "ssh_host_ed25519_key"
    for p in (hostkey, hostkey.with_name(hostkey.name + ".pub")):
        p.unlink(missing_ok=True)
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pm1", "-f", str(hostkey)])
    with _mounted(root_img, mnt) as root:
        proc.run(["tar", *tar_exact_options(), "--same-permissions", "--same-owner",
                  "-C", str(root), "-xf", str(tarball)], timeout=600)
        shutil.copy2(hostkey, root / "etc/ssh/ssh_host_ed25519_key")
        shutil.copy2(hostkey.with_name(hostkey.name + ".pub"),
                     root / "etc/ssh/ssh_host_ed25519_key.pub")
        pub = client_key.with_name(client_key.name + ".pub").read_text()
        _write(root / "root/.ssh/authorized_keys", pub, 0o600)
        (root / "root/.ssh").chmod(0o700)
        fstab = ["# /etc/fstab of the test machine (as a real server's would be)",
                 "LABEL=pm-root  /  ext4  errors=remount-ro  0  1",
                 "/dev/vdb1  none  swap  sw  0  0",
                 "proc  /proc  proc  defaults  0  0",
                 "tmpfs  /tmp  tmpfs  mode=1777,size=64m  0  0"]
        if bad_file:
            fstab.insert(2, "LABEL=pm-archive  /srv/archive  btrfs  defaults  0  2")
        _write(root / "etc/fstab", "\n".join(fstab) + "\n")
        (root / "srv/archive").mkdir(parents=True, exist_ok=True)
        if data_mb:
            _fill(root, data_mb)
    config = {"home": str(home), "root_img": str(root_img), "mnt": str(mnt)}
    if bad_file:
        arch = home / "archive.img"
        _make_disk(arch, 128, "btrfs")
        marker = os.urandom(16) * 8192  # 128 KiB: never inlined, never compressed
        with _mounted(arch, home / "amnt") as a:
            _write(a / "good.txt", "this file reads fine\n")
            (a / BAD_FILE.rsplit("/", 1)[1]).write_bytes(marker)
        _corrupt_bad_file(arch, marker)
        config["archive_img"] = str(arch)
    (home / "boot.json").write_text(json.dumps(config))
    return config


def start(home: Path, prefix: str, client_key: Path, data_mb: int = 0,
          bad_file: bool = False, ip: str = MACHINE_IP) -> TestMachine:
    """Prepare and boot a machine plugged into the switch of test hosts ``prefix``."""
    stop_stale(home)
    prepare(home, client_key, data_mb, bad_file)
    netns, sw = f"{prefix}-pm", f"{prefix}-sw"
    network.ensure_netns(netns)
    _ip(netns, "link", "set", "lo", "up")
    port = "p-pm"
    if _ip(sw, "-o", "link", "show", "dev", port, check=False).returncode == 0:
        _ip(sw, "link", "del", port)
    _ip(netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", sw)
    _ip(sw, "link", "set", port, "master", "br0")
    _ip(sw, "link", "set", port, "up")
    _ip(netns, "addr", "replace", f"{ip}/24", "dev", "eth0")
    _ip(netns, "link", "set", "eth0", "up")
    hostkey = (home / "keys/ssh_host_ed25519_key.pub").read_text().split()
    m = TestMachine(home, netns, sw, ip, client_key, f"{hostkey[0]} {hostkey[1]}",
                    data_mb=data_mb, bad_file=BAD_FILE if bad_file else None)
    log = open(home / "boot.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        p = proc.start_process(
            ["nsenter", f"--net={netns_path(netns)}", "unshare", "--mount", "--pid", "--fork",
             "--kill-child", "--propagation", "private", sys.executable, "-m",
             "testrigs.testmachine", "boot", str(home / "boot.json")],
            stdout=log, stderr=log, new_session=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        log.close()
    m.pid = p.pid
    (home / "unshare.pid").write_text(str(p.pid))
    deadline = time.monotonic() + BOOT_WAIT
    while True:
        try:
            with socket_in_netns(netns, (ip, 22), 2.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            stop(m)
            log_tail = (home / 'boot.log').read_text()[-800:]
            raise NetworkError(f"the test machine did not boot: {log_tail}")
        time.sleep(0.2)
    return m


def stop_stale(home: Path) -> None:
    """Kill a machine a crashed run left under ``home`` (its recorded unshare process, only
    if it still is one of ours)."""
    try:
        pid = int((home / "unshare.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if b"testrigs.testmachine" in cmdline and str(home / "boot.json").encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def stop(m: TestMachine) -> list[str]:
    """Kill what ``start`` started, delete the namespace; returns what could not be done."""
    problems = []
    if m.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(m.pid, 0)
    if proc.run(["ip", "netns", "list"], check=False).stdout.split().count(m.netns):
        proc.run(["ip", "netns", "del", m.netns], check=False)
    # the loop devices go with the mount namespace; allow the kernel a moment
    for img in ("root.img", "archive.img"):
        path = m.home / img
        deadline = time.monotonic() + 10
        while path.exists():
            held = proc.run(["losetup", "-j", str(path)], check=False).stdout.strip()
            if not held:
                break
            if time.monotonic() > deadline:
                problems.append(f"loop device still holds {path}: {held}")
                break
            time.sleep(0.2)
    return problems


@contextlib.contextmanager
def running(home: Path, prefix: str, client_key: Path, **kw: object) -> Iterator[TestMachine]:
    m = start(home, prefix, client_key, **kw)  # type: ignore[arg-type]
    try:
        yield m
    finally:
        problems = stop(m)
        shutil.rmtree(home, ignore_errors=True)
        assert not problems, problems


# inside the machine ---------------------------------------------------------------------------
def _boot(config_path: str) -> int:
    """PID 1 of the machine's PID namespace: mount, chroot, start sshd and the web page."""
    cfg = json.loads(Path(config_path).read_text())
    mnt = cfg["mnt"]
    proc.run(["mount", "--make-rprivate", "/"])
    proc.run(["mount", "-o", "loop", cfg["root_img"], mnt])
    if cfg.get("archive_img"):
        proc.run(["mount", "-o", "loop", cfg["archive_img"], f"{mnt}/srv/archive"])
    proc.run(["mount", "-t", "proc", "proc", f"{mnt}/proc"])
    proc.run(["mount", "-t", "sysfs", "sysfs", f"{mnt}/sys"])
    proc.run(["mount", "-t", "devtmpfs", "devtmpfs", f"{mnt}/dev"])
    os.makedirs(f"{mnt}/dev/pts", exist_ok=True)
    proc.run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
              f"{mnt}/dev/pts"])
    proc.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", f"{mnt}/run"])
    proc.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{mnt}/tmp"])
    os.chroot(mnt)
    os.chdir("/")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    children = [
        proc.spawn(["/usr/sbin/sshd", "-D", "-e"], env=env, output=Path("/var/log/sshd.log")),
        proc.spawn(WEB_ARGV, env=env, output=Path("/var/log/p2c-web.log")),
    ]

    def _term(signum: int, frame: object) -> None:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                c.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _term)
    while True:  # reap everything (orphans of ssh sessions too)
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "boot":
        sys.exit(_boot(sys.argv[2]))
    if len(sys.argv) == 2 and sys.argv[1] == "build":
        print(build())
        sys.exit(0)
    print("usage: python -m testrigs.testmachine build | boot CONFIG", file=sys.stderr)
    sys.exit(2)
