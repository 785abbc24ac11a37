"""A prompt too long for the context of an engine it would go to is dropped at the seed stage, with its reason, and
never sent (tasks/prompt_length.py): the rule with scripted token counts, then against a real llama-server."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flows.cli import main
from orchard.config import Config, EngineConfig, JudgeConfig, SeedSource
from schemas.plan import Instruction
from tasks.hygiene import Drops
from tasks.prompt_length import CHAT_OVERHEAD, PromptLengthError, PromptLimits, answer_budget, utf8_bytes
from tasks.seeds import plan_seeds, read_seeds


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def gsm8k_file(path, *questions: str) -> str:
    return jsonl(path, [{"question": q, "answer": f"#### {i}"} for i, q in enumerate(questions)])


NORMAL = "Ava has 3 apples and buys 4 more. How many apples does she have now?"
LONG = " ".join(f"word{i % 97}" for i in range(50_000)) + " How many words is that?"


class Scripted:
    """A tokenizer that counts one token per `per` characters and records what it was asked."""

    how = "a scripted tokenizer"
    max_model_len = None

    def __init__(self, per: int = 4) -> None:
        self.per = per
        self.asked: list[str] = []

    def count(self, texts, over):
        self.asked += list(texts)
        return [-(-len(text) // self.per) for text in texts]


def config(tmp_path, path: str, **changes) -> Config:
    return Config(state_dir=str(tmp_path / "state"), seeds=(SeedSource(kind="gsm8k", path=path),), decontaminate=(),
                  **changes)


def test_only_texts_over_the_byte_bound_are_counted_and_those_over_the_token_bound_dropped(tmp_path):
    cfg = config(tmp_path, "")
    counter = Scripted(per=4)
    limits = PromptLimits(cfg, counters={"embedded": counter})
    by_bytes = limits.byte_limit("embedded")
    # Fits by its bytes alone; over the byte bound but under the token bound (counted); over both (dropped).
    medium = ("apples " * (by_bytes.bound // 7 + 10)).strip()
    path = gsm8k_file(tmp_path / "seeds.jsonl", NORMAL, medium, LONG)
    drops, too_long = Drops(), []
    instructions, (source,) = read_seeds(config(tmp_path, path).seeds, drops, limits, too_long)
    assert [i.text for i in instructions] == [NORMAL, medium]
    # After the prompt frames, the two texts over the byte bound, then the long one with the reference its critic is
    # shown (a critique leaves more room than a refinement: the medium one is short enough for it by its bytes).
    assert counter.asked[len(limits.frames()):] == [medium, LONG, f"{LONG}\n\n2"]
    exact = limits.limits("embedded")[0]
    assert exact.exact and exact.bound == 2048 - exact.reserved
    assert exact.reserved == (max(-(-len(f) // 4) for f in limits.frames()) + CHAT_OVERHEAD
                              + answer_budget(cfg.run))
    (long,) = too_long
    assert long.counted == -(-len(LONG) // 4) and long.instruction.text == LONG
    reason = (f"prompt too long for engine 'embedded': over {exact.bound:,} tokens by its tokenizer, what its 2,048-token "
              f"context leaves after {exact.reserved:,} for the prompt's frame and answers")
    assert source.read == 3 and source.kept == 2 and source.dropped == {reason: 1}
    assert drops.by_stage() == {"seeds": {f"{reason} (seeds[0] gsm8k {path})": 1}}
    assert drops.examples[("seeds", f"{reason} (seeds[0] gsm8k {path})")] == [long.instruction.instruction_id]


def test_without_a_tokenizer_a_text_counts_as_its_bytes_plus_one(tmp_path):
    cfg = config(tmp_path, "")
    bound = PromptLimits(cfg).byte_limit("embedded").bound
    fits, over = "é" * ((bound - 1) // 2) + "x" * ((bound - 1) % 2), "x" * bound  # bound - 1 and bound bytes
    assert (utf8_bytes(fits), utf8_bytes(over)) == (bound - 1, bound)
    path = gsm8k_file(tmp_path / "seeds.jsonl", fits, over)
    with PromptLimits(cfg, counters={"embedded": None}) as limits:
        instructions, (source,) = read_seeds(config(tmp_path, path).seeds, Drops(), limits)
    assert [i.text for i in instructions] == [fits]
    (reason,) = source.dropped
    assert reason.startswith(f"prompt too long for engine 'embedded': over {bound:,} UTF-8 bytes (no tokenizer: a "
                             f"byte is at most one token)")
    # An engine whose server does not answer: the same rule, and the report says why.
    dead = EngineConfig(kind="openai", model="m", base_urls=("http://127.0.0.1:9",))
    cfg = config(tmp_path, path, engines={"remote": dead}, roles=dict.fromkeys(("generator", "critic", "refiner"),
                                                                                "remote"),
                 jury=tuple(JudgeConfig(name=n, engine="remote", rubric=n) for n in ("direct", "violations", "reader")))
    with PromptLimits(cfg) as limits:
        instructions, _ = read_seeds(cfg.seeds, Drops(), limits)
        (described,) = limits.described()
    assert [i.text for i in instructions] == [fits]
    assert not described["exact"] and "no tokenizer: http://127.0.0.1:9 (llama.cpp: ConnectError" in described["counted_by"]


def test_the_smallest_context_of_the_engines_an_instruction_goes_to_decides(tmp_path):
    small, large = EngineConfig(kind="openai", base_urls=("http://a",), n_ctx=1024), \
        EngineConfig(kind="openai", base_urls=("http://b",), n_ctx=8192)
    text = "x " * 1500  # 750 tokens at 4 characters a token: fits in 8,192, not in what 1,024 leaves
    path = gsm8k_file(tmp_path / "seeds.jsonl", NORMAL, text)
    judges = tuple(JudgeConfig(name=n, engine="large", rubric=n) for n in ("direct", "violations", "reader"))
    cfg = config(tmp_path, path, engines={"small": small, "large": large}, jury=judges,
                 roles={"generator": "large", "critic": "small", "refiner": "large"})
    counters = {"small": Scripted(), "large": Scripted()}
    with PromptLimits(cfg, counters=counters) as limits:
        instructions, (source,) = read_seeds(cfg.seeds, Drops(), limits)
    assert [i.text for i in instructions] == [NORMAL]
    assert [reason.split(":")[0] for reason in source.dropped] == ["prompt too long for engine 'small'"]
    # One turn: the critic's engine gets no instruction, and the text is kept.
    one_turn = cfg.replace(run=dataclasses.replace(cfg.run, turns=1))
    with PromptLimits(one_turn, counters=counters) as limits:
        assert limits.engines == ["large"]
        assert len(read_seeds(one_turn.seeds, Drops(), limits)[0]) == 2


def test_the_critics_engine_also_counts_the_reference_the_critic_is_shown(tmp_path):
    cfg = config(tmp_path, "")
    with PromptLimits(cfg, counters={"embedded": Scripted(per=1)}) as limits:
        bound = limits.limits("embedded")[0].bound
        slack = answer_budget(cfg.run) - cfg.run.max_tokens - cfg.run.critique_max_tokens
        text, tests = "x" * (bound - 100), "y" * (slack + 200)  # fits alone, not with its tests; the tests are cut
        code = Instruction("code", "code", "s", 1, text, tests, 1)
        judged = dataclasses.replace(code, instruction_id="open", domain="open_ended")  # no critic sees it
        (long,) = limits.over([code, judged]).values()
    assert long.instruction == code and long.critic and long.bound == bound + slack and long.counted == len(text) + 2 + len(tests)
    assert long.reason.endswith(f"(the critic's prompt, with the reference it is shown: over {bound + slack:,})")
    one_turn = cfg.replace(run=dataclasses.replace(cfg.run, turns=1))
    with PromptLimits(one_turn, counters={"embedded": Scripted(per=1)}) as limits:
        assert limits.over([code]) == {}


def test_a_context_that_leaves_no_room_is_a_config_error(tmp_path):
    cfg = config(tmp_path, gsm8k_file(tmp_path / "seeds.jsonl", NORMAL),
                 engines={"embedded": EngineConfig(kind="embedded", model="m", n_ctx=256)})
    with pytest.raises(PromptLengthError, match=r"engines.embedded.n_ctx: 256 tokens leave no room for an instruction"):
        plan_seeds(cfg, "r")


# --- against a real llama-server ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_prompt_longer_than_the_context_is_dropped_by_the_servers_count_and_never_planned(tmp_path, llama):
    path = gsm8k_file(tmp_path / "seeds.jsonl", NORMAL, LONG)
    cfg = config(tmp_path, path, engines={"embedded": llama})
    plan = plan_seeds(cfg, "r1")
    assert [i.text for p in plan.plans for i in p.instructions] == [NORMAL]
    (row,) = plan.drops
    assert row["stage"] == "seeds" and row["count"] == 1
    assert row["reason"].startswith("prompt too long for engine 'embedded': over ") and \
        " tokens by its tokenizer, what its 2,048-token context leaves" in row["reason"]
    (source,) = plan.sources
    assert (source.read, source.kept) == (2, 1) and list(source.dropped) == [row["reason"].split(" (seeds[0]")[0]]
    with PromptLimits(cfg) as limits:
        (long,) = limits.over(read_seeds(cfg.seeds)[0]).values()
        exact = limits.limits("embedded")[0]
    # llama.cpp's count of 50,000 words of SmolLM2's vocabulary, nowhere near a byte a token.
    assert long.limit == exact and exact.counted_by.startswith(f"its tokenizer (llama.cpp, POST {llama.base_urls[0]}")
    assert 100_000 < long.counted < utf8_bytes(LONG) / 2


@pytest.mark.integration
def test_orchard_seeds_counts_with_a_server_of_the_embedded_model_and_shows_the_drop(tmp_path, capsys):
    path = gsm8k_file(tmp_path / "seeds.jsonl", NORMAL, LONG)
    toml = tmp_path / "orchard.toml"
    toml.write_text(f'state_dir = "{tmp_path / "state"}"\ndecontaminate = []\n\n[[seeds]]\nkind = "gsm8k"\n'
                    f'path = "{path}"\n')
    assert main(["--config", str(toml), "seeds", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (source,) = report["sources"]
    (reason,) = source["dropped"]
    assert (source["read"], source["kept"]) == (2, 1) and "tokens by its tokenizer" in reason
    (engine,) = report["prompt_length"]["engines"]
    assert engine["exact"] and "a llama-server of its model, started to count" in engine["counted_by"]
    (long,) = report["prompt_length"]["too_long"]
    assert long["row"] == 2 and long["unit"] == "tokens" and long["counted"] > long["bound"] == engine["bound"]
    assert report["kept"] == 1
    assert main(["--config", str(toml), "seeds"]) == 0
    printed = capsys.readouterr().out
    assert "read 2, kept 1, dropped 1" in printed and reason in printed
