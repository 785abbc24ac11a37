"""The grow-shard flow: one shard grown and validated, in one slot of its host's GPU limit, and the task that dispatches it.

The nightly flow's `dispatch-shard` tasks run it: its body in their own process (`orchestration.grow = "inline"`,
the embedded default), or as a subflow run of the `grow-shard` deployment on a GPU work pool (`"deployment"`).
A worker's own `ORCHARD__…` variables say where its servers are (engine endpoints, launch commands, its GPU
limit); they may not change what is grown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import task_run
from prefect.states import Failed, State

from orchard.config import Config, ConfigError, OrchestrationConfig, load_config
from orchard.engine import EngineUnavailable, check_endpoints
from orchard.services import embedded_services
from orchard.stop import stop_within
from orchard.store import ObjectStore
from schemas.errors import OrchardError, is_transient, retry_transient
from schemas.shards import ShardReceipt
from tasks.grow import grow_shard_task, with_stored_validation
from tasks.growth import GrowError
from tasks.land import resume_shard
from tasks.plans import ShardRef


def worker_config(config: dict) -> Config:
    """Return `config` under this host's `ORCHARD__…` variables; refuse a host whose variables change the data.

    Its secrets are references (`env:NAME`, a Prefect Secret block) that this host's clients resolve.
    """
    asked = Config.from_dict(config)
    local = load_config(base=config)
    if local.content_hash() != asked.content_hash():
        raise ConfigError(f"this worker's ORCHARD__ variables change what is grown (config {asked.content_hash()} "
                          f"became {local.content_hash()}); they may only say where servers are")
    if not local.object_store.endpoint_url:
        raise ConfigError("object_store.endpoint_url: a shard grown by a worker lands in the store the nightly run "
                          "reads; give the run (or this worker) the store's endpoint")
    return local


# The name of the Failed state a grow-shard run ends in when its error was transient: the dispatch task, in another
# process, cannot see the exception, only the state.
RETRYABLE = "Retryable"
ENGINE_POLL_S = 5.0


class DispatchError(GrowError):
    """A dispatched grow-shard run did not land its shard; `transient` when growing it again, on any worker of the
    pool, may succeed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def grow_here(cfg: Config, run_id: str, shard: ShardRef) -> ShardReceipt:
    """Grow, verify and land one shard (its plan read from the store) with this host's engines; return its receipt.

    Engines served elsewhere (a worker's model server) must answer before the GPU slot is taken: a host whose
    server is down fails the shard at once, with a transient error, instead of failing every request of it.
    """
    down = engines_down(cfg)
    if down is not None:
        raise down
    gpu_limit = cfg.orchestration.gpu_limit
    # The slot is taken before any model server starts, so a launched engine only holds the GPU inside it.
    slot = concurrency(gpu_limit, occupy=1, strict=True) if gpu_limit else contextlib.nullcontext()
    # Cancelled (SIGTERM from its worker) or interrupted: its model servers stop at once, nothing is retried.
    with stop_within(), slot, embedded_services(cfg) as live:
        return grow_shard_task(live.to_dict(), run_id, shard)


def engines_down(cfg: Config, *, attempts: int = 3) -> EngineUnavailable | None:
    """Return why an engine this host serves from elsewhere (its model server) does not answer; None if all do."""
    for name in sorted(set(cfg.roles.values()) | {j.engine for j in cfg.jury}):
        engine = cfg.engines.get(name)
        if engine is not None and engine.kind != "embedded" and not engine.launch:
            try:
                check_endpoints(name, engine, attempts=attempts)
            except EngineUnavailable as exc:
                return exc
    return None


def hold_while_engines_down(flow: object, flow_run: FlowRun, state: State) -> None:
    """on_failure hook: after a Retryable failure, keep this worker's flow-run slot while its model server is down
    (up to orchestration.engine_down_hold_s), so the worker takes no other shard it cannot grow and the pool's
    other workers grow the shards dispatched again; it takes shards again as soon as its server answers."""
    if state.name != RETRYABLE:
        return
    cfg = worker_config(flow_run.parameters["config"])
    deadline = time.monotonic() + cfg.orchestration.engine_down_hold_s
    down = engines_down(cfg, attempts=1)
    if down is None:
        return
    logger = flow_run_logger(flow_run)
    logger.warning("this worker takes no shard while its model server is down (up to %.0f s): %s",
                   cfg.orchestration.engine_down_hold_s, down)
    while down is not None and time.monotonic() < deadline:
        time.sleep(ENGINE_POLL_S)
        down = engines_down(cfg, attempts=1)
    logger.info("model server %s; this worker takes shards again", "answers" if down is None else "still down")


@flow(name="grow-shard", log_prints=True, on_failure=[hold_while_engines_down])
def grow_shard_flow(config: dict, run_id: str, shard: ShardRef) -> dict | State:
    """Grow, verify and land one shard on this worker (its plan is read from the store: the parameters carry its
    key); return its receipt (as JSON-safe values: the run's result, shown in the UI; the dispatch task reads the
    shard's manifest from the store instead), or a Failed state named Retryable when what failed may not fail again
    (a model server down, the store unavailable)."""
    try:
        return grow_here(worker_config(config), run_id, shard).to_dict()
    except OrchardError as exc:
        if not is_transient(exc):
            raise
        get_run_logger().error("shard %s: transient failure, the dispatch may grow it again", shard.shard_id,
                               exc_info=True)
        return Failed(name=RETRYABLE, message=f"{type(exc).__name__}: {exc}"[:1000])


# Grown again only for a transient failure (a crashed or Retryable grow-shard run, or in-process a store or model
# server that was down); a failure a retry repeats (a config, schema or ownership error) is final at once. How often
# and after how long: orchestration.dispatch_retry_delays_s, which `dispatcher` applies; the task's own are its default.
_DEFAULT_DELAYS_S = list(OrchestrationConfig().dispatch_retry_delays_s)


@task(name="dispatch-shard", cache_policy=NO_CACHE, retries=len(_DEFAULT_DELAYS_S), retry_delay_seconds=_DEFAULT_DELAYS_S,
      retry_condition_fn=retry_transient)
def dispatch_shard_task(config: dict, run_id: str, shard: ShardRef) -> ShardReceipt:
    """Grow one shard with the grow-shard flow, here or on a GPU worker; return its receipt.

    A dispatched shard's receipt comes from its manifest in the store, which the worker wrote when it landed it.
    A grow-shard run that crashed (its worker died) or failed transiently is dispatched again, once after each of
    orchestration.dispatch_retry_delays_s; the error then says how many attempts were made.
    """
    cfg = Config.from_dict(config)
    if cfg.orchestration.grow == "inline":
        # The flow's body, not a subflow run: no worker to hand it to. Its grow-shard task skips a shard that
        # already landed.
        return grow_here(cfg, run_id, shard)
    store = ObjectStore(cfg.object_store)
    known, healed = resume_shard(store, run_id, shard.shard_id, cfg.content_hash())
    if known is not None:  # landed by an earlier attempt of this run: no GPU worker needed
        get_run_logger().info("shard %s already %s; not dispatched", shard.shard_id, known.state)
        return with_stored_validation(store, run_id, known)
    attempt, attempts = task_run.run_count or 1, len(cfg.orchestration.dispatch_retry_delays_s) + 1
    # Parameters show in the UI: the config's secrets are references, which the worker's clients resolve.
    grown = run_deployment(cfg.orchestration.grow_deployment,
                           parameters={"config": config, "run_id": run_id, "shard": shard},
                           flow_run_name=f"{run_id}-{shard.shard_id}", poll_interval=2)
    worker = (grown.labels or {}).get("prefect.worker.name")
    where = f"grow-shard run {grown.name} ({grown.id}) on worker {worker or '?'}"
    state = grown.state
    if state is None or not state.is_completed():
        transient = state is not None and (state.is_crashed() or (state.is_failed() and state.name == RETRYABLE))
        then = ("dispatched again" if attempt < attempts else f"gave up after {attempt} attempts") \
            if transient else "not retried"
        raise DispatchError(f"shard {shard.shard_id}: {where} ended {state.name if state else 'unknown'}: "
                            f"{state.message if state else ''} (attempt {attempt} of {attempts}; {then})",
                            transient=transient)
    landed, corrupt = resume_shard(store, run_id, shard.shard_id, cfg.content_hash())
    if landed is None:
        raise GrowError(f"shard {shard.shard_id}: {where} completed, yet no intact manifest of it is in the store"
                        + (f" ({corrupt})" if corrupt else ""))
    # The worker validated the shard where it grew it: its record is beside the shard (or its quarantined copy).
    return dataclasses.replace(with_stored_validation(store, run_id, landed),
                               state="landed" if landed.state == "reused" else landed.state, worker=worker,
                               healed=healed)


def dispatcher(orchestration: OrchestrationConfig):  # noqa: ANN201 — the dispatch-shard task, as this run retries it
    """`dispatch_shard_task` dispatching a shard again once after each of `orchestration.dispatch_retry_delays_s`."""
    delays = list(orchestration.dispatch_retry_delays_s)
    return dispatch_shard_task.with_options(retries=len(delays), retry_delay_seconds=delays or 0)
