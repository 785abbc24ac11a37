"""The grow-shard flow: one shard grown, in one slot of its host's GPU limit, and the task that dispatches it.

The nightly flow's `dispatch-shard` tasks run it: its body in their own process (`orchestration.grow = "inline"`,
the embedded default), or as a subflow run of the `grow-shard` deployment on a GPU work pool (`"deployment"`).
A worker's own `ORCHARD__…` variables say where its servers are (engine endpoints, launch commands, its GPU
limit); they may not change what is grown.
"""

from __future__ import annotations

import contextlib
import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment

from orchard.config import Config, ConfigError, load_config, redacted, with_secrets
from orchard.errors import retry_transient
from orchard.services import embedded_services
from orchard.store import ObjectStore
from tasks.grow import GrowError, grow_shard_task
from tasks.land import resume_shard
from tasks.seeds import ShardPlan


def worker_config(config: dict, own: Config | None = None) -> Config:
    """Return `config` under this host's `ORCHARD__…` variables, its blanked secrets filled from this host's own
    config (`own`: its $ORCHARD_CONFIG or the preset); refuse a host whose variables change the data."""
    own = own or load_config(os.environ.get("ORCHARD_CONFIG") or None)
    config = with_secrets(config, own)
    asked = Config.from_dict(config)
    local = load_config(base=config)
    if local.content_hash() != asked.content_hash():
        raise ConfigError(f"this worker's ORCHARD__ variables change what is grown (config {asked.content_hash()} "
                          f"became {local.content_hash()}); they may only say where servers are")
    if not local.object_store.endpoint_url:
        raise ConfigError("object_store.endpoint_url: a shard grown by a worker lands in the store the nightly run "
                          "reads; give the run (or this worker) the store's endpoint")
    return local


@flow(name="grow-shard", log_prints=True)
def grow_shard_flow(config: dict, run_id: str, plan: ShardPlan) -> dict:
    """Grow, verify and land one shard on this worker; return its receipt."""
    cfg = worker_config(config)
    gpu_limit = cfg.orchestration.gpu_limit
    # The slot is taken before any model server starts, so a launched engine only holds the GPU inside it.
    slot = concurrency(gpu_limit, occupy=1, strict=True) if gpu_limit else contextlib.nullcontext()
    with slot, embedded_services(cfg) as live:
        return grow_shard_task(live.to_dict(), run_id, plan)


# A shard that failed for a transient reason (its store or model server was down) is grown once more; one that
# failed for a reason a retry repeats (a config, schema or ownership error) is not.
@task(name="dispatch-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def dispatch_shard_task(config: dict, run_id: str, plan: ShardPlan) -> dict:
    """Grow one shard with the grow-shard flow, here or on a GPU worker; return its receipt.

    A dispatched shard's receipt comes from its manifest in the store, which the worker wrote when it landed it.
    """
    cfg = Config.from_dict(config)
    if cfg.orchestration.grow == "inline":
        # The flow's body, not a subflow run: a run's parameters show in the UI, and in-process there is no
        # worker to fill in secrets left out of them. Its grow-shard task skips a shard that already landed.
        return grow_shard_flow.fn(config, run_id, plan)
    store = ObjectStore(cfg.object_store)
    known, healed = resume_shard(store, run_id, plan.shard_id, cfg.content_hash())
    if known is not None:  # landed by an earlier attempt of this run: no GPU worker needed
        get_run_logger().info("shard %s already %s; not dispatched", plan.shard_id, known["state"])
        return known
    # Parameters show in the UI: the worker fills the blanked secrets from its own config.
    grown = run_deployment(cfg.orchestration.grow_deployment,
                           parameters={"config": redacted(config), "run_id": run_id, "plan": plan},
                           flow_run_name=f"{run_id}-{plan.shard_id}", poll_interval=2)
    where = f"grow-shard run {grown.name} ({grown.id})"
    if grown.state is None or not grown.state.is_completed():
        state = grown.state.name if grown.state else "unknown"
        raise GrowError(f"shard {plan.shard_id}: {where} ended {state}: {grown.state.message if grown.state else ''}")
    landed, corrupt = resume_shard(store, run_id, plan.shard_id, cfg.content_hash())
    if landed is None:
        raise GrowError(f"shard {plan.shard_id}: {where} completed, yet no intact manifest of it is in the store"
                        + (f" ({corrupt})" if corrupt else ""))
    return {**landed, "state": "landed" if landed["state"] == "reused" else landed["state"],
            "worker": grown.labels.get("prefect.worker.name"), "healed": healed}
