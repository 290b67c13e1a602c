"""The one module that drives LXC: renders container configs and runs the lxc-* tools.

Commands go through ``migrator.core.proc`` with the host's network namespace, because LXC's
command sockets are per network namespace: a host in a namespace sees only its containers.
The command-line tools are used rather than python3-lxc for the same reason (the binding
talks to the sockets of the namespace the Python process is in).

Config choices made here for CRIU (checkpoint/restore must work for every container):
``lxc.tty.max = 0`` and ``lxc.console.path = none`` (CRIU cannot dump the pty pairs LXC
makes for them), and no ``lxc.apparmor.profile`` line at all (the kernel has no AppArmor and
a named profile makes CRIU restore fail). systemd containers boot with
``systemd.legacy_systemd_cgroup_controller=1`` so systemd attaches no bpf programs.

The renderer is a second wall behind ``migrator.runtime.config.admit_config``: LXC reads its config
line by line, so a value holding a newline would add a line of its own (a
``lxc.hook.pre-start`` runs as root on the host). ``render_config`` refuses any line with a
control character, whatever field it came from, and a MAC that is not one, even though
every config was validated before it reached the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from migrator.core import proc
from migrator.core.errors import CommandFailed, ContainerError, InvalidInput
from migrator.core.netns import call_in_netns
from migrator.runtime.idmap import IdMap
from migrator.runtime.network import NetworkConfig

LXC_COMMON = "/usr/share/lxc/config"
# Device nodes a privileged container may use (LXC's common.conf list).
PRIVILEGED_DEVICES = [
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 136:* rwm",
    "c 10:229 rwm",
]

HALT_SIGNALS = {"busybox": "SIGUSR1", "systemd": "SIGRTMIN+4"}  # busybox halt; systemd poweroff


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to render one container's LXC config."""

    name: str
    rootfs: Path
    log_file: Path
    init: str  # "systemd" or "busybox"
    ipv4: str | None
    network: NetworkConfig
    idmap: IdMap | None  # None: privileged
    memory: int | None = None
    cpus: int | None = None
    # custom volumes bind-mounted in: (host directory, absolute path inside the container)
    mounts: tuple[tuple[Path, str], ...] = ()
    # a MAC kept from elsewhere (an adopted LXC container's); None: derived from name/address
    hwaddr: str | None = None
    # restore only: the NIC is this host-made device, moved in by CRIU (network.restore_nic)
    nic_device: str | None = None


def hwaddr(name: str, ipv4: str | None) -> str:
    """A stable MAC in LXD's 00:16:3e range, so a migrated container keeps its address."""
    h = hashlib.sha256(f"{name}/{ipv4}".encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in h[:3])


def cpuset(cpus: int) -> str:
    return "0" if cpus == 1 else f"0-{cpus - 1}"


class UnsafeConfigValue(InvalidInput):
    """A value that would change the structure of an LXC config file (a newline or other
    control character, a MAC that is not one): the config is not written."""


# what LXC (or anything line-oriented) could read as structure: C0, DEL, C1, U+2028/9;
# runtime/config.py's gate uses the same two patterns (one definition, here, below it)
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAC_ADDRESS = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _refuse_unsafe(name: str, lines: list[str]) -> None:
    for line in lines:
        m = CONTROL_CHARS.search(line)
        if m:
            key = line.partition(" = ")[0]
            raise UnsafeConfigValue(
                f"refusing to write the LXC config of {name!r}: the value of {key} holds a "
                f"control character ({repr(m.group())[1:-1]})",
                "the container's record holds a value that was never validated; fix it "
                "with `migrate config`, or delete the container")


def render_config(spec: ContainerSpec) -> str:
    """The LXC config of ``spec``; ``UnsafeConfigValue`` if any field would break a line."""
    mac = spec.hwaddr or hwaddr(spec.name, spec.ipv4)
    if not MAC_ADDRESS.fullmatch(mac):
        raise UnsafeConfigValue(f"refusing to write the LXC config of {spec.name!r}: "
                                f"hwaddr {mac!r} is not a MAC address",
                                "expected xx:xx:xx:xx:xx:xx (lower case hex)")
    lines = [
        "# Written by migrator; edit with `migrate config set`, not by hand.",
        f"lxc.uts.name = {spec.name}",
        f"lxc.rootfs.path = dir:{spec.rootfs}",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.console.path = none",
        "lxc.pty.max = 1024",
        f"lxc.signal.halt = {HALT_SIGNALS.get(spec.init, 'SIGPWR')}",
        f"lxc.log.file = {spec.log_file}",
        "lxc.log.level = WARN",
        f"lxc.seccomp.profile = {LXC_COMMON}/common.seccomp",
        "lxc.mount.entry = /sys/fs/fuse/connections sys/fs/fuse/connections none bind,optional 0 0",
    ]
    if spec.init == "systemd":
        lines.append("lxc.init.cmd = /sbin/init systemd.legacy_systemd_cgroup_controller=1")
    if spec.idmap is None:
        lines += [
            "lxc.cap.drop = sys_module mac_admin mac_override sys_time sys_rawio",
            "lxc.mount.auto = cgroup:mixed proc:mixed sys:mixed",
            "lxc.cgroup.devices.deny = a",
            "lxc.cgroup.devices.allow = c *:* m",
            "lxc.cgroup.devices.allow = b *:* m",
        ]
        lines += [f"lxc.cgroup.devices.allow = {d}" for d in PRIVILEGED_DEVICES]
    else:
        lines += ["lxc.mount.auto = cgroup:mixed proc:mixed sys:rw", *spec.idmap.lxc_lines()]
    net = spec.network
    if spec.ipv4:
        lines += [
            f"lxc.net.0.type = {'phys' if spec.nic_device else 'veth'}",
            f"lxc.net.0.link = {spec.nic_device or net.bridge}",
            "lxc.net.0.name = eth0",
            "lxc.net.0.flags = up",
            f"lxc.net.0.hwaddr = {mac}",
            f"lxc.net.0.ipv4.address = {spec.ipv4}/{net.prefixlen}",
            f"lxc.net.0.ipv4.gateway = {net.gateway}",
        ]
    else:
        lines.append("lxc.net.0.type = empty")
    for src, target in spec.mounts:
        if any(ch.isspace() for ch in f"{src}{target}"):  # fstab fields are split on blanks
            raise UnsafeConfigValue(f"refusing to write the LXC config of {spec.name!r}: "
                                    f"mount {src} -> {target!r} holds a blank")
        lines.append(f"lxc.mount.entry = {src} {target.lstrip('/')} none bind,create=dir 0 0")
    if spec.memory:
        lines.append(f"lxc.cgroup.memory.limit_in_bytes = {spec.memory}")
    if spec.cpus:
        lines.append(f"lxc.cgroup.cpuset.cpus = {cpuset(spec.cpus)}")
    _refuse_unsafe(spec.name, lines)
    return "\n".join(lines) + "\n"


def abstract_socket_names(proc_net_unix: str) -> set[str]:
    """The abstract names (``@...``) in the text of ``/proc/net/unix``: the path is
    everything after the seventh field (it may hold blanks)."""
    rows = [line.split(None, 7) for line in proc_net_unix.splitlines()[1:]]
    return {r[7] for r in rows if len(r) == 8 and r[7].startswith("@")}


class LxcDriver:
    """lxc-* commands for one host (lxcpath + network namespace)."""

    def __init__(self, lxcpath: Path, netns: str | None) -> None:
        self.lxcpath = lxcpath
        self.netns = netns

    def _run(self, argv: list[str], **kw) -> proc.Completed:  # type: ignore[no-untyped-def]
        return proc.run(argv, netns=self.netns, **kw)

    def config_path(self, name: str) -> Path:
        return self.lxcpath / name / "config"

    def write_config(self, spec: ContainerSpec) -> None:
        """Render first (a refused value leaves no file and no directory), then replace
        the config atomically."""
        text = render_config(spec)
        d = self.lxcpath / spec.name
        d.mkdir(mode=0o700, exist_ok=True)
        tmp = d / "config.tmp"
        tmp.write_text(text)
        tmp.replace(d / "config")

    def remove_config(self, name: str) -> None:
        d = self.lxcpath / name
        for f in ("config", "config.tmp", "lxc.log"):
            (d / f).unlink(missing_ok=True)
        if d.exists():
            with contextlib.suppress(OSError):
                d.rmdir()

    def _query(self, argv: list[str], check: bool = True,
               timeout: float | None = proc.DEFAULT_TIMEOUT) -> proc.Completed:
        """An lxc-* command that only talks to a container's monitor over its command
        socket (lxc-ls, lxc-info, lxc-wait): run in the host's network namespace (where
        those sockets are) without the private mount namespace, /sys and cgroups that
        starting needs, so a command pays for at most one helper process."""
        return proc.run(argv, netns=self.netns, check=check, timeout=timeout, mounts=False)

    def _command_sockets(self) -> set[str] | None:
        """The abstract unix socket names bound in this host's network namespace, or None
        when they cannot be read (then the lxc-* tools are asked)."""

        def read() -> set[str]:
            with open("/proc/thread-self/net/unix") as f:  # this thread's namespace
                return abstract_socket_names(f.read())

        try:
            return call_in_netns(self.netns, read) if self.netns else read()
        except (OSError, ValueError, IndexError):
            return None

    def _monitor_possible(self, name: str | None = None) -> bool:
        """Whether LXC could answer anything but STOPPED for ``name`` (None: for any
        container in this lxcpath).

        A container that is not stopped has a monitor process listening on the abstract
        socket ``@LXCPATH/NAME/command`` in the namespace it was started in (LXC names it
        ``@lxc/HASH/command`` when that path is too long); lxc-ls and lxc-info report
        STOPPED for a container whose socket is not there, so without one no subprocess is
        needed to know it. Unreadable sockets, or a hashed name (which cannot be told
        apart): True, and LXC is asked."""
        socks = self._command_sockets()
        if socks is None or any(s.startswith("@lxc/") for s in socks):
            return True
        if name is not None:
            return f"@{self.lxcpath}/{name}/command" in socks
        prefix = f"@{self.lxcpath}/"
        return any(s.startswith(prefix) for s in socks)

    def states(self) -> dict[str, tuple[str, str]]:
        """name -> (STATE, IPV4) for the containers LXC knows in this host's namespace;
        one missing is STOPPED (none is listed when no container of this lxcpath has a
        monitor: nothing runs, and no lxc-ls is started to say so)."""
        if not any(self.lxcpath.iterdir()) or not self._monitor_possible():
            return {}
        out = self._query(["lxc-ls", "-P", str(self.lxcpath), "-f", "-F", "NAME,STATE,IPV4"]).stdout
        result = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                ip = parts[2] if len(parts) > 2 and parts[2] != "-" else ""
                result[parts[0]] = (parts[1], ip.rstrip(","))
        return result

    def state(self, name: str) -> str:
        """RUNNING, FROZEN, STOPPED... as lxc-info says (STOPPED also for a container LXC
        does not know); no lxc-info is started when the container has no monitor."""
        if not self._monitor_possible(name):
            return "STOPPED"
        r = self._query(["lxc-info", "-P", str(self.lxcpath), "-n", name, "-sH"], check=False)
        return r.stdout.strip() or "STOPPED"

    def start(self, name: str, timeout: float = 30) -> None:
        log_file = self.lxcpath / name / "lxc.log"
        log_file.unlink(missing_ok=True)
        try:
            self._run(["lxc-start", "-P", str(self.lxcpath), "-n", name], timeout=timeout)
            self._query(
                [
                    "lxc-wait",
                    "-P",
                    str(self.lxcpath),
                    "-n",
                    name,
                    "-s",
                    "RUNNING",
                    "-t",
                    str(int(timeout)),
                ],
                timeout=timeout + 5,
            )
        except CommandFailed as e:
            detail = (
                log_file.read_text(errors="replace").strip().splitlines()[-6:]
                if log_file.exists()
                else []
            )
            raise ContainerError(
                f"container {name!r} failed to start: " + ("\n  ".join(["", *detail]) or e.message),
                f"full log: {log_file}",
            ) from e

    def stop(self, name: str, timeout: int = 30, force: bool = False) -> None:
        argv = ["lxc-stop", "-P", str(self.lxcpath), "-n", name]
        argv += ["-k"] if force else ["-t", str(timeout)]
        r = self._run(argv, check=False, timeout=timeout + 30)
        if r.returncode != 0 and self.state(name) != "STOPPED":
            raise ContainerError(
                f"container {name!r} did not stop: {r.stderr.strip()}", "try `--force`"
            )

    def wait_state(self, name: str, state: str, timeout: float = 30) -> bool:
        """Wait until the container is in ``state``; False on timeout."""
        r = self._query(["lxc-wait", "-P", str(self.lxcpath), "-n", name, "-s", state, "-t",
                         str(int(timeout))], check=False, timeout=timeout + 5)
        return r.returncode == 0 or self.state(name) == state

    def freeze(self, name: str) -> None:
        self._run(["lxc-freeze", "-P", str(self.lxcpath), "-n", name])

    def unfreeze(self, name: str) -> None:
        self._run(["lxc-unfreeze", "-P", str(self.lxcpath), "-n", name])

    def attach_argv(self, name: str, argv: list[str], env: dict[str, str]) -> list[str]:
        full = ["lxc-attach", "-P", str(self.lxcpath), "-n", name, "--clear-env"]
        for k, v in env.items():
            full += ["-v", f"{k}={v}"]
        return full + ["--", *argv]

    def attach(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        input: str | None = None,
        timeout: float | None = 300,
    ) -> proc.Completed:
        """Run a command in the container, capturing output (stdin closed unless given)."""
        return self._run(
            self.attach_argv(name, argv, env), check=False, input=input, timeout=timeout
        )

    def attach_interactive(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        return proc.run_interactive(self.attach_argv(name, argv, env), netns=self.netns)

    def set_cgroup(self, name: str, key: str, value: str) -> None:
        self._run(["lxc-cgroup", "-P", str(self.lxcpath), "-n", name, key, value])

    def get_cgroup(self, name: str, key: str) -> str:
        return self._run(["lxc-cgroup", "-P", str(self.lxcpath), "-n", name, key]).stdout.strip()

    # checkpoint / restore (CRIU through lxc-checkpoint) ------------------------------------
    def init_pid(self, name: str) -> int | None:
        """The container's init as seen from the machine, or None when it is not running."""
        if not self._monitor_possible(name):
            return None
        r = self._query(["lxc-info", "-P", str(self.lxcpath), "-n", name, "-pH"], check=False)
        out = r.stdout.strip()
        return int(out) if out.isdigit() and int(out) > 0 else None

    def checkpoint_argv(self, name: str, images: Path, restore: bool = False) -> list[str]:
        """``lxc-checkpoint`` dumping (``-s``: no ``--leave-running``, so a CRIU config file
        may say ``leave-stopped``) or restoring (``-r``, detached) ``name`` with ``images``."""
        mode = ["-r"] if restore else ["-s"]
        return ["lxc-checkpoint", *mode, "-D", str(images), "-P", str(self.lxcpath), "-n", name]

    def checkpoint(
        self, name: str, images: Path, env: dict[str, str], output: Path,
        restore: bool = False, timeout: float | None = 300,
    ) -> int:
        """Run lxc-checkpoint to completion, its output to ``output``; return its exit code.

        Output goes to a file: after ``-r`` the restored container inherits lxc-checkpoint's
        stdout, so a pipe would stay open as long as the container runs.
        """
        return proc.wait_or_kill(self.spawn_checkpoint(name, images, env, output, restore),
                                 timeout)

    def spawn_checkpoint(
        self, name: str, images: Path, env: dict[str, str], output: Path, restore: bool = False,
        pass_fds: tuple[int, ...] = (),
    ) -> proc.Child:
        """lxc-checkpoint in the background (a post-copy dump serves pages until done);
        ``pass_fds`` reach the criu it runs (the page server's socket)."""
        return proc.spawn(
            self.checkpoint_argv(name, images, restore), netns=self.netns, env=env, output=output,
            pass_fds=pass_fds,
        )

