"""How busy does the nightly flow keep the embedded engine? The same requests, two ways, side by side in one run.

(a) factory: the nightly flow (plan → grow every tree through its phases: turns with critiques and refinements,
    MCTS steps, rollouts and self-evaluations, the jury's verdicts → verify → land → validate → materialise) on
    `--instructions` trees, with its engine behind a recording proxy (bench/fault_lab.py: FaultProxy);
(b) raw: every request body the flow sent, in the order it was sent, sent again straight to the same server with
    the engine's concurrency (bench/gpu_sim.py: replay), all ready at once, with nothing else to do.

Prints completion tokens/s of both and their ratio (factory ÷ raw), over the growth phase (the flow's first
request to its last answer) and over the whole flow. Usage:
    PYTHONPATH=. .venv/bin/python bench/engine_utilisation.py [--instructions 32] [--per-shard 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fault_lab import FORWARD, FaultProxy  # noqa: E402
from bench.gpu_sim import replay  # noqa: E402
from orchard.config import Config, RunConfig, SeedSource  # noqa: E402

COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


class Recorder:
    """What the proxy saw: every completion request's path and body, and when the first came and the last left."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.first: float | None = None
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> str:
        if method == "POST" and path in COMPLETIONS:
            with self._lock:
                self.first = self.first or time.monotonic()
                self.bodies.append({"path": path, "body": json.loads(body)})
        return FORWARD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=32)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="orchard-bench-"))
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.nightly import nightly
    from orchard.engine import EngineClient, Sampling
    from orchard.services import embedded_services

    run = RunConfig(instructions_per_shard=args.per_shard, samples_per_strategy=2, turns=2, refine_per_tree=1,
                    refine_samples=2, max_tokens=96, critique_max_tokens=64)
    cfg = Config(state_dir=str(state), run=run,
                 seeds=(SeedSource(kind="arithmetic", count=args.instructions, difficulty=1, seed=3),))
    with embedded_services(cfg) as live:
        engine = live.engines["embedded"]
        server = engine.base_urls[0]

        async def warm() -> None:  # the model's first answer loads it: not part of either side
            async with EngineClient(engine) as client:
                await client.chat([{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8))

        asyncio.run(warm())
        recorder = Recorder()
        with FaultProxy(lambda: server, recorder) as proxy:
            proxied = live.replace(engines={"embedded": dataclasses.replace(engine, base_urls=(proxy.url,))})
            flow_started = time.monotonic()
            summary = nightly(config=proxied.to_dict(), run_id="bench")
            flow_wall = time.monotonic() - flow_started
        raw_started = time.monotonic()
        raw_tokens = asyncio.run(replay(server, recorder.bodies, engine.max_concurrency))
        raw_wall = time.monotonic() - raw_started

    tokens = summary["completion_tokens"]
    raw, factory, whole = raw_tokens / raw_wall, tokens / summary["wall_s"], tokens / flow_wall
    print(f"shape: {args.instructions} trees in shards of {args.per_shard}; {len(recorder.bodies)} requests "
          f"(actions, critiques, refinements over {run.turns} turns; MCTS steps, rollouts, self-evaluations; verdicts)")
    print(f"raw replay        : {raw_tokens} completion tokens in {raw_wall:.1f} s = {raw:.1f} tokens/s")
    print(f"nightly flow      : {tokens} completion tokens in {summary['wall_s']:.1f} s of growth = {factory:.1f} tokens/s "
          f"({flow_wall:.1f} s for the whole flow = {whole:.1f} tokens/s)")
    print(f"ratio factory/raw : {factory / raw:.3f} (growth phase), {whole / raw:.3f} (whole flow)")


if __name__ == "__main__":
    main()
