"""Scheduling features must not change the tokens: prefix caching, chunked prefill, preemption."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.sampling_params import RequestOutputKind
from tests.conftest import KERNEL_DEVICE, hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 20, 140, seed=2)


@pytest.fixture(scope="module")
def expected(tiny_qwen3, prompts):
    return hf_greedy(tiny_qwen3, prompts, max_new_tokens=24)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=32, max_num_seqs=4),       # prompts cut into 32-token chunks
    dict(num_gpu_blocks_override=24, block_size=16),       # 384 slots for ~6 x 100 tokens: preemption
    dict(max_num_seqs=1),                                  # one request at a time
    dict(block_size=1),
    dict(block_size=256),
])
def test_same_tokens_under_scheduling_options(tiny_qwen3, prompts, expected, options):
    llm = LLM(tiny_qwen3, device="cpu", **options)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if "num_gpu_blocks_override" in options:
        assert engine.scheduler.num_preemptions > 0


def test_prefix_cache_reuse_is_reported_and_exact(tiny_qwen3, prompts, expected):
    llm = LLM(tiny_qwen3, device="cpu", block_size=16)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in first)
    # The same prompts again: every full block except the one holding the last token is reused.
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert token_ids(again) == expected
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 16 * 16 for p in prompts]
    # A shared 64-token prefix is reused by a new prompt that extends it.
    extended = prompts[0][:64] + [5, 6, 7]
    out = llm.generate([extended], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 64
    assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, [extended], 24)[0]


def test_prefix_cache_shared_within_one_batch(tiny_qwen3):
    prefix = random_prompts(1, 80, 80, seed=3)[0]
    prompts = [prefix + [10 + i] for i in range(4)]
    llm = LLM(tiny_qwen3, device="cpu", block_size=16)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    # The first request computes the 80-token prefix; the others in the same step reuse its 5 blocks.
    assert [o.num_cached_tokens for o in outs] == [0, 80, 80, 80]
    assert token_ids(outs) == hf_greedy(tiny_qwen3, prompts, 24)


def test_ignore_eos_and_max_tokens(tiny_qwen3, prompts):
    llm = LLM(tiny_qwen3, device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 and o.outputs[0].finish_reason == "length" for o in outs)


def test_max_model_len_caps_generation(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=40)
    out = llm.generate([list(range(3, 33))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_engine_step_api_and_abort(tiny_qwen3):
    from nanovllm import LLMEngine
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu")
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request("b", "Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    seen = {}
    for _ in range(3):
        for out in engine.step():
            seen[out.request_id] = out
    assert set(seen) == {"a", "b"} and not seen["a"].finished   # CUMULATIVE: every step reports
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id] = out
    assert seen["b"].finished and len(seen["b"].outputs[0].token_ids) == 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_failed_step_aborts_the_requests_it_ran_and_the_rest_finish(tiny_qwen3, monkeypatch):
    engine = LLM(tiny_qwen3, device="cpu", max_num_seqs=1).llm_engine      # "a" runs, "b" waits
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.add_request("b", [8, 9, 10], GREEDY)
    launch = engine.runner.launch

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(engine.runner, "launch", launch)
        raise RuntimeError("a step failed")
    monkeypatch.setattr(engine.runner, "launch", fail_once)
    with pytest.raises(RuntimeError, match="a step failed"):
        engine.step()
    assert sorted(engine.requests) == ["b"]
    finished = []
    for _ in range(100):
        finished += [out.request_id for out in engine.step() if out.finished]
        if not engine.has_unfinished_requests():
            break
    assert finished == ["b"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_outputs_between_hand_overs_wait_and_then_cover_every_step(tiny_qwen3):
    """The server's hand-over makes only first and final outputs and those wanted; a request's
    next output reports its progress since its last one (DELTA: all the new tokens and text),
    so streams read less often see the same tokens and text."""
    from nanovllm import LLMEngine, RequestOutputKind
    from nanovllm.entrypoints.hand_over import HandOver
    prompts = ["Hello, my name is", "The capital of France is", [5, 6, 7, 8, 9]]
    kinds = [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA]
    stops = [[], [], ["e"]]       # the last one decodes every step (a stop string to look for)
    params = [SamplingParams(temperature=0, max_tokens=20, output_kind=k, stop=stop) for k, stop in zip(kinds, stops)]
    llm = LLM(tiny_qwen3, device="cpu")
    want = [o.outputs[0] for o in llm.generate(prompts, [p.clone() for p in params], use_tqdm=False)]
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu")
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    got = {str(i): [] for i in range(3)}
    step, hand_over = 0, HandOver(interval_per_request=0.0)
    while engine.has_unfinished_requests():
        wanted = str(step % 5)                          # request i's outputs every 5th step
        hand_over.wanted = lambda num_requests: lambda request_id: request_id == wanted
        outputs = hand_over.step(engine)
        for out in outputs:
            its_turn = out.request_id == wanted
            assert its_turn or out.finished or not got[out.request_id], "an output between hand-overs"
            got[out.request_id].append(out)
        step += 1
    for i, kind in enumerate(kinds):
        outs = got[str(i)]
        assert 2 <= len(outs) < 20 and outs[-1].finished and len(outs[0].outputs[0].token_ids) == 1
        if kind == RequestOutputKind.DELTA:
            text = "".join(o.outputs[0].text for o in outs)
            tokens = [t for o in outs for t in o.outputs[0].token_ids]
        else:
            text, tokens = outs[-1].outputs[0].text, outs[-1].outputs[0].token_ids
        assert (text, tokens) == (want[i].text, want[i].token_ids)


@pytest.mark.slow
def test_triton_backend_gives_the_same_tokens(tiny_qwen3, prompts, expected):
    """The engine on the Triton kernels (the CPU interpreter here, the GPU's default backend)."""
    from nanovllm.kernels import triton_available
    if not triton_available():
        pytest.skip("triton is not installed")
    llm = LLM(tiny_qwen3, device=KERNEL_DEVICE, dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=64, max_num_seqs=4)
    assert token_ids(llm.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)) \
        == [e[:6] for e in expected[:3]]


@pytest.mark.slow
def test_triton_backend_with_fresh_spans_gives_the_same_tokens(tiny_qwen3, prompts, expected, monkeypatch):
    """As above, with every prompt chunk of 8+ tokens and no cached context a fresh span: attended
    from the step's own keys and values (torch's dense attention here, cuDNN's on a GPU)."""
    from nanovllm.kernels import triton_available
    from nanovllm.layers import attention_backends
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(attention_backends, "FRESH_MIN_TOKENS", 8)
    monkeypatch.setattr(attention_backends, "FRESH_MIN_STEP_TOKENS", 8)
    llm = LLM(tiny_qwen3, device=KERNEL_DEVICE, dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=64, max_num_seqs=4)
    assert token_ids(llm.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)) \
        == [e[:6] for e in expected[:3]]
    if KERNEL_DEVICE == "cpu":      # (a GPU's float32 steps stay in graphs, on the kernel)
        assert list(llm.llm_engine.runner.backend.dense_ok.values()) == [True]     # the path ran


def test_steps_are_pipelined(tiny_qwen3):
    """While one step is on the device the next is already launched (see LLMEngine.step),
    prefill included, and tokens are the same as unpipelined, step by step."""
    from nanovllm import LLMEngine
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu")
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                      output_kind=RequestOutputKind.CUMULATIVE))
    assert engine.step() == [] and engine.in_flight is not None    # the prompt: launched, not read back
    outs = engine.step()                   # the first decode launched before the prompt's token is read
    assert engine.in_flight is not None and engine.in_flight.batch.from_device == [True]
    assert len(outs[0].outputs[0].token_ids) == 1
    outs = engine.step()
    assert engine.in_flight is not None and len(outs[0].outputs[0].token_ids) == 2
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, [[5, 6, 7]], 8, ignore_eos=True)[0]
    assert engine.num_steps == 8           # the 8th token's step is never launched: max_tokens is known


def test_generate_steps_each_time_the_prompts_it_adds_fill_a_step(tiny_qwen3, prompts, expected):
    """Whenever the prompts added since the last launch fill a step (the token budget), generate
    steps before adding the rest, so the device runs while it adds them; the tokens stay
    transformers'."""
    llm = LLM(tiny_qwen3, device="cpu", max_num_batched_tokens=128, max_num_seqs=8)
    engine, steps_at_add = llm.llm_engine, []
    add_request = engine.add_request

    def recording_add_request(*args):
        steps_at_add.append(engine.num_steps)
        return add_request(*args)
    engine.add_request = recording_add_request
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    wanted, steps, added = [], 0, 0
    for prompt in prompts:
        wanted.append(steps)
        added += len(prompt)
        if added >= 128:            # a step's worth: one step, then the count starts again
            steps, added = steps + 1, 0
    assert steps >= 2 and steps_at_add == wanted
    # A bad prompt after the first step was launched: refused, and the engine is left clean.
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate(prompts + [[10**9]], GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_triton_backend_with_a_group_of_seven_query_heads(checkpoint_factory):
    """Qwen2.5-0.5B/7B share one KV head among 7 query heads: a group that is no power of two."""
    from nanovllm.kernels import triton_available
    if not triton_available():
        pytest.skip("triton is not installed")
    path = checkpoint_factory("qwen2", hidden_size=112, num_attention_heads=7, num_key_value_heads=1, head_dim=16)
    prompts = random_prompts(3, 5, 70, seed=9)
    llm = LLM(path, device=KERNEL_DEVICE, dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=64, max_num_seqs=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 5)


def test_everything_at_once_keeps_greedy_tokens(tiny_qwen3):
    """Shared prefixes, small blocks, a tight token budget (chunking), a cache small enough to
    preempt, uneven max_tokens, and several generate calls on one engine (prefix-cache hits
    across calls, pipelined steps throughout): greedy tokens must still be transformers'."""
    import random
    preemptions = 0
    for seed in range(3):
        rng = random.Random(seed)
        stems = random_prompts(3, 20, 60, seed=10 + seed)
        prompts = [rng.choice(stems) + random_prompts(1, 1, 40, seed=100 * seed + i)[0] for i in range(8)]
        expected = hf_greedy(tiny_qwen3, prompts, 20, ignore_eos=True)
        block_size = rng.choice([4, 8, 16])
        longest = max(map(len, prompts)) + 20
        # Room for the longest request alone and a little more: running several may preempt.
        llm = LLM(tiny_qwen3, device="cpu", block_size=block_size, max_num_batched_tokens=rng.choice([24, 48]),
                  max_num_seqs=rng.choice([4, 8]), num_gpu_blocks_override=-(-longest // block_size) + 3)
        for _ in range(2):
            lengths = [rng.randint(1, 20) for _ in prompts]
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == [e[:n] for e, n in zip(expected, lengths)], seed
        bm = llm.llm_engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        preemptions += llm.llm_engine.scheduler.num_preemptions
    assert preemptions > 0          # (whether one seed's run preempts depends on the schedule)


def test_chunked_prefill_can_be_turned_off(tiny_qwen3, prompts, expected):
    llm = LLM(tiny_qwen3, device="cpu", enable_chunked_prefill=False, max_model_len=160,
              max_num_batched_tokens=160, max_num_seqs=4)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        LLM(tiny_qwen3, device="cpu", enable_chunked_prefill=False, max_model_len=160, max_num_batched_tokens=64)


def test_step_token_budget_defaults_follow_vllm(tiny_qwen3, monkeypatch):
    from nanovllm.config import EngineConfig, default_max_num_batched_tokens
    assert EngineConfig(tiny_qwen3, device="cpu").max_num_batched_tokens == 8192
    assert default_max_num_batched_tokens("cpu", 256, server=True) == 2048
    assert default_max_num_batched_tokens("cpu", 10000) == 10000          # room for every sequence
    # An 80 GiB H100 gets vLLM's larger budgets; an 80 GiB A100 does not.
    for name, expected in (("NVIDIA H100 80GB HBM3", (16384, 8192)), ("NVIDIA A100-SXM4-80GB", (8192, 2048))):
        monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: type("P", (), {"total_memory": 80 * 2**30}))
        monkeypatch.setattr("torch.cuda.get_device_name", lambda i, name=name: name)
        assert (default_max_num_batched_tokens("cuda", 256),
                default_max_num_batched_tokens("cuda", 256, server=True)) == expected


def test_a_dropped_engine_is_collected_whole(tiny_qwen3):
    """The offline engine leaves the garbage collector alone: it runs in the user's process,
    where frozen objects (gc.freeze) would never be collected, so a dropped engine's reference
    cycles would hold its weights, and the user's own garbage, for good. Dropped, every weight
    is freed. (The server's engine process, which holds nothing else, does freeze.)"""
    import gc
    import weakref
    llm = LLM(tiny_qwen3, enforce_eager=True)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    assert gc.get_freeze_count() == 0
    weights = [weakref.ref(p) for p in llm.llm_engine.runner.model.parameters()]
    del llm
    gc.collect()
    assert all(w() is None for w in weights)
