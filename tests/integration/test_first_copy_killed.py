"""A move whose first copy (``cp -a`` into the new target, ``copy_into_empty``) is killed
leaves the container whole on its pool and no target behind; the next move succeeds.

The rsync case of ``test_copy_move.test_move_with_receiver_killed_mid_stream`` killed the
rsync that used to make that first copy; rsync now only sends the (empty) delta after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from migrator.pipelines.copy import move_container
from tests.integration.conftest import MIGRATE
from tests.integration.treecmp import signature

COPIER = "cp -a --preserve=all"


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def _kill_copier(p: subprocess.Popen) -> bool:  # type: ignore[type-arg]
    """SIGKILL the first ``cp`` started under ``p`` as soon as it shows (it copies the
    600 MB in well under a second, so there is no waiting for data to flow)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        r = subprocess.run(["pgrep", "-f", COPIER], capture_output=True, text=True)
        for pid in (int(x) for x in r.stdout.split()):
            if _descends(pid, p.pid):
                os.kill(pid, signal.SIGKILL)
                return True
        time.sleep(0.005)
    return False


def test_move_with_first_copy_killed(make_host) -> None:  # type: ignore[no-untyped-def]
    th = make_host()
    th.cts.create("busybox", "k", "dir")
    root = th.cts.rootfs(th.cts.get("k"))
    with open(root / "blob", "wb") as f:
        for _ in range(6):
            f.write(os.urandom(100 << 20))
    th.cts.snapshot_create("k", "s0")
    sig = signature(root)
    p = subprocess.Popen([*MIGRATE, "--root", str(th.root), "move", "k", "--pool", "btrfs"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_copier(p)
    _out, err = p.communicate(timeout=300)
    assert killed, f"{COPIER} never seen; move output: {err}"
    assert p.returncode != 0 and "Error:" in err, err
    assert th.cts.get("k").pool == "dir"
    assert signature(root) == sig
    assert [s.name for s in th.cts.snapshot_list("k")] == ["s0"]
    vol = th.cts.volume(th.cts.get("k"))
    assert not th.host.backend("btrfs").volume_exists(vol)
    move_container(th.cts, "k", "btrfs")
    assert th.cts.get("k").pool == "btrfs"
    assert signature(th.cts.rootfs(th.cts.get("k"))) == sig
