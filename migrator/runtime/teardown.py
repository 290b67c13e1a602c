"""Take a host down cleanly: containers stopped, VXLAN device removed, pools unmounted,
namespace removed.

Used by ``migrate teardown``, the demo and the test fixtures, so that CI and later sessions
on the same machine start from nothing left over (no mounts, loop devices or namespaces).
"""

from __future__ import annotations

import dataclasses
import shutil

from migrator.core.errors import MigratorError
from migrator.runtime import network
from migrator.runtime.host import Host
from migrator.runtime.lxc import LxcDriver


def teardown(host: Host, purge: bool = False) -> list[str]:
    """Best effort on every step; returns the problems met (never raises for one of them)."""
    problems: list[str] = []
    lxc = LxcDriver(host.lxcpath, host.netns)
    netns = host.netns
    if not netns or network.netns_exists(netns):
        try:
            for name, (st, _ip) in lxc.states().items():
                if st != "STOPPED":
                    lxc.stop(name, force=True)
        except MigratorError as e:
            problems.append(f"stopping containers: {e}")
    try:
        net = host.network_config()
        if net.overlay is not None and (not netns or network.netns_exists(netns)):
            # the VXLAN device this host made (in a namespace it would go with it anyway)
            network.ensure_overlay(dataclasses.replace(net, overlay=None))
    except MigratorError as e:
        problems.append(f"removing the VXLAN device: {e}")
    try:
        host.deactivate_pools()
        host.unshare_pools_dir()
    except MigratorError as e:
        problems.append(f"unmounting pools: {e}")
    if netns:
        try:
            network.delete_netns(netns)
        except MigratorError as e:
            problems.append(f"deleting netns {netns}: {e}")
    root = host.root
    host.close()
    if purge:
        shutil.rmtree(root, ignore_errors=True)
    return problems
