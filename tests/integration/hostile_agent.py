"""A hostile source host's "agent", for ``test_hostile_pull.py``.

Run by the test host's sshd in place of ``migrate agent`` (the client's inventory names it
as the host's agent command): ``python hostile_agent.py CASE_FILE --root R agent``. It
reads the client's ``delegate`` request, then behaves like a pushing agent for as long as
it takes to look like one, and sends the call that CASE_FILE's case names, aimed at another
container on the client's host (the victim) or at the client itself. It speaks the
project's framing (``migrator.transport.frames``) and exits once the client has answered.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from migrator.transport.frames import (  # noqa: E402
    DATA,
    Writer,
    pack,
    read_json,
    write_end,
    write_json,
    write_link,
)

stdin = sys.stdin.buffer
read = stdin.read1 if hasattr(stdin, "read1") else stdin.read


def write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def call(op: str, **args: object) -> dict:
    write_json(write, {"call": op, **args})
    return read_json(read)


def data(w: Writer, payload: bytes) -> None:
    for i in range(0, len(payload), 65536):
        w(pack(DATA, payload[i:i + 65536]))
    write_end(w, {"bytes": len(payload)})


def volume_tar(*extra: tarfile.TarInfo, payload: bytes = b"pwned\n") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (".", "./rootfs", "./rootfs/etc"):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        for member in extra:
            tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buf.getvalue()


def receive_args(name: str, pool: str, snap: str, first: bool) -> dict:
    return {"pool": pool, "volume": {"type": "container", "name": name}, "snapshot": snap,
            "parent": None, "how": "tar", "compress": "none", "drop_after": False,
            "first": first, "size": None, "privileged": False}


def main() -> int:
    case = json.loads(Path(sys.argv[1]).read_text())
    kind, victim, pulled, pool = case["kind"], case["victim"], case["pulled"], case["pool"]
    read_json(read)  # the client's delegate request
    if kind == "reply":  # no pull at all: a hostile error reply to the request itself
        write_json(write, {"ok": False, "error": {
            "type": "SystemExit", "message": case["message"], "hint": case["message"]}})
        return 0
    call("hello")
    call("container_state", name=pulled)
    if kind == "receive":  # straight into the victim's volume, as a fresh first stream
        write_json(write, {"call": "receive", **receive_args(victim, pool, "evil", True)})
        f = tarfile.TarInfo("./rootfs/precious")
        f.size = 6
        data(write, volume_tar(f))
        read_json(read)
    elif kind == "delete":
        call("delete_snapshot", pool=pool, volume={"type": "container", "name": victim},
             snapshot="v0")
    elif kind == "delete-own":  # a refresh: the target's own snapshot, not one it sent
        call("delete_snapshot", pool=pool, volume={"type": "container", "name": pulled},
             snapshot="s0")
    elif kind == "commit":
        call("commit_container", name=victim, pool=pool, image=None, ipv4=None,
             config={"user.owned": "yes", "security.privileged": "true"}, snapshots=[])
    elif kind == "link":  # the pulled container's own stream, but sent over "our" link
        write_json(write, {"call": "receive", **receive_args(pulled, pool, "s0", True)})
        write_link(write, {"address": case["address"], "port": case["port"],
                           "cipher": "aes-256-gcm", "secret": "AAAAAAAAAAAAAAAAAAAAAA=="})
        data(write, volume_tar())
        read_json(read)
    elif kind == "tar":  # the pulled container's own stream, escaping its rootfs
        link = tarfile.TarInfo("./rootfs/etc/cron")
        link.type, link.linkname = tarfile.SYMTYPE, case["outside"]
        f = tarfile.TarInfo("./rootfs/etc/cron/pwned")
        f.size = 6
        write_json(write, {"call": "receive", **receive_args(pulled, pool, "s0", True)})
        data(write, volume_tar(link, f))
        read_json(read)
    elif kind == "device":  # a block device in an unprivileged container's rootfs
        dev = tarfile.TarInfo("./rootfs/etc/disk")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.BLKTYPE, 7, 0, 0o666
        write_json(write, {"call": "receive", **receive_args(pulled, pool, "s0", True)})
        data(write, volume_tar(dev))
        read_json(read)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the client hung up on us: what we expect
        print(f"hostile agent: {e}", file=sys.stderr)
        sys.exit(0)
