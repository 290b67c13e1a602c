"""Container config between LXD's keys and ours, both ways: what an export writes of our
config (``lxd_config``) and what an import keeps of LXD's (``convert_config``).

Only what we can run is converted: ``security.privileged``, ``security.protection.delete``,
``limits.memory``, ``limits.cpu``, ``user.*`` and ``image.*``; other keys (``volatile.*``,
``raw.lxc``, ``limits.processes``...) are dropped and reported, never stored.
"""

from __future__ import annotations

from migrator.core.errors import InvalidInput
from migrator.runtime import config as cfg

_KEEP_PREFIXES = ("user.", "image.")


def lxd_config(config: dict[str, str]) -> dict[str, str]:
    """Our config as an export writes it: without our ``volatile.*`` bookkeeping."""
    return cfg.without_volatile(config)


def convert_config(lxd: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """LXD config -> ours: (config, dropped keys with the reason).

    Each kept key passes the configuration gate's check of its own (``user.*`` without
    control characters, ``image.*`` only the keys the runtime records, in their formats);
    a value that fails is dropped and reported, never stored. ``record_received`` runs the
    whole gate again on the result."""
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in sorted(lxd.items()):
        shown = repr(value) if cfg.control_char(value) else value
        if key.startswith(cfg.VOLATILE_PREFIX):
            continue  # LXD's own bookkeeping (MACs, idmaps, last state)
        if key.startswith("image.") and key not in cfg.IMAGE_KEYS:
            dropped.append(f"{key}={shown} (not kept here)")
            continue
        if key.startswith(_KEEP_PREFIXES) or key in cfg.KEYS:
            try:
                out[key] = cfg.admit_config({key: value}, "the archive's config",
                                            allow_privileged=True)[key]
            except InvalidInput as e:
                dropped.append(f"{key}={shown} ({e.message.rpartition(': ')[2]})")
            continue
        dropped.append(f"{key}={shown} (not supported here)")
    return out, dropped
