"""Data-parallel replicas on the CPU (nanovllm/data_parallel.py, nanovllm/ray.py): two replicas
as local processes and as Ray actors (a local Ray with 2 CPUs) give one engine's greedy outputs
in input order; a replica killed mid-run loses no request; Ray Data's map_batches with
LLMPredictor gives the same texts."""
import os
import signal
import sys

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.data_parallel import ReplicaWorker
from nanovllm.ray import LLMPredictor
from nanovllm.sampling_params import RequestOutputKind

from tests.conftest import random_prompts

pytestmark = pytest.mark.slow      # several engine processes and a local Ray: run with -m slow (CI does)

BACKENDS = ["mp", "ray"]
ENGINE_ARGS = dict(enforce_eager=True, max_num_seqs=16)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
TEXT_PROMPTS = ["the cat sat on", "hello world", "a b c d e", "once upon a time", "xyz", "one two three"]
CONVERSATIONS = [[{"role": "user", "content": "hello there"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}],
                 [{"role": "user", "content": "a b c"}]]


def token_ids(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def texts(outputs) -> list[str]:
    return [out.outputs[0].text for out in outputs]


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    """One engine in this process."""
    llm = LLM(tiny_qwen3, **ENGINE_ARGS)
    yield llm
    llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "nanovllm[ray]")')
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, on_sigterm)     # ray.init's handler (SIGTERM -> SystemExit) outlives it


class Replicated:
    """dp=2 LLMs, one per backend, built on first use and shared by the tests; a test that
    kills replicas `take`s its LLM, so later tests get a fresh one."""

    def __init__(self, model: str, request):
        self.model, self.request, self.built = model, request, {}

    def get(self, backend: str) -> LLM:
        if backend not in self.built:
            if backend == "ray":
                self.request.getfixturevalue("ray_cluster")
            self.built[backend] = LLM(self.model, data_parallel_size=2, distributed_executor_backend=backend,
                                      **ENGINE_ARGS)
        return self.built[backend]

    def take(self, backend: str) -> LLM:
        llm = self.get(backend)
        del self.built[backend]
        return llm

    def close(self, backend: str) -> None:
        if backend in self.built:
            self.take(backend).llm_engine.shutdown()


@pytest.fixture(scope="module")
def replicated(tiny_qwen3, request):
    replicated = Replicated(tiny_qwen3, request)
    yield replicated
    for backend in list(replicated.built):
        replicated.close(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_equals_one_engine_in_input_order(replicated, reference, backend):
    llm = replicated.get(backend)
    engine = llm.llm_engine
    # Text and token-id prompts, and budgets that differ, so that the replicas finish out of order.
    prompts = TEXT_PROMPTS + random_prompts(6, 3, 24, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=2 + 3 * (i % 5), ignore_eos=True) for i in range(len(prompts))]
    finished_before = [r.num_finished for r in engine.replicas]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = reference.generate(prompts, params, use_tqdm=False)
    assert token_ids(outputs) == token_ids(expected)
    assert texts(outputs) == texts(expected)
    assert [out.prompt_token_ids for out in outputs] == [out.prompt_token_ids for out in expected]
    assert [out.prompt for out in outputs] == [out.prompt for out in expected]
    assert all(out.finished for out in outputs)
    # Both replicas did part of the work, and the engine has nothing left.
    done = [r.num_finished - before for r, before in zip(engine.replicas, finished_before)]
    assert min(done) > 0 and sum(done) == len(prompts) and not engine.has_unfinished_requests()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_equals_one_engine(replicated, reference, backend):
    outputs = replicated.get(backend).chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    expected = reference.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == token_ids(expected)
    assert texts(outputs) == texts(expected)


def test_refused_request_raises_the_engines_error(replicated, reference):
    """A request a replica's engine refuses raises the single engine's ValueError, and the
    engine stays usable."""
    llm = replicated.get("mp")
    too_long = [[5] * 2000]
    with pytest.raises(ValueError) as single:
        reference.generate(too_long, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError) as replicated_error:
        llm.generate(too_long + TEXT_PROMPTS, GREEDY, use_tqdm=False)
    assert str(replicated_error.value) == str(single.value)
    assert not llm.llm_engine.has_unfinished_requests()
    assert token_ids(llm.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False)) == \
        token_ids(reference.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False))


def test_aborted_requests_leave_no_output(replicated, reference):
    """Aborting a request not yet sent to its replica, and requests running there."""
    engine = replicated.get("mp").llm_engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(TEXT_PROMPTS):
        engine.add_request(f"abort-{i}", prompt, params)
    engine.abort_request("abort-0")                  # still queued here
    finished = {out.request_id: out for out in engine.step() if out.finished}
    engine.abort_request(["abort-1", "abort-2"])     # on their replicas by now (or done already:
    before = set(finished)                           # a quiet machine finishes them in one round)
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert "abort-0" not in finished and not {"abort-1", "abort-2"} & (set(finished) - before)
    assert {"abort-3", "abort-4", "abort-5"} <= set(finished)
    expected = reference.generate(TEXT_PROMPTS[3:], params, use_tqdm=False)
    assert [finished[f"abort-{i}"].outputs[0].token_ids for i in (3, 4, 5)] == token_ids(expected)
    assert all(not replica.request_ids and not replica.adds for replica in engine.replicas)


def test_a_round_sends_each_cumulative_request_once(tiny_qwen3, reference):
    """Of a round's outputs, a CUMULATIVE request sends only its latest (it holds the earlier
    ones); DELTA requests send every piece. Both add up to one engine's tokens."""
    worker = ReplicaWorker(tiny_qwen3, ENGINE_ARGS, None)
    kinds = [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA] * 2
    params = [SamplingParams(temperature=0, max_tokens=12 * (i + 1), ignore_eos=True, output_kind=k)
              for i, k in enumerate(kinds)]
    adds = [(str(i), prompt, p) for i, (prompt, p) in enumerate(zip(TEXT_PROMPTS, params))]
    rounds = [worker.run(adds, [], seconds=0)]     # a round of one step, then rounds until all finish
    while worker.engine.has_unfinished_requests():
        rounds.append(worker.run([], [], seconds=0.05))
    worker.shutdown()
    tokens = {str(i): [] for i in range(len(kinds))}
    for round_ in rounds:
        ids = [out.request_id for out in round_.outputs]
        for i, kind in enumerate(kinds):
            if kind == RequestOutputKind.CUMULATIVE:
                assert ids.count(str(i)) <= 1
        for out in round_.outputs:
            if kinds[int(out.request_id)] == RequestOutputKind.CUMULATIVE:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
            else:
                tokens[out.request_id] += out.outputs[0].token_ids
    assert len(rounds) > 2 and not worker.cumulative
    expected = reference.generate(TEXT_PROMPTS[:len(kinds)], params, use_tqdm=False)
    assert [tokens[str(i)] for i in range(len(kinds))] == token_ids(expected)


def test_a_round_ends_soon_after_a_request_finishes(tiny_qwen3):
    """A finished request is reported within FINISHED_GRACE_SECONDS, not at the end of a long
    round: the round returns while the long request still runs."""
    worker = ReplicaWorker(tiny_qwen3, ENGINE_ARGS, None)
    adds = [("short", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True)),
            ("long", [4, 5, 6], SamplingParams(max_tokens=1000, ignore_eos=True))]
    answer = worker.run(adds, [], seconds=60)
    assert [out.request_id for out in answer.outputs if out.finished] == ["short"]
    assert worker.engine.has_unfinished_requests()
    worker.shutdown()


@pytest.mark.parametrize("backend", BACKENDS)
def test_replica_killed_mid_run_loses_no_request(replicated, reference, backend):
    llm = replicated.take(backend)
    engine = llm.llm_engine
    engine.round_seconds = 0.02       # several rounds per call, so there is a "mid-run"
    victim = engine.replicas[1]
    prompts = random_prompts(8, 4, 16, seed=2)
    # Short requests finish in the first rounds while the long ones are still running.
    params = [SamplingParams(temperature=0, max_tokens=2 if i < 2 else 60, ignore_eos=True) for i in range(8)]
    killed_with = []
    step = engine.step

    def step_then_kill():
        outputs = step()
        if outputs and not killed_with:
            killed_with.append(len(victim.request_ids))
            os.kill(victim.pid, signal.SIGKILL)
        return outputs
    engine.step = step_then_kill
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert killed_with and killed_with[0] > 0, "the replica was not killed while it had requests"
        assert token_ids(outputs) == token_ids(reference.generate(prompts, params, use_tqdm=False))
        assert victim not in engine.replicas and len(engine.replicas) == 1
        # The last replica killed too: the call raises, naming it.
        survivor = engine.replicas[0]
        os.kill(survivor.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=f"data-parallel replica 0 \\(pid {survivor.pid}\\) died"):
            llm.generate(prompts[:2], GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="No data-parallel replica is left"):
            llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    finally:
        engine.shutdown()


def test_ray_data_pipeline_with_llm_predictor(replicated, reference, ray_cluster, tiny_qwen3):
    pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "ray[data]")')
    replicated.close("ray")          # its replicas hold the cluster's 2 CPUs
    import ray.data
    dataset = ray.data.from_items([{"prompt": p} for p in TEXT_PROMPTS])
    dataset = dataset.map_batches(
        LLMPredictor, batch_size=2, concurrency=2, num_cpus=1,
        fn_constructor_kwargs=dict(model=tiny_qwen3, sampling_params=dict(temperature=0, max_tokens=10, ignore_eos=True),
                                   **ENGINE_ARGS))
    rows = {row["prompt"]: row for row in dataset.take_all()}
    expected = reference.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False)
    assert sorted(rows) == sorted(TEXT_PROMPTS)
    assert [rows[p]["generated_text"] for p in TEXT_PROMPTS] == texts(expected)
    assert [rows[p]["num_generated_tokens"] for p in TEXT_PROMPTS] == [10] * len(TEXT_PROMPTS)
    assert [rows[p]["num_input_tokens"] for p in TEXT_PROMPTS] == [len(o.prompt_token_ids) for o in expected]


def test_llm_predictor_reads_messages_and_keeps_columns(reference, tiny_qwen3):
    """A batch as Ray Data hands it (a dict of numpy arrays; conversations as arrays of dicts
    in which a key some message lacks is None), called directly: no Ray needed."""
    predictor = LLMPredictor(tiny_qwen3, sampling_params=GREEDY, **ENGINE_ARGS)
    messages = np.empty(len(CONVERSATIONS), dtype=object)
    messages[:] = [np.array([dict(m, name=None) for m in conversation], dtype=object) for conversation in CONVERSATIONS]
    batch = {"messages": messages, "id": np.arange(len(CONVERSATIONS))}
    result = predictor(batch)
    expected = reference.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    assert list(result["generated_text"]) == texts(expected)
    assert list(result["num_input_tokens"]) == [len(o.prompt_token_ids) for o in expected]
    assert list(result["num_generated_tokens"]) == [10] * len(CONVERSATIONS)
    assert list(result["id"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="'prompt' or a 'messages' column"):
        predictor({"text": np.array(["hi"])})


@pytest.mark.parametrize("replicas", [1, 2])     # one replica too: the engine then runs in a Ray actor
def test_missing_ray_names_the_extra(tiny_qwen3, monkeypatch, replicas):
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` now fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "nanovllm\[ray\]"'):
        LLM(tiny_qwen3, data_parallel_size=replicas, distributed_executor_backend="ray", **ENGINE_ARGS)


@pytest.mark.parametrize("kwargs, field", [
    (dict(data_parallel_size=0), "data_parallel_size"),
    (dict(data_parallel_size="2"), "data_parallel_size"),
    (dict(data_parallel_size=2, distributed_executor_backend="spark"), "distributed_executor_backend"),
])
def test_bad_arguments_name_the_field(tiny_qwen3, kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM(tiny_qwen3, **kwargs)
