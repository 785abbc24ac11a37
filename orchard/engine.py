"""One client for every OpenAI-compatible endpoint (vLLM, llama.cpp server, hosted APIs).

Bounded concurrency per endpoint, retries with backoff, timeouts, and token usage on every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Coroutine, Iterable, Mapping, Protocol, Sequence

import aiohttp
import httpx

from orchard.config import CHAT_FORMATS, EngineConfig, secret_value
from schemas.errors import OrchardError
from schemas.stopping import on_stop, stop_requested

Message = dict[str, str]


class EngineError(OrchardError):
    """An endpoint failed after all retries, or answered something that is not a completion.

    `reason` is a short, countable name for what went wrong (`HTTP 400`, `HTTP 503 after retries`, ...).
    """

    def __init__(self, message: str, reason: str = "", *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or "engine error"
        self.transient = transient


class EngineUnavailable(EngineError):
    """An endpoint does not answer at all (nothing listens, or it never answers GET /v1/models): it may come back."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unavailable", transient=True)


def check_endpoints(name: str, engine: EngineConfig, *, attempts: int = 3, wait_s: float = 1.0) -> None:
    """Raise EngineUnavailable unless every base URL of engine `name` answers GET /v1/models (tried `attempts`
    times, `wait_s` apart, so a server restarting that moment is not taken for dead).

    A server that answers at all is up, even if it does not serve the models list (404, 501: some OpenAI-compatible
    servers serve only the completion routes); one that refuses the connection, times out, or answers 500/502/503/
    504 (a gateway in front of a dead server, a server failing) is down.
    """
    down = {}
    for url in engine.base_urls:
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait_s)
            try:
                response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=5.0,
                                     headers={"Authorization": f"Bearer {secret_value(engine.api_key)}"})
            except httpx.HTTPError as exc:
                down[url] = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code < 500 or response.status_code == 501:
                down.pop(url, None)
                break
            down[url] = f"HTTP {response.status_code}"
    if down:
        where = "; ".join(f"{url} ({why})" for url, why in down.items())
        raise EngineUnavailable(f"engine {name!r} does not answer GET /v1/models after {attempts} tries: {where}")


def _failure_kind(error: str) -> str:
    """The countable part of a failed attempt's description: `HTTP 503`, `ConnectError`, `unusable answer`."""
    if error.startswith("HTTP "):
        return error.split(":", 1)[0]
    return error.split(":", 1)[0].strip() or "error"


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request; recorded on every node the request produced."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # > 0: ask for the first token's most likely alternatives (a judge's Yes/No probability)
    # A JSON schema the answer must follow (a judge's verdict): sent as the engine's structured output, if any.
    json_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Completion:
    """One choice of an answer, with the usage of the request it came from."""

    text: str
    finish_reason: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    seed: int | None = None  # the seed of the request this choice came from
    # The first generated token's most likely alternatives (token -> logprob), when Sampling.top_logprobs asked.
    top_logprobs: Mapping[str, float] | None = None


@dataclass
class Usage:
    """Running totals for everything an engine client sent."""

    requests: int = 0
    failed_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # None while the server has never reported prompt-cache hits
    busy_s: float = 0.0
    _first_start: float | None = field(default=None, repr=False)
    _last_end: float | None = field(default=None, repr=False)

    @property
    def wall_s(self) -> float:
        """Seconds from the first request's start to the last answer's end."""
        if self._first_start is None or self._last_end is None:
            return 0.0
        return self._last_end - self._first_start

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def combined(cls, usages: Sequence["Usage"]) -> "Usage":
        """Return the totals of several clients' usage; its wall time spans all of them."""
        total = cls()
        for usage in usages:
            for name in ("requests", "failed_requests", "retries", "prompt_tokens", "completion_tokens", "busy_s"):
                setattr(total, name, getattr(total, name) + getattr(usage, name))
            if usage.cached_tokens is not None:
                total.cached_tokens = (total.cached_tokens or 0) + usage.cached_tokens
        starts = [u._first_start for u in usages if u._first_start is not None]
        ends = [u._last_end for u in usages if u._last_end is not None]
        total._first_start, total._last_end = (min(starts), max(ends)) if starts and ends else (None, None)
        return total

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


# The Prometheus counters of prefix-cache hits and queries (in tokens), newest name first: vLLM's V1 engine
# exposes `vllm:prefix_cache_*_total` (0.32 does), earlier V1 releases `vllm:gpu_prefix_cache_*`. A server that
# exposes two of these names (a deprecated alias beside the new one) is read under the first only.
PREFIX_CACHE_METRICS = {
    "hits": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits",
             "vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits"),
    "queries": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries",
                "vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries"),
}
# One sample line of Prometheus' text format: `name{labels} value [timestamp]`.
_PROMETHEUS_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(?P<value>\S+)")
METRICS_TIMEOUT_S = 2.0  # a scrape is a side look: a server slow to answer it has no figures, the shard goes on


@dataclass(frozen=True)
class CacheCounters:
    """Prompt tokens a server looked up in its prefix cache (`queries`) and found there (`hits`)."""

    hits: int
    queries: int

    @property
    def hit_rate(self) -> float | None:
        return round(self.hits / self.queries, 4) if self.queries > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "queries": self.queries, "hit_rate": self.hit_rate}


def parse_prefix_cache_counters(text: str) -> CacheCounters | None:
    """Return the prefix-cache counters of a Prometheus text page, summed over label sets (engines, models); None
    when the page has none of PREFIX_CACHE_METRICS (not vLLM, or not a metrics page)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        sample = _PROMETHEUS_SAMPLE.match(line)
        if sample is None:
            continue  # a comment, a blank line, or not a metrics page at all
        try:
            value = float(sample["value"])
        except ValueError:
            continue
        values[sample["name"]] = values.get(sample["name"], 0.0) + value
    found = {}
    for kind, names in PREFIX_CACHE_METRICS.items():
        name = next((n for n in names if n in values), None)
        if name is None:
            return None
        found[kind] = int(values[name])
    return CacheCounters(**found)


def counters_delta(before: Mapping[str, CacheCounters], after: Mapping[str, CacheCounters]) -> CacheCounters | None:
    """Return the prefix-cache counters gained between two scrapes, summed over the base URLs read both times;
    None when no URL was, or when a counter went back (the server restarted in between)."""
    urls = [url for url in after if url in before]
    if not urls:
        return None
    if any(after[u].hits < before[u].hits or after[u].queries < before[u].queries for u in urls):
        return None
    return CacheCounters(sum(after[u].hits - before[u].hits for u in urls),
                         sum(after[u].queries - before[u].queries for u in urls))


async def prefix_cache_counters(clients: Iterable["EngineClient"]) -> dict[str, CacheCounters]:
    """Return the prefix-cache counters of every base URL of `clients` that exposes them (GET /metrics), by URL
    (a URL shared by two clients is read once)."""
    clients = list(clients)
    scraped = await asyncio.gather(*(client.prefix_cache_counters() for client in clients))
    return {url: counters for found in scraped for url, counters in found.items()}


@dataclass(frozen=True)
class PrefixCache:
    """How much of a shard's (or run's) prompt the servers answered from their prefix cache.

    Two views: `cached_tokens` is what the answers' `usage.prompt_tokens_details.cached_tokens` said (None when no
    server reported it; vLLM needs `--enable-prompt-tokens-details`), over this client's own prompt tokens;
    `metrics` is the growth of the servers' Prometheus counters over the shard (None when no server exposes
    them), which also counts other clients' requests served meanwhile.
    """

    prompt_tokens: int = 0
    cached_tokens: int | None = None
    metrics: CacheCounters | None = None

    @property
    def cached_share(self) -> float | None:
        if self.cached_tokens is None or self.prompt_tokens <= 0:
            return None
        return round(self.cached_tokens / self.prompt_tokens, 4)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "cached_share": self.cached_share, "metrics": self.metrics.as_dict() if self.metrics else None}

    @classmethod
    def of_usage(cls, usage: Mapping[str, Any], metrics: CacheCounters | None) -> "PrefixCache":
        """Return the figures of a shard whose engine usage was `usage` (`Usage.as_dict`) and whose servers'
        counters grew by `metrics` meanwhile."""
        return cls(int(usage.get("prompt_tokens") or 0), usage.get("cached_tokens"), metrics)

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any] | None) -> "PrefixCache":
        """Return the figures `as_dict` wrote (a shard's stats); empty figures for a shard that has none."""
        figures = figures or {}
        metrics = figures.get("metrics")
        return cls(int(figures.get("prompt_tokens") or 0), figures.get("cached_tokens"),
                   CacheCounters(int(metrics["hits"]), int(metrics["queries"])) if metrics else None)

    @classmethod
    def combined(cls, parts: Sequence["PrefixCache"]) -> "PrefixCache":
        """Return the sum of several shards' figures; a view none of them has stays None."""
        cached = [p.cached_tokens for p in parts if p.cached_tokens is not None]
        metrics = [p.metrics for p in parts if p.metrics is not None]
        return cls(sum(p.prompt_tokens for p in parts), sum(cached) if cached else None,
                   CacheCounters(sum(m.hits for m in metrics), sum(m.queries for m in metrics)) if metrics else None)


def render_chat(messages: Sequence[Message], chat_format: str, prefix: str = "") -> str:
    """Return `messages` as the raw prompt text of `chat_format`, with an open assistant turn starting `prefix`."""
    try:
        layout = CHAT_FORMATS[chat_format]
    except KeyError:
        raise EngineError(f"chat_format {chat_format!r} is not known (known: {', '.join(CHAT_FORMATS)})") from None
    turns = "".join(layout["turn"].format(role=m["role"], content=m["content"]) for m in messages)
    return layout.get("begin", "") + turns + layout["open"] + prefix


class ChatEngine(Protocol):
    """What tree growth needs from an engine: `n` chat completions for one prompt, or continuations of an answer.

    `priority`: among requests waiting for a free slot of the endpoint, higher goes first (tree growth passes how
    many dependent levels still follow the request, so long chains start early and do not form the idle tail).
    """

    model: str
    usage: Usage
    response_format: str  # how the server is asked for a schema-shaped answer: json_schema | json_object | none

    async def chat(self, messages: Sequence[Message], sampling: Sampling, n: int = 1, *,
                   priority: int = 0) -> list[Completion]: ...

    async def continue_chat(self, messages: Sequence[Message], prefix: str, sampling: Sampling, n: int = 1, *,
                            priority: int = 0) -> list[Completion]: ...


class Slots:
    """A counting semaphore whose waiters get a freed slot by priority (highest first), then in arrival order."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._arrivals), handed))
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # the slot was handed over as the waiter was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, handed = heapq.heappop(self._waiting)
            if not handed.done():  # a cancelled waiter left its entry behind
                handed.set_result(None)
                return
        self._free += 1


class _Endpoints:
    """What every view of one engine's client shares: the HTTP session, each base URL's slots, the round robin."""

    def __init__(self, engine: EngineConfig) -> None:
        self.engine = engine
        self.urls = [u.rstrip("/") for u in engine.base_urls]
        self.next_url = itertools.cycle(range(len(self.urls)))
        self.slots = [Slots(engine.max_concurrency) for _ in self.urls]
        # Whether the server honours `n` (vLLM and llama-server do; some answer one choice): None = not known yet.
        self.supports_n: bool | None = None
        self.http: aiohttp.ClientSession | None = None  # made on first use, inside the loop that uses it
        # Resolved, in that loop, when this process is asked to stop: a request in flight is then abandoned.
        self.stopping: asyncio.Future[None] | None = None
        self.forget_stop: Callable[[], None] = lambda: None

    def session(self) -> aiohttp.ClientSession:
        # aiohttp, not httpx: at 64 in flight an httpx pool costs this process 3-7 ms of CPU per request (it scans
        # every pooled connection per request), this client ~0.25 ms (bench/engine_client_cost.py). One kept
        # connection per slot: up to max_concurrency requests per base URL are in flight, and a pool smaller than
        # that closes a connection after every answer and opens one for the next request.
        if self.http is None:
            self.http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {secret_value(self.engine.api_key)}"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self.engine.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.engine.max_concurrency * len(self.urls),
                                               limit_per_host=self.engine.max_concurrency),
            )
            loop = asyncio.get_running_loop()
            self.stopping = stopping = loop.create_future()
            self.forget_stop = on_stop(lambda: _resolve_from_any_thread(loop, stopping))
        return self.http


class EngineClient:
    """Async client over one engine's endpoints; requests are spread round-robin over `base_urls`.

    `view()` gives another client over the same connections and slots that counts its own usage: one per shard,
    so `max_concurrency` is what the server sees from the whole process and one priority queue spans every shard.
    """

    def __init__(self, engine: EngineConfig, *, _endpoints: _Endpoints | None = None) -> None:
        if not engine.base_urls:
            raise EngineError(f"engine {engine.model!r} has no base_urls (was the embedded server started?)")
        self.engine = engine
        self.model = engine.model
        self.response_format = engine.response_format
        self.usage = Usage()
        self._owner = _endpoints is None  # a view leaves the connections to the client it came from
        self._endpoints = _endpoints or _Endpoints(engine)
        self._urls = self._endpoints.urls

    def view(self) -> "EngineClient":
        """Return a client sharing this one's connections, slots and priority queue, with usage of its own."""
        return EngineClient(self.engine, _endpoints=self._endpoints)

    @property
    def supports_n(self) -> bool | None:
        """Whether the server honours `n`; None until a request with n > 1 has told."""
        return self._endpoints.supports_n

    def _session(self) -> aiohttp.ClientSession:
        return self._endpoints.session()

    async def __aenter__(self) -> "EngineClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (a view's are its client's: closing a view closes nothing)."""
        if self._owner and self._endpoints.http is not None:
            self._endpoints.forget_stop()
            await self._endpoints.http.close()
            self._endpoints.http = None

    async def prefix_cache_counters(self) -> dict[str, CacheCounters]:
        """Return, by base URL, the prefix-cache counters of each endpoint whose GET /metrics has them; an endpoint
        without them (llama.cpp's server, a hosted API), slow or down is left out, never an error."""

        async def scrape(url: str) -> CacheCounters | None:
            try:
                async with self._session().get(f"{url}/metrics",
                                               timeout=aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)) as response:
                    if response.status != 200:
                        return None
                    return parse_prefix_cache_counters(await response.text(encoding="utf-8", errors="replace"))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        found = await asyncio.gather(*(scrape(url) for url in self._urls))
        return {url: counters for url, counters in zip(self._urls, found) if counters is not None}

    async def chat(self, messages: Sequence[Message], sampling: Sampling, n: int = 1, *,
                   priority: int = 0) -> list[Completion]:
        """Return `n` chat completions of `messages` (one request with `n` where the server honours it)."""
        return await self._sample("/v1/chat/completions", {"messages": list(messages)}, sampling, n, key="message",
                                  priority=priority)

    async def complete(self, prompt: str, sampling: Sampling, n: int = 1, *, priority: int = 0) -> list[Completion]:
        """Return `n` raw-text completions of `prompt` (for continuing an exact prefix)."""
        return await self._sample("/v1/completions", {"prompt": prompt}, sampling, n, key="text", priority=priority)

    async def continue_chat(self, messages: Sequence[Message], prefix: str, sampling: Sampling, n: int = 1, *,
                            priority: int = 0) -> list[Completion]:
        """Return `n` continuations of an assistant answer that starts with `prefix` (may be empty).

        The chat is rendered in the engine's `chat_format` and sent to the completions endpoint, so the
        model continues exactly `prefix` and the server's prefix cache sees one growing prompt. A choice
        with finish_reason `length` stopped at `max_tokens`; any other ended the answer.
        """
        end = CHAT_FORMATS.get(self.engine.chat_format, {}).get("end")
        stop = sampling.stop if end is None or end in sampling.stop else (*sampling.stop, end)
        prompt = render_chat(messages, self.engine.chat_format, prefix)
        return await self.complete(prompt, replace(sampling, stop=stop), n, priority=priority)

    async def _sample(self, path: str, request: dict[str, Any], sampling: Sampling, n: int, *, key: str,
                      priority: int) -> list[Completion]:
        limit = self.engine.max_n
        if limit and n > limit:
            # More choices than the server gives in one answer: requests of at most `limit`, the one starting at
            # choice k with seed + k (choice k of a request with seed s is what a request with seed s + k answers).
            parts = await asyncio.gather(*(
                self._sample(path, request, _nth(sampling, start), min(limit, n - start), key=key, priority=priority)
                for start in range(0, n, limit)
            ))
            return [completion for part in parts for completion in part]
        got: list[Completion] = []
        if n == 1 or self.supports_n is not False:
            body = {"model": self.model, **request, **self._body(path, sampling)}
            if n != 1:
                body["n"] = n
            got = _completions(await self._post(path, body, priority), self.model, key=key, seed=sampling.seed)[:n]
            if n > 1:
                self._endpoints.supports_n = len(got) == n
        # A server that ignores `n` gets the missing siblings as separate requests, each with its own seed.
        missing = range(len(got), n)
        extra = await asyncio.gather(*(
            self._post(path, {"model": self.model, **request, **self._body(path, _nth(sampling, k))}, priority)
            for k in missing
        ))
        for k, answer in zip(missing, extra):
            got.extend(_completions(answer, self.model, key=key, seed=_nth(sampling, k).seed)[:1])
        return got

    def _body(self, path: str, sampling: Sampling) -> dict[str, Any]:
        """The request fields of `sampling`: sampling parameters, logprobs, and the schema the answer must follow."""
        body = {**_sampling_body(sampling), **_logprob_body(path, sampling)}
        if sampling.json_schema is not None and self.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "schema": sampling.json_schema, "strict": True}}
        elif sampling.json_schema is not None and self.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": sampling.json_schema}
        return body

    async def _send(self, url: str, body: dict[str, Any]) -> tuple[int, str]:
        async with self._session().post(url, json=body) as response:
            return response.status, await response.text(encoding="utf-8", errors="replace")

    async def _unless_stopping(self, url: str, sending: Coroutine[Any, Any, tuple[int, str]]) -> tuple[int, str]:
        """Await `sending`; abandon it (its connection closed, so the server stops generating) when the process is
        asked to stop: a stop does not wait out the answers in flight."""
        self._session()  # the connections, and the stop's future in this loop
        sent = asyncio.ensure_future(sending)
        stopping = self._endpoints.stopping
        try:
            if stopping is not None:
                await asyncio.wait((sent, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not sent.done():
                raise EngineError(f"{url}: abandoned: the run is stopping", "stopped")
            return await sent
        finally:
            if not sent.done():
                sent.cancel()

    async def _post(self, path: str, body: dict[str, Any], priority: int = 0) -> dict[str, Any]:
        index = next(self._endpoints.next_url)
        url = self._urls[index] + path
        last_error = "no attempt made"
        for attempt in range(self.engine.retries + 1):
            if stop_requested():  # the run stops (its model servers with it): no request, no retry
                raise EngineError(f"{url}: not sent: the run is stopping", "stopped")
            if attempt:
                self.usage.retries += 1
                await asyncio.sleep(self.engine.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            slot = self._endpoints.slots[index]
            await slot.acquire(priority)
            started = time.monotonic()
            if self.usage._first_start is None:
                self.usage._first_start = started
            try:
                status, text = await self._unless_stopping(url, self._send(url, body))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last_error = _transport_failure(exc)
                continue
            finally:
                slot.release()
                ended = time.monotonic()
                self.usage.busy_s += ended - started
                self.usage._last_end = ended
            if status >= 500 or status == 429:
                last_error = f"HTTP {status}: {text[:200]}"
                continue
            if status >= 400:
                self.usage.failed_requests += 1
                # A request the server refuses (too long, malformed) is refused again: not retried.
                raise EngineError(f"{url}: HTTP {status}: {text[:300]}", f"HTTP {status}")
            try:
                answer = json.loads(text)
                _check_answer(answer)
            except (ValueError, EngineError) as exc:
                last_error = f"unusable answer: {exc}"
                continue
            usage = answer.get("usage") or {}
            self.usage.requests += 1
            self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
            cached = _cached_tokens(usage)
            if cached is not None:
                self.usage.cached_tokens = (self.usage.cached_tokens or 0) + cached
            return answer
        self.usage.failed_requests += 1
        # The server was down, busy or garbled through every retry: it may answer later.
        raise EngineError(f"{url}: gave up after {self.engine.retries + 1} attempts: {last_error}",
                          f"{_failure_kind(last_error)} after retries", transient=True)


def _resolve_from_any_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits on it
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))


def _transport_failure(exc: BaseException) -> str:
    """Describe an attempt that got no HTTP answer: ConnectError (nothing listens there), Timeout (no answer within
    timeout_s), else the error's own name (ServerDisconnectedError: the server closed the connection mid-answer)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"ConnectError: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"Timeout: no answer within the engine's timeout_s ({exc or 'read timed out'})"
    return f"{type(exc).__name__}: {exc}"


def _nth(sampling: Sampling, k: int) -> Sampling:
    """The sampling of the k-th sibling when siblings are separate requests: the seed moves on by k."""
    return sampling if sampling.seed is None or k == 0 else replace(sampling, seed=sampling.seed + k)


def _sampling_body(sampling: Sampling) -> dict[str, Any]:
    body: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        # vLLM defaults max_tokens to 16: always send it.
        "max_tokens": sampling.max_tokens,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return body


def _logprob_body(path: str, sampling: Sampling) -> dict[str, Any]:
    if sampling.top_logprobs <= 0:
        return {}
    if path.endswith("/chat/completions"):
        return {"logprobs": True, "top_logprobs": sampling.top_logprobs}
    return {"logprobs": sampling.top_logprobs}


def _first_top_logprobs(choice: Mapping[str, Any]) -> dict[str, float] | None:
    """Return the first token's alternatives from a chat (`content[0].top_logprobs`) or completions answer."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list) and content and isinstance(content[0], Mapping):
        alternatives = content[0].get("top_logprobs") or []
        return {str(a["token"]): float(a["logprob"]) for a in alternatives if isinstance(a, Mapping) and "token" in a}
    top = logprobs.get("top_logprobs")
    if isinstance(top, list) and top and isinstance(top[0], Mapping):
        return {str(token): float(value) for token, value in top[0].items()}
    return None


def _check_answer(answer: Any) -> None:
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        raise EngineError(f"no choices in {str(answer)[:200]!r}")


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(cached) if cached is not None else None


def _completions(answer: dict[str, Any], model: str, *, key: str, seed: int | None = None) -> list[Completion]:
    usage = answer.get("usage") or {}
    choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    completions = []
    for choice in choices:
        text = choice["message"].get("content") if key == "message" else choice.get("text")
        if not isinstance(text, str):
            raise EngineError(f"choice {choice.get('index', 0)} has no text: {str(choice)[:200]!r}")
        completions.append(
            Completion(
                text=text,
                finish_reason=str(choice.get("finish_reason") or "unknown"),
                model=str(answer.get("model") or model),
                prompt_tokens=prompt_tokens,
                # usage covers all choices of the request; share it out so per-node counts add up.
                completion_tokens=completion_tokens // len(choices),
                cached_tokens=_cached_tokens(usage),
                seed=seed,
                top_logprobs=_first_top_logprobs(choice),
            )
        )
    return completions
