"""What does one request cost the process that sends it? The engine client against a bare httpx pool, side by side.

Both send the same `--requests` chat requests, `--concurrency` in flight, to the instant simulated engine
(bench/gpu_sim.py, its own process): (a) `orchard.engine.EngineClient` (aiohttp, priority slots, retries, usage);
(b) one `httpx.AsyncClient` whose pool holds `--concurrency` connections, behind a semaphore: what the engine
client was built on before. Prints requests/s and this process's CPU per request of each, twice, alternating.
Usage:
    PYTHONPATH=. .venv/bin/python bench/engine_client_cost.py [--requests 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_sim import SimSettings, sim_process  # noqa: E402
from orchard.config import EngineConfig  # noqa: E402
from orchard.engine import EngineClient, Sampling  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are a careful math tutor. End with a last line of the form "
                                          "'Answer: <number>'."},
            {"role": "user", "content": "Compute 2 + 3."}]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def engine_client(url: str, requests: int, concurrency: int) -> None:
    async with EngineClient(EngineConfig(model="sim", base_urls=(url,), max_concurrency=concurrency)) as client:
        await asyncio.gather(*(client.chat(MESSAGES, Sampling(max_tokens=48, seed=i)) for i in range(requests)))


async def httpx_pool(url: str, requests: int, concurrency: int) -> None:
    import httpx

    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        async def one(seed: int) -> None:
            async with slots:
                response = await client.post(f"{url}/v1/chat/completions", json={
                    "model": "sim", "messages": MESSAGES, "max_tokens": 48, "seed": seed})
                response.raise_for_status()
                response.json()

        await asyncio.gather(*(one(i) for i in range(requests)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state, \
            sim_process(SimSettings.instant(), {}, Path(state)) as (url, _):
        for name, send in (("EngineClient (aiohttp)", engine_client), ("httpx pool", httpx_pool)) * 2:
            cpu, started = cpu_s(), time.monotonic()
            asyncio.run(send(url, args.requests, args.concurrency))
            wall, used = time.monotonic() - started, cpu_s() - cpu
            print(f"{name:<22}: {args.requests} requests, {args.concurrency} in flight, in {wall:.2f} s = "
                  f"{args.requests / wall:.0f} requests/s, {1000 * used / args.requests:.2f} ms CPU per request")


if __name__ == "__main__":
    main()
