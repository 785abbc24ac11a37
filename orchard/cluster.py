"""`orchard up`, `down`, `status`: a Prefect server with its UI, the store, the work pools, the deployments of
deployments/prefect.yaml, and process workers (one CPU worker for nightly, GPU workers for grow-shard, each with
its own model servers), all on 127.0.0.1 and all recorded in `<state_dir>/up.json` so `down` stops them.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from orchard.config import Config, ConfigError
from orchard.llama_build import cache_root
from orchard.services import (
    HOST,
    STOP_GRACE_S,
    Service,
    _launch,
    _NotReady,
    _slug,
    _wait_healthy,
    free_ports,
    keep_running,
    outliving,
    start_llama_server,
    start_seaweedfs,
    start_time,
)
from schemas.errors import OrchardError
from schemas.stopping import stop_requested

UP_FILE = "up.json"
API_STARTUP_TIMEOUT_S = 120.0  # Prefect's server migrates its database and builds the UI on first start
DEPLOY_TIMEOUT_S = 300.0
REPO_ROOT = Path(__file__).resolve().parent.parent  # deployments/prefect.yaml's entrypoints are relative to it


class ClusterError(OrchardError):
    """`orchard up` could not bring a part up, or `down`/`status` found the record unreadable."""


@dataclass(frozen=True)
class Process:
    """A server or worker `up` started: enough to find it again from another process."""

    name: str
    pid: int
    started: str  # the process's start time in clock ticks (/proc/<pid>/stat), so a reused pid is not taken for it
    url: str
    log: str
    leftovers: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return start_time(self.pid) == self.started




def _record(service: Service) -> Process:
    keep_running(service)  # it outlives this command: `orchard down` stops it
    return Process(service.name, service.process.pid, start_time(service.process.pid) or "", service.url,
                   str(service.log_path), tuple(service.leftovers))


def up_file(cfg: Config) -> Path:
    return cfg.state_path / UP_FILE


def read_up(cfg: Config) -> dict[str, Any] | None:
    """Return what `orchard up` recorded in this state directory, or None if nothing is up."""
    path = up_file(cfg)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path}: unreadable record of `orchard up` ({exc}); stop its processes by hand") from None
    record["processes"] = [Process(**{**p, "leftovers": tuple(p.get("leftovers", ()))}) for p in record["processes"]]
    return record


def joined(cfg: Config) -> tuple[Config, str | None]:
    """Return `cfg` using the store `orchard up` runs for this state directory (a second SeaweedFS must not open
    the same data), and the API URL of its Prefect server; as they are, and None, when nothing is up."""
    record = read_up(cfg)
    if record is None:
        return cfg, None
    running = {p.name: p for p in record["processes"] if p.running}
    if not cfg.object_store.endpoint_url and "seaweedfs" in running:
        cfg = cfg.replace(object_store=dataclasses.replace(cfg.object_store, endpoint_url=running["seaweedfs"].url))
    return cfg, record["api_url"] if "prefect-server" in running else None


def up(cfg: Config, config_path: Path | None, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything and deploy; return the record written to up.json. On any failure stop what was started.
    What it starts outlives this command (`orchard down` stops it): no parent-death signal, no pid records."""
    with outliving():
        return _up(cfg, config_path, say=say)


def _up(cfg: Config, config_path: Path | None, *, say: Callable[[str], None]) -> dict[str, Any]:
    record = read_up(cfg)
    if record is not None and any(p.running for p in record["processes"]):
        raise ClusterError(f"already up ({up_file(cfg)}): `orchard down` first")
    orch = cfg.orchestration
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"{config_path}: no such config file")
    started: list[Process] = []
    try:
        server = _record(start_prefect_server(cfg.state_path, orch.api_port))
        started.append(server)
        api = f"{server.url}/api"
        say(f"prefect server: {server.url} (log {server.log})")
        views = _record(start_view_server(cfg.state_path, orch.view_port))
        started.append(views)
        say(f"run views: {views.url} (log {views.log})")
        env = {
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(cfg.state_path / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": str(orch.worker_poll_s),
            "ORCHARD__STATE_DIR": json.dumps(str(cfg.state_path)),
        }
        if config_path is not None:  # a scheduled nightly run has no command line: its worker loads this file
            env["ORCHARD_CONFIG"] = str(Path(config_path).resolve())
        if not cfg.object_store.endpoint_url:
            store = _record(start_seaweedfs(cfg.object_store, cfg.state_path))
            started.append(store)
            env["ORCHARD__OBJECT_STORE__ENDPOINT_URL"] = json.dumps(store.url)
            say(f"object store: {store.url} (SeaweedFS, bucket {cfg.object_store.bucket})")
        gpu_limits = {f"{orch.gpu_pool}-{i}": 1 for i in range(orch.gpu_workers)}
        create_pools_and_limits(api, (orch.cpu_pool, orch.gpu_pool), gpu_limits)
        create_crash_automation(api, orch.crashed_after_s)
        deploy(api, cfg.state_path, env)
        say("deployed: nightly (cron, pool %s), grow-shard (pool %s)" % (orch.cpu_pool, orch.gpu_pool))
        # The CPU worker runs nightly, which dispatches every shard to the GPU pool (or grows them itself when
        # there are no GPU workers to dispatch to).
        grow = "deployment" if orch.gpu_workers else "inline"
        workers = [(start_worker(cfg.state_path, orch.cpu_pool, "cpu-0", {
            **env, "ORCHARD__ORCHESTRATION__GROW": json.dumps(grow)}), orch.cpu_pool, "cpu-0")]
        started.append(_record(workers[-1][0]))
        # The embedded model servers started here share this host's cores: each gets its share of its engine's
        # threads. Two servers of 2 threads on 2 cores (gpu_workers = 2 on a CPU host) grew a shard at 4-10 tokens/s
        # each, where one alone grew it at 15-21 (tests/test_cluster.py's cluster, worker logs).
        servers = orch.gpu_workers * sum(engine.kind == "embedded" for engine in cfg.engines.values())
        cores = max(1, (os.cpu_count() or 1) // max(1, servers))
        for i, limit in enumerate(gpu_limits):
            worker_env = {**env, "ORCHARD__ORCHESTRATION__GPU_LIMIT": json.dumps(limit)}
            for engine_name, engine in cfg.engines.items():
                if engine.kind != "embedded":
                    continue  # served elsewhere, or launched by the worker for each shard
                shared = dataclasses.replace(engine, threads=min(engine.threads, cores))
                model = _record(start_llama_server(shared, cfg.state_path, name=f"llama-gpu-{i}-{_slug(engine_name)}"))
                started.append(model)
                key = f"ORCHARD__ENGINES__{engine_name.upper()}__"
                worker_env |= {key + "KIND": '"openai"', key + "BASE_URLS": json.dumps([model.url]),
                               key + "STRUCTURED_OUTPUT": json.dumps(engine.response_format)}
            # Besides the GPU limit, the worker itself takes one shard at a time: it never claims a run it must park.
            workers.append((start_worker(cfg.state_path, orch.gpu_pool, f"gpu-{i}", worker_env, limit=1),
                            orch.gpu_pool, f"gpu-{i}"))
            started.append(_record(workers[-1][0]))
        for worker, pool, name in workers:  # started side by side: one wait for all
            wait_started(worker, pool, name)
        record = {"api_url": api, "ui_url": server.url, "views_url": views.url, "config": env.get("ORCHARD_CONFIG"),
                  "processes": [p.__dict__ for p in started]}
        up_file(cfg).write_text(json.dumps(record, indent=2))
        say(f"workers: {orch.cpu_pool} × 1, {orch.gpu_pool} × {orch.gpu_workers}")
        return read_up(cfg)  # type: ignore[return-value]
    except BaseException:
        stop_processes(started)
        raise


def down(cfg: Config, *, say: Callable[[str], None] = print) -> int:
    """Stop what `orchard up` started here (workers first, the API last); return how many processes were stopped."""
    record = read_up(cfg)
    if record is None:
        say(f"nothing is up in {cfg.state_path}")
        return 0
    stopped = stop_processes(record["processes"], say=say)
    up_file(cfg).unlink(missing_ok=True)
    return stopped


# A process asked to stop (orchard/stop.py) gives what it stops this long each, so that `up` undoing a half start or
# `down` ends within the stop's deadline whatever it stops; a stop that ignores SIGTERM is killed.
STOPPING_GRACE_S = 1.0


def stop_processes(processes: list[Process], *, say: Callable[[str], None] = lambda _: None) -> int:
    """Stop each process's group, last started first: SIGTERM, then SIGKILL after a grace period (STOP_GRACE_S, or
    STOPPING_GRACE_S once this process is asked to stop)."""
    stopped = 0
    for process in reversed(processes):
        if not process.running:
            continue
        _signal(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + (STOPPING_GRACE_S if stop_requested() else STOP_GRACE_S)
        while process.running and time.monotonic() < deadline:
            time.sleep(0.1 if stop_requested() else 0.2)
        _signal(process.pid, signal.SIGKILL)  # whatever is left of its group
        for pattern in process.leftovers:
            for path in Path("/").glob(pattern.lstrip("/")):
                path.unlink(missing_ok=True)
        stopped += 1
        say(f"stopped {process.name} (pid {process.pid})")
    return stopped


def _signal(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return


def status(cfg: Config) -> dict[str, Any]:
    """Return what runs: each recorded process (running, answering) and, from the API, pools, workers, deployments and
    the latest flow runs."""
    record = read_up(cfg)
    if record is None:
        return {"up": False, "processes": [], "api": None}
    processes = [{"name": p.name, "pid": p.pid, "url": p.url, "running": p.running, "log": p.log}
                 for p in record["processes"]]
    api = None
    if any(p["name"] == "prefect-server" and p["running"] for p in processes):
        api = prefect_overview(record["api_url"])
    return {"up": all(p["running"] for p in processes), "ui_url": record["ui_url"], "processes": processes, "api": api}


def status_text(report: dict[str, Any]) -> str:
    """Return `orchard status` as lines a person reads."""
    if not report["processes"]:
        return "nothing is up (orchard up starts it)"
    lines = [f"UI: {report['ui_url']}"]
    for p in report["processes"]:
        lines.append(f"  {'running' if p['running'] else 'STOPPED':8} {p['name']:<28} pid {p['pid']:<8} {p['url']}")
    api = report["api"]
    if api is None:
        lines.append("  the Prefect API does not answer")
        return "\n".join(lines)
    for pool in api["pools"]:
        workers = ", ".join(f"{w['name']} ({w['status']})" for w in pool["workers"]) or "no workers"
        lines.append(f"  pool {pool['name']} ({pool['status']}): {workers}")
    for d in api["deployments"]:
        lines.append(f"  deployment {d['name']}: pool {d['pool']}, schedule {d['schedule'] or 'none'}")
    for run in api["flow_runs"]:
        lines.append(f"  flow run {run['name']} ({run['flow']}): {run['state']}")
    return "\n".join(lines)


# --- the parts ---------------------------------------------------------------------------------


def start_prefect_server(state_dir: Path, port: int) -> Service:
    """Start `prefect server start` (API and UI) on 127.0.0.1:`port`, its database in `<state_dir>/prefect`."""
    url = f"http://{HOST}:{port}"
    argv = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", HOST, "--port", str(port)]
    return _start_prefect("prefect-server", argv, state_dir, url, {"PREFECT_UI_API_URL": f"{url}/api"})


def start_view_server(state_dir: Path, port: int) -> Service:
    """Serve the runs' views (`<state_dir>/views`, tasks/view.py writes them) as static files on 127.0.0.1:`port` (0: a
    free port); return once it answers."""
    views = state_dir / "views"
    views.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    url = f"http://{HOST}:{port}"
    argv = [sys.executable, "-m", "http.server", "--bind", HOST, "--directory", str(views), str(port)]
    service = _launch("views", argv, state_dir, url=url)

    def answers() -> None:
        response = httpx.get(f"{url}/", timeout=2.0)
        if response.status_code != 200:
            raise _NotReady(f"GET / answered {response.status_code}")

    _wait_healthy(service, answers, 30.0)
    return service


def start_prefect_api(state_dir: Path, *, wait: bool = True) -> Service:
    """Start Prefect's API alone (no UI) on a free port of 127.0.0.1, its database in `<state_dir>/prefect`: the server
    Prefect would start itself for `orchard run` (its ephemeral server, the same uvicorn command), started as Orchard
    starts its other servers, so that it dies with the run however the run dies and a stale one is reaped.

    Returns once it answers; with `wait` False, at once (its seconds of imports overlap what the caller starts next),
    and `wait_prefect` waits for it."""
    import importlib.util

    (port,) = free_ports(1)
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.submodule_search_locations
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.submodule_search_locations[0]).parent),
            "--factory", "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    return _start_prefect("prefect-api", argv, state_dir, f"http://{HOST}:{port}",
                          {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
                          wait=wait)


def _start_prefect(name: str, argv: list[str], state_dir: Path, url: str, extra_env: dict[str, str], *,
                   wait: bool = True) -> Service:
    """Run a Prefect server command with its database in `<state_dir>/prefect`; return once GET /api/health answers
    (`wait`), else at once."""
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra_env}
    env.pop("PREFECT_API_URL", None)
    prefect_database(home, env)
    service = _launch(name, argv, state_dir, env=env, url=url)
    if wait:
        wait_prefect(service)
    return service


def wait_prefect(service: Service) -> None:
    """Return once the Prefect server `service` answers GET /api/health; stop it and raise if it never does."""

    def healthy() -> None:
        response = httpx.get(f"{service.url}/api/health", timeout=2.0)
        if response.status_code != 200:
            raise _NotReady(f"GET /api/health answered {response.status_code}")

    _wait_healthy(service, healthy, API_STARTUP_TIMEOUT_S)


# Prefect's settings that put its database elsewhere than `$PREFECT_HOME/prefect.db` (a Postgres server, say).
DATABASE_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
DATABASE_FILE = "prefect.db"  # Prefect's default SQLite database, in $PREFECT_HOME


def prefect_database(home: Path, env: Mapping[str, str]) -> None:
    """Give the Prefect home `home` a migrated database if it has none: a copy of this machine's empty one for this
    Prefect version (`prefect_template`). A fresh database's migrations take Prefect's server 8-10 s of CPU on every
    first start (each run of a new state dir: the first `make run`, the tests', the benches'); a copy takes
    milliseconds. Nothing is copied where `env` puts Prefect's database elsewhere."""
    database = home / DATABASE_FILE
    if database.exists() or any(env.get(name) for name in DATABASE_SETTINGS):
        return
    partial = database.with_name(f".{DATABASE_FILE}.{os.getpid()}")
    shutil.copyfile(prefect_template(), partial)
    os.replace(partial, database)  # a database appears whole or not at all


def prefect_template() -> Path:
    """Return this machine's empty, migrated Prefect database for the installed Prefect version, in Orchard's cache
    (`orchard/llama_build.cache_root()`), migrating one first if there is none (`prefect server database upgrade`:
    Prefect's own migrations, what its server would run on an empty database). `make setup` builds it."""
    template = cache_root() / "prefect" / f"prefect-{importlib.metadata.version('prefect')}.db"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".build-") as build:
        partial = Path(build) / DATABASE_FILE
        env = {**os.environ, "PREFECT_HOME": str(Path(build) / "home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{partial}"}
        for name in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
            env.pop(name, None)
        argv = [str(Path(sys.executable).with_name("prefect")), "server", "database", "upgrade", "-y"]
        migrate = _launch("prefect-database-template", argv, Path(build), env=env, url="")
        try:
            code = migrate.process.wait(timeout=API_STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            migrate.stop()
        if code != 0 or not partial.exists():
            raise ClusterError(f"could not migrate an empty Prefect database ({' '.join(argv)}: "
                               f"{'timed out' if code is None else f'exit {code}'}):\n{migrate.log_tail()}")
        os.replace(partial, template)  # concurrent builders each replace it whole
    return template


def start_worker(state_dir: Path, pool: str, name: str, env: dict[str, str], *, limit: int | None = None) -> Service:
    """Start a process worker on `pool` with `env` (the API URL and this worker's ORCHARD__ variables), running at
    most `limit` flow runs at once; `wait_started` returns once it is up (workers start side by side)."""
    argv = [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool, "--type", "process",
            "--name", name]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return _launch(f"worker-{name}", argv, state_dir, env={**os.environ, **env}, cwd=REPO_ROOT,
                   url=env["PREFECT_API_URL"])


WORKER_START_TIMEOUT_S = 120.0  # a worker imports Prefect before it registers: tens of seconds on a busy 2-core host


def wait_started(worker: Service, pool: str, name: str) -> None:
    """Return once `worker` (start_worker's, named `name` on `pool`) is up: it has registered with its pool, so the
    API, the UI and `orchard status` list it; raise (and stop it) if it dies first."""

    def registered() -> None:
        response = httpx.post(f"{worker.url}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
        if response.status_code != 200 or name not in {w.get("name") for w in response.json()}:
            raise _NotReady(f"not registered with pool {pool} yet")

    _wait_healthy(worker, registered, WORKER_START_TIMEOUT_S)


def create_pools_and_limits(api: str, pools: tuple[str, ...], limits: dict[str, int]) -> None:
    """Create the process work pools and the global concurrency limits (one slot per GPU) unless they exist."""
    # Prefect is slow to import, and `orchard run` imports this module before it sets Prefect's environment.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
        for name, slots in limits.items():
            client.upsert_global_concurrency_limit_by_name(name, slots)


CRASH_AUTOMATION = "orchard: a deployment run whose heartbeats stopped is Crashed"
ORCHARD_FLOWS = ("nightly", "grow-shard")  # the flows of deployments/prefect.yaml, which send heartbeats every HEARTBEAT_S


def create_crash_automation(api: str, crashed_after_s: int) -> None:
    """Create (or replace) the automation that marks a deployment run of Orchard's flows Crashed once it has sent no
    heartbeat and changed no state for `crashed_after_s` seconds (Prefect's "detect zombie flows" recipe).

    A worker or host that dies mid-run reports nothing: without this its flow run stays Running for ever, and the
    nightly dispatch task waiting on it with run_deployment waits for ever too.
    """
    # Prefect is slow to import, and `orchard run` imports this module before it sets Prefect's environment.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        # Any later event of the run (a heartbeat, or a state, final or not, whatever its name: "Partial") shows it alive.
        expect={"prefect.flow-run.*"},
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        # Only deployment runs of Orchard's own flows: their deployments set the heartbeat interval; a flow run
        # elsewhere may beat at Prefect's default (180 s) and must not be taken for dead.
        match_related=[ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": list(ORCHARD_FLOWS)}),
                       ResourceSpecification({"prefect.resource.role": "deployment"})],
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=datetime.timedelta(seconds=crashed_after_s),
    )
    crash = ChangeFlowRunState(state=StateType.CRASHED, message=(
        f"no heartbeat for {crashed_after_s} s: the worker or host running this flow run died"))
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
        client.create_automation(AutomationCore(name=CRASH_AUTOMATION, trigger=trigger, actions=[crash],
                                                description="created by `orchard up` (orchestration.crashed_after_s)"))


def deploy(api: str, state_dir: Path, env: dict[str, str]) -> None:
    """Register deployments/prefect.yaml's deployments with the API (`prefect deploy --all` from the repository)."""
    argv = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all",
            "--prefect-file", "deployments/prefect.yaml"]
    log = state_dir / "logs" / "deploy.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        done = subprocess.run(argv, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=DEPLOY_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ClusterError(f"prefect deploy failed (exit {done.returncode}); log {log}:\n{tail}")


def prefect_overview(api: str) -> dict[str, Any]:
    """Return the work pools with their workers, the deployments and the ten latest flow runs."""
    # Prefect is slow to import, and `orchard run` imports this module before it sets Prefect's environment.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        pools = [{"name": pool.name, "status": str(pool.status.value if pool.status else "unknown").lower(),
                  "workers": [{"name": w.name, "status": str(w.status.value).lower()}
                              for w in client.read_workers_for_work_pool(pool.name)]}
                 for pool in client.read_work_pools()]
        flows = {}
        deployments = []
        for d in client.read_deployments():
            flows.setdefault(d.flow_id, client.read_flow(d.flow_id).name)
            schedule = ", ".join(f"{s.schedule.cron} {s.schedule.timezone}" for s in d.schedules
                                 if getattr(s.schedule, "cron", None))
            deployments.append({"name": f"{flows[d.flow_id]}/{d.name}", "pool": d.work_pool_name, "schedule": schedule})
        runs = []
        for run in client.read_flow_runs(limit=10, sort=FlowRunSort.START_TIME_DESC):
            flows.setdefault(run.flow_id, client.read_flow(run.flow_id).name)
            runs.append({"name": run.name, "flow": flows[run.flow_id], "state": run.state_name,
                         "worker": run.labels.get("prefect.worker.name") if run.labels else None})
    return {"pools": pools, "deployments": deployments, "flow_runs": runs}
