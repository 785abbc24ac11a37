"""Which embedded engine settings? llama-server's quantisation, threads and slots, side by side in one run.

For each setting (the model file: the shipped Q4_1 or its re-encoding by llama-quantize as Q4_0, Q5_0, Q8_0, ...;
`--threads`; `--parallel` slots, which is also how many requests the client keeps in flight; `max_n`, the most
choices one request asks for, a larger n being split into requests with seed + k) a fresh llama-server answers the
same requests:

(a) chat: `--prompts` arithmetic problems × `--samples` answers each (the first turn of a tree: one request per
    problem with n = samples, seeded), at temperature 0.9 and 160 tokens: completion tokens/s, and the share of
    answers the math verifier passes (quality must not collapse with a coarser file);
(b) tree: every answer of (a) continued (MCTS-style: its first half as a prefix, `continue_chat`, n = 2) and
    critiqued: the share of prompt tokens the server answered from its prompt cache, and tokens/s.

Usage (after `make setup`):
    PYTHONPATH=. .venv/bin/python bench/embedded_engine.py [--prompts 48] [--samples 3] [--no-tree]
        [--settings Q4_1:2:8:1,Q8_0:2:8:1,Q8_0:2:16:1,Q8_0:1:8:1]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchard import llama_build, services  # noqa: E402
from orchard.config import EngineConfig  # noqa: E402
from orchard.engine import EngineClient, Sampling  # noqa: E402
from tasks.seeds import generate_arithmetic  # noqa: E402
from tasks.turns import action_messages, critique_messages  # noqa: E402
from tasks.verify import check_math_answer  # noqa: E402


@dataclasses.dataclass
class Result:
    setting: str
    chat_tokens: int
    chat_s: float
    passed: int
    answers: int
    tree_tokens: int
    tree_s: float
    prompt_tokens: int
    cached_tokens: int


async def workload(engine: EngineConfig, prompts: int, samples: int, tree: bool) -> Result:
    problems = generate_arithmetic(prompts, difficulty=1, seed=11)
    async with EngineClient(engine) as client:
        await client.chat([{"role": "user", "content": "Say hi."}], Sampling(max_tokens=4))  # loaded and warm
        client.usage = type(client.usage)()
        sampling = Sampling(temperature=0.9, top_p=0.95, max_tokens=160)
        started = time.monotonic()
        answers = await asyncio.gather(*(
            client.chat(action_messages(p, "step_by_step"), dataclasses.replace(sampling, seed=1000 + i), n=samples)
            for i, p in enumerate(problems)))
        chat_s = time.monotonic() - started
        chat_tokens = client.usage.completion_tokens
        passed = sum((check_math_answer(a.text, p.reference).verdict == "correct") for p, got in zip(problems, answers) for a in got)

        before = (client.usage.completion_tokens, client.usage.prompt_tokens, client.usage.cached_tokens or 0)
        started = time.monotonic()
        jobs = []
        for i, (problem, got) in enumerate(zip(problems, answers) if tree else ()):
            for j, answer in enumerate(got):
                half = answer.text[: len(answer.text) // 2]
                jobs.append(client.continue_chat(action_messages(problem, "step_by_step"), half,
                                                 dataclasses.replace(sampling, max_tokens=40, seed=5000 + 10 * i + j),
                                                 n=2))
                attempt = {"text": answer.text, "feedback": "the final answer does not match"}
                jobs.append(client.chat(critique_messages(problem, attempt),
                                        dataclasses.replace(sampling, max_tokens=64, seed=9000 + 10 * i + j)))
        await asyncio.gather(*jobs)
        tree_s = max(time.monotonic() - started, 1e-9)
        usage = client.usage
        return Result("", chat_tokens, chat_s, passed, sum(len(g) for g in answers),
                      usage.completion_tokens - before[0], tree_s, usage.prompt_tokens - before[1],
                      (usage.cached_tokens or 0) - before[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--no-tree", dest="tree", action="store_false", help="the chat part (a) only")
    parser.add_argument("--settings", default="Q4_1:2:8:1,Q8_0:2:8:1,Q8_0:2:16:1,Q8_0:1:8:1",
                        help="comma-separated QUANT:THREADS:SLOTS:MAX_N (max_n: choices per request at most)")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="orchard-bench-engine-"))
    files = {"Q4_1": services.smollm2_gguf()}
    for quant in {setting.split(":")[0] for setting in args.settings.split(",")} - set(files):
        files[quant] = state / f"SmolLM2-135M-Instruct.{quant}.gguf"
        subprocess.run([str(llama_build.find_binary("llama-quantize")), "--allow-requantize", str(files["Q4_1"]),
                        str(files[quant]), quant], check=True, capture_output=True)
    results = []
    for setting in args.settings.split(","):
        quant, threads, slots, max_n = setting.split(":")
        engine = EngineConfig(kind="embedded", model="SmolLM2-135M-Instruct", threads=int(threads),
                              max_concurrency=int(slots), max_n=int(max_n))
        server = services.start_llama_server(engine, state, name=f"llama-{quant}-{threads}-{slots}", model=files[quant])
        try:
            live = dataclasses.replace(engine, kind="openai", base_urls=(server.url,))
            result = asyncio.run(workload(live, args.prompts, args.samples, args.tree))
        finally:
            server.stop()
        result.setting = f"{quant} threads={threads} slots={slots} max_n={max_n}"
        results.append(result)
        line = (f"{result.setting:34s} chat {result.chat_tokens / result.chat_s:6.1f} tok/s ({result.chat_tokens} in "
                f"{result.chat_s:.1f} s), verifier passed {result.passed}/{result.answers}")
        if args.tree:
            line += (f"; tree {result.tree_tokens / result.tree_s:6.1f} tok/s, prompt cached {result.cached_tokens}/"
                     f"{result.prompt_tokens} = {result.cached_tokens / max(1, result.prompt_tokens):.1%}")
        print(line, flush=True)
    base = results[0]
    for result in results[1:]:
        ratio = (result.chat_tokens / result.chat_s) / (base.chat_tokens / base.chat_s)
        tree = (result.tree_tokens / result.tree_s) / (base.tree_tokens / base.tree_s) if args.tree else None
        print(f"{result.setting} ÷ {base.setting}: chat {ratio:.2f}x" + (f", tree {tree:.2f}x" if tree else ""))


if __name__ == "__main__":
    main()
