"""How busy does the nightly flow keep the engine? Same requests, two ways, measured side by side in one run.

(a) raw: every request of every shard sent straight through the engine client, all in flight together;
(b) factory: the nightly flow (plan → grow → verify → land → validate → materialise) on the same seeds.

Prints completion tokens/s of both and their ratio (factory ÷ raw). Usage:
    .venv/bin/python bench/engine_utilisation.py [--instructions 12] [--per-shard 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchard.config import Config, RunConfig, SeedSource  # noqa: E402
from orchard.engine import EngineClient, Sampling  # noqa: E402


async def raw_tokens_per_s(cfg: Config, run_id: str) -> tuple[int, float]:
    """Send the flow's exact requests straight to the engine; return (completion tokens, wall seconds)."""
    from tasks.grow import _id, action_messages, sample_seed
    from tasks.seeds import load_seeds

    run = cfg.run
    requests = []
    for instruction in load_seeds(cfg.seeds):
        tree_id = _id(run_id, instruction.instruction_id)
        for strategy in run.strategies:
            for k in range(run.samples_per_strategy):
                sampling = Sampling(run.temperature, run.top_p, run.max_tokens, sample_seed(run.seed, tree_id, strategy, k))
                requests.append((action_messages(instruction, strategy), sampling))
    async with EngineClient(cfg.engine_for("generator")) as client:
        started = time.monotonic()
        await asyncio.gather(*(client.chat(m, s) for m, s in requests))
        return client.usage.completion_tokens, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=12)
    parser.add_argument("--per-shard", type=int, default=4)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="orchard-bench-"))
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.nightly import nightly
    from orchard.services import embedded_services

    cfg = Config(
        state_dir=str(state),
        run=RunConfig(instructions_per_shard=args.per_shard),
        seeds=(SeedSource(kind="arithmetic", count=args.instructions, difficulty=1, seed=3),),
    )
    run_id = "bench"
    with embedded_services(cfg) as live:
        # Warm the server once so neither side pays for the first load.
        asyncio.run(raw_tokens_per_s(live.replace(seeds=(SeedSource(count=1, difficulty=1, seed=99),)), "warm"))
        raw_tokens, raw_wall = asyncio.run(raw_tokens_per_s(live, run_id))
        flow_started = time.monotonic()
        summary = nightly(config=live.to_dict(), run_id=run_id)
        flow_wall = time.monotonic() - flow_started

    raw = raw_tokens / raw_wall
    factory = summary["completion_tokens"] / summary["wall_s"]
    end_to_end = summary["completion_tokens"] / flow_wall
    print(f"requests: {args.instructions} instructions × {len(cfg.run.strategies)} strategies × "
          f"{cfg.run.samples_per_strategy} samples, shards of {args.per_shard}")
    print(f"raw engine client : {raw_tokens} completion tokens in {raw_wall:.1f} s = {raw:.1f} tokens/s")
    print(f"nightly flow      : {summary['completion_tokens']} completion tokens in {summary['wall_s']:.1f} s "
          f"of growth = {factory:.1f} tokens/s ({flow_wall:.1f} s for the whole flow = {end_to_end:.1f} tokens/s)")
    print(f"ratio factory/raw : {factory / raw:.3f} (growth phase), {end_to_end / raw:.3f} (whole flow)")


if __name__ == "__main__":
    main()
