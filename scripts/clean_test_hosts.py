"""Tear down test hosts left by an interrupted run (normally the fixtures do it).

Also the networked test-host sets of testrigs/testhosts.py: `make hosts` (mh-*) and the one
tests/integration/test_testhosts.py brings up (mt2-*): sshds, namespaces, pools, files.

Then destroy any zpool still imported whose disk file lives under the test or demo roots:
zpool names are machine-wide and the zfs-fuse daemon keeps a pool imported (and its file
open) after the state root that owned it is gone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from migrator.core import proc
from migrator.runtime.host import Host
from migrator.runtime.teardown import teardown
from testrigs import testhosts

BASES = (Path("/var/tmp/migrator-tests"), Path("/var/tmp/migrator-demo"))
# (base, namespace prefix) of each test-host set; the second is test_testhosts.py's
HOST_SETS = ((testhosts.DEFAULT_BASE, testhosts.DEFAULT_PREFIX),
             (Path("/var/tmp/migrator-tests/testhosts"), "mt2"))


def pool_files(name: str) -> list[str]:
    """The file vdevs of an imported zpool, read from ``zpool status``."""
    r = proc.run(["zpool", "status", name], check=False)
    return [f for line in r.stdout.splitlines() for f in line.split()[:1] if f.startswith("/")]


def leftover_zpools() -> list[str]:
    if shutil.which("zpool") is None:
        return []
    r = proc.run(["zpool", "list", "-H", "-o", "name"], check=False)
    if r.returncode != 0:  # no daemon: nothing can be imported
        return []
    return [
        name for name in r.stdout.split()
        if any(f.startswith(str(base) + "/") for f in pool_files(name) for base in BASES)
    ]


for base in BASES:
    if base.is_dir():
        for root in sorted(base.iterdir()):
            if (root / "state.db").exists():
                print(root, teardown(Host(root), purge=True) or "ok")

for base, prefix in HOST_SETS:
    if base.exists() or testhosts.namespaces(prefix):
        print(f"test hosts {base} ({prefix}-*)", testhosts.down(base, prefix) or "ok")

for name in leftover_zpools():
    r = proc.run(["zpool", "destroy", "-f", name], check=False, timeout=300)
    print(f"zpool {name}", "destroyed" if r.returncode == 0 else r.stderr.strip())
