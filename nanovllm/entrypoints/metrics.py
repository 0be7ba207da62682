"""GET /metrics: Prometheus' text format, with vLLM's metric names, types, labels
(`model_name`, `engine`) and histogram buckets, so dashboards built for vLLM work.

Two sources:
- the engine's state, read from the engine process at each scrape (AsyncLLM.stats()):
  vllm:num_requests_running / _waiting (sequences; a request with n > 1 counts n, as vLLM
  V1's child requests), vllm:kv_cache_usage_perc (a fraction, 0 to 1), vllm:num_preemptions_total;
- each request as it ends (AsyncLLM's request listener, a RequestRecord): token counters and
  the latency histograms. A request is counted when it ends: vllm:generation_tokens_total
  grows in steps, and an aborted request adds its tokens but no latencies.

vllm:time_per_output_token_seconds is vLLM's per-token interval: a request's decode time
(first token to last) over its later tokens, counted once per token, so that sum / count is
the mean interval per token over all tokens, as in vLLM.
"""
import bisect
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from nanovllm.entrypoints.async_llm import RequestRecord
from nanovllm.entrypoints.engine_process import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]


class Histogram:
    """Bucket counts, sum and count; an observation may count several times (one value
    observed for each of a request's tokens costs one update, not one per token)."""

    def __init__(self, buckets: list[float]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)      # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


class ServingMetrics:
    """The metrics of one served model (a prometheus_client collector in its own registry)."""

    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name, "engine": "0"}
        self.lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.engine_stats: EngineStats | None = None     # the latest scrape's
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, record: RequestRecord) -> None:
        """A request ended (AsyncLLM's request listener)."""
        with self.lock:
            if record.first_token is not None:
                self.prompt_tokens += record.prompt_tokens
            self.generation_tokens += sum(record.output_tokens)
            if record.finished is None or record.first_token is None:
                return                              # aborted, or failed: no latencies
            self.ttft.observe(max(0.0, record.first_token - record.arrival))
            self.e2e.observe(max(0.0, record.finished - record.arrival))
            later_tokens = max(record.output_tokens, default=0) - 1
            if later_tokens > 0:
                self.tpot.observe(max(0.0, record.finished - record.first_token) / later_tokens, later_tokens)

    def render(self, engine_stats: EngineStats | None) -> bytes:
        """The text format; `engine_stats` None (the engine has stopped) leaves its gauges out."""
        self.engine_stats = engine_stats
        return generate_latest(self.registry)

    # -- prometheus_client's Collector interface --------------------------------------------
    def collect(self):
        names, values = list(self.labels), list(self.labels.values())

        def family(kind, name: str, doc: str, value):
            metric = kind(name, doc, labels=names)
            metric.add_metric(values, value)
            return metric
        stats = self.engine_stats
        if stats is not None:
            yield family(GaugeMetricFamily, "vllm:num_requests_running",
                         "Number of requests in model execution batches.", stats.num_running)
            yield family(GaugeMetricFamily, "vllm:num_requests_waiting",
                         "Number of requests waiting to be processed.", stats.num_waiting)
            usage = 1.0 - stats.num_free_blocks / stats.num_blocks if stats.num_blocks else 0.0
            yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                         "KV-cache usage. 1 means 100 percent usage.", usage)
            yield family(CounterMetricFamily, "vllm:num_preemptions",
                         "Cumulative number of preemption from the engine.", stats.num_preemptions)
            if stats.num_draft_tokens is not None:      # speculative decoding is on
                yield family(CounterMetricFamily, "vllm:spec_decode_num_draft_tokens",
                             "Number of draft tokens.", stats.num_draft_tokens)
                yield family(CounterMetricFamily, "vllm:spec_decode_num_accepted_tokens",
                             "Number of accepted tokens.", stats.num_accepted_tokens)
        with self.lock:
            yield family(CounterMetricFamily, "vllm:prompt_tokens", "Number of prefill tokens processed.",
                         self.prompt_tokens)
            yield family(CounterMetricFamily, "vllm:generation_tokens", "Number of generation tokens processed.",
                         self.generation_tokens)
            for name, doc, histogram in (
                    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
                    ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                     self.tpot),
                    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e)):
                metric = HistogramMetricFamily(name, doc, labels=names)
                metric.add_metric(values, histogram.cumulative(), histogram.sum)
                yield metric
