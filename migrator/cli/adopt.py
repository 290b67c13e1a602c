"""``migrate import-lxc``: adopt containers made with plain LXC (``lxc-create``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current
from migrator.cli.options import format_option, pool_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size
from migrator.core.errors import ImportsFailed, InvalidInput
from migrator.runtime.config import without_volatile

if TYPE_CHECKING:
    from migrator.adopt.plan import ImportResult


def register(app: typer.Typer) -> None:
    """Add ``import-lxc`` to ``app``."""
    app.command("import-lxc")(import_lxc_cmd)


def _lines(r: ImportResult, replaced: bool) -> list[str]:
    kind = "privileged" if r.privileged else f"unprivileged, ids shifted by {r.shift:+d}"
    if r.dry_run:
        size = human_size(r.size) if r.size is not None else "?"
        head = [f"would import {r.source} as {r.container} on pool {r.pool} ({kind}); "
                f"rootfs {size}"]
    else:
        head = [f"imported {r.source} as {r.container} on pool {r.pool} ({kind}): "
                f"{human_size(r.bytes)} copied in {r.seconds:.1f}s"]
        if r.verified:
            head.append(f"  verified: {r.verified}")
    where = r.ipv4 or "allocated at record"
    head.append(f"  network: eth0 on the runtime's bridge, address {where}"
                + (f", MAC {r.hwaddr} kept" if r.hwaddr else ""))
    keys = without_volatile(r.config)
    head.append("  config: " + ", ".join(f"{k}={v}" for k, v in sorted(keys.items())))
    head += [f"  converted: {c}" for c in r.converted]
    head += [f"  unconvertible: {u}" for u in r.unconvertible]
    head += [f"  note: {n}" for n in r.notes]
    if replaced:
        head += [f"  replaced: {x}" for x in r.replaced]
    if r.deleted:
        head.append(f"  the original {r.source} was destroyed")
    return head


def import_lxc_cmd(
    name: str = typer.Argument(None, help="LXC container to adopt (its directory name under "
                                          "--lxcpath); omit with --all"),
    lxcpath: Path = typer.Option(Path("/var/lib/lxc"), "--lxcpath", "-P",
                                 help="LXC path holding the container"),
    pool: str = pool_option("Pool [default: the default pool]"),
    all_: bool = typer.Option(False, "--all", help="Adopt every container of --lxcpath, each "
                              "on its own (one failure does not stop the others)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan and the keys that "
                                 "cannot be converted; change nothing"),
    delete: bool = typer.Option(False, "--delete", help="lxc-destroy the original once the "
                                "adopted container is recorded and verified"),
    replaced: bool = typer.Option(False, "--show-replaced", help="Also list the LXC keys the "
                                  "runtime sets its own way (ttys, console, AppArmor...)"),
    allow_privileged: bool = typer.Option(
        False, "--allow-privileged", help="Adopt a privileged container (no lxc.idmap: its "
        "root is root on this host); refused without this"),
    fmt: Format = format_option("table or json"),
) -> None:
    """Adopt a stopped LXC container (its config and dir rootfs) into this host, as LXD's
    lxc-to-lxd does: the rootfs is copied into a volume (ids shifted to this host's map if it
    is unprivileged), its network, limits and idmap converted, and every key that cannot be
    converted listed. The original is only read, unless --delete destroys it after success."""
    from migrator.adopt.adoption import import_all, import_lxc
    from migrator.adopt.plan import plan_import

    if bool(name) == all_:
        raise InvalidInput("name one LXC container, or give --all",
                           "e.g. migrate import-lxc web --lxcpath /var/lib/lxc")
    cts = current().containers

    def show(r: ImportResult) -> None:
        if fmt != Format.json:
            for line in _lines(r, replaced):
                say(line)

    if not all_:
        with Bars() as bars:
            plan = plan_import(cts, name, lxcpath, pool)
            r = plan.result(True) if dry_run else import_lxc(cts, plan, delete, bars,
                                                             allow_privileged)
        if fmt == Format.json:
            print_json(r.as_dict())
        show(r)
        return
    with Bars() as bars:
        entries = import_all(cts, lxcpath, pool, delete, dry_run, bars,
                             allow_privileged=allow_privileged)
    if fmt == Format.json:
        print_json([e.as_dict() for e in entries])
    for e in entries:
        if e.result is not None:
            show(e.result)
        elif fmt != Format.json:
            say(f"{e.name}: FAILED: {e.error}" + (f" (hint: {e.hint})" if e.hint else ""))
    failed = [e.name for e in entries if e.error]
    if not entries and fmt != Format.json:
        say(f"no LXC containers in {lxcpath}")
    if failed:
        raise ImportsFailed(f"{len(failed)} of {len(entries)} LXC containers were not "
                            f"{'planned' if dry_run else 'imported'}: {', '.join(failed)}")
