"""``migrate backup ...``: create, list, info, verify, restore, prune and protect backups."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from migrator.cli.console import print_json, say
from migrator.cli.context import current, transport_for
from migrator.cli.options import config_option, format_option, pool_option
from migrator.cli.progress import Bars
from migrator.cli.render import Format, human_size, render
from migrator.core.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from migrator.backup.chunkrepo import ChunkedRepository
    from migrator.backup.objectstore import ObjectStore
    from migrator.backup.repository import BackupRepository

backup_app = typer.Typer(
    help="Compressed, verifiable, incremental backups in a repository.\n\n"
    "A repository is a directory (default: <state root>/backups, or --repo PATH) holding "
    "one directory per backup: an index.json listing its parts with their sha256, and the "
    "parts themselves (zstd-compressed tar or btrfs/zfs send streams). A backup is complete "
    "or absent: it is written aside and appears only once its index is on disk. "
    "A repository on another host is reached through its agent: --repo ssh://HOST/PATH.\n\n"
    "A chunked repository (`migrate backup init REPO`: a directory, s3://BUCKET/PREFIX or "
    "ssh://HOST/PATH) "
    "stores every part as deduplicated, compressed chunks, encrypted and authenticated "
    "with a key wrapped by a passphrase (MIGRATOR_PASSPHRASE or MIGRATOR_PASSPHRASE_FILE, "
    "else asked; the key may be "
    "kept in a file instead: --key-file or MIGRATOR_KEY_FILE). The same commands work on it.",
    no_args_is_help=True)

REPO_OPT = typer.Option(None, "--repo", "-r",
                        help="Repository: a directory, s3://BUCKET/PREFIX, or ssh://HOST/PATH "
                        "on an inventory host (ssh://HOST alone: that host's "
                        "<state root>/backups) [default: <state root>/backups]")
FORMAT_OPT = format_option("table or json")
KEY_FILE_OPT = typer.Option(None, "--key-file",
                            help="The repository key's envelope in this file (0600) instead "
                            "of the repository [env: MIGRATOR_KEY_FILE]")


def _ask_passphrase(confirm: bool) -> str:
    """``MIGRATOR_PASSPHRASE`` (or ``MIGRATOR_PASSPHRASE_FILE``), else a prompt on a
    terminal (asked twice when ``confirm``)."""
    from migrator.backup.chunkrepo import env_passphrase, passphrase_from_env

    value = env_passphrase()
    if value is not None:
        return value
    if not sys.stdin.isatty():
        return passphrase_from_env(confirm)  # raises, with the hint
    return str(typer.prompt("Repository passphrase", hide_input=True,
                            confirmation_prompt=confirm, err=True))


def _repo(path: str | None, key_file: Path | None = None) -> BackupRepository:
    """A local repository (a directory: the directory format or a chunked one),
    ``s3://BUCKET/PREFIX`` (chunked) or ``ssh://HOST/PATH`` on an inventory host."""
    from migrator.backup.remote import open_repository

    return open_repository(current().host, path, _ask_passphrase, key_file)


def _chunked(path: str | None, key_file: Path | None) -> ChunkedRepository:
    from migrator.backup.chunkrepo import ChunkedRepository

    r = _repo(path, key_file)
    if not isinstance(r, ChunkedRepository):
        raise InvalidInput(f"{r} is not a chunked repository",
                           "keys belong to chunked repositories (`migrate backup init`)")
    return r


@backup_app.command("init")
def init_cmd(
    repo: str = typer.Argument(..., help="A directory, s3://BUCKET/PREFIX, or "
                               "ssh://HOST/PATH (a directory on an inventory host)"),
    encryption: str = typer.Option(
        "repokey", "--encryption", "-e",
        help="repokey: chunks and indexes encrypted and authenticated (AES-256-GCM) with a "
        "random key wrapped by your passphrase (scrypt); none: compressed and checked by "
        "hash only"),
    key_file: Path = KEY_FILE_OPT,
    fmt: Format = FORMAT_OPT,
) -> None:
    """Create a chunked repository: deduplicated across backups and containers, encrypted.

    The passphrase comes from MIGRATOR_PASSPHRASE or is asked twice. With --key-file the
    wrapped key is written to that file only (keep a copy!), not into the repository.
    Over ssh:// only sealed chunks cross the link: the far host never sees the key.
    Examples: `migrate backup init /srv/backups`, `migrate backup init s3://bkt/host-a`,
    `migrate backup init ssh://host-b/srv/backups`
    """
    from migrator.backup.chunkrepo import ChunkedRepository

    if encryption not in ("repokey", "none"):
        raise InvalidInput(f"unknown encryption {encryption!r}", "use repokey or none")
    kf: Path | None = key_file or (Path(os.environ["MIGRATOR_KEY_FILE"])
                                   if os.environ.get("MIGRATOR_KEY_FILE") else None)
    store = _new_store(repo)
    passphrase = _ask_passphrase(True) if encryption == "repokey" else None
    r = ChunkedRepository.create(store, encryption, passphrase, kf)
    if fmt == Format.json:
        print_json({"repo": str(r), "id": r.config["id"], "encryption": encryption,
                    "key_file": str(kf) if kf else None})
        return
    say(f"created chunked repository {r} ({encryption}"
        + (f", key in {kf}" if kf and encryption == "repokey" else "") + ")")
    if encryption == "repokey":
        say("  keep the passphrase (and `migrate backup key export`): without them the "
            "backups cannot be read")


def _new_store(spec: str) -> ObjectStore:
    """The empty store a new repository goes into (a directory is made 0700)."""
    if spec.startswith("s3:"):
        from migrator.backup.s3store import S3Store

        return S3Store.from_url(spec)
    if spec.startswith("ssh:"):
        from migrator.backup.remote import parse_url
        from migrator.backup.sshstore import SshObjectStore

        name, far_path = parse_url(spec)
        remote = SshObjectStore(transport_for(name).connect(), far_path, owns_transport=True)
        try:
            if next(iter(remote.list("")), None) is not None:
                raise InvalidInput(f"{spec} exists and is not empty",
                                   "give a new or empty directory on that host")
            remote.create()
        except BaseException:
            remote.close()
            raise
        return remote
    from migrator.backup.dirstore import DirStore

    path = Path(spec)
    if path.exists() and any(path.iterdir()):
        raise InvalidInput(f"{path} exists and is not empty",
                           "give a new or empty directory")
    store = DirStore(path)
    store.create()
    return store


key_app = typer.Typer(help="A chunked repository's key: export it, change its passphrase.",
                      no_args_is_help=True)
backup_app.add_typer(key_app, name="key")


@key_app.command("export")
def key_export_cmd(
    to: Path = typer.Argument(..., help="File to write the wrapped key into (0600)"),
    repo: str = REPO_OPT, key_file: Path = KEY_FILE_OPT,
) -> None:
    """Write the repository's wrapped key (still sealed by the passphrase) to a file.

    Keep it apart from the repository: if the repository's copy is lost or damaged, give it
    back with --key-file (or MIGRATOR_KEY_FILE). The passphrase is checked first."""
    from migrator.backup.chunkrepo import write_key_file

    env = _chunked(repo, key_file).key_envelope()
    write_key_file(to, env)
    say(f"wrote the wrapped key to {to}")


@key_app.command("change-passphrase")
def key_change_cmd(repo: str = REPO_OPT, key_file: Path = KEY_FILE_OPT) -> None:
    """Wrap the repository key under a new passphrase (the data is not re-encrypted).

    The current passphrase comes from MIGRATOR_PASSPHRASE or a prompt; the new one from
    MIGRATOR_NEW_PASSPHRASE or a prompt (asked twice)."""
    r = _chunked(repo, key_file)
    r.key_envelope()  # the current passphrase first
    new = os.environ.get("MIGRATOR_NEW_PASSPHRASE")
    if new is None:
        if not sys.stdin.isatty():
            raise InvalidInput("no new passphrase", "set MIGRATOR_NEW_PASSPHRASE")
        new = str(typer.prompt("New passphrase", hide_input=True, confirmation_prompt=True,
                               err=True))
    r.change_passphrase(new)
    say(f"the key of {r} is now wrapped by the new passphrase")


@backup_app.command("create")
def create_cmd(
    name: str = typer.Argument(..., help="Container to back up (it may be running)"),
    repo: str = REPO_OPT,
    optimized: bool = typer.Option(
        False, "--optimized",
        help="Store the pool's native send streams (btrfs/zfs): snapshots cost only their "
        "changes; restorable onto any pool, natively onto the same driver"),
    incremental: bool = typer.Option(
        False, "--incremental", "-i",
        help="Store only what changed since the newest backup of this container in the "
        "repository (a full backup is made, and said so, when there is none to build on)"),
    compression: str = typer.Option("zstd:3", "--compression", "-c",
                                    help="zstd, zstd:LEVEL (1-19) or none (a chunked "
                                    "repository compresses each chunk itself)"),
    instance_only: bool = typer.Option(False, "--instance-only",
                                       help="Back up the container without its snapshots"),
    fmt: Format = FORMAT_OPT,
) -> None:
    """Back up a container and its snapshots into the repository.

    A running container is frozen for an instant while a snapshot is taken, then keeps
    running while the backup is read from that snapshot. The generic format (default) is a
    tar per snapshot plus the current state; --incremental stores file-level changes
    (new/changed files by size, mtime, mode, owner; plus the list of removed paths).

    Examples: `migrate backup create web-1`,
    `migrate backup create web-1 --optimized --incremental --compression zstd:6`
    """
    from migrator.backup.create import create_backup

    with Bars() as bars:
        r = create_backup(current().containers, name, _repo(repo), optimized, incremental,
                          compression, instance_only, bars)
    if fmt == Format.json:
        print_json(r.as_dict())
        return
    ratio = f", {r.raw_bytes / r.stored_bytes:.1f}x" if r.stored_bytes else ""
    say(f"backup {r.id} of {r.container} ({r.kind}"
        f"{', incremental from ' + r.parent if r.parent else ', full'}): "
        f"{human_size(r.raw_bytes)} -> {human_size(r.stored_bytes)}{ratio} in {r.seconds:.1f}s")
    if r.chunks is not None:
        say(f"  chunks: {r.chunks}, {r.new_chunks} new (the rest already in the repository)")
    if r.snapshots_stored:
        say(f"  snapshots stored: {', '.join(r.snapshots_stored)}")
    if r.snapshots_referenced:
        say(f"  snapshots already in the chain: {', '.join(r.snapshots_referenced)}")
    for n in r.notes:
        say(f"  note: {n}")
    typer.echo(r.id)


@backup_app.command("list")
def list_cmd(
    container: str = typer.Argument(None, help="Only the backups of this container"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """List the backups in the repository, oldest first."""
    from migrator.backup.catalog import row

    r = _repo(repo)
    r.check()
    rows = [row(b) for b in r.list() if container is None or b.container == container]
    if fmt == Format.table:
        for x in rows:
            x["size"] = human_size(x["size"])
            x["protected"] = "yes" if x["protected"] else ""
            x["incremental"] = "yes" if x["incremental"] else ""
    typer.echo(render(rows, ["id", "container", "created", "kind", "incremental", "snapshots",
                             "size", "protected"], fmt))


@backup_app.command("info")
def info_cmd(backup_id: str = typer.Argument(..., metavar="ID"), repo: str = REPO_OPT,
             fmt: Format = FORMAT_OPT) -> None:
    """Show one backup: its chain, snapshots, parts (sizes and checksums) and config.

    In a chunked repository also what it stored when it was written: raw_bytes,
    stored_bytes (new after dedup and compression), chunks and new_chunks."""
    from dataclasses import asdict

    r = _repo(repo)
    r.check()
    idx = r.get(backup_id)
    stats_of = getattr(r, "stats_of", None)
    stats = stats_of(backup_id) if stats_of is not None else None
    if fmt == Format.json:
        # raw_bytes as `backup create` reports it: the container's streams (the chunk
        # counts and stored_bytes also cover the small manifest part)
        print_json({**json.loads(idx.to_json()),
                    **({**asdict(stats), "raw_bytes": idx.raw_size()} if stats is not None
                       else {})})
        return
    from migrator.backup.catalog import row

    for k, v in row(idx).items():
        if k != "created_epoch":
            typer.echo(f"{k}: {v}")
    if stats is not None:
        typer.echo(f"stored when written: {human_size(stats.stored_bytes)} new of "
                   f"{human_size(idx.raw_size())}; chunks: {stats.chunks}, "
                   f"{stats.new_chunks} new")
    typer.echo(f"final: {idx.final}")
    if idx.base_snapshot:
        typer.echo(f"base snapshot on the pool: {idx.base_snapshot}")
    typer.echo("snapshots:")
    for s in idx.snapshots:
        where = "" if s.backup == idx.id else f" (stored in {s.backup})"
        typer.echo(f"  {s.name}{where}")
    typer.echo("parts:")
    for p in idx.parts:
        typer.echo(f"  {p.path}  {p.kind}  {human_size(p.size)} "
                   f"(raw {human_size(p.raw_size)})  sha256:{p.sha256[:16]}")
    for n in idx.notes:
        typer.echo(f"note: {n}")


@backup_app.command("verify")
def verify_cmd(
    backup_id: str = typer.Argument(None, metavar="[ID]"),
    all_: bool = typer.Option(False, "--all", help="Verify every backup in the repository"),
    deep: bool = typer.Option(
        False, "--deep",
        help="Also decompress every part and check every tar member (as restore does); "
        "in a chunked repository, read and authenticate every chunk, naming each bad one"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """Check backups: index, chain of parents, presence, size and sha256 of every part.

    In a chunked repository the quick check is the index and the presence of every chunk
    it lists; --deep reads them all.

    Each damage is named precisely (missing part, truncated part, checksum mismatch,
    malformed index, missing parent). Exits with CorruptBackup's code (21) if any backup is
    damaged.
    """
    from migrator.backup.verify import check_backup, raise_if_damaged, unreadable_reports

    if bool(backup_id) == all_:
        raise InvalidInput("give one backup ID or --all")
    r = _repo(repo)
    r.check()
    ids = r.ids() if all_ else [backup_id]
    # a chunked repository is asked about the one index (listing its ids opens them all)
    committed = getattr(r, "committed", None)
    if not all_ and not (committed(backup_id) if committed is not None
                         else backup_id in r.ids()):
        r.get(backup_id)  # NotFound, with a hint
    reports = []
    with Bars() as bars:
        for i in ids:
            reports.append(check_backup(r, i, deep, bars))
    if all_:  # index objects that do not open with the key are in no listing: named here
        reports.extend(unreadable_reports(r))
    if fmt == Format.json:
        print_json([x.as_dict() for x in reports])
    else:
        for x in reports:
            say(f"{x.id}: " + ("ok" if x.ok else "DAMAGED") +
                (f" ({x.parts} parts, {human_size(x.bytes)}{', deep' if deep else ''})"
                 if x.ok else ""))
            for p in x.problems:
                say(f"  {p}")
    raise_if_damaged(reports)


@backup_app.command("restore")
def restore_cmd(
    backup_id: str = typer.Argument(..., metavar="ID"),
    name: str = typer.Option(None, "--name", "-n",
                             help="Restore as this container [default: the backed-up name]"),
    pool: str = pool_option("Pool to restore onto (any driver) [default: default pool]"),
    config: list[str] = config_option("KEY=VALUE overriding the backed-up config "
                                      "(repeatable), e.g. -c limits.memory=512MiB", []),
    force: bool = typer.Option(False, "--force",
                               help="Replace an existing container of that name"),
    host: str = typer.Option(None, "--host", "-H",
                             help="Restore on this inventory host instead of here"),
    verify_first: bool = typer.Option(
        True, "--verify-first/--verify-while-restoring",
        help="Check every part's sha256 before writing anything (reads the backup twice), "
        "or while it streams into a hidden scratch volume that is deleted on a mismatch "
        "(reads it once: faster, half the traffic from an ssh:// repository). A chunked "
        "repository is always read once: each chunk is authenticated as it streams"),
    allow_privileged: bool = typer.Option(
        False, "--allow-privileged",
        help="Accept a privileged backup (the container's root is root on this host)"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """Restore a backup (through its incremental chain) as a stopped container.

    Every part of the chain is checked against its sha256 before anything changes; every
    tar member is checked while extracting (no paths out of the rootfs, no device nodes for
    unprivileged containers). An existing container is only replaced with --force, and only
    once the restored one is complete. Start it with `migrate start NAME`.

    With --host H the restore runs on H: from a repository on H (--repo ssh://H/PATH)
    directly, else the backup and its chain are first copied into H's default repository,
    checked on the way, and removed from there afterwards.

    Examples: `migrate backup restore web-1-20261121T020000Z-1a2b3c --name web-1-old`,
    `migrate backup restore ID --host host-b --pool fast --repo ssh://host-b/srv/backups`
    """
    from migrator.backup.restore import RestoreResult, restore_backup

    overrides: dict[str, str] = {}
    for item in config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"expected KEY=VALUE, got {item!r}", "e.g. -c limits.cpu=1")
        overrides[key.strip()] = value
    staged: list[str] = []
    with Bars() as bars:
        if host and host != "local":
            from migrator.backup.remote import restore_on_host

            with transport_for(host) as t:
                done, staged = restore_on_host(t, _repo(repo), backup_id, name, pool,
                                               overrides, force, bars, verify_first,
                                               allow_privileged)
            r = RestoreResult(**done)
        else:
            r = restore_backup(current().containers, _repo(repo), backup_id, name, pool,
                               overrides, force, bars, verify_first, allow_privileged)
    if fmt == Format.json:
        print_json({**r.as_dict(), "host": host or "local", "staged": staged})
        return
    where = f" on {host}" if host and host != "local" else ""
    say(f"restored {r.id} as {r.container}{where} on pool {r.pool} via {r.method}: "
        f"{human_size(r.bytes)} in {r.seconds:.1f}s")
    if staged:
        say(f"  copied {len(staged)} backup(s) to {host} for it, removed again after")
    if len(r.chain) > 1:
        say(f"  through the chain {' -> '.join(r.chain)}")
    if r.snapshots:
        say(f"  snapshots: {', '.join(r.snapshots)}")
    for n in r.notes:
        say(f"  note: {n}")


@backup_app.command("extract")
def extract_cmd(
    backup_id: str = typer.Argument(..., metavar="ID"),
    paths: list[str] = typer.Argument(..., metavar="PATH...",
                                      help="Paths as the container sees them (/ for all)"),
    to: Path = typer.Option(..., "--to", "-t", help="A new or empty directory to write into"),
    snapshot: str = typer.Option(None, "--snapshot", "-s",
                                 help="From this snapshot of the backup [default: its "
                                 "final state]"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """Copy single files or directories out of a generic backup, without restoring it.

    The tar parts are read through the same member checks as a restore; files are written
    under DIR without ever following a symlink (a link in the backup is made as a link),
    owned by you, without setuid/setgid bits; device nodes and fifos are skipped. Optimized
    (btrfs/zfs send) backups cannot be read file by file: restore them under another name.
    Exits with NotFound's code when a PATH is not in the backup.

    Example: `migrate backup extract web-1-20261121T020000Z-1a2b3c /etc/nginx /srv/www/index.html
    --to /tmp/web-files`
    """
    from migrator.backup.extract import extract_files

    with Bars() as bars:
        r = extract_files(_repo(repo), backup_id, paths, to, snapshot, bars)
    if fmt == Format.json:
        print_json(r.as_dict())
    else:
        say(f"extracted from {r.id} ({r.point}) into {r.to}: {r.files} file(s), "
            f"{r.dirs} dir(s), {r.links} link(s), {human_size(r.bytes)} in {r.seconds:.1f}s")
        for x in r.skipped:
            say(f"  skipped {x}")
    if r.missing:
        raise NotFound(f"not in backup {r.id} ({r.point}): {', '.join(r.missing)}",
                       "the rest was extracted; a path through a symlink in the container "
                       "(/bin -> usr/bin) is not followed: give the path it points to")


@backup_app.command("copy")
def copy_cmd(
    backup_id: str = typer.Argument(..., metavar="ID"),
    to: str = typer.Option(..., "--to", "-t",
                           help="Destination repository: a directory, s3://BUCKET/PREFIX "
                           "or ssh://HOST/PATH"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """Copy a backup, with the incremental chain it needs, into another repository.

    Each part is checked against its sha256 on the way and the index is written last, so
    the copy is complete or absent; backups the destination already holds are skipped, so
    sending each night's incremental off-site moves only that night's changes.

    Example: `migrate backup copy web-1-20261121T020000Z-1a2b3c --to ssh://host-b/srv/backups`
    """
    from migrator.backup.replicate import copy_chain

    with Bars() as bars:
        r = copy_chain(_repo(repo), _repo(to), backup_id, bars)
    if fmt == Format.json:
        print_json({"copied": r.copied, "present": r.present, "bytes": r.bytes})
        return
    say(f"copied {len(r.copied)} backup(s), {human_size(r.bytes)}"
        + (f"; already there: {', '.join(r.present)}" if r.present else ""))
    for bid in r.copied:
        typer.echo(bid)


@backup_app.command("prune")
def prune_cmd(
    keep_last: int = typer.Option(0, "--keep-last", min=0, help="Keep the N newest"),
    keep_hourly: int = typer.Option(0, "--keep-hourly", min=0,
                                    help="Keep the newest of each of the last N hours"),
    keep_daily: int = typer.Option(0, "--keep-daily", min=0, help="... of N days"),
    keep_weekly: int = typer.Option(0, "--keep-weekly", min=0, help="... of N ISO weeks"),
    keep_monthly: int = typer.Option(0, "--keep-monthly", min=0, help="... of N months"),
    keep_yearly: int = typer.Option(0, "--keep-yearly", min=0, help="... of N years"),
    container: str = typer.Option(None, "--container", help="Only this container's backups"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be removed"),
    list_: bool = typer.Option(False, "--list", help="List every backup kept or removed, "
                               "with the reason"),
    gc_grace: float = typer.Option(
        3600.0, "--gc-grace", min=0,  # catalog.GC_GRACE (not imported at start-up)
        help="Chunked repository: seconds an unreferenced chunk stays recorded as garbage "
        "before a later prune deletes it"),
    repo: str = REPO_OPT, fmt: Format = FORMAT_OPT,
) -> None:
    """Remove backups a retention policy no longer keeps, per container.

    Rules apply in the order last, hourly, daily, weekly, monthly, yearly; each bucket rule
    keeps the newest backup of each of its N most recent periods (UTC) not already covered.
    Protected backups are always kept, and so is every backup a kept incremental one needs.
    No --keep-* option keeps everything. Example: `migrate backup prune --keep-last 3
    --keep-daily 7 --keep-weekly 4 --dry-run --list`

    In a chunked repository removing a backup removes its index; its chunks are collected
    in two phases: a prune records the chunks no backup references, and a later prune
    (after --gc-grace, and with no backup being written) deletes those still unreferenced.
    """
    from migrator.backup.catalog import collect_garbage, prune_repository
    from migrator.backup.prune import RetentionPolicy

    policy = RetentionPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
                             keep_yearly)
    target = _repo(repo)
    r = prune_repository(target, policy, dry_run, container)
    gc = collect_garbage(target, gc_grace, dry_run)
    if fmt == Format.json:
        print_json({**r.as_dict(), **({"gc": vars(gc)} if gc is not None else {})})
        return
    if list_:
        for bid, why in sorted(r.keep.items()):
            say(f"keep    {bid}  ({', '.join(why)})")
        for bid in r.remove:
            say(f"{'would remove' if dry_run else 'remove'}  {bid}")
    verb = "would remove" if dry_run else "removed"
    say(f"{verb} {len(r.remove)} backup(s), {human_size(r.freed)}; kept {len(r.keep)} "
        f"({r.policy})")
    if gc is not None:
        say(f"chunks: {'would delete' if dry_run else 'deleted'} {gc.deleted} unreferenced, "
            f"{gc.pending} recorded for a later prune"
            + (f"; {gc.postponed} postponed while backups are written" if gc.postponed
               else ""))


@backup_app.command("protect")
def protect_cmd(backup_id: str = typer.Argument(..., metavar="ID"),
                repo: str = REPO_OPT) -> None:
    """Protect a backup: prune always keeps it."""
    _set_protected(backup_id, repo, True)


@backup_app.command("unprotect")
def unprotect_cmd(backup_id: str = typer.Argument(..., metavar="ID"),
                  repo: str = REPO_OPT) -> None:
    """Remove a backup's protection (prune may then remove it)."""
    _set_protected(backup_id, repo, False)


def _set_protected(backup_id: str, repo: str | None, value: bool) -> None:
    r = _repo(repo)
    r.check()
    with r.lock():
        r.set_protected(backup_id, value)
    say(f"backup {backup_id} {'protected' if value else 'unprotected'}")
