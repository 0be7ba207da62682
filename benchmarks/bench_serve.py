"""Serving benchmark: bench.py's workloads sent to a running server over HTTP.

Each request is a streamed /v1/completions call with a random token-id prompt and `max_tokens`
drawn as in bench.py (--workload nano, the default: 256 requests, prompts of 100..1024 ids,
100..1024 output tokens; chat, prefix, long: see --help), ignore_eos, seed 0, at a fixed
concurrency or at a Poisson request rate. Reports throughput, time to first token (TTFT) and time
per output token after the first (TPOT), p50 and p99, over the requests that completed; a request
that fails (an HTTP error, a dropped connection) is counted and reported, not retried. The client
cannot see the server's device:
--preset cpu asks for the CPU preset's sizes (default: the full ones).

    nanovllm serve MODEL --max-model-len 4096 --port 8000 &
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --concurrency 256
    python benchmarks/bench_serve.py --workload chat            # server started with --max-model-len 1024 or more
"""
import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from nanovllm.bench_workload import add_workload_args, make_workload, use_cpu_preset


@dataclass
class Result:
    ttft: float | None    # seconds to the first streamed chunk
    latency: float        # seconds to the end of the stream
    output_tokens: int
    error: str | None = None      # why it failed (then ttft is None)
    started: float = 0.0          # seconds after the run's start
    retries: int = 0              # sends again after the connection failed before any response


class NoResponse(RuntimeError):
    """The connection failed before any response: most often a kept-alive connection that the
    server had just closed, which never carried the request. Sent again, as the openai client
    does with connection errors (a server that died mid-request then fails again)."""


MAX_RETRIES = 2                   # the openai client's default


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                      temperature: float, start: float | None = None) -> Result:
    """`start`: when the request was first sent (a retry counts the time lost before it)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = start or time.perf_counter()
    ttft, last, chunks, status = None, None, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            status = resp.status_code
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - start
                last, chunks = line, chunks + 1
    except httpx.HTTPError as e:          # say where the exchange broke, and the socket's own error
        where = "before the response" if status is None else f"after HTTP {status} and {chunks} chunks"
        root = e
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        error = NoResponse if status is None and isinstance(e, httpx.TransportError) else RuntimeError
        raise error(f"{type(e).__name__} {where}, {time.perf_counter() - start:.2f} s in: {root!r}") from e
    usage = json.loads(last[len("data: "):]).get("usage") if last else None   # the include_usage chunk comes last
    if usage is None:
        raise RuntimeError(f"the stream ended without its usage chunk; its last: {(last or '(none)')[:300]}")
    return Result(ttft, time.perf_counter() - start, usage["completion_tokens"])


async def request_with_retries(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                               max_tokens: int, temperature: float) -> Result:
    """One request, sent again (up to MAX_RETRIES times) while its connection fails before any
    response; a request that fails otherwise is not retried. A failure is a Result with its error."""
    began = time.perf_counter()
    for attempt in range(MAX_RETRIES + 1):
        try:
            result = await one_request(client, url, model, prompt, max_tokens, temperature, began)
            break
        except NoResponse as e:
            result = Result(None, time.perf_counter() - began, 0, f"{type(e).__name__}: {e}")
        except (httpx.HTTPError, RuntimeError) as e:
            result = Result(None, time.perf_counter() - began, 0, f"{type(e).__name__}: {e}")
            break
    result.retries = attempt
    return result


async def run(args) -> tuple[list[Result], float]:
    workload = make_workload(args, cpu=use_cpu_preset(args, engine_on_cpu=False))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    # One client of one connection per request in flight, not one client of `concurrency`
    # connections: httpcore's pool scans all its connections for every request it places and
    # every response it closes; with 256 that took ~10 ms of CPU per request, and this process,
    # not the server, set the pace (requests reached the server late: small engine steps).
    # (One SSL context for them all: building one takes ~20 ms.)
    limits, tls = httpx.Limits(max_connections=1, max_keepalive_connections=1), httpx.create_ssl_context()
    clients = [httpx.AsyncClient(timeout=None, limits=limits, headers=headers, verify=tls)
               for _ in range(args.concurrency)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        models = await clients[0].get(f"{args.url}/v1/models")
        models.raise_for_status()           # e.g. 401: the server wants --api-key
        model = args.model or models.json()["data"][0]["id"]
        await one_request(clients[0], args.url, model, [1, 2, 3], 4, args.temperature)       # warm-up
        semaphore = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed)

        async def limited(prompt, max_tokens):
            async with semaphore:           # so a client is free: take it for this request
                client = clients.pop()
                try:
                    began = time.perf_counter()
                    result = await request_with_retries(client, args.url, model, prompt, max_tokens,
                                                        args.temperature)
                finally:
                    clients.append(client)
                result.started = began - start
                return result

        start, tasks = time.perf_counter(), []
        for prompt, max_tokens in zip(workload.prompts, workload.output_lens):
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="the server's --api-key")
    add_workload_args(p)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--concurrency", type=int, default=256, help="most requests in flight at once")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); default: all at once")
    p.add_argument("--json", help="append the results as a JSON line to this file")
    args = p.parse_args()

    results, seconds = asyncio.run(run(args))
    failed = [r for r in results if r.error is not None]
    results = [r for r in results if r.error is None]
    if not results:
        raise SystemExit(f"every request failed; the first at {failed[0].started:.1f} s: {failed[0].error}")
    output_tokens = sum(r.output_tokens for r in results)
    ttft = [r.ttft * 1000 for r in results]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in results if r.output_tokens > 1]
    summary = {
        "workload": args.workload, "num_requests": len(results), "failed_requests": len(failed),
        "retried_requests": sum(r.retries > 0 for r in results + failed),
        "concurrency": args.concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "seconds": round(seconds, 2), "output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / seconds, 1), "requests_per_s": round(len(results) / seconds, 2),
        "ttft_ms_p50": round(statistics.median(ttft), 1), "ttft_ms_p99": round(percentile(ttft, 99), 1),
        "tpot_ms_p50": round(statistics.median(tpot), 2), "tpot_ms_p99": round(percentile(tpot, 99), 2),
    }
    print(f"workload {args.workload}: {len(results)} requests, {output_tokens} output tokens in {seconds:.2f} s: "
          f"{summary['output_tok_per_s']:.0f} output tok/s, {summary['requests_per_s']:.2f} req/s")
    print(f"TTFT ms  p50 {summary['ttft_ms_p50']:8.1f}   p99 {summary['ttft_ms_p99']:8.1f}")
    print(f"TPOT ms  p50 {summary['tpot_ms_p50']:8.2f}   p99 {summary['tpot_ms_p99']:8.2f}")
    if summary["retried_requests"]:
        print(f"sent again: {summary['retried_requests']} requests whose connection failed before any response")
    if failed:
        first = min(failed, key=lambda r: r.started)
        print(f"FAILED {len(failed)} requests; the first, sent {first.started:.1f} s after the start: {first.error}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
