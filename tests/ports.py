"""Ports for the servers tests start (tribunal run, exporters, redis-server, llama-server).

A port the kernel hands out for bind(0) comes from the ephemeral range (Linux: 32768-60999),
which it also hands every outgoing connection, and the suite's parallel processes open many:
one may hold the port by the time the server under test binds it (seen once in seven full
runs of `tribunal run --port`). A port drawn at random below that range can only be taken
by a test that draws the same number.
"""

from __future__ import annotations

import random

from tribunal.processes.embedded import port_is_free


def free_port() -> int:
    """A port in 20000-32767 that nothing listens on now."""
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(20000, 32768)
        if port_is_free(port):
            return port
    raise RuntimeError("no free port in 20000-32767")
