"""The nightly flow: seeds → trees → S3, validated by GX where grown → one DuckLake snapshot → Data Docs, report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.grow_shard import dispatcher
from orchard.config import Config, load_config
from orchard.services import embedded_services
from orchard.stop import stop_within
from schemas.errors import OrchardError
from schemas.fates import ShardCheck, shard_fate
from schemas.run import RunSummary
from schemas.shards import ShardReceipt
from tasks.grow import growth_host, shards_in_flight
from tasks.materialise import check_run_id_task, materialise_task
from tasks.plans import ShardRef, plan_shards_task
from tasks.report import report_task, run_summary, summary_text
from tasks.validate import check_shard_task, data_docs_task
from tasks.verify import warm_workers
from tasks.view import view_task


class RunFailed(OrchardError):
    """No shard of a run was published (every one failed or was quarantined); `summary` is the run's summary.

    The data of the flow's Failed state: calling the flow raises it, with the shards' problems as its message.
    """

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.summary)


def default_run_id() -> str:
    """Return today's nightly run id (UTC), so a re-run on the same day resumes the same run."""
    return "nightly-" + datetime.now(timezone.utc).strftime("%Y-%m-%d")


@flow(name="nightly", log_prints=True)
def nightly(config: dict | None = None, run_id: str | None = None, preset: str | None = None,
            max_shards: int | None = None) -> dict | State:
    """Grow, land, validate and publish one run; return its summary as JSON-safe values (`RunSummary.to_dict`: the
    flow run's result), as the data of a "Partial" Completed state when some shards were not published; a Failed
    state's data is RunFailed, holding it, when none was.

    `config` is a whole config (as `orchard run` passes it; its secrets are references, resolved where clients are
    built); a deployment run passes none and loads `preset` (a config file on the worker; None: its $ORCHARD_CONFIG
    or the embedded preset) under the worker's environment.
    `max_shards` caps the run's size: the first shards of the plan are grown and the rest wait for a later run.
    """
    # A scheduled deployment run has no command line: `orchard up` names the file in its worker's $ORCHARD_CONFIG.
    cfg = Config.from_dict(config) if config else load_config(preset or os.environ.get("ORCHARD_CONFIG") or None)
    # What the config leaves to Orchard starts here (nothing, when the caller already started it); model servers
    # only when shards grow in this process: dispatched shards use their worker's.
    # SIGTERM (a cancel, a stop) or SIGINT: the model servers stop at once and nothing is retried (orchard/stop.py).
    with stop_within(), embedded_services(cfg, model=cfg.orchestration.grow == "inline") as live:
        summary = publish_run(live, run_id or default_run_id(), max_shards)
    # The UI shows how the run went: Failed when nothing was published, "Partial" when some shards were left out.
    problems = "; ".join(summary.problems)[:500]
    if summary.status == "failed":
        message = f"run {summary.run_id}: nothing published: {problems}"
        return Failed(message=message, data=RunFailed(message, summary.to_dict()))
    if summary.status == "partial":
        return Completed(name="Partial", message=f"run {summary.run_id}: {problems}", data=summary.to_dict())
    return summary.to_dict()


def publish_run(cfg: Config, run_id: str, max_shards: int | None = None) -> RunSummary:
    """Grow, land, validate and publish the run `run_id` of `cfg` (whose servers are running); return its summary."""
    config = cfg.to_dict()
    logger = get_run_logger()
    started_at = datetime.now(timezone.utc)
    stages = Stages()

    if cfg.orchestration.grow == "inline":
        warm_workers()  # the verification workers' imports overlap planning (tasks/verify.py)
    check_run_id_task(config, run_id)  # a run id resumes its run: refuse one published under another config
    # Through the hygiene gate (decontaminated and deduplicated), written to the store: shards travel as references.
    seeds = plan_shards_task(config, run_id)
    plans = seeds.shards[:max_shards]
    in_flight, dispatch = shards_in_flight(cfg), dispatcher(cfg.orchestration)
    logger.info("run %s: %d shards of up to %d instructions, up to %d growing at once", run_id, len(plans),
                cfg.run.instructions_per_shard, in_flight)
    progress = Progress(run_id, len(plans))
    stages.end("plan")

    growth_started = time.monotonic()
    # Shards growing here share one growth host (an engine client per engine, a verification pool), held for the
    # whole growth; dispatched shards grow in their workers' processes.
    host = growth_host(cfg) if cfg.orchestration.grow == "inline" else contextlib.nullcontext()
    with host:
        checks = grow_and_validate(config, run_id, plans, progress, in_flight, dispatch)
        # A corrupt shard (its bytes or manifest are not what was landed) is grown again, once, in this same run.
        corrupt = [plan for plan in plans if checks[plan.shard_id].outcome == "corrupt"]
        found = {plan.shard_id: checks[plan.shard_id].reason for plan in corrupt}
        if corrupt:
            logger.warning("run %s: %d corrupt shard(s) grown again", run_id, len(corrupt))
            progress.add(len(corrupt))
            checks.update(grow_and_validate(config, run_id, corrupt, progress, in_flight, dispatch))
    growth_wall_s = time.monotonic() - growth_started
    # Growth ends with the last landing; what follows until every shard is validated and checked is the tail.
    stages.end("grow", until=max((_landed_at(c.receipt) for c in checks.values() if c.receipt), default=None))
    stages.end("validate")

    fates = [shard_fate(checks[plan.shard_id], found.get(plan.shard_id) or _healed(checks[plan.shard_id]))
             for plan in plans]
    passed = [checks[f.shard_id].receipt for f in fates if f.fate == "published"]
    summary = run_summary(run_id, str(flow_run.id) if flow_run.id else None, cfg, started_at, len(plans), fates,
                          [checks[p.shard_id].receipt for p in plans if checks[p.shard_id].receipt], passed,
                          growth_wall_s, seeds.sources, seeds.drops, seeds.contamination)
    validation_rows = [row for check in checks.values() for row in check.validation_rows]
    run_rows = {"drops": seeds.drops, "contamination": seeds.contamination}
    # The publishing transaction settles the fates against the lake: from here on the summary is the published one.
    summary = materialise_task(config, summary, [r.manifest for r in passed], validation_rows, run_rows)
    stages.end("publish")
    summary = dataclasses.replace(summary, data_docs=data_docs_task(config, [checks[plan.shard_id] for plan in plans]))
    stages.end("data_docs")
    summary = dataclasses.replace(summary, view=view_task(config, run_id, summary.snapshot_id))
    stages.end("view")
    summary = dataclasses.replace(summary, report=report_task(config, summary))
    stages.end("report")
    summary = dataclasses.replace(summary, stages=stages.walls)
    print(summary_text(summary))
    return summary


class Stages:
    """The wall time of each stage of a run, in seconds, in order: each stage ends where the next begins."""

    def __init__(self) -> None:
        self.walls: dict[str, float] = {}
        self._since = time.time()

    def end(self, stage: str, until: float | None = None) -> None:
        """End `stage` now, or at `until` (a time.time() value, e.g. the last landing, clamped to the stage)."""
        now = time.time()
        end = now if until is None else min(now, max(self._since, until))
        self.walls[f"{stage}_s"] = round(end - self._since, 3)
        self._since = end


class Progress:
    """The run's progress artifact: each shard moves it twice, when it is grown (landed and validated) and when the
    flow has checked it."""

    def __init__(self, run_id: str, shards: int) -> None:
        self.steps, self.done = 2 * max(1, shards), 0
        self.artifact = create_progress_artifact(progress=0.0,
                                                 description=f"run {run_id}: shards landed and validated")

    def add(self, shards: int) -> None:
        self.steps += 2 * shards

    def tick(self) -> None:
        self.done += 1
        update_progress_artifact(self.artifact, progress=min(100.0, 100.0 * self.done / self.steps))


def grow_and_validate(config: dict, run_id: str, plans: Sequence[ShardRef], progress: Progress,
                      in_flight: int, dispatch: Task) -> dict[str, ShardCheck]:
    """Grow (or find landed) every shard of `plans`, each validated where it grows, and check each as it returns
    (its bytes against its manifest); return each shard's check. `dispatch` grows one shard (`dispatcher`).

    At most `in_flight` shards grow at once and at most as many wait on their check: the others wait in plan order,
    so the flow's threads and task runs do not grow with the run.
    """
    waiting, landed = deque(plans), deque()
    growing: dict[PrefectFuture, ShardRef] = {}
    checking: dict[PrefectFuture, tuple[ShardRef, ShardReceipt]] = {}
    finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()  # futures, as they finish
    checks: dict[str, ShardCheck] = {}
    while True:
        while waiting and len(growing) < in_flight:
            plan = waiting.popleft()
            future = dispatch.submit(config, run_id, plan)
            growing[future] = plan
            future.add_done_callback(finished.put)
        while landed and len(checking) < in_flight:
            plan, receipt = landed.popleft()
            future = check_shard_task.submit(config, run_id, receipt)
            checking[future] = (plan, receipt)
            future.add_done_callback(finished.put)
        if not growing and not checking:
            return checks
        future = _next(finished)
        progress.tick()
        if future in growing:
            plan, receipt = growing.pop(future), future.result(raise_on_failure=False)
            if isinstance(receipt, BaseException):
                checks[plan.shard_id] = ShardCheck(plan.shard_id, "failed", _reason(receipt))
            else:
                landed.append((plan, receipt))
            continue
        (plan, receipt), checked = checking.pop(future), future.result(raise_on_failure=False)
        if isinstance(checked, BaseException):  # transient and still failing after retries: nothing was moved
            checked = ShardCheck(plan.shard_id, "failed", f"check could not run: {_reason(checked)}", receipt)
        checks[plan.shard_id] = checked


def _next(finished: queue.SimpleQueue[PrefectFuture]) -> PrefectFuture:
    """The next future to finish. Waited for a second at a time: a signal (SIGTERM, Ctrl-C) the kernel hands another
    thread only runs its Python handler once the main thread wakes, and a wait without a timeout never does."""
    while True:
        with contextlib.suppress(queue.Empty):
            return finished.get(timeout=WAKE_S)


WAKE_S = 1.0


def _landed_at(receipt: ShardReceipt) -> float:
    """When a shard landed (time.time()): its grow task says so; a dispatched shard's manifest, to the second."""
    if receipt.landed_at:
        return receipt.landed_at
    stamp = receipt.manifest.get("landed_at")
    return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0


def _healed(check: ShardCheck) -> str | None:
    """The corruption the grow step found (and grew over) before this check, if any."""
    return check.receipt.healed if check.receipt else None


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


if __name__ == "__main__":
    nightly()
