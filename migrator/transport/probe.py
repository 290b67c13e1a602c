"""Link throughput through the agent: stream zeros (uncompressed) to its ``sink``."""

from __future__ import annotations

import time
from typing import Any

from migrator.streams import SendStream


def measure_upload(transport: Any, nbytes: int) -> float:
    """Bytes per second of an uncompressed upload of ``nbytes`` through the transport."""
    stream = SendStream(["head", "-c", str(nbytes), "/dev/zero"], "probe", "probe")
    t0 = time.monotonic()
    reply = transport.request("sink", {}, stream=stream, compress="none")
    seconds = time.monotonic() - t0
    return float(reply["raw"]) / max(seconds, 1e-6)
