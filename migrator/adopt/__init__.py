"""Adopting containers made with plain LXC (``lxc-create``): ``migrate import-lxc``.

``lxc_config`` reads an LXC config and maps it onto the runtime's keys (pure), ``plan``
adds the checks that look at this machine, ``adoption`` does the staged, journaled work.
"""
