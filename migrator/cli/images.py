"""``migrate image ...``: build, import, export, list and delete images."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import typer

from migrator.cli.console import say
from migrator.cli.context import current
from migrator.cli.options import format_option
from migrator.cli.render import Format, human_size, render

image_app = typer.Typer(
    help="Build, import, export and delete images (LXD unified tarballs).", no_args_is_help=True
)


@image_app.command("build")
def image_build(
    recipe: str = typer.Argument(..., help="busybox or debian/SUITE (bookworm, trixie)"),
    alias: str = typer.Option(None, help="Alias [default: the recipe name]"),
    rebuild: bool = typer.Option(False, help="Ignore the machine-wide build cache"),
) -> None:
    """Build an image (debootstrap for Debian, with systemd as init) and import it."""
    c = current().containers
    t = time.monotonic()
    rec = c.images.build(recipe, alias, say, rebuild=rebuild)
    say(
        f"image {rec.alias} ({rec.fingerprint[:12]}, {human_size(rec.size)}) ready in "
        f"{time.monotonic() - t:.1f}s"
    )


@image_app.command("import")
def image_import(
    file: str = typer.Argument(..., help="Unified tarball (.tar.zst/.tar.gz/.tar.xz) or -"),
    alias: str = typer.Option(None, help="Alias for the image"),
) -> None:
    """Import a unified image tarball (as made by `image export`, LXD or Incus)."""
    c = current().containers
    if file == "-":
        from migrator.runtime.images import read_stream_to_file

        with tempfile.NamedTemporaryFile(dir=c.host.images_dir, prefix=".stdin-") as tmp:
            read_stream_to_file(sys.stdin.buffer, Path(tmp.name))
            rec = c.images.import_file(Path(tmp.name), alias)
    else:
        rec = c.images.import_file(Path(file), alias)
    say(f"imported image {rec.fingerprint[:12]}" + (f" as {rec.alias}" if rec.alias else ""))


@image_app.command("export")
def image_export(
    image: str = typer.Argument(..., help="Alias or fingerprint"),
    file: str = typer.Argument(..., help="Destination file, or - for standard output"),
) -> None:
    """Write the image's unified tarball (the same bytes and fingerprint as imported)."""
    rec = current().containers.images.export(image, file)
    if file != "-":
        say(f"exported {rec.fingerprint[:12]} to {file}")


@image_app.command("list")
def image_list(fmt: Format = format_option("table, json or csv")) -> None:
    """List images."""
    rows = [
        {
            "alias": r.alias,
            "fingerprint": r.fingerprint[:12],
            "os": r.properties.get("os"),
            "release": r.properties.get("release"),
            "size": human_size(r.size),
            "description": r.properties.get("description"),
        }
        for r in current().containers.images.list()
    ]
    cols = ["alias", "fingerprint", "os", "release", "size", "description"]
    typer.echo(render(rows, cols, fmt))


@image_app.command("delete")
def image_delete(image: str = typer.Argument(..., help="Alias or fingerprint")) -> None:
    """Delete an image (containers made from it are not affected)."""
    rec = current().containers.images.delete(image)
    say(f"deleted image {rec.fingerprint[:12]}")
