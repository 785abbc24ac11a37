"""The nightly flow: seeds → trees → S3 → GX → one DuckLake snapshot → report."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from orchard.config import Config, load_config, with_secrets
from orchard.services import embedded_services
from flows.grow_shard import dispatch_shard_task
from tasks.materialise import check_run_id_task, materialise_task
from tasks.report import cost_estimate, report_task, run_totals, summary_text
from tasks.seeds import plan_shards_task
from tasks.validate import validate_shard_task


def default_run_id() -> str:
    """Return today's nightly run id (UTC), so a re-run on the same day resumes the same run."""
    return "nightly-" + datetime.now(timezone.utc).strftime("%Y-%m-%d")


@flow(name="nightly", log_prints=True)
def nightly(config: dict | None = None, run_id: str | None = None, preset: str | None = None,
            max_shards: int | None = None) -> dict | State:
    """Grow, land, validate and publish one run; return its summary (as the data of a Failed or a "Partial"
    Completed state when not every shard was published).

    `config` is a whole config (as `orchard run` passes it); a deployment run passes none and loads `preset` (a
    config file on the worker; None: its $ORCHARD_CONFIG or the embedded preset) under the worker's environment.
    `max_shards` caps the run's size: the first shards of the plan are grown and the rest wait for a later run.
    """
    own = load_config(preset or os.environ.get("ORCHARD_CONFIG") or None)
    # A given config may come with its secrets blanked (parameters show in the UI): they are this host's.
    cfg = Config.from_dict(with_secrets(config, own)) if config else own
    # What the config leaves to Orchard starts here (nothing, when the caller already started it); model servers
    # only when shards grow in this process: dispatched shards use their worker's.
    with embedded_services(cfg, model=cfg.orchestration.grow == "inline") as live:
        summary = publish_run(live, run_id or default_run_id(), max_shards)
    # The UI shows how the run went: Failed when nothing was published, "Partial" when some shards were left out.
    problems = "; ".join(summary["problems"])[:500]
    if summary["status"] == "failed":
        return Failed(message=f"run {summary['run_id']}: nothing published: {problems}", data=summary)
    if summary["status"] == "partial":
        return Completed(name="Partial", message=f"run {summary['run_id']}: {problems}", data=summary)
    return summary


def publish_run(cfg: Config, run_id: str, max_shards: int | None = None) -> dict:
    """Grow, land, validate and publish the run `run_id` of `cfg` (whose servers are running); return its summary."""
    config = cfg.to_dict()
    logger = get_run_logger()
    started_at = datetime.now(timezone.utc)

    check_run_id_task(config, run_id)  # a run id resumes its run: refuse one published under another config
    plans = plan_shards_task(config)[:max_shards]
    logger.info("run %s: %d shards of up to %d instructions", run_id, len(plans), cfg.run.instructions_per_shard)
    progress = create_progress_artifact(progress=0.0, description=f"run {run_id}: shards landed and validated")
    steps = 2 * max(1, len(plans))  # each shard moves it twice: landed, then validated

    growth_started = time.monotonic()
    grown = [dispatch_shard_task.submit(config, run_id, plan) for plan in plans]
    validations, receipts, shards, problems = [], [], [], []
    for landed, future in enumerate(as_completed(grown), start=1):
        receipt = future.result(raise_on_failure=False)
        update_progress_artifact(progress, progress=100.0 * landed / steps)
        if isinstance(receipt, BaseException):
            plan = plans[grown.index(future)]
            problems.append(f"shard {plan.shard_id} failed: {receipt}")
            shards.append({"shard_id": plan.shard_id, "state": "failed", "reason": str(receipt)[:300]})
            continue
        receipts.append(receipt)
        validations.append(validate_shard_task.submit(config, run_id, receipt))
    growth_wall_s = time.monotonic() - growth_started

    publish, validation_rows, data_docs = [], [], None
    for done, future in enumerate(as_completed(validations), start=1):
        checked = future.result(raise_on_failure=False)
        update_progress_artifact(progress, progress=100.0 * (len(plans) + done) / steps)
        if isinstance(checked, BaseException):
            problems.append(f"validation failed to run: {checked}")
            continue
        receipt = next(r for r in receipts if r["shard_id"] == checked["shard_id"])
        data_docs = checked.get("data_docs") or data_docs
        validation_rows.extend(checked["rows"])
        state = receipt["state"] if checked["passed"] else "quarantined"
        if checked["passed"]:
            publish.append(receipt["manifest"])
        else:
            problems.append(f"shard {checked['shard_id']} quarantined: {checked['summary']}")
        shards.append({"shard_id": checked["shard_id"], "state": state, "reason": "" if checked["passed"] else checked["summary"],
                       "trees": receipt["stats"].get("trees"), "pairs": receipt["stats"].get("pairs"),
                       "worker": receipt.get("worker"), "grow_wall_s": receipt["stats"].get("grow_wall_s")})

    fresh = [r["stats"] for r in receipts if r["state"] == "landed"]
    published_stats = [r["stats"] for r in receipts if r["manifest"] in publish]
    totals = run_totals(published_stats, growth_wall_s)
    totals.update({k: v for k, v in run_totals(fresh, growth_wall_s).items() if k in ("prompt_tokens", "completion_tokens", "tokens_per_s")})
    totals.update(cost_estimate(fresh, cfg.cost))  # what this run paid: shards grown now, not reused ones
    failed = sum(s["state"] == "failed" for s in shards)
    quarantined = sum(s["state"] == "quarantined" for s in shards)
    status = "complete" if not failed and not quarantined else ("failed" if not publish else "partial")
    summary = {
        "run_id": run_id,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "config_hash": cfg.content_hash(),
        "status": status,
        "started_at": started_at.isoformat(),
        "shards_planned": len(plans),
        "shards_published": len(publish),
        "shards_reused": sum(r["state"] == "reused" for r in receipts),
        "shards_quarantined": quarantined,
        "shards_failed": failed,
        **totals,
        "problems": problems,
        "data_docs": data_docs,
    }
    summary["snapshot_id"] = materialise_task(config, summary, publish, validation_rows)
    summary.update(report_task(config, summary, shards))
    print(summary_text(summary))
    return summary


if __name__ == "__main__":
    nightly()
