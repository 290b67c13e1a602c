"""Host-to-host transports: framed agent protocol over SSH channels (or a local process)."""
