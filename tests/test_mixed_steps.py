"""One kind of step: prompts that join run in the same step as the decodes (vLLM V1's policy)."""
from nanovllm import LLMEngine, SamplingParams
from tests.conftest import hf_greedy, random_prompts


def test_joining_prompts_do_not_stall_running_decodes(tiny_qwen3):
    """Short requests keep joining two long ones: the long ones get a token at every step (one
    step per token of the longest request, not one more per joining prompt), and every
    request's greedy tokens are those it gets alone."""
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu", max_num_batched_tokens=96, max_num_seqs=8)
    long_prompts, short_prompts = random_prompts(2, 30, 40, seed=5), random_prompts(8, 20, 50, seed=6)
    long_params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    short_params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(long_prompts):
        engine.add_request(f"long{i}", prompt, long_params)
    long_seqs = [engine.requests[f"long{i}"].seqs[0] for i in range(2)]
    outputs, counts, joined = {}, [], 0
    while engine.has_unfinished_requests():
        if engine.num_steps % 3 == 2 and joined < len(short_prompts):
            engine.add_request(f"short{joined}", short_prompts[joined], short_params)
            joined += 1
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step())
        counts.append([seq.num_output_tokens for seq in long_seqs])
    assert joined == len(short_prompts)
    # The long prompts' step, then one token per step each until both have 30.
    growing = [c for c in counts if 0 < c[0] < 30]
    assert all(b[0] - a[0] == 1 and b[1] - a[1] == 1 for a, b in zip(growing, growing[1:]))
    assert engine.num_steps == 30               # a step per token: joining prompts rode along
    prompts = long_prompts + short_prompts
    ids = [f"long{i}" for i in range(2)] + [f"short{i}" for i in range(len(short_prompts))]
    expected = [e[:30] if i.startswith("long") else e[:4] for e, i in zip(hf_greedy(tiny_qwen3, prompts, 30, True), ids)]
    assert [outputs[i] for i in ids] == expected


def test_a_long_prompt_is_chunked_beside_running_decodes(tiny_qwen3):
    """A prompt longer than what the budget leaves after the decodes is cut into chunks; the
    decodes still advance at every step, and its tokens are unchanged."""
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu", max_num_batched_tokens=24, max_num_seqs=4)
    short, long_prompt = random_prompts(1, 10, 10, seed=7)[0], random_prompts(1, 100, 100, seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", short, params)
    engine.step()
    engine.step()
    engine.add_request("b", long_prompt, params)
    seq_a = engine.requests["a"].seqs[0]
    spans, outputs = [], {}
    while engine.has_unfinished_requests():
        before = seq_a.num_output_tokens
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step())
        if engine.last_step is not None and len(engine.last_step.seqs) == 2:
            spans.append(engine.last_step.num_new_tokens)
            assert seq_a.is_finished or seq_a.num_output_tokens == before + 1
    assert [1, 23] in spans                      # a decode beside a 23-token chunk
    assert [outputs["a"], outputs["b"]] == hf_greedy(tiny_qwen3, [short, long_prompt], 12, True)


def test_a_long_prompt_is_not_begun_with_a_short_head(tiny_qwen3):
    """A long prompt for which a step has only a short head left (under an eighth of the budget)
    waits a step and then runs whole; a shorter prompt still takes the chunk that is left."""
    engine = LLMEngine.from_kwargs(tiny_qwen3, device="cpu", max_num_batched_tokens=64, max_num_seqs=4)
    first, second = random_prompts(2, 60, 60, seed=11)
    long_prompt, short = random_prompts(1, 40, 40, seed=12)[0], random_prompts(1, 7, 7, seed=13)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for request_id, prompt in (("first", first), ("long", long_prompt)):
        engine.add_request(request_id, prompt, params)
    spans, outputs = [], {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step())
        spans.append(engine.last_step.num_new_tokens)
    assert spans[:2] == [[60], [1, 40]]          # not [60, 4] then [1, 36]
    engine.add_request("second", second, params)
    engine.add_request("short", short, params)  # 7 tokens, under an eighth of the budget: chunked
    engine.step()
    assert engine.last_step.num_new_tokens == [60, 4]
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step())
    prompts = [first, long_prompt, second, short]
    assert [outputs[i] for i in ("first", "long", "second", "short")] == hf_greedy(tiny_qwen3, prompts, 4, True)
