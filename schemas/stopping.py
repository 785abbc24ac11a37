"""Whether this process was asked to stop (SIGTERM, SIGINT: orchard/stop.py): retries and waits consult it, so a
stopping run does not retry or wait on what its stop just took away. In the lowest layer so every layer can read it."""

from __future__ import annotations

import threading

STOP_REQUESTED = threading.Event()


def stop_requested() -> bool:
    return STOP_REQUESTED.is_set()
