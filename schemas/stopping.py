"""Whether this process was asked to stop (SIGTERM, SIGINT: orchard/stop.py): retries and waits consult it, and what
waits on a server (a request in flight) is woken by it, so a stopping run neither retries nor waits on what its stop
just took away. In the lowest layer so every layer can read it."""

from __future__ import annotations

import threading
from typing import Callable

STOP_REQUESTED = threading.Event()
_ON_STOP: list[Callable[[], None]] = []
_LOCK = threading.Lock()


def stop_requested() -> bool:
    return STOP_REQUESTED.is_set()


def set_stopping() -> None:
    """Mark this process as stopping and call, once, everything registered with `on_stop` (in this thread)."""
    with _LOCK:
        if STOP_REQUESTED.is_set():
            return
        STOP_REQUESTED.set()
        waiting = list(_ON_STOP)
        _ON_STOP.clear()
    for callback in waiting:
        callback()


def on_stop(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` when this process is asked to stop (at once if it already was), from the thread that stops
    it; return what takes it back. A callback must be quick and thread-safe (e.g. loop.call_soon_threadsafe)."""
    with _LOCK:
        if not STOP_REQUESTED.is_set():
            _ON_STOP.append(callback)
            return lambda: _forget(callback)
    callback()
    return lambda: None


def _forget(callback: Callable[[], None]) -> None:
    with _LOCK:
        if callback in _ON_STOP:
            _ON_STOP.remove(callback)
