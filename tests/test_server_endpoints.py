"""vLLM's extra endpoints: GET /metrics (Prometheus), POST /tokenize and /detokenize. The
engine here has a small KV cache (16 blocks of 16 tokens), so that concurrent requests
preempt each other and vllm:num_preemptions_total moves."""
import asyncio

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from nanovllm.entrypoints.async_llm import AsyncLLM
from tests.server_helpers import CHAT, ENGINE_KWARGS, MODEL, PROMPTS, raw_error, url  # noqa: F401 (url: a fixture, over this module's engine)

LABELS = {"model_name": MODEL, "engine": "0"}


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    engine = AsyncLLM(tiny_qwen3, **{**ENGINE_KWARGS, "num_gpu_blocks_override": 16})
    yield engine
    engine.shutdown_sync()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def scrape(url: str) -> dict:
    """{(sample name, extra labels): value} of every sample, and each family's type."""
    resp = httpx.get(f"{url}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples, types = {}, {}
    for family in text_string_to_metric_families(resp.text):
        types[family.name] = family.type
        for s in family.samples:
            labels = dict(s.labels)
            assert {k: labels.pop(k) for k in LABELS} == LABELS, s
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return {"samples": samples, "types": types}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics["samples"][(name, tuple(sorted(labels.items())))]


def test_metrics_have_vllms_names_types_and_counts(url, engine):
    before = scrape(url)
    assert before["types"] == {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    plain = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, stream=True, n=2,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    after = scrape(url)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    requests = len(PROMPTS) + 1                         # one engine request per prompt, one for the chat
    assert grew("vllm:prompt_tokens_total") == plain.usage.prompt_tokens + streamed[-1].usage.prompt_tokens
    assert grew("vllm:generation_tokens_total") == 4 * 7 + 2 * 5
    assert grew("vllm:time_to_first_token_seconds_count") == requests
    assert grew("vllm:e2e_request_latency_seconds_count") == requests
    assert grew("vllm:time_per_output_token_seconds_count") == 4 * 6 + 4     # each later token once
    assert grew("vllm:e2e_request_latency_seconds_sum") >= grew("vllm:time_to_first_token_seconds_sum") > 0
    buckets = [(float(le), v) for (name, labels), v in after["samples"].items()
               if name == "vllm:time_to_first_token_seconds_bucket" for _, le in labels]
    assert [v for _, v in sorted(buckets)] == sorted(v for _, v in buckets)     # cumulative
    assert max(le for le, _ in buckets) == float("inf") and len(buckets) == 23   # vLLM's 22 bounds
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


def test_metrics_show_the_engine_at_work(url, engine):
    """While requests run: running and waiting sequences, the KV cache in use; eight 100-token
    requests in a 256-token cache preempt each other, so that some wait for most of the run
    (the gauges are sampled while it runs: a short wait could fall between two samples)."""
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    start = value(scrape(url), "vllm:num_preemptions_total")

    async def main():
        async def one(prompt):
            return await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0,
                                                    extra_body={"ignore_eos": True})
        tasks = [asyncio.create_task(one(p)) for p in PROMPTS * 2]
        seen = []
        while not all(t.done() for t in tasks):
            seen.append(await asyncio.to_thread(scrape, url))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        await aclient.close()
        return seen
    seen = asyncio.run(asyncio.wait_for(main(), 240))
    assert max(value(m, "vllm:num_requests_running") for m in seen) >= 2
    assert max(value(m, "vllm:num_requests_waiting") for m in seen) >= 1
    assert 0 < max(value(m, "vllm:kv_cache_usage_perc") for m in seen) <= 1
    assert value(scrape(url), "vllm:num_preemptions_total") > start


def test_tokenize_and_detokenize(url, tokenizer):
    text = PROMPTS[1]
    resp = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert resp["tokens"] == tokenizer.encode(text) and resp["count"] == len(resp["tokens"])
    assert resp["max_model_len"] == 256 and resp["token_strs"] == tokenizer.convert_ids_to_tokens(resp["tokens"])
    plain = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()       # model is optional
    assert plain["tokens"] == resp["tokens"] and plain["token_strs"] is None
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": resp["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(resp["tokens"])}
    # Chat messages: the prompt a chat completion would run (its usage counts the same tokens).
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    usage = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": MODEL, "messages": CHAT, "max_tokens": 1}, timeout=30).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    bare = httpx.post(f"{url}/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": "a", "messages": CHAT}, 400, "messages"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/detokenize", {"model": MODEL, "tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [1, "x"]}, 400, "tokens[1]"),
    ("/detokenize", {"model": MODEL}, 400, "tokens"),
])
def test_tokenize_errors(url, path, body, status, param):
    assert raw_error(url, status, body, path=path)["param"] == param
