"""The ``--rsh`` command rsync runs for a push through the agent (see ``rsync_relay``).

rsync starts it as ``python -m migrator.transport.rsync_shim SOCKET HOST rsync --server ...``
with a pipe on stdin and stdout. The shim hands both pipe ends and the server arguments to
the relay listening on SOCKET (SCM_RIGHTS), closes its own copies so only the relay holds
them, and then waits for the relay to send the far rsync's exit status, which it exits with:
rsync reports the remote side's failure as if it had run over ssh. No bytes of the transfer
pass through this process.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("rsync_shim: expected SOCKET HOST ARGS...", file=sys.stderr)
        return 255
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(argv[1])
        socket.send_fds(sock, [json.dumps(argv[3:]).encode()], [0, 1])
    except OSError as e:
        print(f"rsync_shim: cannot reach the relay: {e}", file=sys.stderr)
        return 255
    null = os.open(os.devnull, os.O_RDWR)  # our copies of the pipes go; the relay has them
    os.dup2(null, 0)
    os.dup2(null, 1)
    status = sock.recv(1)
    return status[0] if status else 255


if __name__ == "__main__":
    sys.exit(main(sys.argv))
