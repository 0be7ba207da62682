"""The CUDA engine (Triton kernels, eager and with CUDA graphs) gives transformers' greedy tokens."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import assert_greedy_parts_only_at_near_ties, hf_greedy, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(8, 5, 300, seed=4)


@pytest.fixture(scope="module")
def expected(tiny_qwen3, prompts):
    return hf_greedy(tiny_qwen3, prompts, max_new_tokens=32)


@pytest.mark.parametrize("options", [
    dict(enforce_eager=True),
    dict(enforce_eager=False),
    dict(enforce_eager=False, block_size=256),
    dict(enforce_eager=False, max_num_batched_tokens=64, max_num_seqs=8),   # chunked prefill
    dict(enforce_eager=False, num_gpu_blocks_override=40),                 # preemption
])
def test_cuda_engine_matches_transformers(tiny_qwen3, prompts, expected, options):
    llm = LLM(tiny_qwen3, device="cuda", dtype="float32", **options)
    assert llm.llm_engine.runner.backend.name == "triton"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)   # prefix hits
    assert [o.outputs[0].token_ids for o in again] == expected


def test_graphs_match_eager_in_bf16(tiny_qwen3, prompts):
    """CUDA graphs + fused kernels vs eager in bf16: rounding differs, so sequences may part
    at a near-tie between the top two tokens, but nowhere else."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    eager = LLM(tiny_qwen3, device="cuda", dtype="bfloat16", enforce_eager=True).generate(prompts, params, use_tqdm=False)
    graphs = LLM(tiny_qwen3, device="cuda", dtype="bfloat16").generate(prompts, params, use_tqdm=False)
    assert all(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(eager, graphs))
    assert_greedy_parts_only_at_near_ties(eager, graphs, max_gap=0.1, max_logprob_diff=0.25)


def test_seeded_sampling_on_gpu_is_reproducible(tiny_qwen3, prompts):
    llm = LLM(tiny_qwen3, device="cuda", dtype="float32")     # as before "auto" became float16 for it
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=16)
    a = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.parametrize("speculation", ["ngram", "same draft", "other draft"])
def test_speculation_with_graphs_keeps_the_greedy_tokens(tiny_qwen3, checkpoint_factory, speculation):
    """Verifying steps of 40 sequences (k + 1 rows each) through the mixed-step graphs, the draft
    model's steps through its own graphs: in float32, the plain engine's tokens exactly."""
    prompts = [p * 3 for p in random_prompts(40, 4, 40, seed=9)]       # repeated: n-gram matches
    draft = {"same draft": tiny_qwen3, "other draft": checkpoint_factory("qwen3", seed=1)}.get(speculation)
    config = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1} if draft is None
              else {"model": draft, "num_speculative_tokens": 4})
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = LLM(tiny_qwen3, device="cuda", dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(tiny_qwen3, device="cuda", dtype="float32", speculative_config=config)
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    metrics = llm.llm_engine.speculator.metrics
    assert metrics.num_draft_tokens > 0
    if speculation != "other draft":
        assert metrics.num_accepted_tokens > 0


def test_long_fresh_prompts_through_cudnn_match_the_triton_kernel(tiny_qwen3, monkeypatch):
    """Prompts of 600-900 tokens with no cached context (AttentionMetadata.fresh_spans) attend
    through cuDNN's kernel in eager steps; with the path off, through ours in CUDA graphs."""
    from nanovllm.layers import attention_backends
    monkeypatch.setattr(attention_backends, "FRESH_MIN_TOKENS", 512)
    monkeypatch.setattr(attention_backends, "FRESH_MIN_STEP_TOKENS", 512)
    prompts = random_prompts(2, 5, 40, seed=3) + random_prompts(3, 600, 900, seed=5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    llm = LLM(tiny_qwen3, device="cuda", dtype="bfloat16", max_model_len=1024)
    fresh = llm.generate(prompts, params, use_tqdm=False)
    assert list(llm.llm_engine.runner.backend.dense_ok.values()) == [True]      # cuDNN took them
    monkeypatch.setattr(attention_backends, "FRESH_MIN_TOKENS", 10 ** 9)
    kernel = LLM(tiny_qwen3, device="cuda", dtype="bfloat16", max_model_len=1024).generate(prompts, params, use_tqdm=False)
    assert_greedy_parts_only_at_near_ties(kernel, fresh, max_gap=0.1, max_logprob_diff=0.25)


def test_fp8_activations_quantized_by_the_mlp_give_the_same_tokens(tiny_qwen3, monkeypatch):
    """quantization="fp8": the MLP's activation quantized in its own kernel (silu_and_mul_fp8)
    gives the bits of the activation kernel and the projection's quantization one after the
    other, through the CUDA graphs: the same tokens and logprobs."""
    from nanovllm.quantization import fp8_linear
    prompts = random_prompts(4, 5, 60, seed=7)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    llm = LLM(tiny_qwen3, device="cuda", dtype="bfloat16", quantization="fp8")
    assert any(isinstance(m, fp8_linear.SiluAndMulToFp8) for m in llm.llm_engine.runner.model.modules())
    fused = llm.generate(prompts, params, use_tqdm=False)
    del llm
    monkeypatch.setattr(fp8_linear, "fuse_input_quantization", lambda model: None)
    unfused = LLM(tiny_qwen3, device="cuda", dtype="bfloat16", quantization="fp8")
    unfused = unfused.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused, unfused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob


def test_gptq_model_through_graphs_gives_the_same_tokens_with_early_launches(tmp_path, monkeypatch):
    """A 4-bit GPTQ model's GEMVs start before the kernel ahead has finished (programmatic dependent
    launch, sm_90+): through CUDA graphs, the tokens and logprobs of the same kernels launched one
    after another."""
    from nanovllm.demo_model import build_tiny_checkpoint
    from tests.test_quantization import write_quantized
    src, dst, ref = (str(tmp_path / name) for name in ("float", "gptq", "dequantized"))
    build_tiny_checkpoint(src, model_type="llama")
    write_quantized(src, dst, ref, "gptq", bits=4, group_size=32)
    prompts = random_prompts(8, 5, 200, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("NANOVLLM_PDL", pdl)
        llm = LLM(dst, device="cuda", dtype="bfloat16")
        runs[pdl] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                     for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert runs["1"] == runs["0"]
    assert len({tuple(tokens) for tokens, _ in runs["1"]}) > 1
