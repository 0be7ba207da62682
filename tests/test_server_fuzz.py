"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): requests that fit the
schema and requests that do not, to every operation. None may get a 500 or hang, and the
server still answers a normal request afterwards. Bounded: a fixed number of examples, a
time limit per request, and the expensive but valid dimensions (`n`, `max_tokens`) clamped,
so that the test takes tens of seconds."""
import hypothesis
import hypothesis.strategies as st
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

from tests.server_helpers import MODEL, client, engine, url  # noqa: F401

EXAMPLES = 150
# A valid request may still ask for much work (n=10000, or 200 tokens of each choice): clamped
# to keep the run short. Out-of-range and wrongly typed values go through untouched.
CLAMPS = {"n": 3, "best_of": 3, "max_tokens": 8, "max_completion_tokens": 8, "min_tokens": 8}


def clamped(body):
    if isinstance(body, dict):
        for key, top in CLAMPS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > top:
                body[key] = top
    return body


def test_fuzzing_the_api_finds_no_server_error(url, client):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
        "GET /health", "GET /metrics", "GET /v1/models"}
    strategy = st.one_of(*[op.as_strategy(generation_mode=mode) for op in operations
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    failures = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True)
    @hypothesis.given(case=strategy)
    def call(case):
        case.body = clamped(case.body)
        try:
            response = case.call(base_url=url, timeout=30)
        except Exception as e:              # a hang (timeout) or a dropped connection
            failures.append(f"{case.method} {case.path}: {type(e).__name__} {e} {case.body!r:.300}")
            return
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:300]} "
                            f"{case.body!r:.300}")
    call()
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(f"{url}/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
