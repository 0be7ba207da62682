"""Greedy token-for-token parity with transformers (float32) for Qwen3-MoE, Gemma 3, Phi-3 and
GPT-NeoX on tiny random checkpoints, and sliding-window attention (Qwen2, Gemma 3's local
layers; Mistral in test_models.py) with prompts longer than the window; tensor parallelism
(two gloo ranks) gives one rank's tokens for the MoE and Gemma 3."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12)

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.0, 1.2, 1.5, 2.0, 2.0, 3.0, 4.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]}

FAMILIES = {
    # name: (model_type, checkpoint config, engine arguments, (prompt count, min len, max len))
    # layer 0 routed (top-2 of 8, renormalised), layer 1 a dense MLP (mlp_only_layers)
    "qwen3-moe-top2-norm": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                              norm_topk_prob=True, mlp_only_layers=[1]), {}, (4, 3, 60)),
    # every second layer routed (decoder_sparse_step=2): layer 1 top-3 of 4, not renormalised
    "qwen3-moe-sparse-step2": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=24,
                                                 norm_topk_prob=False, decoder_sparse_step=2), {}, (4, 3, 60)),
    # a local layer (window 8, base 10,000) then a global one (base 1e6, linear scaling x2)
    "gemma3": ("gemma3_text", dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        final_logit_softcapping=3.0), {}, (4, 12, 70)),
    # LongRoPE within the original context (64): the short factors
    "phi3-longrope-short": ("phi3", dict(rope_parameters=LONGROPE, original_max_position_embeddings=64,
                                         tie_word_embeddings=False), {"max_model_len": 64}, (4, 3, 40)),
    # max_model_len beyond the original context and prompts too: the long factors
    "phi3-longrope-long": ("phi3", dict(rope_parameters=LONGROPE, original_max_position_embeddings=64,
                                        tie_word_embeddings=False), {}, (3, 70, 140)),
    # Phi-4-mini's kind: half of each head rotated
    "phi3-partial-rotary": ("phi3", dict(rope_parameters={**LONGROPE, "partial_rotary_factor": 0.5,
                                                          "short_factor": [1.0, 1.5, 2.0, 3.0],
                                                          "long_factor": [2.0, 3.0, 5.0, 8.0]},
                                         original_max_position_embeddings=64), {"max_model_len": 64}, (4, 3, 40)),
    # Pythia: a quarter of each head rotated, parallel residual, biases everywhere
    "gpt-neox-parallel": ("gpt_neox", dict(rotary_pct=0.25, num_key_value_heads=4, tie_word_embeddings=False),
                          {}, (4, 3, 60)),
    "gpt-neox-sequential-residual": ("gpt_neox", dict(rotary_pct=0.5, use_parallel_residual=False,
                                                      attention_bias=False, num_key_value_heads=4), {}, (4, 3, 60)),
    # Qwen2 with use_sliding_window: full attention in layer 0, a window of 8 from layer 1 on
    "qwen2-sliding-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
                             {}, (4, 12, 70)),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_parity_with_transformers(name, checkpoint_factory):
    model_type, overrides, engine_args, (count, shortest, longest) = FAMILIES[name]
    path = checkpoint_factory(model_type, **overrides)
    prompts = random_prompts(count, shortest, longest, seed=3)
    expected = hf_greedy(path, prompts, max_new_tokens=12, ignore_eos=True)
    llm = LLM(path, device="cpu", block_size=16, **engine_args)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_sliding_window_across_prompt_chunks_and_cached_prefixes(checkpoint_factory):
    """A window of 8 when prompts arrive in chunks of at most 16 tokens and share cached prefix
    blocks: each chunk's queries see the window's keys from earlier chunks and other requests."""
    path = checkpoint_factory("mistral", sliding_window=8)
    stem = random_prompts(1, 40, 40, seed=7)[0]
    prompts = [stem + tail for tail in random_prompts(3, 5, 30, seed=8)]
    expected = hf_greedy(path, prompts, max_new_tokens=8, ignore_eos=True)
    llm = LLM(path, device="cpu", block_size=8, max_num_batched_tokens=16, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)] == expected[:1]
    outputs = llm.generate(prompts, params, use_tqdm=False)      # the stem's blocks now come from the cache
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_gemma3_logits_are_soft_capped(checkpoint_factory):
    """Greedy tokens cannot show the cap (tanh keeps the order); logprobs can."""
    from transformers import AutoModelForCausalLM
    model_type, overrides, _, _ = FAMILIES["gemma3"]
    path = checkpoint_factory(model_type, **overrides)
    prompt = random_prompts(1, 20, 20, seed=5)[0]
    out = LLM(path, device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=3),
                                           use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([prompt])).logits[0, -1]
    assert logits.abs().max() < 3.0            # the cap of this checkpoint
    expected = torch.log_softmax(logits, dim=-1)
    for token, logprob in out.logprobs[0].items():
        assert abs(logprob.logprob - expected[token].item()) < 1e-4


def test_gemma3_refuses_soft_capped_attention(checkpoint_factory):
    path = checkpoint_factory("gemma3_text", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        LLM(path, device="cpu")


@pytest.mark.parametrize("name", ["qwen3-moe-top2-norm",
                                  *(pytest.param(n, marks=pytest.mark.slow)       # the default suite's time
                                    for n in ("gemma3", "phi3-partial-rotary", "gpt-neox-parallel", "qwen2-sliding-window"))])
def test_tensor_parallel_matches_one_rank(name, checkpoint_factory):
    """Two gloo ranks: the MoE's experts split along their intermediate dimension (its router
    replicated); Gemma 3's heads split, its local and global layers alike; Phi-3's fused qkv and
    gate_up tensors and GPT-NeoX's interleaved qkv each load their rank's slice; Qwen2's biases
    split with their heads."""
    model_type, overrides, _, (count, shortest, longest) = FAMILIES[name]
    path = checkpoint_factory(model_type, **overrides)
    prompts = random_prompts(count, shortest, longest, seed=4)
    args = dict(device="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4)
    one = LLM(path, **args).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, **args)
    two = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]


def test_triton_attention_kernels_with_a_window(checkpoint_factory):
    """Gemma 3's local layers through the Triton attention kernels (prefill and decode) with
    their window: in Triton's interpreter here, on the GPU when there is one. (The fused MoE
    kernel is checked against the loop the CPU engine runs in tests/kernels/test_fused_moe.py.)"""
    from nanovllm.kernels import triton_available
    from tests.conftest import KERNEL_DEVICE
    if not triton_available():
        pytest.skip("triton is not installed")
    model_type, overrides, _, _ = FAMILIES["gemma3"]
    path = checkpoint_factory(model_type, **overrides)
    prompts = random_prompts(2, 12, 20, seed=6)      # longer than the window of 8
    llm = LLM(path, device=KERNEL_DEVICE, dtype="float32", attention_backend="triton", block_size=16,
              max_num_seqs=4, enforce_eager=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 3, ignore_eos=True)


@pytest.mark.parametrize("rank", [0, 1])
def test_fused_checkpoint_tensors_load_each_ranks_slice(rank, monkeypatch):
    """As rank `rank` of 2: Phi-3's fused qkv_proj and gate_up_proj, GPT-NeoX's per-head
    interleaved query_key_value and Qwen3-MoE's per-expert projections each land as the
    separately stored tensors would (q/k/v heads and intermediate rows of this rank)."""
    from nanovllm.layers import linear
    from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
    from nanovllm.models import qwen3_moe
    from nanovllm.models.gpt_neox import InterleavedQKVLinear
    for module in (linear, qwen3_moe):
        monkeypatch.setattr(module, "tp_size", lambda: 2)
        monkeypatch.setattr(module, "tp_rank", lambda: rank)
    hidden, head_dim = 6, 2
    q, k, v = torch.randn(4 * head_dim, hidden), torch.randn(2 * head_dim, hidden), torch.randn(2 * head_dim, hidden)

    def rows(t, parts):           # this rank's slice of t's rows
        return t.chunk(parts)[rank]

    separate = QKVParallelLinear(hidden, head_dim, 4, 2)
    for part, sid in zip((q, k, v), "qkv"):
        separate.weight.weight_loader(separate.weight, part, sid)
    assert torch.equal(separate.weight, torch.cat([rows(q, 2), rows(k, 2), rows(v, 2)]))
    fused = QKVParallelLinear(hidden, head_dim, 4, 2)
    fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))                    # Phi-3
    assert torch.equal(fused.weight, separate.weight)

    mha_k, mha_v = torch.randn(4 * head_dim, hidden), torch.randn(4 * head_dim, hidden)
    per_head = torch.stack([t.view(4, head_dim, hidden) for t in (q, mha_k, mha_v)], dim=1)   # [heads, 3, D, H]
    neox = InterleavedQKVLinear(hidden, head_dim, 4, 4, bias=True)
    neox.weight.weight_loader(neox.weight, per_head.reshape(-1, hidden))
    assert torch.equal(neox.weight, torch.cat([rows(q, 2), rows(mha_k, 2), rows(mha_v, 2)]))
    neox.bias.weight_loader(neox.bias, torch.arange(24.0).view(4, 3, 2).flatten())
    heads = [2 * rank, 2 * rank + 1]
    expected_bias = [6 * h + 2 * which + d for which in range(3) for h in heads for d in range(2)]
    assert neox.bias.tolist() == expected_bias

    gate, up = torch.randn(8, hidden), torch.randn(8, hidden)
    mlp = MergedColumnParallelLinear(hidden, [8, 8])
    mlp.weight.weight_loader(mlp.weight, torch.cat([gate, up]))                       # Phi-3
    assert torch.equal(mlp.weight, torch.cat([rows(gate, 2), rows(up, 2)]))

    experts = qwen3_moe.FusedMoE(num_experts=3, hidden_size=hidden, intermediate_size=8)
    down = torch.randn(hidden, 8)
    experts.gate_up_proj.weight.weight_loader(experts.gate_up_proj.weight, gate, (2, 0))
    experts.gate_up_proj.weight.weight_loader(experts.gate_up_proj.weight, up, (2, 1))
    experts.down_proj.weight.weight_loader(experts.down_proj.weight, down, (2, None))
    assert torch.equal(experts.gate_up_proj.weight[2], torch.cat([rows(gate, 2), rows(up, 2)]))
    assert torch.equal(experts.down_proj.weight[2], down.chunk(2, dim=1)[rank])
