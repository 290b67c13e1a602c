"""``migrate live SRC DST [CT...]``: CRIU live migration of running containers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, delegation_target, transport_for
from migrator.cli.options import format_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size
from migrator.core.errors import InvalidInput, MigratorError, NotFound


def register(app: typer.Typer) -> None:
    """Add ``live`` to ``app``."""
    app.command("live")(live_cmd)


def _split_source(src: str) -> tuple[str, list[str]]:
    host, sep, name = src.partition(":")
    return host, [name] if sep and name else []


def live_cmd(
    src: str = typer.Argument(..., help="Source host: local (this host), or HOST:CONTAINER"),
    dst: str = typer.Argument(..., help="Target host (an inventory name, see `migrate host`)"),
    names: list[str] = typer.Argument(None, help="Containers to move [default: every running "
                                      "container on SRC: host evacuation]"),
    target_pool: str = typer.Option(None, "--target-pool", "-p",
                                    help="Pool on the target [default: its default]"),
    mode: str = typer.Option("auto", "--mode",
                             help="Checkpoint mode: auto (post-copy where both hosts support "
                             "lazy pages, else stop-and-copy), post-copy, stop-and-copy"),
    keep_source: bool = typer.Option(False, "--keep-source",
                                     help="Leave a stopped copy on the source"),
    parallel: int = typer.Option(1, "--parallel", "-j", min=1, max=16,
                                 help="Containers migrated at once (evacuation)"),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Negotiate and check, print the plan, change nothing"),
    compress: str = typer.Option("auto", "--compress", help="zstd, none, or auto"),
    fmt: Format = format_option(),
) -> None:
    """Live-migrate running containers to another host with their memory (CRIU).

    The rootfs is synced while the container runs; then it is frozen, checkpointed, the
    last changes synced, and restored on DST with its address. In post-copy mode it runs on
    DST as soon as its non-memory state is there and memory pages follow on demand, so the
    downtime does not grow with memory. Any failure before DST runs it leaves it running
    here with its memory state. Examples:

      migrate live local host-b web-1          # one container
      migrate live local host-b                # evacuate: every running container
      migrate live local host-b --dry-run      # the plan: storage method, mode, sizes
    """
    from migrator.pipelines.live import live_migrate, plan_live

    host, from_src = _split_source(src)
    cts = current().containers
    if host != "local":
        if dry_run:
            raise InvalidInput("--dry-run needs the source to be this host",
                               f"run it on {host}: `migrate live local {dst} --dry-run`")
        _delegate(host, dst, from_src + list(names or []), target_pool, mode, keep_source,
                  compress, fmt)
        return
    if dst == "local" or not any(h.name == dst for h in cts.state.list_hosts()):
        raise NotFound(f"{dst!r} is not a host in the inventory",
                       "add it with `migrate host add NAME ADDRESS`")
    wanted = list(dict.fromkeys(from_src + list(names or [])))
    if not wanted:
        from migrator.pipelines.live import running_containers

        wanted = running_containers(cts)
        if not wanted:
            say("no running container to migrate")
            return
        say(f"evacuating {len(wanted)} running container(s): {', '.join(wanted)}")
    for n in wanted:
        cts.get(n)  # every name exists before anything moves

    if dry_run:
        plans = []
        with transport_for(dst) as t:
            for n in wanted:
                plans.append(plan_live(cts, t, n, target_pool, mode, compress).as_dict())
        if fmt == Format.json:
            print_json(plans)
            return
        for p in plans:
            say(f"{p['container']}: -> {dst} pool {p['pool']}, storage {p['storage']}, "
                f"{p['mode']}, link {p['link']}, compression {p['compress']}; rootfs "
                f"{human_size(p['rootfs_bytes'])}, memory {human_size(p['memory_bytes'])}")
            for r in p["reasons"]:
                say(f"  {r}")
        return

    # inventory look-ups here, in the main thread (the state's SQLite stays in its thread)
    transports = {n: transport_for(dst) for n in wanted}

    def one(n: str) -> dict[str, Any]:
        from migrator.runtime.containers import Containers
        from migrator.runtime.host import Host

        own = cts if parallel == 1 else Containers(Host(cts.host.root))
        try:
            with transports[n] as t, Bars(enabled=None if parallel == 1 else False) as bars:
                return live_migrate(own, t, n, target_pool, mode, keep_source, compress,
                                    bars).as_dict()
        finally:
            if own is not cts:
                own.host.close()

    results: list[dict[str, Any]] = []
    failures: list[tuple[str, Exception]] = []
    def collect(n: str, run: Any) -> None:
        try:
            r = run()
        except MigratorError as e:
            failures.append((n, e))
            say(f"{n}: FAILED, still on the source: {e.message}")
            return
        results.append(r)
        if fmt != Format.json:
            _report(r)

    if parallel == 1:
        for n in wanted:
            collect(n, lambda n=n: one(n))
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {n: pool.submit(one, n) for n in wanted}
            for n, fut in futures.items():
                collect(n, fut.result)
    if fmt == Format.json:
        print_json(results if len(wanted) > 1 or not results else results[0])
    if failures:
        if len(failures) == 1 and len(wanted) == 1:
            raise failures[0][1]
        raise typer.Exit(max(getattr(e, "exit_code", 1) for _n, e in failures))


def _delegate(src: str, dst: str, names: list[str], pool: str | None, mode: str,
              keep_source: bool, compress: str, fmt: Format) -> None:
    """SRC is another host: it runs the migration itself (its agent pushes to DST with the
    DST host key this host verified); each container's result is reported as it lands."""
    if src == dst:
        raise InvalidInput("source and target are the same host")
    target = delegation_target(dst)
    say(f"{src} migrates to {dst} (driven through {src}'s agent)")

    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("event") == "migrated" and fmt != Format.json:
            _report({k: v for k, v in ev.items() if k != "event"} | {"source": src})
        elif ev.get("event") == "failed":
            say(f"{ev.get('name')}: FAILED, still on {src}: {ev.get('message')}")

    with transport_for(src) as t:
        reply = t.request("delegate", {"command": "live", "target": target, "names": names,
                                       "pool": pool, "mode": mode, "keep_source": keep_source,
                                       "compress": compress}, on_event=on_event)
    results = [r | {"source": src} for r in reply.get("results", [])]
    failures = reply.get("failures", [])
    if fmt == Format.json:
        print_json(results if len(results) != 1 else results[0])
    if failures:
        from migrator.transport.replies import remote_error

        if len(failures) == 1 and not results:
            raise remote_error(src, failures[0])
        raise typer.Exit(1)
    if not results:
        say(f"no running container to migrate on {src}")


def _report(r: dict[str, Any]) -> None:
    # no downtime when the target's "restored" was cut off and the migration went forward
    down = "unknown" if r.get("downtime") is None else f"{r['downtime']:.2f}s"
    say(f"{r['container']}: live-migrated to {r['target']} ({r['mode']}, storage "
        f"{r['storage']}+{r['compress']}) in {r['seconds']:.1f}s, down {down}")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in r["stages"].items())
    say(f"  stages: {stages}")
    say(f"  sent: rootfs {human_size(r['storage_bytes'])}, images "
        f"{human_size(r['image_bytes'])}, pages {human_size(r['page_bytes'])}")
    for n in r["notes"]:
        say(f"  note: {n}")
