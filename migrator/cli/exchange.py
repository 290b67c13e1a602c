"""``migrate export`` / ``migrate import``: single-file archives in LXD's/Incus's layout."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current
from migrator.cli.options import format_option, pool_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size
from migrator.core.errors import InvalidInput

FORMAT_OPT = format_option("table or json (a summary on stdout; when the archive itself "
                           "goes to stdout, the summary stays on stderr)")


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``import`` to ``app``."""
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)


@contextlib.contextmanager
def _output(file: str) -> Iterator[BinaryIO]:
    """stdout for '-', else a temporary file renamed into place only when complete."""
    if file == "-":
        if sys.stdout.isatty():
            raise InvalidInput("refusing to write an archive to a terminal",
                               "redirect it (migrate export NAME - > NAME.tar.zst) or give "
                               "a FILE")
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(file)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        # 0600 from the first byte: an export holds the container's files and its config
        # (user.* keys); O_NOFOLLOW|O_EXCL: a link planted at the temporary name is refused
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)


def _report(result: Any, fmt: Format, lines: list[str], to_stdout: bool = True) -> None:
    if fmt == Format.json and to_stdout:
        print_json(result.as_dict())
        return
    for line in lines:
        say(line)
    for note in result.notes:
        say(f"  note: {note}")


def export_cmd(
    name: str = typer.Argument(..., help="Container to export"),
    file: str = typer.Argument(..., help="Archive to write, or - for stdout"),
    optimized: bool = typer.Option(
        False, "--optimized",
        help="btrfs send streams instead of files (imports onto btrfs pools only)"),
    instance_only: bool = typer.Option(False, "--instance-only",
                                       help="Leave the container's snapshots out"),
    compression: str = typer.Option("zstd", "--compression",
                                     help="zstd, gzip (LXD's default) or none"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Export a container (and its snapshots) as one tarball in the layout of `lxc export`
    and `incus export`, which LXD and Incus import. The archive is streamed: exporting never
    needs room for a copy of the container, and `-` pipes it into another tool."""
    from migrator.exchange.export import export_container

    with Bars() as bars, _output(file) as out:
        r = export_container(current().containers, name, out, optimized, instance_only,
                             compression, bars)
    kind = "optimized (btrfs streams)" if r.optimized else "generic"
    snaps = f" with snapshots {', '.join(r.snapshots)}" if r.snapshots else ""
    where = "stdout" if file == "-" else file
    _report(r, fmt, [f"exported {r.container}{snaps} to {where}: {kind}, {r.compression}, "
                     f"{human_size(r.bytes)} of tar in {r.seconds:.1f}s"], file != "-")


def import_cmd(
    file: str = typer.Argument(..., help="Archive to read (lxc/incus/migrate export), or -"),
    name: str = typer.Argument(None, help="Name of the new container [default: the "
                                          "archive's]"),
    pool: str = pool_option("Pool [default: the default pool]"),
    allow_privileged: bool = typer.Option(
        False, "--allow-privileged",
        help="Accept a privileged container (its root is root on this host)"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Import a container from an `lxc export`, `incus export` or `migrate export` tarball
    (gzip, zstd, xz or plain; read once, from a file or stdin). Every member is checked
    before it is written; an unsafe or damaged archive changes nothing on this host."""
    from migrator.exchange.import_archive import import_container

    with Bars() as bars, contextlib.ExitStack() as stack:
        if file == "-":
            src: BinaryIO = sys.stdin.buffer
            total = None
        else:
            src = stack.enter_context(open(file, "rb"))
            total = os.fstat(src.fileno()).st_size
        r = import_container(current().containers, src, name, pool, total, bars,
                             allow_privileged)
    lines = [f"imported {r.container} (archive of {r.source_name}) on pool {r.pool}: "
             f"{'optimized' if r.optimized else 'generic'}, {r.compression}, "
             f"{'privileged' if r.privileged else 'unprivileged'}, "
             f"{human_size(r.bytes)} in {r.seconds:.1f}s"]
    if r.snapshots:
        lines.append(f"  snapshots: {', '.join(r.snapshots)}")
    lines += [f"  dropped: {d}" for d in r.dropped]
    _report(r, fmt, lines)
