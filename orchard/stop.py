"""How a process of Orchard's stops on SIGTERM (Prefect cancelling, systemd, a container runtime) and SIGINT (Ctrl-C).

The first signal asks the process to stop (schemas.stopping): the model servers it started are stopped at once, so
the requests in flight end, and no request or task is retried; the signal then goes on as it would have (inside a
flow, SIGTERM is Prefect's: a run its worker cancels is recorded Cancelled, any other SIGTERM Crashed; RunStopped
elsewhere), so the flow and the blocks that started the servers unwind and stop them. Whatever still runs
STOP_DEADLINE_S after the first signal is killed and the process exits with 128 + the signal's number (143, 130),
the shell's "ended by a signal".

Nothing half-landed is published by a stop: a shard lands whole or not at all and a run publishes one lake snapshot
or none, so running the same run again resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from orchard.services import child_pids, stop_all_services, stop_model_servers
from schemas.stopping import set_stopping

STOP_DEADLINE_S = 12.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FIRST: list[int] = []
_FIRST_LOCK = threading.Lock()


class RunStopped(KeyboardInterrupt):
    """A signal asked the command to stop."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def code(self) -> int:
        return 128 + self.signum


def request_stop(signum: int, deadline_s: float = STOP_DEADLINE_S) -> None:
    """The first time: mark the process as stopping, stop its model servers (in a thread: a handler must not wait)
    and arm the deadline after which what is left is killed. Later calls do nothing."""
    with _FIRST_LOCK:
        if _FIRST:
            return
        _FIRST.append(signum)
    set_stopping()
    threading.Thread(target=stop_model_servers, name="orchard-stop-servers", daemon=True).start()
    threading.Thread(target=_deadline, args=(signum, deadline_s), name="orchard-stop-deadline", daemon=True).start()


def _deadline(signum: int, seconds: float) -> None:
    time.sleep(seconds)
    exit_now(128 + signum, f"stopped by {signal.Signals(signum).name}; what still ran {seconds:g} s later was killed")


def exit_now(code: int, why: str | None = None) -> None:
    """Kill what this process started that still runs (its servers; its worker processes, whose own workers die with
    them) and exit with `code` at once, without waiting for threads."""
    if why:
        print(f"orchard: {why}", file=sys.stderr)
    stop_all_services(grace_s=1.0)
    for pid in child_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def stop_on_signals(deadline_s: float = STOP_DEADLINE_S) -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM and SIGINT ask the process to stop and raise RunStopped.
    Elsewhere (a thread), nothing is installed."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        request_stop(signum, deadline_s)
        raise RunStopped(signum)

    with _handlers(handler):
        yield
    # Raised from a signal handler, RunStopped lands wherever the main thread was: in a finalizer (a socket closed by
    # the garbage collector), Python reports and drops it. The block then ends as if nothing happened: stop here.
    if received:
        raise RunStopped(received[0])


@contextlib.contextmanager
def stop_within(deadline_s: float = STOP_DEADLINE_S) -> Iterator[None]:
    """Inside a flow: the first SIGTERM or SIGINT asks the process to stop the moment it arrives, and the handlers
    stay as the flow set them. Prefect's SIGTERM bridge raises its TerminationSignal: a run its worker cancels is
    recorded Cancelled (the worker's cancel is acknowledged only while that bridge is the handler), any other SIGTERM
    Crashed; SIGINT raises what the handler outside does (RunStopped under stop_on_signals).

    The signal is seen through the interpreter's wakeup fd, which its C-level handler writes as the signal arrives,
    whatever the main thread is doing; a signal that arrived is acted on before the block is left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(reader, deadline_s), name="orchard-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(OSError):
            writer.send(b"\0")  # after any signal's byte: the watcher handles those, then ends
        watcher.join(timeout=2.0)
        reader.close()
        writer.close()


def _watch(reader: socket.socket, deadline_s: float) -> None:
    """Ask the process to stop for each SIGTERM or SIGINT byte the wakeup fd writes; end at a zero byte."""
    while True:
        try:
            received = reader.recv(64)
        except OSError:
            return
        for signum in received:
            if signum == 0:
                return
            if signum in SIGNALS:
                request_stop(signum, deadline_s)
        if not received:
            return


@contextlib.contextmanager
def _handlers(handler: Callable[[int, Any], None]) -> Iterator[None]:
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
