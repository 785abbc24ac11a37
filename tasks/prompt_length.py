"""Prompts that cannot fit: an instruction too long for the context of an engine it would be sent to is dropped at the
seed stage (tasks/seeds.py: read_seeds), its reason in `drops`, and never sent.

The bound. Every engine an instruction's text goes to (the generator's; the critic's and refiner's when run.turns > 1;
each judge's) has `n_ctx` tokens per request (vLLM: also at most the `max_model_len` its /tokenize reports). Reserved
out of them: the longest fixed text a prompt puts around the instruction (`prompt_frames`: a system prompt with its
longest strategy and the refine request, the critique request, MCTS's self-evaluation, a principle, a judge's rubric
and request), counted like the instruction, plus CHAT_OVERHEAD tokens of chat markup, plus the most generated tokens
one prompt holds and asks for (`answer_budget`: a refinement holds an attempt and a critique and asks for an answer; a
judge sees two responses and answers a verdict). What is left is the instruction's bound. A critic (run.turns > 1) is
also shown the instruction's reference (its first 1,500 characters): for the critic's engine, the instruction and that
reference together must fit what the critique leaves (its attempt and critique, not a refinement's three answers).
Not reserved: the checker's feedback, which a refinement's prompt carries (the measured slack at the bound: ~150
tokens at the defaults).

Counting. A text of at most `bound - 1` UTF-8 bytes fits whatever the tokenizer (every token of a byte-level BPE
covers at least one byte of the text; SentencePiece may add one leading space marker): only longer texts are counted,
by the engine's own tokenizer, POST /tokenize, several at once. llama.cpp's llama-server answers {"content": text}
with {"tokens": [...]}; vLLM answers {"model", "prompt"} with {"count", "tokens", "max_model_len"} (llama-server
answers a "prompt" with no tokens at all, so its form is asked first and an empty count means no tokenizer). A text
over PREFIX_BYTES is counted by its first PREFIX_BYTES when those alone are over the bound. An embedded engine that
has no server yet (`orchard seeds`; a run whose shards grow on workers) gets a llama-server of its model for the
count, started only when some text needs counting and stopped after. Where no tokenizer answers (a hosted API, a server
down, llama-server not built), a text counts as its UTF-8 bytes plus one, the most tokens it can make: nothing kept can
overflow, at the cost of dropping some texts that would fit. Each drop's reason names the engine, the bound and which
count was used.
"""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import httpx

from orchard.config import RUBRICS, Config, EngineConfig, RunConfig, secret_value
from schemas.errors import OrchardError
from schemas.plan import Instruction

CHAT_OVERHEAD = 32  # tokens of chat markup: role markers of up to four messages and the generation prompt
PREFIX_BYTES = 1_000_000  # a longer text is counted by its first megabyte first
PREFIX_SLACK = 16  # tokens a prefix cut inside a word may count beyond what that stretch counts in the whole text
COUNT_THREADS = 8
TOKENIZE_TIMEOUT_S = 60.0
PROBE = "Hello world"


class PromptLengthError(OrchardError, ValueError):
    """An engine's context leaves no room for any instruction; the message names the engine and its budget."""


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def answer_budget(run: RunConfig) -> int:
    """The most generated tokens one prompt carrying an instruction holds and asks for."""
    longest_response = max(run.max_tokens, run.principle_max_tokens)
    budgets = [run.max_tokens + 1,  # a first attempt (MCTS: its steps); a self-evaluation: the partial, one word
               run.principle_max_tokens,
               2 * longest_response + run.judge_max_tokens]  # a judge: the two responses and its verdict
    if run.turns > 1:  # a refinement: the attempt, its critique, and the new answer
        budgets.append(2 * run.max_tokens + run.critique_max_tokens)
    return max(budgets)


def prompt_frames(cfg: Config) -> list[str]:
    """The fixed text of every prompt an instruction goes into, the instruction and the generated parts left out
    (the messages of one prompt joined): what a prompt adds to the instruction besides answers and chat markup."""
    # The phases' prompts, imported here: they pull in growth and verification, which reading seeds does not need.
    from schemas.domains import DOMAINS
    from tasks.jury import CORRECTNESS_TEXT, JUDGE_REQUEST, fence
    from tasks.mcts import SELF_EVAL_REQUEST, SELF_EVAL_SYSTEM
    from tasks.principles import PRINCIPLED_SYSTEM, load_constitution
    from tasks.turns import CRITIC_SYSTEM, REFINE_REQUEST

    frames = [SELF_EVAL_SYSTEM + SELF_EVAL_REQUEST.format(task="", partial="")]
    for domain in DOMAINS.values():
        if domain.strategies:
            strategy = max(domain.strategies.values(), key=utf8_bytes)
            system = domain.system.format(strategy=strategy, format=domain.answer_format)
            frames.append(system + REFINE_REQUEST.format(feedback="", critique="", format=domain.answer_format))
            frames.append(CRITIC_SYSTEM + f"Task:\n\n\n{domain.critic_reference.format(reference='')}\n\nAttempt:\n\n\n"
                                          "The checker said: ")
    principles = load_constitution(cfg.run.constitution or None).principles
    longest_principle = max([p for pr in principles for p in (pr.text, pr.antithesis)], key=utf8_bytes, default="")
    frames.append(PRINCIPLED_SYSTEM.format(principle=longest_principle))
    nonce = "0" * 8
    criterion = max([CORRECTNESS_TEXT, *(p.text for p in principles)], key=utf8_bytes)
    judge = JUDGE_REQUEST.format(criterion=criterion, request=fence("REQUEST", "", nonce),
                                 a=fence("RESPONSE A", "", nonce), b=fence("RESPONSE B", "", nonce))
    frames.append(max(RUBRICS.values(), key=utf8_bytes) + judge)
    return frames


def receiving_engines(cfg: Config) -> list[str]:
    """The engines an instruction's text is sent to, in role order: generator, critic and refiner (run.turns > 1),
    then each judge's."""
    names = [cfg.roles["generator"]]
    if cfg.run.turns > 1:
        names += [cfg.roles["critic"], cfg.roles["refiner"]]
    names += [judge.engine for judge in cfg.jury]
    return list(dict.fromkeys(names))


# --- tokenizers -------------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    how: str  # which tokenizer counts, for reasons and reports: "its tokenizer (llama.cpp, http://…/tokenize)"
    max_model_len: int | None  # the context the server itself reports, if it does

    def count(self, texts: Sequence[str], over: int) -> list[int | None]:
        """Each text's tokens (for a text over PREFIX_BYTES maybe those of its start alone, when already more than
        `over`); None where a text could not be counted."""


@dataclass
class EndpointTokenizer:
    """An OpenAI-compatible server's own tokenizer: POST /tokenize, llama.cpp's or vLLM's form."""

    url: str
    dialect: str  # llama.cpp | vllm
    model: str = ""
    api_key: str = ""
    max_model_len: int | None = None
    label: str = ""  # how it is named in reasons; default: its dialect and URL

    @property
    def how(self) -> str:
        return self.label or f"its tokenizer ({self.dialect}, POST {self.url}/tokenize)"

    @classmethod
    def probe(cls, engine: EngineConfig) -> tuple[EndpointTokenizer | None, str]:
        """The first base URL of `engine` whose /tokenize counts a probe text, or None and why none did."""
        try:
            key = secret_value(engine.api_key)
        except OrchardError as exc:
            return None, str(exc)
        tried = []
        for url in engine.base_urls:
            for dialect in ("llama.cpp", "vllm"):
                found = cls(url.rstrip("/"), dialect, engine.model, key)
                try:
                    answer = found._post(PROBE, timeout=10.0)
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    tried.append(f"{url} ({dialect}: {type(exc).__name__}: {str(exc)[:120]})")
                    if isinstance(exc, httpx.TransportError):
                        break  # nothing answers there
                    continue
                if found._tokens(answer) > 0:
                    if isinstance(answer.get("max_model_len"), int):
                        found.max_model_len = answer["max_model_len"]
                    return found, ""
                tried.append(f"{url} ({dialect}: no tokens for a probe text)")
        return None, "; ".join(tried) or "no base URL"

    def _post(self, text: str, *, timeout: float = TOKENIZE_TIMEOUT_S) -> dict[str, Any]:
        body = ({"content": text} if self.dialect == "llama.cpp"
                else {"model": self.model, "prompt": text, "add_special_tokens": False})
        response = httpx.post(f"{self.url}/tokenize", json=body, timeout=timeout,
                              headers={"Authorization": f"Bearer {self.api_key}"})
        response.raise_for_status()
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError(f"not a tokenize answer: {str(answer)[:80]}")
        return answer

    def _tokens(self, answer: dict[str, Any]) -> int:
        return int(answer["count"]) if self.dialect == "vllm" else len(answer["tokens"])

    def _one(self, text: str, over: int) -> int | None:
        try:
            data = text.encode("utf-8", "surrogatepass")
            if len(data) > PREFIX_BYTES:
                start = self._tokens(self._post(data[:PREFIX_BYTES].decode("utf-8", "ignore")))
                if start - PREFIX_SLACK > over:
                    return start - PREFIX_SLACK
            return self._tokens(self._post(text))
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def count(self, texts: Sequence[str], over: int) -> list[int | None]:
        if len(texts) <= 1:
            return [self._one(text, over) for text in texts]
        with ThreadPoolExecutor(min(COUNT_THREADS, len(texts))) as pool:
            return list(pool.map(lambda text: self._one(text, over), texts))


# --- the limits -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLimit:
    """How long an instruction may be for one engine, and how it was counted."""

    engine: str
    n_ctx: int
    reserved: int  # tokens of frame, chat markup and answers
    bound: int  # the most tokens (exact) or UTF-8 bytes + 1 (not exact) an instruction may count
    exact: bool  # counted by the engine's tokenizer
    counted_by: str

    @property
    def reason(self) -> str:
        unit = "tokens by its tokenizer" if self.exact else "UTF-8 bytes (no tokenizer: a byte is at most one token)"
        return (f"prompt too long for engine {self.engine!r}: over {self.bound:,} {unit}, what its {self.n_ctx:,}-token "
                f"context leaves after {self.reserved:,} for the prompt's frame and answers")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reason": self.reason}


@dataclass(frozen=True)
class TooLong:
    """An instruction dropped for its length: against which engine's limit, and what it counted."""

    instruction: Instruction
    limit: EngineLimit
    counted: int  # tokens (limit.exact) or UTF-8 bytes + 1; at least this many for a text over PREFIX_BYTES
    critic: bool = False  # counted with the reference the critic is shown, against what a critique leaves
    critic_slack: int = 0  # what a critique leaves beyond the limit's bound

    @property
    def bound(self) -> int:
        return self.limit.bound + (self.critic_slack if self.critic else 0)

    @property
    def reason(self) -> str:
        if self.critic:
            return f"{self.limit.reason} (the critic's prompt, with the reference it is shown: over {self.bound:,})"
        return self.limit.reason

    def to_dict(self) -> dict[str, Any]:
        text = self.instruction.text
        return {"instruction_id": self.instruction.instruction_id, "domain": self.instruction.domain,
                "source": self.instruction.source, "row": self.instruction.source_row,
                "text": text[:200] + ("…" if len(text) > 200 else ""), "bytes": utf8_bytes(text),
                "engine": self.limit.engine, "counted": self.counted,
                "unit": "tokens" if self.limit.exact else "UTF-8 bytes + 1", "bound": self.bound, "critic": self.critic,
                "counted_by": self.limit.counted_by}


class PromptLimits:
    """The length gate of one planning: `over(instructions)` says which are too long for which engine. Use it as a
    context manager: a tokenizer server it starts stops at the end. `counters` (engine name -> TokenCounter, or None
    for none) replaces finding each engine's tokenizer (tests)."""

    def __init__(self, cfg: Config, *, counters: dict[str, TokenCounter | None] | None = None,
                 start_servers: bool = True) -> None:
        self.cfg = cfg
        self.engines = receiving_engines(cfg)
        self._given = counters
        self._start_servers = start_servers
        self._frames: list[str] | None = None
        self._limits: dict[str, tuple[EngineLimit, EngineLimit, TokenCounter | None]] = {}
        self._seen: dict[str, TooLong | None] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> PromptLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def frames(self) -> list[str]:
        if self._frames is None:
            self._frames = prompt_frames(self.cfg)
        return self._frames

    def byte_limit(self, name: str) -> EngineLimit:
        """The engine's limit counted in UTF-8 bytes + 1 (an upper bound on tokens): a shorter text surely fits."""
        engine = self.cfg.engines[name]
        # Before anything is counted or started: a context the answers alone fill is a config error.
        self._checked(EngineLimit(name, engine.n_ctx, CHAT_OVERHEAD + answer_budget(self.cfg.run), 0, False, ""), 1)
        reserved = max(utf8_bytes(frame) + 1 for frame in self.frames()) + CHAT_OVERHEAD + answer_budget(self.cfg.run)
        return EngineLimit(name, engine.n_ctx, reserved, engine.n_ctx - reserved, False, "")

    @staticmethod
    def _checked(limit: EngineLimit, frame: int = 0) -> EngineLimit:
        if limit.n_ctx - limit.reserved - frame < 1:
            raise PromptLengthError(
                f"engines.{limit.engine}.n_ctx: {limit.n_ctx:,} tokens leave no room for an instruction: the prompt's "
                f"frame and answers take {limit.reserved + frame:,} or more (run.max_tokens, critique_max_tokens, "
                f"judge_max_tokens, principle_max_tokens); raise n_ctx or lower them")
        return limit

    def limits(self, name: str) -> tuple[EngineLimit, EngineLimit, TokenCounter | None]:
        """(the exact limit, or the byte limit where there is no tokenizer; the byte limit; the tokenizer)."""
        if name not in self._limits:
            by_bytes = self.byte_limit(name)
            counter, why = self._counter(name)
            if counter is None:
                limit = self._checked(dataclasses.replace(by_bytes, counted_by=f"UTF-8 bytes + 1 (no tokenizer: {why})"))
                self._limits[name] = (limit, limit, None)
            else:
                engine = self.cfg.engines[name]
                n_ctx = min(engine.n_ctx, counter.max_model_len or engine.n_ctx)
                frames = self.frames()
                counted = counter.count(frames, 0)
                frame = max((n if n is not None else utf8_bytes(text) + 1) for text, n in zip(frames, counted))
                reserved = frame + CHAT_OVERHEAD + answer_budget(self.cfg.run)
                exact = self._checked(EngineLimit(name, n_ctx, reserved, n_ctx - reserved, True, counter.how))
                fallback = dataclasses.replace(by_bytes, counted_by=f"UTF-8 bytes + 1 ({counter.how} did not "
                                                                    f"count the text)")
                self._limits[name] = (exact, fallback, counter)
        return self._limits[name]

    def _counter(self, name: str) -> tuple[TokenCounter | None, str]:
        if self._given is not None:
            found = self._given.get(name)
            return found, "" if found is not None else "none given"
        engine = self.cfg.engines[name]
        if engine.base_urls:
            return EndpointTokenizer.probe(engine)
        if engine.kind != "embedded":
            return None, "its launch command is not run to read seeds"
        if not self._start_servers:
            return None, "its llama-server is not running"
        from orchard.services import start_llama_server  # starts a process: only when a text needs counting

        try:
            server = start_llama_server(dataclasses.replace(engine, max_concurrency=1), self.cfg.state_path,
                                        name=f"tokenizer-{name}")
        except (OrchardError, OSError) as exc:
            return None, f"its llama-server could not start: {exc}"
        self._stack.callback(server.stop)
        counter, why = EndpointTokenizer.probe(dataclasses.replace(engine, kind="openai", base_urls=(server.url,)))
        if counter is not None:
            counter.label = "its tokenizer (llama.cpp: a llama-server of its model, started to count)"
        return counter, why

    def over(self, instructions: Sequence[Instruction]) -> dict[str, TooLong]:
        """The instructions too long for some receiving engine (by id), each against the first engine, in role
        order, whose limit it is over."""
        from tasks.turns import CRITIC_REFERENCE_CHARS, answered_by_turns

        found: dict[str, TooLong] = {}
        pending = {i.instruction_id: i for i in instructions if i.instruction_id not in self._seen}
        run = self.cfg.run
        critics = {self.cfg.roles["critic"]} if run.turns > 1 else set()
        # A critique holds the attempt and asks for the critique: what it leaves beyond the bound, for the reference.
        slack = answer_budget(run) - run.max_tokens - run.critique_max_tokens
        for name in self.engines:
            if not pending:
                break
            by_bytes = self.byte_limit(name)
            # (instruction id, the text to count, whether it is the critic's, what beyond the bound it may count)
            checks = [(iid, i.text, False, 0) for iid, i in pending.items()]
            if name in critics:
                checks += [(iid, f"{i.text}\n\n{i.reference[:CRITIC_REFERENCE_CHARS]}", True, slack)
                           for iid, i in pending.items() if answered_by_turns(i) and i.reference]
            unsure = [check for check in checks if utf8_bytes(check[1]) + 1 > by_bytes.bound + check[3]]
            if not unsure:
                continue
            limit, fallback, counter = self.limits(name)
            counts = (counter.count([check[1] for check in unsure], limit.bound) if counter is not None
                      else [None] * len(unsure))
            for (iid, text, critic, extra), n in zip(unsure, counts):
                judged_by, counted = (limit, n) if n is not None else (fallback, utf8_bytes(text) + 1)
                if iid in pending and counted > judged_by.bound + extra:
                    self._seen[iid] = TooLong(pending.pop(iid), judged_by, counted, critic, extra)
        for iid in pending:
            self._seen[iid] = None
        for instruction in instructions:
            dropped = self._seen.get(instruction.instruction_id)
            if dropped is not None:
                found[instruction.instruction_id] = dropped
        return found

    def described(self) -> list[dict[str, Any]]:
        """Per receiving engine: its limit and how texts were counted (the byte limit only, when no text needed
        counting)."""
        out = []
        for name in self.engines:
            if name in self._limits:
                out.append(self._limits[name][0].to_dict())
            else:
                limit = self.byte_limit(name)
                out.append({**limit.to_dict(), "counted_by": f"not needed: no instruction is over {limit.bound:,} "
                                                             f"UTF-8 bytes, which no tokenizer makes more tokens of"})
        return out
