"""The ``migrate`` command line: the app, its global options, the command groups and the
one place where errors become exit codes. Each group lives in a module of its own
(containers, snapshots, images, pools, storage, ...); logic lives in the library.

Exit codes: 0 success; 2 usage error; each ``MigratorError`` subclass has its own code
(``migrate --help`` lists them); 130 interrupted. ``migrate exec`` returns the command's own
exit code.
"""

from __future__ import annotations

import logging
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, Union, get_args, get_origin

import typer
import typer.core
import typer.main

from migrator.cli.context import begin
from migrator.core.errors import ALL_ERRORS, MigratorError

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 2 usage, "
    + ", ".join(f"{c.exit_code} {c.__name__}" for c in ALL_ERRORS if c.exit_code != 1)
    + ", 1 other error."
)


# --- values converted without pydantic -----------------------------------------------------
# Why: typer (0.2x) converts every non-flag parameter through a pydantic ``TypeAdapter``;
# importing pydantic and building the adapters costs ~0.08 s of every command (`migrate list`
# must answer within 0.15 s; every SSH request starts a `migrate agent`). This CLI's
# parameters are plain (str, int, float, Path, enums, lists of those), and typer's adapters
# for enums and paths only wrap its pydantic-free ``coerce_cli_choice`` and
# ``coerce_cli_path``. So `install_fast_conversion` puts a builder in front of typer's that
# converts those plain values itself, calling the same functions, and hands everything else
# (constraints, parsers, dates, files, bools given as words, numbers that are not plain
# digits, every refusal) to typer's own builder: a value gets what typer would give it, or
# goes through typer itself. tests/unit/test_cli_startup.py compares both on every parameter
# of every command. With a typer whose internals differ, nothing is installed (slower, never
# different).

_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class Unusual(Exception):
    """A value the fast path does not decide: typer's own conversion takes it."""


Leaf = Callable[[Any, Any, Any], Any]  # (value, param, ctx) -> converted value


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def leaf_converter(annotation: Any, info: Any) -> Leaf | None:
    """The fast conversion of one value of ``annotation``, or None (typer's own then)."""
    from typer import _param_types as pt

    annotation = _unwrap_optional(annotation)
    if getattr(info, "parser", None) is not None:
        return None
    if annotation is str:
        def to_str(value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, str):
                return value
            raise Unusual

        return to_str
    if annotation is bool:  # flags (already bools); a word such as "yes" goes to typer
        def to_bool(value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, bool):
                return value
            raise Unusual

        return to_bool
    if annotation in (int, float):
        if getattr(info, "min", None) is not None or getattr(info, "max", None) is not None \
                or getattr(info, "clamp", False):
            return None
        pattern = _INT if annotation is int else _FLOAT

        def to_number(value: Any, param: Any, ctx: Any) -> Any:
            if type(value) is annotation:
                return value
            if isinstance(value, str) and pattern.fullmatch(value):
                return annotation(value)
            raise Unusual

        return to_number
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = list(annotation)
        case_sensitive = info.case_sensitive

        def to_choice(value: Any, param: Any, ctx: Any) -> Any:
            return pt.coerce_cli_choice(value, choices=choices, case_sensitive=case_sensitive,
                                        ctx=ctx)

        return to_choice
    if isinstance(annotation, type) and issubclass(annotation, Path) \
            and pt.routes_to_path(annotation, info):
        path_type = info.path_type or annotation

        def to_path(value: Any, param: Any, ctx: Any) -> Any:
            # typer turns a str into the path type through pydantic, which for a plain Path
            # and a non-empty str is ``Path(value)``; its checks (exists, dir_okay...) follow
            if isinstance(value, str) and value and path_type is Path:
                value = Path(value)
            elif not isinstance(value, path_type):
                raise Unusual
            return pt.coerce_cli_path(value, info, path_type=path_type, param=param, ctx=ctx)

        return to_path
    return None


def converter(annotation: Any, info: Any) -> Leaf | None:
    """``leaf_converter``, also over ``list[X]`` (typer's rule: a single value is a list of one)."""
    annotation = _unwrap_optional(annotation)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        leaf = leaf_converter(item, info)
        if leaf is None:
            return None

        def to_list(value: Any, param: Any, ctx: Any) -> Any:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [leaf(v, param, ctx) for v in items]

        return to_list
    if get_origin(annotation) is not None:
        return None
    return leaf_converter(annotation, info)


_installed: list[bool] = []
_original: list[Callable[[Any], Any]] = []


def original_builder() -> Callable[[Any], Any]:
    """typer's own builder, as it was before `install_fast_conversion` (tests compare)."""
    if _original:
        return _original[0]
    import typer.core

    return typer.core.build_runtime_param  # type: ignore[no-any-return]


def install_fast_conversion() -> bool:
    """Put the fast conversion in front of typer's; False (and nothing changed) when this
    typer has no pydantic-backed builder to stand in front of."""
    if _installed:
        return _installed[0]
    try:
        import typer.core as core
        from typer import _coercion, _param_types

        original = core.build_runtime_param
        base = _coercion.RuntimeParam
        ok = callable(getattr(_param_types, "coerce_cli_choice", None)) and callable(
            getattr(_param_types, "coerce_cli_path", None))
    except (ImportError, AttributeError):
        ok = False
    if not ok:
        _installed.append(False)
        return False

    @dataclass(frozen=True)
    class FastRuntimeParam(base):  # type: ignore[valid-type,misc]
        """Converts plain values itself; any other value goes through typer's own param."""

        fast: Leaf
        descriptor: Any

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.fast(value, param, ctx)
            except (Unusual, ValueError, TypeError):  # refusals too: typer words them
                return original(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build(descriptor: Any) -> Any:
        fast = None
        if getattr(descriptor, "file_annotation", None) is None:
            fast = converter(descriptor.annotation, descriptor.parameter_info)
        if fast is None:
            return original(descriptor)
        return FastRuntimeParam(parameter_info=descriptor.parameter_info,
                                annotation=descriptor.annotation, fast=fast,
                                descriptor=descriptor)

    _original.append(original)
    core.build_runtime_param = build
    _installed.append(True)
    return True


class Entry(NamedTuple):
    """One top-level command or group as ``migrate --help`` lists it, without its module.

    ``module`` is the ``migrator.cli`` module that defines it: a function ``register(app)``
    for commands, the Typer app named ``group`` for groups. ``help`` is the first paragraph
    of its help text (all click's one-line summary reads); tests/unit/test_cli_startup.py
    checks this table against the commands the modules really define.
    """

    module: str
    help: str
    group: str | None = None  # the attribute holding the group's Typer app
    hidden: bool = False


# Commands, then groups, in the order `migrate --help` lists them.
COMMANDS: dict[str, Entry] = {
    "init": Entry("hostsetup", "Set up this host: state root, network namespace (optional), "
                  "bridge and (optional) a VXLAN overlay joining it to other hosts' bridges. "
                  "Idempotent: run again with no options (e.g. after a reboot), it makes what "
                  "is recorded again."),
    "teardown": Entry("hostsetup", "Stop every container, unmount pools, remove the host's "
                      "network namespace."),
    "launch": Entry("containers", "Create a container from an image and start it."),
    "create": Entry("containers", "Create a container from an image without starting it."),
    "start": Entry("containers", "Start containers."),
    "stop": Entry("containers", "Stop containers (clean shutdown, killed after --timeout)."),
    "restart": Entry("containers", "Restart containers."),
    "freeze": Entry("containers", "Freeze (pause) running containers."),
    "unfreeze": Entry("containers", "Unfreeze containers."),
    "exec": Entry("containers", "Run a command in a container: `migrate exec web-1 -- ls /`. "
                  "Passes its exit code."),
    "shell": Entry("containers", "An interactive login shell in the container."),
    "list": Entry("containers", "List containers: NAME, STATE, IPV4, POOL, SNAPSHOTS."),
    "info": Entry("containers", "Show one container."),
    "delete": Entry("containers", "Delete containers with their snapshots."),
    "copy": Entry("storage", "Copy a container with its snapshots: on this host (any pool to "
                  "any pool), to another host with HOST:NAME as the target, from one with "
                  "HOST:NAME as the source (a pull: that host sends over the same SSH "
                  "connection), or between two others (see `migrate host add`)."),
    "move": Entry("storage", "Move a container to another pool (with all snapshots), or "
                  "rename it."),
    "agent": Entry("hosts", "The far side of host-to-host operations (run over SSH by the "
                   "client; not by hand).", hidden=True),
    "operations": Entry("journal", "Journaled copies and moves: kind, status, last stage; "
                        "interrupted ones need recover."),
    "recover": Entry("journal", "Roll back, or complete, operations whose process died "
                     "part-way (on both hosts)."),
    "live": Entry("live", "Live-migrate running containers to another host with their "
                  "memory (CRIU)."),
    "evacuate": Entry("evacuate", "Move every container off a host: live where CRIU can, "
                      "stateless where it cannot."),
    "export": Entry("exchange", "Export a container (and its snapshots) as one tarball in the "
                    "layout of `lxc export` and `incus export`, which LXD and Incus import. The "
                    "archive is streamed: exporting never needs room for a copy of the "
                    "container, and `-` pipes it into another tool."),
    "import": Entry("exchange", "Import a container from an `lxc export`, `incus export` or "
                    "`migrate export` tarball (gzip, zstd, xz or plain; read once, from a file "
                    "or stdin). Every member is checked before it is written; an unsafe or "
                    "damaged archive changes nothing on this host."),
    "import-lxc": Entry("adopt", "Adopt a stopped LXC container (its config and dir rootfs) "
                        "into this host, as LXD's lxc-to-lxd does: the rootfs is copied into a "
                        "volume (ids shifted to this host's map if it is unprivileged), its "
                        "network, limits and idmap converted, and every key that cannot be "
                        "converted listed. The original is only read, unless --delete "
                        "destroys it after success."),
    "p2c": Entry("p2c", "Convert a running machine reached over SSH into a system container "
                 "(inventory, transfer with a delta pass, fixups, first boot)."),
    "image": Entry("images", "Build, import, export and delete images (LXD unified "
                   "tarballs).", group="image_app"),
    "pool": Entry("pools", "Storage pools (dir, btrfs, zfs).", group="pool_app"),
    "snapshot": Entry("snapshots", "Container snapshots.", group="snapshot_app"),
    "config": Entry("containers", "Container configuration keys.", group="config_app"),
    "volume": Entry("storage", "Custom storage volumes: directories on a pool, mounted into "
                    "containers.", group="volume_app"),
    "host": Entry("hosts", "Other hosts: inventory, host keys, connection checks.",
                  group="host_app"),
    "backup": Entry("backup", "Compressed, verifiable, incremental backups in a repository.",
                    group="backup_app"),
    "schedule": Entry("schedule", "Automatic snapshots and backups from the snapshots.* and "
                      "backups.* keys (`migrate config set web-1 snapshots.schedule=@daily`).",
                      group="schedule_app"),
}


def cli_module(name: str) -> ModuleType:
    """The command module ``migrator.cli.NAME``, imported on first use.

    One import statement per module, inside this function, so that a command imports only
    its own module (and what that needs: paramiko, zstandard, boto3... stay out of `list`
    and `--help`), while the import graph the layer tests read still sees every edge.
    """
    if name == "adopt":
        from migrator.cli import adopt

        return adopt
    if name == "backup":
        from migrator.cli import backup

        return backup
    if name == "containers":
        from migrator.cli import containers

        return containers
    if name == "evacuate":
        from migrator.cli import evacuate

        return evacuate
    if name == "exchange":
        from migrator.cli import exchange

        return exchange
    if name == "hosts":
        from migrator.cli import hosts

        return hosts
    if name == "hostsetup":
        from migrator.cli import hostsetup

        return hostsetup
    if name == "images":
        from migrator.cli import images

        return images
    if name == "journal":
        from migrator.cli import journal

        return journal
    if name == "live":
        from migrator.cli import live

        return live
    if name == "p2c":
        from migrator.cli import p2c

        return p2c
    if name == "pools":
        from migrator.cli import pools

        return pools
    if name == "schedule":
        from migrator.cli import schedule

        return schedule
    if name == "snapshots":
        from migrator.cli import snapshots

        return snapshots
    if name == "storage":
        from migrator.cli import storage

        return storage
    raise KeyError(name)


def _typer_app(name: str, entry: Entry) -> typer.Typer:
    """A throw-away app holding just command ``name`` (or group), registered the way the
    full app used to register it, so its click form is the same."""
    mod = cli_module(entry.module)
    holder = typer.Typer(rich_markup_mode=None, add_completion=False)
    if entry.group is None:
        mod.register(holder)  # the module's commands; only ``name``'s is built
        holder.registered_commands = [c for c in holder.registered_commands if c.name == name]
    else:
        sub: typer.Typer = getattr(mod, entry.group)
        if name == "config":  # `migrate config host ...` lives with the schedule keys
            schedule = cli_module("schedule")
            if not any(g.typer_instance is schedule.host_config_app
                       for g in sub.registered_groups):
                sub.add_typer(schedule.host_config_app, name="host")
        holder.add_typer(sub, name=name)
    return holder


class LazyGroup(typer.core.TyperGroup):
    """The top-level group: a command's module is imported only when that command runs.

    Start-up time is why (issue 18: `migrate --help` <= 0.1 s, `migrate list` <= 0.15 s; every
    SSH request starts a `migrate agent`): importing every command module pulled in the whole
    library (~0.1 s) and building all ~90 commands' click objects another ~0.05 s. The help
    listing reads ``COMMANDS`` instead of the modules.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return [*COMMANDS, *(n for n in self.commands if n not in COMMANDS)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            built = typer.main.get_group(_typer_app(cmd_name, COMMANDS[cmd_name]))
            for n, cmd in built.commands.items():
                self.commands.setdefault(n, cmd)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(n, e.help) for n, e in COMMANDS.items() if not e.hidden]
        limit = formatter.width - 6 - max(len(n) for n, _ in rows)
        with formatter.section("Commands"):
            formatter.write_dl([(n, summary(h, limit)) for n, h in rows])


def summary(text: str, limit: int) -> str:
    """Click's one-line summary of a help text (its ``make_default_short_help``)."""
    from typer._click.utils import make_default_short_help

    return make_default_short_help(text, limit)


install_fast_conversion()  # plain values converted without pydantic (~0.08 s)

app = typer.Typer(
    cls=LazyGroup,
    help="System containers on LXC: run, snapshot, copy, migrate and back them up.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help and errors: rich's rendering alone costs ~0.12 s per `--help`
    rich_markup_mode=None,
)


@app.callback()
def _global(
    ctx: typer.Context,
    root: Path = typer.Option(
        None,
        "--root",
        envvar="MIGRATOR_ROOT",
        help="State root of this host [default: /var/lib/migrator]",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show commands and details"),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = begin(root, verbose)


def main() -> None:
    """Entry point: the only place exceptions become exit codes and messages.

    Click's standalone mode handles usage errors (exit 2) and ``typer.Exit``; a
    ``MigratorError`` becomes its message, its hint and its own exit code, never a traceback.
    """
    try:
        app(standalone_mode=True)
    except MigratorError as e:
        typer.echo(f"Error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"Hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("Interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
