"""How busy does the nightly flow keep the engine? The same requests, two ways, measured side by side in one run.

(a) factory: the nightly flow (plan → grow every tree with critiques and refinements → verify → land →
    validate → materialise) on a shard of `--instructions` trees;
(b) raw: every request the flow sent — read back from the nodes it landed: messages, sampling, seed — sent
    straight through the engine client, all in flight together, with nothing else to do.

Prints completion tokens/s of both and their ratio (factory ÷ raw). Usage:
    .venv/bin/python bench/engine_utilisation.py [--instructions 32] [--per-shard 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchard.config import Config, RunConfig, SeedSource  # noqa: E402
from orchard.engine import EngineClient, Sampling  # noqa: E402

ROLE_OF = {"action": "generator", "critique": "critic", "refinement": "refiner"}


async def replay(cfg: Config, requests: list[tuple[str, list[dict], Sampling]]) -> tuple[int, float]:
    """Send `requests` straight to the engines, all at once; return (completion tokens, wall seconds)."""
    clients = {name: EngineClient(cfg.engines[name]) for name in set(cfg.roles.values())}
    try:
        started = time.monotonic()
        await asyncio.gather(*(clients[cfg.roles[role]].chat(m, s) for role, m, s in requests))
        wall = time.monotonic() - started
        return sum(c.usage.completion_tokens for c in clients.values()), wall
    finally:
        for client in clients.values():
            await client.aclose()


def landed_requests(cfg: Config, run_id: str) -> list[tuple[str, list[dict], Sampling]]:
    """Return every request the run sent, one per node, as (role, messages, sampling with the node's seed)."""
    from orchard.lake import query

    _, found = query(cfg, f"""
        SELECT role, to_json(prompt), temperature, top_p, max_tokens, sample_seed FROM nodes
        WHERE run_id = '{run_id}' AND role <> 'instruction'""")
    return [
        (ROLE_OF[role], json.loads(prompt), Sampling(temperature, top_p, max_tokens, seed))
        for role, prompt, temperature, top_p, max_tokens, seed in found
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=32)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="orchard-bench-"))
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.nightly import nightly
    from orchard.services import embedded_services

    run = RunConfig(instructions_per_shard=args.per_shard, samples_per_strategy=2, turns=2, refine_per_tree=1,
                    refine_samples=2, max_tokens=96, critique_max_tokens=64)
    cfg = Config(state_dir=str(state), run=run,
                 seeds=(SeedSource(kind="arithmetic", count=args.instructions, difficulty=1, seed=3),))
    with embedded_services(cfg) as live:
        warm = live.replace(seeds=(SeedSource(count=1, difficulty=1, seed=99),))
        asyncio.run(replay(warm, [("generator", [{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8))]))
        flow_started = time.monotonic()
        summary = nightly(config=live.to_dict(), run_id="bench")
        flow_wall = time.monotonic() - flow_started
        requests = landed_requests(live, "bench")
        raw_tokens, raw_wall = asyncio.run(replay(live, requests))

    raw = raw_tokens / raw_wall
    factory = summary["completion_tokens"] / summary["wall_s"]
    whole = summary["completion_tokens"] / flow_wall
    print(f"shape: {args.instructions} trees in shards of {args.per_shard}; {len(requests)} requests "
          f"(actions, critiques, refinements over {run.turns} turns)")
    print(f"raw engine client : {raw_tokens} completion tokens in {raw_wall:.1f} s = {raw:.1f} tokens/s")
    print(f"nightly flow      : {summary['completion_tokens']} completion tokens in {summary['wall_s']:.1f} s of "
          f"growth = {factory:.1f} tokens/s ({flow_wall:.1f} s for the whole flow = {whole:.1f} tokens/s)")
    print(f"ratio factory/raw : {factory / raw:.3f} (growth phase), {whole / raw:.3f} (whole flow)")


if __name__ == "__main__":
    main()
