"""A simulated batched GPU engine, and how busy the nightly flow keeps it compared with a raw replay of its requests.

The engine (`serve`, its own process so its CPU is not the factory's) is an OpenAI-compatible HTTP server that
decodes `slots` sequences at once. A request with `n` choices is `n` sequences; each waits for a free slot (FIFO),
holds it for `prefill + per_token × tokens` and frees it; the request is answered when its last sequence ends.
Lengths are drawn from a lognormal (median `median_tokens`) capped at `max_tokens`; texts are a function of the
request's seed (+ k for choice k) and prompt, so the same request gets the same answer. It serves:

- POST /v1/chat/completions: `n`, `seed`, `max_tokens`; a judge's request (`response_format`, or a prompt asking
  for a "winner") gets a verdict JSON `{"reason": …, "winner": "A"|"B"|"tie"}`; `logprobs`/`top_logprobs` (a
  one-token self-evaluation) get Yes/No alternatives; a math prompt (one that asks for an 'Answer:' line) ends with
  'Answer: <n>', right about half the time when the bench told the engine the reference answers;
- POST /v1/completions: raw continuations (MCTS steps), finish_reason `length` when the drawn length reached
  `max_tokens`, else `stop` (then with the 'Answer:' line); `logprobs` as in the legacy completions API;
- GET /v1/models; usage with prompt_tokens (words of the prompt) and completion_tokens (sum over choices);
- GET /sim/stats: the timeline since the last reset, summarised (see occupancy below) with every request body;
  POST /sim/reset: start a new period (timeline, request log and accepted-connection count start from zero).

Occupancy of a period: the time-average of busy slots ÷ `slots` over [the first request's arrival, the last answer
sent], i.e. Σ over sequences of (end − start) ÷ (slots × (last answer sent − first arrival)). A slot is busy from the
moment a sequence takes it (prefill included) until it frees it. 1.0 means no slot was ever idle in that window;
"flow" is the nightly flow's period (the window is its growth: no request is sent outside it), "raw" the replay's.

The benchmark, for each instruction count: (a) the nightly flow on arithmetic seeds (domain math, turns 2, MCTS,
jury of three and hard negatives on: RunConfig/Config defaults), every engine and judge on the simulated engine,
inside `embedded_services` (SeaweedFS only); (b) raw: every request body the engine received from the flow, sent
again exactly, all ready at once, by `--concurrency` workers with a kept httpx connection each. Both run
against the same engine, one after the other. Factory CPU is measured from /proc and `resource.getrusage`: this
process (RUSAGE_SELF) + its reaped children (RUSAGE_CHILDREN) + its live descendants (utime+stime+cutime+cstime
of /proc/<pid>/stat), the simulated engine's process left out; Prefect's ephemeral API is started before the
measurement (a trivial flow), so its start-up is not counted. "run" is CPU over the whole `nightly()` call,
"growth" CPU within the flow's engine window (sampled every 0.2 s and interpolated; the sampler's own /proc
reads, a fraction of a ms per node, are counted too). "occ/growth" divides the
flow's busy slot time by slots × its whole growth wall (summary wall_s: verification, landing, validation included).

Usage:
    PYTHONPATH=. .venv/bin/python bench/gpu_sim.py [--instructions 64 256] [--slots 64] [--per-token-ms 10]
        [--prefill-ms 20] [--concurrency N] [--per-shard 32] [--instant]
    PYTHONPATH=. .venv/bin/python bench/gpu_sim.py serve --port 8000 [--slots 64 ...]   # the engine alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"


# --- the simulated engine ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimSettings:
    """How the simulated GPU decodes: slots in its batch, prefill and per-token time, the answer-length law."""

    slots: int = 64
    prefill_s: float = 0.020
    per_token_s: float = 0.010
    median_tokens: float = 48.0
    sigma: float = 0.6
    correct_share: float = 0.5  # math answers whose reference the engine knows are right this often

    @classmethod
    def instant(cls) -> "SimSettings":
        """An engine that is almost never the bottleneck: a ceiling for nodes/s."""
        return cls(slots=512, prefill_s=0.0, per_token_s=0.001)


WORDS = ("first", "we", "add", "the", "numbers", "then", "multiply", "by", "so", "which", "gives", "check", "that",
         "each", "step", "is", "right", "total", "left", "over", "half", "more", "less", "apples", "boxes", "of")
VERDICT_REASONS = ("A follows the criterion more closely", "B is clearer and complete", "both are equally good",
                   "A has an error", "B misses part of the task", "A is shorter and right")
_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def _rng(body: Mapping[str, Any], path: str, k: int) -> random.Random:
    """The random source of choice `k`: its request's seed (+ k, as vLLM numbers siblings) and prompt, stably hashed."""
    seed = body.get("seed")
    prompt = json.dumps(body.get("messages") if "messages" in body else body.get("prompt"), sort_keys=True)
    base = f"{path}|{'none' if seed is None else int(seed) + k}|{k if seed is None else ''}|{prompt}"
    return random.Random(zlib.crc32(base.encode()) * 7919 + len(prompt))


def prompt_words(body: Mapping[str, Any]) -> int:
    """Prompt tokens, approximated by words."""
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


def _user_texts(body: Mapping[str, Any]) -> list[str]:
    if "messages" in body:
        return [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "user"]
    return _CHATML_USER.findall(str(body.get("prompt", "")))


def _is_judge(body: Mapping[str, Any]) -> bool:
    if body.get("response_format"):
        return True
    return "messages" in body and any('"winner"' in str(m.get("content", "")) for m in body["messages"])


def _wants_logprobs(body: Mapping[str, Any], chat: bool) -> int:
    if chat:
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    return int(body.get("logprobs") or 0)


def _asks_answer_line(body: Mapping[str, Any]) -> bool:
    if "messages" in body:
        return any("Answer:" in str(m.get("content", "")) for m in body["messages"])
    return "Answer:" in str(body.get("prompt", ""))


@dataclass(frozen=True)
class Draft:
    """One choice as the engine will write it: text, tokens decoded, finish reason, first-token alternatives."""

    text: str
    tokens: int
    finish_reason: str
    yes_logprob: float | None = None  # set for a self-evaluation: log P(Yes) among Yes/No


def draft_choice(settings: SimSettings, path: str, body: Mapping[str, Any], k: int,
                 references: Mapping[str, str]) -> Draft:
    """Return choice `k` of a request: the same body always gets the same draft."""
    rng = _rng(body, path, k)
    max_tokens = max(1, int(body.get("max_tokens") or 16))
    drawn = max(1, round(rng.lognormvariate(math.log(settings.median_tokens), settings.sigma)))
    tokens = min(drawn, max_tokens)
    finish = "length" if drawn >= max_tokens else "stop"
    chat = path.endswith("/chat/completions")
    if _wants_logprobs(body, chat) or max_tokens == 1:
        yes = rng.random()
        word = "Yes" if yes >= 0.5 else "No"
        return Draft(word, 1, "length" if max_tokens == 1 else "stop",
                     math.log(max(yes, 1e-6)) if yes >= 0.5 else math.log(max(1 - yes, 1e-6)))
    if chat and _is_judge(body):
        reason = rng.choice(VERDICT_REASONS)
        winner = rng.choices(("A", "B", "tie"), weights=(0.45, 0.45, 0.1))[0]
        return Draft(json.dumps({"reason": reason, "winner": winner}), tokens, "stop")
    words = [rng.choice(WORDS) for _ in range(tokens)]
    if finish == "length" or not _asks_answer_line(body):
        return Draft(" ".join(words), tokens, finish)
    reference = next((references[t] for t in _user_texts(body) if t in references), None)
    if reference is not None and rng.random() < settings.correct_share:
        answer = reference
    elif reference is not None and re.fullmatch(r"-?\d+", reference):
        answer = str(int(reference) + rng.choice((-2, -1, 1, 2, 10)))
    else:
        answer = str(rng.randint(0, 99))
    lines = [" ".join(words[i:i + 8]) for i in range(0, max(0, tokens - 2), 8)]
    return Draft("\n".join([*lines, f"Answer: {answer}"]), tokens, finish)


def _logprobs(draft: Draft, top: int, chat: bool) -> dict[str, Any]:
    """The first token's alternatives in the chat (`content`) or legacy completions layout."""
    chosen = draft.yes_logprob if draft.yes_logprob is not None else -0.1
    other = math.log(max(1e-6, 1 - math.exp(chosen)))
    alternatives = [(draft.text, chosen), ("No" if draft.text == "Yes" else "Yes", other),
                    ("The", other - 3.0), ("I", other - 3.5)][:max(1, top)]
    if chat:
        return {"content": [{"token": draft.text, "logprob": chosen, "bytes": list(draft.text.encode()),
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                              for t, lp in alternatives]}]}
    return {"tokens": [draft.text], "token_logprobs": [chosen], "text_offset": [0],
            "top_logprobs": [{t: lp for t, lp in alternatives}]}


class GpuSim:
    """The engine's batch: slots taken FIFO by sequences, and the timeline of one period (since the last reset)."""

    def __init__(self, settings: SimSettings, references: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.references = dict(references or {})
        self._slots = asyncio.Semaphore(settings.slots)
        self.reset()

    def reset(self) -> None:
        """Start a new period: timeline, request log and connection count from zero."""
        self.sequences: list[tuple[float, float]] = []  # (slot taken, slot freed)
        self.requests: list[dict[str, Any]] = []  # path, body, arrival, answered
        self.period = getattr(self, "period", 0) + 1
        self.connections = 0  # connections that carried a completion request in this period
        self.accepted = 0  # every connection accepted in this period (health checks and /sim calls too)
        self.models_requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.completion_tokens = 0

    async def _decode(self, tokens: int) -> None:
        async with self._slots:
            start = time.monotonic()
            await asyncio.sleep(self.settings.prefill_s + self.settings.per_token_s * tokens)
            self.sequences.append((start, time.monotonic()))

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Decode every choice of one request in the batch; return the OpenAI-shaped answer."""
        arrival = time.monotonic()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        chat = path.endswith("/chat/completions")
        n = max(1, int(body.get("n") or 1))
        drafts = [draft_choice(self.settings, path, body, k, self.references) for k in range(n)]
        try:
            await asyncio.gather(*(self._decode(d.tokens) for d in drafts))
        finally:
            self.in_flight -= 1
        top = _wants_logprobs(body, chat)
        choices = []
        for k, draft in enumerate(drafts):
            choice: dict[str, Any] = {"index": k, "finish_reason": draft.finish_reason,
                                      "logprobs": _logprobs(draft, top, chat) if top else None}
            choice.update({"message": {"role": "assistant", "content": draft.text}} if chat else {"text": draft.text})
            choices.append(choice)
        tokens = sum(d.tokens for d in drafts)
        self.completion_tokens += tokens
        self.requests.append({"path": path, "body": body, "arrival": arrival, "answered": time.monotonic()})
        return {"id": f"sim-{len(self.requests)}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", "sim"), "choices": choices,
                "usage": {"prompt_tokens": prompt_words(body), "completion_tokens": tokens,
                          "total_tokens": prompt_words(body) + tokens}}

    def stats(self, *, bodies: bool = False) -> dict[str, Any]:
        """The period's summary: requests, sequences, window, occupancy, connections (and every request body)."""
        found: dict[str, Any] = {"slots": self.settings.slots, "requests": len(self.requests),
                                 "sequences": len(self.sequences), "connections": self.connections,
                                 "accepted": self.accepted,
                                 "models_requests": self.models_requests, "peak_in_flight": self.peak_in_flight,
                                 "completion_tokens": self.completion_tokens}
        if self.requests:
            first = min(r["arrival"] for r in self.requests)
            last = max(r["answered"] for r in self.requests)
            busy = sum(end - start for start, end in self.sequences)
            window = last - first
            found.update(first_arrival=first, last_answer=last, window_s=window, busy_slot_s=busy,
                         occupancy=busy / (self.settings.slots * window) if window > 0 else 0.0,
                         profile=occupancy_profile(self.sequences, first, last, self.settings.slots))
        if bodies:
            found["bodies"] = [{"path": r["path"], "body": r["body"], "arrival": r["arrival"], "answered": r["answered"]}
                               for r in self.requests]
        return found


def occupancy_profile(sequences: Sequence[tuple[float, float]], first: float, last: float, slots: int,
                      bins: int = 20) -> list[float]:
    """Occupancy (busy slots ÷ slots, time-averaged) in each of `bins` equal parts of [first, last]."""
    width = (last - first) / bins
    if width <= 0:
        return []
    busy = [0.0] * bins
    for start, end in sequences:
        for b in range(max(0, int((start - first) / width)), min(bins, int((end - first) / width) + 1)):
            lo, hi = first + b * width, first + (b + 1) * width
            busy[b] += max(0.0, min(end, hi) - max(start, lo))
    return [round(x / (slots * width), 3) for x in busy]


# --- its HTTP front: HTTP/1.1 with keep-alive on asyncio streams (fast enough for hundreds of requests/s) ----------


def _http_response(status: int, payload: Any, *, close: bool = False) -> bytes:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    return head.encode() + body


async def _route(sim: GpuSim, method: str, path: str, body: bytes, seen: list[int]) -> tuple[int, Any]:
    """Answer one request; `seen` holds the last period this connection was counted in."""
    path = path.split("?", 1)[0]
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
        try:
            request = json.loads(body)
        except ValueError:
            return 400, {"error": {"message": "body is not JSON"}}
        if seen[0] != sim.period:
            seen[0] = sim.period
            sim.connections += 1
        return 200, await sim.complete(path, request)
    if method == "GET" and path == "/v1/models":
        sim.models_requests += 1
        return 200, {"object": "list", "data": [{"id": "sim", "object": "model", "owned_by": "gpu_sim"}]}
    if method == "GET" and path == "/sim/stats":
        return 200, sim.stats(bodies=True)
    if method == "POST" and path == "/sim/reset":
        before = sim.stats()
        sim.reset()
        return 200, before
    return 404, {"error": {"message": f"{method} {path} is not served"}}


async def _connection(sim: GpuSim, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sim.accepted += 1
    seen = [0]
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            close = headers.get("connection", "").lower() == "close"
            status, payload = await _route(sim, method, path, body, seen)
            writer.write(_http_response(status, payload, close=close))
            await writer.drain()
            if close:
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(settings: SimSettings, port: int = 0, references: Mapping[str, str] | None = None,
                ready: threading.Event | None = None, bound: list[int] | None = None) -> None:
    """Serve the simulated engine on 127.0.0.1:`port` until cancelled; print (or put in `bound`) the port."""
    sim = GpuSim(settings, references)
    server = await asyncio.start_server(lambda r, w: _connection(sim, r, w), HOST, port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    if bound is not None:
        bound.append(port)
    else:
        print(f"listening {port}", flush=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def sim_in_thread(settings: SimSettings, references: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run the engine on its own event loop in a thread (for tests); yield its base URL."""
    loop = asyncio.new_event_loop()
    ready, bound = threading.Event(), []
    task: list[asyncio.Task] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(serve(settings, 0, references, ready, bound)))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the simulated engine did not start")
    try:
        yield f"http://{HOST}:{bound[0]}"
    finally:
        loop.call_soon_threadsafe(task[0].cancel)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def sim_process(settings: SimSettings, references: Mapping[str, str], state: Path) -> Iterator[tuple[str, int]]:
    """Run the engine as a child process (its CPU is not the factory's); yield its base URL and pid."""
    answers = state / "references.json"
    answers.write_text(json.dumps(references))
    argv = [sys.executable, __file__, "serve", "--slots", str(settings.slots),
            "--prefill-ms", str(settings.prefill_s * 1000), "--per-token-ms", str(settings.per_token_s * 1000),
            "--median-tokens", str(settings.median_tokens), "--references", str(answers)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("listening "):
            raise RuntimeError(f"the simulated engine did not start: {line!r}")
        yield f"http://{HOST}:{int(line.split()[1])}", process.pid
    finally:
        process.terminate()
        process.wait(10)


def sim_call(url: str, method: str, path: str) -> dict[str, Any]:
    """Call one of the engine's /sim routes."""
    import httpx

    return httpx.request(method, url + path, timeout=60.0).json()


# --- factory CPU ------------------------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def proc_tree() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Every live process's children, and its CPU seconds (its own and its reaped children's), from /proc."""
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(f) for f in fields[11:15]) / _TICK  # utime, stime, cutime, cstime
    return parents, times


def _proc_cpu(exclude: set[int]) -> float:
    """CPU seconds of this process's live descendants (and their reaped children), subtrees of `exclude` left out."""
    parents, times = proc_tree()
    total, todo = 0.0, list(parents.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        total += times.get(pid, 0.0)
        todo.extend(parents.get(pid, []))
    return total


def factory_cpu(exclude: set[int]) -> tuple[float, float]:
    """Return (CPU s of this process, CPU s of its children: reaped ones + live descendants but `exclude`)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime + _proc_cpu(exclude)


class CpuSampler:
    """Samples factory CPU every `every_s` on a thread, to read it at instants known only afterwards."""

    def __init__(self, exclude: set[int], every_s: float = 0.2) -> None:
        self.exclude, self.every_s = exclude, every_s
        self.samples: list[tuple[float, float]] = []  # (monotonic, total CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), sum(factory_cpu(self.exclude))))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), sum(factory_cpu(self.exclude))))

    def at(self, when: float) -> float:
        """CPU seconds at `when`, interpolated between samples."""
        before = max((s for s in self.samples if s[0] <= when), default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= when), default=self.samples[-1])
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (when - before[0]) / (after[0] - before[0])


# --- the benchmark ----------------------------------------------------------------------------------------------


async def replay(url: str, bodies: Sequence[Mapping[str, Any]], concurrency: int) -> dict[str, int]:
    """Send every logged request body again, all ready at once: `concurrency` workers, each with its own kept
    connection, take the next body as soon as their last answer came. Return the tokens answered: completion,
    prompt and cached prompt tokens (as the server reports them in usage).

    One client per worker, not one pool for all: httpcore's pool walks every waiting request on every release,
    which at hundreds in flight costs more CPU than the requests (the instant engine idled behind it).
    """
    import httpx

    queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
    for logged in bodies:
        queue.put_nowait(logged)
    totals = {"completion_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0}

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=600.0, limits=httpx.Limits(max_connections=1),
                                     headers={"Authorization": "Bearer orchard"}) as client:
            while not queue.empty():
                logged = queue.get_nowait()
                response = await client.post(url + logged["path"], json=logged["body"])
                response.raise_for_status()
                usage = response.json().get("usage") or {}
                totals["completion_tokens"] += int(usage.get("completion_tokens") or 0)
                totals["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                totals["cached_tokens"] += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return totals


def sim_config(state: Path, url: str, instructions: int, per_shard: int, concurrency: int):
    """The run's Config: arithmetic seeds, run/jury defaults, every role and judge on the simulated engine."""
    from orchard.config import Config, EngineConfig, RunConfig, SeedSource

    preset = Config()
    engine = EngineConfig(kind="openai", model="sim", base_urls=(url,), max_concurrency=concurrency,
                          structured_output="json_schema", timeout_s=600.0)
    seeds = tuple(SeedSource(kind="arithmetic", count=count, difficulty=1, seed=seed)
                  for seed, count in seed_chunks(instructions))
    return Config(state_dir=str(state), run=RunConfig(instructions_per_shard=per_shard), seeds=seeds,
                  engines={"sim": engine}, roles={role: "sim" for role in preset.roles},
                  jury=tuple(dataclasses.replace(judge, engine="sim") for judge in preset.jury))


# Difficulty 1 has fewer than 256 distinct problems per generator seed: larger runs draw from several seeds.
SEED_CHUNK = 64


def seed_chunks(instructions: int) -> list[tuple[int, int]]:
    """(generator seed, count) of each arithmetic seed source of a run of `instructions`."""
    return [(3 + i, min(SEED_CHUNK, instructions - start)) for i, start in enumerate(range(0, instructions, SEED_CHUNK))]


def references_of(instructions: int) -> dict[str, str]:
    """The reference answer of each arithmetic seed, by its text: the engine answers some of them right."""
    from tasks.seeds import generate_arithmetic

    return {i.text: i.reference for seed, count in seed_chunks(instructions)
            for i in generate_arithmetic(count, difficulty=1, seed=seed)}


def warm_prefect() -> None:
    """Start Prefect's ephemeral API (a trivial flow), so its start-up is not counted as the factory's CPU."""
    from prefect import flow

    @flow(name="gpu-sim-warm-up")
    def warm_up() -> int:
        return 1

    warm_up()


def bench_one(settings: SimSettings, instructions: int, per_shard: int, concurrency: int, mode: str,
              state_root: Path) -> list[dict[str, Any]]:
    """Run the flow and the raw replay against one fresh engine; return a row per (flow, raw)."""
    from flows.nightly import nightly
    from orchard.services import embedded_services

    state = state_root / f"{mode}-{instructions}"
    state.mkdir(parents=True)
    with sim_process(settings, references_of(instructions), state) as (url, sim_pid):
        cfg = sim_config(state, url, instructions, per_shard, concurrency)
        with embedded_services(cfg) as live:
            sim_call(url, "POST", "/sim/reset")  # embedded_services' own checks are not the flow's
            with CpuSampler({sim_pid}) as cpu:
                started = time.monotonic()
                result = nightly(config=live.to_dict(), run_id=f"bench-{mode}-{instructions}")
                flow_wall = time.monotonic() - started
            summary = result if isinstance(result, dict) else result.data
            flow = sim_call(url, "GET", "/sim/stats")
            sim_call(url, "POST", "/sim/reset")
            bodies = flow.pop("bodies")
            (state / "requests.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bodies))
            started = time.monotonic()
            asyncio.run(replay(url, bodies, concurrency))
            raw_wall = time.monotonic() - started
            raw = sim_call(url, "GET", "/sim/stats")
            raw.pop("bodies")
    nodes = int(summary.get("nodes") or 0)
    run_cpu = cpu.samples[-1][1] - cpu.samples[0][1]
    growth_cpu = cpu.at(flow["last_answer"]) - cpu.at(flow["first_arrival"])
    (state / "timeline.json").write_text(json.dumps({"flow": flow, "raw": raw, "summary_nodes": nodes}, default=str))
    base = {"instructions": instructions, "mode": mode, "slots": settings.slots}
    return [
        {**base, "who": "flow", **_row(flow), "nodes": nodes, "busy_slot_s": flow.get("busy_slot_s"), "growth_wall_s": summary.get("wall_s"),
         "flow_wall_s": flow_wall, "pairs": summary.get("pairs"), "trees": summary.get("trees"), "status": summary.get("status"),
         "run_cpu_s": run_cpu, "growth_cpu_s": growth_cpu, "timeline": str(state / "timeline.json")},
        {**base, "who": "raw", **_row(raw), "wall_s": raw_wall},
    ]


def _row(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {k: stats.get(k) for k in ("requests", "sequences", "connections", "occupancy", "window_s",
                                      "peak_in_flight", "completion_tokens", "profile")}


def print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    """One line per (instructions, mode, flow|raw), then the flow ÷ raw ratio of occupancy and requests/s."""
    head = (f"{'instr':>5} {'mode':<7} {'who':<4} {'occupancy':>9} {'occ/growth':>10} {'req':>6} {'req/s':>7} {'window s':>8} "
            f"{'nodes':>6} {'nodes/s':>7} {'n/s wall':>8} {'cpu ms/node run':>15} {'growth':>7} {'conns':>6} {'peak infl':>9}")
    print(head)
    print("-" * len(head))
    for row in rows:
        rps = row["requests"] / row["window_s"] if row.get("window_s") else 0.0
        if row["who"] == "flow":
            nodes, wall = row["nodes"], row["growth_wall_s"] or 0.0
            per_node = f"{1000 * row['run_cpu_s'] / nodes:>15.1f} {1000 * row['growth_cpu_s'] / nodes:>7.1f}" \
                if nodes else f"{'-':>15} {'-':>7}"
            window = row.get("window_s") or 0.0
            extra = f"{nodes:>6} {nodes / window if window else 0:>7.1f} {nodes / wall if wall else 0:>8.1f} {per_node}"
            over_growth = f"{row['busy_slot_s'] / (row['slots'] * wall) if wall else 0:>10.3f}"
        else:
            extra = f"{'':>6} {'':>7} {'':>8} {'':>15} {'':>7}"
            over_growth = f"{'':>10}"
        print(f"{row['instructions']:>5} {row['mode']:<7} {row['who']:<4} {row['occupancy'] or 0:>9.3f} {over_growth} "
              f"{row['requests']:>6} {rps:>7.1f} {row['window_s'] or 0:>8.1f} {extra} {row['connections']:>6} "
              f"{row['peak_in_flight']:>9}")
    print()
    for flow, raw in zip(rows[::2], rows[1::2]):
        ratio = flow["occupancy"] / raw["occupancy"] if raw.get("occupancy") else float("nan")
        rate = (flow["requests"] / flow["window_s"]) / (raw["requests"] / raw["window_s"])
        print(f"{flow['instructions']} instructions, {flow['mode']}: occupancy flow/raw = {ratio:.3f}, requests/s "
              f"flow/raw = {rate:.3f}; flow {flow['status']}, {flow['trees']} trees, {flow['pairs']} pairs, growth {flow['growth_wall_s']} s "
              f"of {flow['flow_wall_s']:.1f} s; {flow['sequences']} sequences")
        print(f"  occupancy profile, flow (20 parts of its window): {flow['profile']}")
        print(f"  occupancy profile, raw : {raw['profile']}")
        print(f"  timeline: {flow['timeline']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("bench", "serve"), default="bench")
    parser.add_argument("--instructions", type=int, nargs="+", action="extend",
                        help="instruction counts, repeatable (default: 64 256)")
    parser.add_argument("--slots", type=int, default=None, help="sequences decoded at once (default 64; instant 512)")
    parser.add_argument("--per-token-ms", type=float, default=None, help="decode time per token (default 10; instant 1)")
    parser.add_argument("--prefill-ms", type=float, default=None, help="prefill per sequence (default 20; instant 0)")
    parser.add_argument("--median-tokens", type=float, default=SimSettings.median_tokens)
    parser.add_argument("--instant", action="store_true", help="512 slots, 1 ms/token, no prefill: a nodes/s ceiling")
    parser.add_argument("--concurrency", type=int, default=None, help="the engine's max_concurrency (default: slots)")
    parser.add_argument("--per-shard", type=int, default=32, help="run.instructions_per_shard")
    parser.add_argument("--port", type=int, default=0, help="serve: the port (0: a free one)")
    parser.add_argument("--references", default="", help="serve: a JSON file {instruction text: reference answer}")
    args = parser.parse_args(argv)

    settings = SimSettings.instant() if args.instant else SimSettings()
    changes = {k: v for k, v in (("slots", args.slots), ("median_tokens", args.median_tokens),
                                 ("prefill_s", None if args.prefill_ms is None else args.prefill_ms / 1000),
                                 ("per_token_s", None if args.per_token_ms is None else args.per_token_ms / 1000))
               if v is not None}
    settings = dataclasses.replace(settings, **changes)
    if args.command == "serve":
        references = json.loads(Path(args.references).read_text()) if args.references else {}
        asyncio.run(serve(settings, args.port, references))
        return

    state_root = Path(tempfile.mkdtemp(prefix="orchard-gpu-sim-"))
    os.environ["PREFECT_HOME"] = str(state_root / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    warm_prefect()
    mode = "instant" if args.instant else "gpu"
    concurrency = args.concurrency or settings.slots
    print(f"engine: {settings.slots} slots, prefill {settings.prefill_s * 1000:g} ms, {settings.per_token_s * 1000:g} "
          f"ms/token, median {settings.median_tokens:g} tokens; client max_concurrency {concurrency}; "
          f"{args.per_shard} instructions per shard")
    rows = []
    for instructions in args.instructions or [64, 256]:
        rows.extend(bench_one(settings, instructions, args.per_shard, concurrency, mode, state_root))
    print()
    print_table(rows)
    print("\noccupancy: Σ sequence slot time ÷ (slots × [first request arrival, last answer sent]); occ/growth: the "
          "same slot time ÷ (slots × the flow's whole growth wall, verification/landing/validation included); nodes/s: nodes "
          "landed ÷ the engine window (the trees' growth); n/s wall: nodes ÷ the flow's growth wall (summary wall_s: "
          "landing and the GX validation of every shard included); cpu ms/node: CPU of this process (RUSAGE_SELF) + its "
          "children (RUSAGE_CHILDREN + live descendants from /proc), engine excluded, over nightly() ('run') and "
          "over the flow's engine window ('growth'); conns: TCP connections that carried completion requests in that period")


if __name__ == "__main__":
    main()
