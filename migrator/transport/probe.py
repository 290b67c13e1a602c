"""Link throughput through the agent: stream zeros (uncompressed) to its ``sink``."""

from __future__ import annotations

import time

from migrator.streams import SendStream
from migrator.transport.base import Transport


def measure_upload(transport: Transport, nbytes: int) -> float:
    """Bytes per second of an uncompressed upload of ``nbytes`` through the transport, as
    the agent saw it arrive from its first byte on (the request's start-up, ~0.4 s of it
    spawning the agent, is not the link's speed); from the client's clock for an older
    agent."""
    stream = SendStream(["head", "-c", str(nbytes), "/dev/zero"], "probe", "probe")
    t0 = time.monotonic()
    reply = transport.request("sink", {}, stream=stream, compress="none")
    seconds = time.monotonic() - t0
    if reply.get("rate"):
        return float(reply["rate"])
    return float(reply["raw"]) / max(seconds, 1e-6)
