"""What the fault scenarios share: real servers that can be stopped and restarted, `orchard run` as a watched
subprocess with a TOML config, a fault-injecting HTTP proxy, and the checks made on a bucket and a lake.

One `Lab` holds one SeaweedFS and one llama.cpp server for every scenario of a session; each scenario gets its own
bucket, state directory and config, so scenarios do not see each other's data. Everything binds to 127.0.0.1 and
every process started here is stopped by `Lab.close()` (servers) or by the run that started it (orchard runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchard import lake, services  # noqa: E402
from orchard.config import Config, EngineConfig, ObjectStoreConfig, load_config  # noqa: E402
from orchard.services import Service, start_llama_server, start_seaweedfs  # noqa: E402
from orchard.store import ObjectStore, StoreError  # noqa: E402
from schemas.rows import SHARD_TABLES  # noqa: E402
from tasks.land import MANIFEST, VALIDATION, LandingError, read_shard_table  # noqa: E402

RUN_ID = "faults"
MODEL = "SmolLM2-135M-Instruct"
STORE = ObjectStoreConfig(bucket="faults-services", access_key_id="orchard", secret_access_key="orchard-faults-secret")
POLL_S = 0.02
# The id column of each shard table: count(*) must equal count(DISTINCT id).
ID_COLUMNS = {"instructions": "instruction_id", "nodes": "node_id", "pairs": "pair_id", "trees": "tree_id",
              "principle_examples": "example_id", "judgements": "judgement_id"}
GROWTH_MARK = re.compile(r"run \S+: \d+ shards of up to")  # the flow logs it as it submits the grow-shard tasks
PUBLISHED_MARK = "published as lake snapshot"
# Marks every process of one `orchard run`, so that any that outlive a killed process group can be found.
TAG_VAR = "ORCHARD_FAULTS_RUN"
# How long the servers of a run killed alone (SIGKILL of `orchard run`, not its group) may take to end by themselves:
# their parent-death signal is SIGTERM, and SeaweedFS shuts down in about 3 s.
ORPHAN_GRACE_S = 10.0

# The smallest run that still has several shards to corrupt or kill between: one instruction per shard, one
# turn, one sample per strategy, no MCTS, no jury (no open-ended seeds). Seconds of growth on 2 cores.
SMALL_RUN = """\
[run]
instructions_per_shard = 1
strategies = ["step_by_step", "plan_first"]
code_strategies = ["direct", "plan_in_comments"]
samples_per_strategy = 1
turns = 1
max_tokens = 48
mcts_iterations = 0
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 1

[orchestration]
verify_workers = 1

[[seeds]]
kind = "arithmetic"
count = 4
difficulty = 1
seed = 5
"""


# --- servers that can be stopped and started again ------------------------------------------------


@contextlib.contextmanager
def same_ports(ports: list[int]) -> Iterator[None]:
    """Make `orchard.services` draw `ports` instead of free ones: a restarted server keeps its endpoint."""
    pick = services.free_ports
    services.free_ports = lambda count: list(ports[:count])
    try:
        yield
    finally:
        services.free_ports = pick


class Restartable:
    """One server on its own state directory, stopped (or SIGKILLed) and started again on the same ports."""

    def __init__(self, name: str, start: Callable[[], Service], state_dir: Path) -> None:
        self.name = name
        self._start = start
        self.state_dir = state_dir
        self.service: Service | None = None
        self.ports: list[int] = []
        self.down_s: list[float] = []  # how long each outage lasted, from the stop to the server answering again
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.service.url

    def start(self) -> None:
        """Start the server; after the first start on the ports it had."""
        with self._lock:
            if self.service is not None and self.service.running:
                return
            pick = services.free_ports
            drawn: list[int] = []

            def record(count: int) -> list[int]:
                ports = list(self.ports[:count]) if self.ports else pick(count)
                drawn.extend(ports)
                return ports

            services.free_ports = record
            try:
                self.service = self._start()
            finally:
                services.free_ports = pick
            self.ports = self.ports or drawn

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL its process group at once with `kill`, as a crash would)."""
        with self._lock:
            if self.service is None:
                return
            if kill and self.service.running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.service.process.pid, signal.SIGKILL)
            self.service.stop()

    def outage(self, seconds: float, *, kill: bool = False) -> threading.Thread:
        """Stop the server now and start it again `seconds` later, from a thread; return that thread."""
        began = time.monotonic()
        self.stop(kill=kill)

        def come_back() -> None:
            time.sleep(seconds)
            self.start()
            self.down_s.append(round(time.monotonic() - began, 1))

        thread = threading.Thread(target=come_back, daemon=True, name=f"{self.name}-outage")
        thread.start()
        return thread


def clear_prompt_cache(model_url: str) -> None:
    """Leave an unrelated prompt in the model server's cache, as it is when an uninterrupted run starts.

    A llama.cpp server may answer a request whose prompt is still cached from an earlier request differently from
    the same request (same seed) evaluated afresh: a run that ended mid-way would change what the next grows.
    """
    response = httpx.post(f"{model_url}/v1/chat/completions", timeout=300.0, json={
        "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "seed": 0, "temperature": 0.0})
    response.raise_for_status()


# --- a PostgreSQL cluster of its own (a shared lake catalog) --------------------------------------


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth), stopped and started again on its data."""

    root: Path
    bin_dir: Path
    port: int
    user: str = "orchard"

    @classmethod
    def create(cls) -> "Postgres":
        initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdb:
            raise RuntimeError("PostgreSQL server binaries are not installed (`make postgres` installs them)")
        # Not under a private temp dir: the server runs as the `postgres` user when we are root.
        root = Path(tempfile.mkdtemp(prefix="orchard-faults-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(root, Path(initdb[-1]).parent, services.free_ports(1)[0])
        server._run("initdb", "-D", str(root / "data"), "-U", server.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        server.start()
        return server

    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*owner, str(self.bin_dir / binary), *args], check=check, capture_output=True, text=True)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=50"
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "start")

    def stop(self) -> None:
        """Stop at once (`-m immediate`: open transactions are cut off, as when the catalog host goes away)."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", check=False)

    def create_database(self) -> str:
        """Create an empty database; return the DuckLake catalog string that reaches it."""
        name = f"lake_{os.urandom(6).hex()}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgres:dbname={name} host=127.0.0.1 port={self.port} user={self.user}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- a fault-injecting HTTP proxy -------------------------------------------------------------------

# What a proxy does with one request: forward it, or answer with a fault.
FORWARD = "forward"
FAULTS = ("500", "400", "garbage", "drop")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server, answering some requests with a fault.

    `decide(method, path, body)` returns FORWARD or one of FAULTS: "500" (an internal server error), "400" (a bad
    request), "garbage" (200 with a body that is not JSON), "drop" (the connection closed, no answer). A request
    the upstream does not answer (it is down) is dropped the same way. Use as a context manager; `url` is its base.
    """

    def __init__(self, upstream: Callable[[], str], decide: Callable[[str, str, bytes], str] | None = None) -> None:
        self.upstream = upstream  # a callable: the upstream may move (a restarted store keeps its URL, though)
        self.decide = decide or (lambda method, path, body: FORWARD)
        self.answered: dict[str, int] = {}  # how many requests got each outcome
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy.decide(self.command, self.path, body)
                if action == FORWARD:
                    action = self._forward(body)
                else:
                    self._fault(action)
                with proxy._lock:
                    proxy.answered[action] = proxy.answered.get(action, 0) + 1

            def _fault(self, action: str) -> None:
                if action == "drop":
                    self.close_connection = True
                    return
                status, payload, kind = {
                    "500": (500, b'{"error": {"message": "injected internal error"}}', "application/json"),
                    "400": (400, b'{"error": {"message": "injected bad request"}}', "application/json"),
                    "garbage": (200, b"\x00<html>not json at all", "text/html"),
                }[action]
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes) -> str:
                target = urllib.parse.urlsplit(proxy.upstream())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                try:
                    upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
                    upstream.request(self.command, self.path, body=body if body or length_given(self) else None,
                                     headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                except OSError:
                    self.close_connection = True  # as a server that went away: no answer at all
                    return "down"
                self.send_response_only(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()
                return FORWARD

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        def length_given(handler: BaseHTTPRequestHandler) -> bool:
            return handler.headers.get("Content-Length") is not None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def body_share(body: bytes, share: float) -> bool:
    """Whether a request body falls in the chosen `share` of all bodies (by its hash: its retries fall there too)."""
    return int(hashlib.sha256(body).hexdigest()[:8], 16) < share * 2**32


# --- the lab: shared servers, and one target (bucket + state dir + config) per scenario --------------


@dataclass
class Target:
    """One `orchard run` set-up: its config file, state dir, bucket and config."""

    name: str
    config_path: Path
    cfg: Config

    @functools.cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.cfg.object_store)

    @property
    def catalog(self) -> Path:
        return Path(self.cfg.lake_catalog)


class Lab:
    """The servers every scenario of a session shares, and the baselines (clean runs) computed once.

    With `prefect_api`, one Prefect server too, which every `orchard run` of the lab reports to instead of starting
    a temporary one of its own (~10 s each on 2 cores): for scenarios whose faults are not in Prefect's path (a
    corrupt shard, a model's answer). Runs that are killed keep their own, as a user's runs do.
    """

    def __init__(self, work: Path, *, prefect_api: bool = False, model_threads: int = 0) -> None:
        self.work = work.resolve()
        self.prefect: Service | None = None
        self.api_url: str | None = None
        self._wants_api = prefect_api
        self.work.mkdir(parents=True, exist_ok=True)
        self.store_cfg = STORE
        self.seaweed = Restartable("seaweedfs", lambda: start_seaweedfs(STORE, self.work / "services"),
                                   self.work / "services")
        engine = EngineConfig(kind="embedded", model=MODEL, n_ctx=2048, threads=model_threads)  # 0: the default
        self.llama = Restartable("llama", lambda: start_llama_server(engine, self.work / "services"),
                                 self.work / "services")
        self.memo: dict[Any, Any] = {}  # what scenarios share: clean runs, a corruption episode's outcome
        self._postgres: Postgres | None = None
        self._names: set[str] = set()

    def open(self) -> "Lab":
        self.seaweed.start()
        self.store_cfg = dataclasses.replace(STORE, endpoint_url=self.seaweed.url)
        self.llama.start()
        if self._wants_api:
            from orchard.cluster import start_prefect_server

            (port,) = services.free_ports(1)
            self.prefect = start_prefect_server(self.work / "services", port)
            self.api_url = f"{self.prefect.url}/api"
        return self

    def close(self) -> None:
        if self._postgres is not None:
            self._postgres.remove()
            self._postgres = None
        if self.prefect is not None:
            self.prefect.stop()
            self.prefect = self.api_url = None
        self.llama.stop()
        self.seaweed.stop()

    def __enter__(self) -> "Lab":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def postgres(self) -> Postgres:
        if self._postgres is None:
            self._postgres = Postgres.create()
        return self._postgres

    def target(self, name: str, *, run_toml: str = SMALL_RUN, model_url: str | None = None,
               store_url: str | None = None, store_retries: int | None = None, catalog: str = "",
               engine_retries: int | None = None) -> Target:
        """Write `<work>/<name>/orchard.toml` for a fresh state dir and bucket that point at the lab's servers."""
        if name in self._names:
            raise ValueError(f"target {name!r} made twice in one lab")
        self._names.add(name)
        state = self.work / name
        if state.exists():
            shutil.rmtree(state)  # a work dir used before: start clean
        state.mkdir(parents=True)
        bucket = f"faults-{re.sub(r'[^a-z0-9-]', '-', name.lower())}"[:63]
        engine_extra = f"retries = {engine_retries}\n" if engine_retries is not None else ""
        store_extra = f"retries = {store_retries}\n" if store_retries is not None else ""
        lake_table = f"\n[lake]\ncatalog = {json.dumps(catalog)}\n" if catalog else ""
        text = f"""state_dir = {json.dumps(str(state))}

{run_toml}
[engines.embedded]
kind = "openai"
model = "{MODEL}"
base_urls = [{json.dumps(model_url or self.llama.url)}]
structured_output = "json_object"
{engine_extra}
[object_store]
endpoint_url = {json.dumps(store_url or self.store_cfg.endpoint_url)}
bucket = {json.dumps(bucket)}
access_key_id = {json.dumps(self.store_cfg.access_key_id)}
secret_access_key = {json.dumps(self.store_cfg.secret_access_key)}
{store_extra}{lake_table}"""
        path = state / "orchard.toml"
        path.write_text(text)
        target = Target(name=name, config_path=path, cfg=load_config(path, environ={}))
        # Straight to the store, not through a proxy that may be faulting: the bucket exists before the run.
        ObjectStore(dataclasses.replace(target.cfg.object_store, endpoint_url=self.store_cfg.endpoint_url)).ensure_bucket()
        return target

    def planned(self, target: Target) -> list[str]:
        """The shard ids the target's config plans (deterministic from the seeds, the hygiene gate and the config
        hash; the lab's runs each have a lake of their own, so nothing another run published counts)."""
        from tasks.seeds import plan_seeds

        return [p.shard_id for p in plan_seeds(target.cfg, "planned").plans]

    def run(self, target: Target, log_name: str, **options: Any) -> "Attempt":
        """`run_orchard` (reporting to the lab's Prefect server, if it has one, unless it will be killed), after
        leaving the model server's prompt cache as a fresh start has it."""
        if self.llama.service is not None and self.llama.service.running:
            clear_prompt_cache(self.llama.url)
        if options.get("kill_when") is None:
            options.setdefault("api_url", self.api_url)
        return run_orchard(target, log_name, **options)


# --- one `orchard run`, watched ----------------------------------------------------------------------


@dataclass
class Watch:
    """What one `orchard run` has done so far, read from its log, its bucket and its state dir."""

    started: float
    run_id: str
    events: dict[str, float] = field(default_factory=dict)  # first time seen, seconds after start
    landed: set[str] = field(default_factory=set)  # shards with a manifest
    landing: dict[str, int] = field(default_factory=dict)  # shards with objects but no manifest yet: how many
    log_text: str = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def mark(self, event: str) -> None:
        self.events.setdefault(event, round(self.elapsed(), 2))


@dataclass
class Attempt:
    """How one `orchard run` ended: exit code (None if killed), wall time, what it had done, its log."""

    code: int | None
    wall_s: float
    watch: Watch
    log_path: Path
    stragglers: list[str] = field(default_factory=list)

    def summary_line(self, prefix: str) -> str:
        """The line of the printed run summary that starts with `prefix` (empty if absent)."""
        for line in self.watch.log_text.splitlines():
            if line.strip().startswith(prefix):
                return line.strip()
        return ""

    def error_line(self) -> str:
        """The CLI's one-line error, or the last line that names an error."""
        lines = [line.strip() for line in self.watch.log_text.splitlines()
                 if line.startswith("orchard: error:") or "Error" in line]
        return lines[-1][:200] if lines else ""

    @property
    def status(self) -> str:
        """The status the run printed (`run <id>: complete`), or '' if it printed none."""
        found = re.findall(rf"run {re.escape(self.watch.run_id)}: (complete|partial|failed)\b", self.watch.log_text)
        return found[-1] if found else ""

    def brief(self) -> str:
        return f"rc {self.code} ({self.status or 'no summary'}, {self.wall_s:.0f} s)"


def run_orchard(target: Target, log_name: str, *, run_id: str = RUN_ID, kill_when: Callable[[Watch], bool] | None = None,
                kill_group: bool = True, signal_when: Callable[[Watch], bool] | None = None,
                stop_signal: signal.Signals = signal.SIGTERM, signal_group: bool = False,
                act: Callable[[Watch], None] | None = None, timeout_s: float = 900.0,
                poll_s: Callable[[Watch], float] = lambda watch: POLL_S, store: ObjectStore | None = None,
                api_url: str | None = None) -> Attempt:
    """Run `python -m flows.cli --config … run --run-id …`; SIGKILL its process group (`kill_group`, else the
    `orchard run` process alone: what it started must then end by itself, within ORPHAN_GRACE_S) once `kill_when`
    says so; send `stop_signal` to it (or, `signal_group`, to its group, as a terminal's Ctrl-C does) once
    `signal_when` says so, and let it stop (the event "signalled" marks when).
    With `api_url`, the run reports to that Prefect API; without, it starts one of its own.

    `act(watch)` is called after every look at the run (a scenario's fault, timed by what the run has done);
    `store` is what the bucket is watched through (default: the target's own, without retries; pass a direct one
    when the target's endpoint is a faulting proxy).
    """
    # Nothing of this process's Prefect or Orchard environment may leak into the run: it finds its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHARD"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env[TAG_VAR] = f"{target.name}:{log_name}:{os.getpid()}"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    argv = [sys.executable, "-m", "flows.cli", "--config", str(target.config_path), "run", "--run-id", run_id]
    log_path = target.config_path.parent / log_name
    watch = Watch(started=time.monotonic(), run_id=run_id)
    # Watched without retries: a poll while a scenario has the store down must not stall the watch for 30 s.
    store = store or ObjectStore(dataclasses.replace(target.cfg.object_store, retries=0))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO, start_new_session=True)
    reader = open(log_path, errors="replace")
    try:
        while process.poll() is None:
            _poll(target, store, watch, reader)
            if act is not None:
                act(watch)
            if signal_when is not None and "signalled" not in watch.events and signal_when(watch):
                (os.killpg if signal_group else os.kill)(process.pid, stop_signal)
                watch.mark("signalled")
            if kill_when is not None and kill_when(watch):
                (os.killpg if kill_group else os.kill)(process.pid, signal.SIGKILL)
                process.wait()
                wall = watch.elapsed()
                stragglers = kill_stragglers(env[TAG_VAR], grace_s=0.0 if kill_group else ORPHAN_GRACE_S)
                _poll(target, store, watch, reader)  # what the killed run left behind
                return Attempt(None, wall, watch, log_path, stragglers)
            if watch.elapsed() > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kill_stragglers(env[TAG_VAR])
                raise RuntimeError(f"{target.name}: orchard run did not finish in {timeout_s:.0f} s; log {log_path}")
            time.sleep(poll_s(watch))
        watch.mark("exit")
        with contextlib.suppress(StoreError):
            _poll(target, store, watch, reader)
        # A run that exits has stopped what it started (a stopped one too): anything left is a straggler.
        return Attempt(process.returncode, watch.elapsed(), watch, log_path,
                       kill_stragglers(env[TAG_VAR], grace_s=1.0 if "signalled" in watch.events else 0.0))
    except BaseException:
        # Interrupted (Ctrl-C, a scenario's error): the run started here must not outlive the suite.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kill_stragglers(env[TAG_VAR])
        raise
    finally:
        reader.close()


def _poll(target: Target, store: ObjectStore, watch: Watch, reader) -> None:
    """Bring `watch` up to date: new log lines, the shards in the bucket, the lake catalog file."""
    new = reader.read()
    if new:
        recent = watch.log_text[-200:] + new  # a line may arrive in two reads
        watch.log_text += new
        if GROWTH_MARK.search(recent):
            watch.mark("growth")
        if PUBLISHED_MARK in recent:
            watch.mark("published")
    if target.catalog.exists():
        watch.mark("lake")
    shards: dict[str, set[str]] = {}
    prefix = f"runs/{watch.run_id}/shards/"
    try:
        keys = store.list_keys(prefix)
    except StoreError:
        return  # the store is down (a scenario stopped it): nothing new to see
    for key in keys:
        shard, _, name = key[len(prefix):].partition("/")
        shards.setdefault(shard, set()).add(name)
    landed = {s for s, names in shards.items() if MANIFEST in names}
    for shard in landed - watch.landed:
        watch.mark(f"landed:{shard}")
    watch.landed = landed
    watch.landing = {s: len(names) for s, names in shards.items() if s not in landed}
    if watch.landing:
        watch.mark("landing")
    # Materialise writes the lake's data files into the bucket inside its transaction, before COMMIT.
    if "lake data" not in watch.events and ("lake" in watch.events or not str(target.catalog).endswith(".ducklake")):
        with contextlib.suppress(StoreError):
            if store.list_keys("lake/"):
                watch.mark("lake data")


def kill_stragglers(tag: str, *, grace_s: float = 0.0) -> list[str]:
    """SIGKILL, by pid, any process of a run (found by its tag variable) that outlived it, after giving them `grace_s`
    to end on their own (a server whose parent died gets SIGTERM and shuts down); return what they were."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _tagged(tag):
        time.sleep(0.25)
    found = []
    needle = f"{TAG_VAR}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(f"{entry.name} {command[:80]}")
    return found


def _tagged(tag: str) -> list[int]:
    """The live (not zombie) processes carrying `tag`."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


# --- what a run left in the bucket and the lake, and the checks on it -------------------------------------


def bucket_facts(store: ObjectStore, run_id: str, planned: list[str]) -> dict:
    """Per planned shard: manifests, orphan objects, intact files; quarantined and unplanned prefixes."""
    keys = store.list_keys(f"runs/{run_id}/")
    shard_keys: dict[str, list[str]] = {}
    quarantined: dict[str, list[str]] = {}
    strays = []
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 5 and parts[2] == "shards":
            shard_keys.setdefault(parts[3], []).append(key)
        elif len(parts) >= 5 and parts[2] == "quarantine":
            quarantined.setdefault(parts[3], []).append(key)
        elif len(parts) == 4 and parts[2] == "plans":
            continue  # the run's plan: what every attempt of it grows
        else:
            strays.append(key)
    manifests, orphans, broken = {}, [], []
    for shard in planned:
        found = shard_keys.get(shard, [])
        manifest_key = f"runs/{run_id}/shards/{shard}/{MANIFEST}"
        if manifest_key not in found:
            orphans += found
            continue
        try:
            manifest = store.get_json(manifest_key)
        except (StoreError, ValueError) as exc:
            broken.append(f"{manifest_key}: {exc}")
            continue
        manifests[shard] = manifest
        named = {manifest_key, f"runs/{run_id}/shards/{shard}/{VALIDATION}",  # what its check found, beside it
                 *(entry.get("key") for entry in (manifest.get("files") or {}).values())}
        orphans += [key for key in found if key not in named]
        if manifest.get("run_id") != run_id or manifest.get("shard_id") != shard:
            broken.append(f"{manifest_key}: manifest of run {manifest.get('run_id')!r}, shard {manifest.get('shard_id')!r}")
        for table in SHARD_TABLES:
            try:
                read_shard_table(store, manifest, table)  # size, sha256 and row count as the manifest says
            except (LandingError, StoreError) as exc:
                broken.append(str(exc))
            except Exception as exc:  # pyarrow's own errors for an unreadable file: that is what is reported
                broken.append(f"{manifest_key} {table}: {type(exc).__name__}: {exc}")
    unplanned = sorted(set(shard_keys) - set(planned))
    return {"manifests": manifests, "orphans": orphans, "broken": broken, "quarantined": quarantined,
            "unplanned": unplanned, "strays": strays}


def lake_facts(cfg: Config, run_id: str) -> dict:
    """The run's rows in the newest snapshot: counts, distinct ids, rows per shard, runs rows, node text digest."""
    facts: dict = {"rows": {}, "distinct": {}, "per_shard": {}}
    with lake.connect(cfg, read_only=True) as con:
        for table, column in ID_COLUMNS.items():
            rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT {column}) FROM {table} WHERE run_id = ?",
                                         [run_id]).fetchone()
            facts["rows"][table], facts["distinct"][table] = rows, distinct
        for table in SHARD_TABLES:  # rows per shard (a run's own drops, before shards, have none: left out)
            facts["per_shard"][table] = dict(con.execute(
                f"SELECT shard_id, count(*) FROM {table} WHERE run_id = ? AND shard_id IS NOT NULL GROUP BY 1",
                [run_id]).fetchall())
        cursor = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        columns = [c[0] for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
        facts["runs"] = [(r["status"], r["snapshot_id"], r) for r in rows]
        facts["digest"] = con.execute(
            "SELECT md5(string_agg(node_id || ':' || coalesce(text, ''), '|' ORDER BY node_id)) FROM nodes "
            "WHERE run_id = ?", [run_id]).fetchone()[0]
        facts["snapshots"] = [(s["snapshot_id"], s["commit_message"]) for s in lake.snapshot_rows(con)]
    facts["summary"] = _run_summary(facts["runs"][-1][2]) if facts["runs"] else None
    return facts


def _run_summary(row: dict) -> dict:
    """The run's `runs` row as one dict: its columns, and its `summary` JSON (fates, requests, …) merged in."""
    merged = {k: v for k, v in row.items() if k != "summary"}
    try:
        merged.update(json.loads(row.get("summary") or "{}"))
    except (TypeError, ValueError):
        pass
    fates = merged.get("fates") or []
    merged.setdefault("shards_reused", sum(f.get("fate") == "reused" for f in fates))
    return merged


def shard_rows_at(cfg: Config, run_id: str, version: int) -> dict[str, dict[str, int]]:
    """Rows of `run_id` per shard in each shard table as of lake snapshot `version` (tables not yet made: none)."""
    with lake.connect(cfg, version=version) as con:
        tables = {row[0] for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [lake.LAKE]).fetchall()}
        return {table: dict(con.execute(f"SELECT shard_id, count(*) FROM {table} WHERE run_id = ? AND shard_id IS NOT "
                                        "NULL GROUP BY 1", [run_id]).fetchall()) if table in tables else {}
                for table in SHARD_TABLES}


def counts_of(facts: dict, shards: int) -> dict[str, int]:
    """The counts a run is compared by: shards, rows per table and distinct ids."""
    counts = {"shards": shards, **facts["rows"]}
    counts.update({f"distinct {ID_COLUMNS[t]}": n for t, n in facts["distinct"].items()})
    return counts


# The counts the plan fixes: a shard grown twice from the same plan has the same instructions and trees, but not the
# same nodes, pairs or verdicts. The embedded llama-server (like vLLM) answers a seeded request with different text
# when its prompt came from the prefix cache or shared a batch with other slots (llama.cpp's server docs on
# cache_prompt; ggml-org/llama.cpp#7052, #18776): growth is not bit-for-bit repeatable, so a regrown shard is checked
# against its own manifest (every row once, in the lake as landed), and against a clean run only by what the plan fixes.
PLAN_COUNTS = ("shards", "instructions", "trees", "distinct instruction_id", "distinct tree_id")


def plan_counts(counts: dict[str, int]) -> dict[str, int]:
    """The part of a run's counts that the plan fixes (PLAN_COUNTS)."""
    return {k: v for k, v in counts.items() if k in PLAN_COUNTS}


@dataclass
class Check:
    """A finished run's bucket and lake, checked: the failed checks (empty: all passed) and what was seen."""

    failed: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    bucket: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        return self.facts.get("summary") or {}

    def fate(self, shard: str) -> dict:
        """The shard's entry in the run summary's `fates` (empty when the summary has none)."""
        return next((f for f in self.summary.get("fates") or () if f.get("shard_id") == shard), {})


def check_complete(target: Target, attempt: Attempt, planned: list[str], baseline: dict[str, int] | None, *,
                   run_id: str = RUN_ID, quarantined: set[str] = frozenset()) -> Check:
    """Check a run that should have completed: exit 0; every planned shard landed once, intact, its rows in the lake
    once; no snapshot holds part of a shard; one `complete` runs row; the counts `baseline` names are equal;
    quarantine holds exactly the shards in `quarantined`."""
    failed = []
    if attempt.code != 0:
        failed.append(f"exit status {attempt.code}: {attempt.error_line() or 'no error line'} (log {attempt.log_path})")
    return _check_state(target, planned, baseline, failed, run_id=run_id, quarantined=quarantined, complete=True)


def check_state(target: Target, planned: list[str], *, run_id: str = RUN_ID, quarantined: set[str] = frozenset()) -> Check:
    """Check what a run that did not complete left: landed shards intact, lake rows none or all per shard and
    snapshot, no duplicate ids (no claim about status or counts)."""
    return _check_state(target, planned, None, [], run_id=run_id, quarantined=quarantined, complete=False)


def _check_state(target: Target, planned: list[str], baseline: dict[str, int] | None, failed: list[str], *,
                 run_id: str, quarantined: set[str], complete: bool) -> Check:
    cfg = target.cfg
    if str(target.catalog).endswith(".ducklake") and not target.catalog.exists():
        return Check(failed + ["no lake catalog"] if complete else failed)
    try:
        bucket = bucket_facts(target.store, run_id, planned)
        facts = lake_facts(cfg, run_id)
    except (lake.LakeError, StoreError, LandingError, duckdb.Error) as exc:
        return Check(failed + [f"checks cannot read the run: {type(exc).__name__}: {str(exc).splitlines()[0]}"])
    missing = sorted(set(planned) - set(bucket["manifests"]))
    if missing and complete:
        failed.append(f"shards without manifest: {missing}")
    for what in ("broken", "unplanned", "strays") + (("orphans",) if complete else ()):
        if bucket[what]:
            failed.append(f"{what}: {bucket[what][:3]}")
    if set(bucket["quarantined"]) != set(quarantined):
        failed.append(f"quarantined {sorted(bucket['quarantined'])}, expected {sorted(quarantined)}")
    published = set().union(*(set(p) for p in facts["per_shard"].values()))
    for shard in published:
        manifest = bucket["manifests"].get(shard)
        if manifest is None:
            failed.append(f"lake rows of shard {shard}, which has no landed manifest")
            continue
        for table in SHARD_TABLES:
            in_lake = facts["per_shard"][table].get(shard, 0)
            if in_lake != manifest["files"][table]["rows"]:
                failed.append(f"shard {shard} {table}: {in_lake} rows in the lake, manifest says "
                              f"{manifest['files'][table]['rows']}")
    if complete and set(bucket["manifests"]) - published:
        failed.append(f"landed, not in the lake: {sorted(set(bucket['manifests']) - published)}")
    for table, column in ID_COLUMNS.items():
        if facts["rows"][table] != facts["distinct"][table]:
            failed.append(f"{table}: {facts['rows'][table]} rows, {facts['distinct'][table]} distinct {column}")
    if len(facts["runs"]) > 1 or (complete and (not facts["runs"] or facts["runs"][0][0] != "complete")):
        failed.append(f"runs rows for {run_id}: {[r[:2] for r in facts['runs']]}")
    final = facts["per_shard"]
    for snapshot_id, _ in facts["snapshots"]:
        at = shard_rows_at(cfg, run_id, snapshot_id)
        for table in SHARD_TABLES:
            partial = {s: n for s, n in at[table].items() if n != final[table].get(s, 0)}
            if partial:
                failed.append(f"snapshot {snapshot_id} holds part of a shard: {table} {partial} of "
                              f"{ {s: final[table].get(s, 0) for s in partial} }")
                break
    counts = counts_of(facts, len(bucket["manifests"]))
    if baseline is not None:  # only the counts `baseline` names: a clean run's plan_counts, or a whole earlier run's
        differ = {k: (counts.get(k), v) for k, v in baseline.items() if counts.get(k) != v}
        if differ:
            failed.append(f"counts differ from the expected (got, expected): {differ}")
    return Check(failed, counts, facts, bucket)


@dataclass(frozen=True)
class Baseline:
    """A clean run of a config: its planned shards, counts and node texts, what a faulted run is compared with."""

    target: Target
    planned: list[str]
    counts: dict[str, int]
    digest: str
    attempt: Attempt

    @property
    def plan_counts(self) -> dict[str, int]:
        """What a run of the same plan must match (PLAN_COUNTS): its grown rows may differ."""
        return plan_counts(self.counts)


def clean_run(lab: Lab, name: str = "clean", run_toml: str = SMALL_RUN, run_id: str = RUN_ID) -> Baseline:
    """Run `run_toml` uninterrupted once per lab (memoised); fail loudly if even that does not pass the checks."""
    key = ("clean", run_toml, run_id)
    if key not in lab.memo:
        target = lab.target(f"{name}-{len([k for k in lab.memo if k[0] == 'clean'])}", run_toml=run_toml)
        planned = lab.planned(target)
        attempt = lab.run(target, "run.log", run_id=run_id)
        check = check_complete(target, attempt, planned, None, run_id=run_id)
        if check.failed:
            raise RuntimeError(f"a clean run fails its checks: {check.failed}")
        lab.memo[key] = Baseline(target, planned, check.counts, check.facts["digest"], attempt)
    return lab.memo[key]


def counts_text(counts: dict[str, int]) -> str:
    return f"{counts.get('shards', '?')} shards, {counts.get('nodes', '?')} nodes, {counts.get('pairs', '?')} pairs"
