"""Published model shapes, for benchmarks with dummy weights (no download needed).

`shape_checkpoint_dir("qwen3-0.6b")` writes the model's config.json beside a tokenizer of
as many tokens; with `LLM(dir, load_format="dummy")` the engine then runs a model of exactly
that shape (and speed) with random weights.
"""
import json
import os

SHAPES: dict[str, dict] = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=None, torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151645),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128009),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the demo model): bench.py's CPU preset
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen3-30B-A3B: 128 experts, 8 active per token (3.3B of 30.5B parameters active)
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
        sliding_window=None, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
    # google/gemma-3-1b-it: 5 local layers (window 512) to each global one
    "gemma-3-1b": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=2, eos_token_id=[1, 106]),
    # microsoft/Phi-3-mini-4k-instruct: every layer with a 2,047-token window
    "phi-3-mini-4k": dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
        max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
        sliding_window=2047, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        torch_dtype="bfloat16", bos_token_id=1, eos_token_id=32000),
}
# The same model as a 4-bit GPTQ checkpoint (group size 128), as its published 4-bit versions are.
SHAPES["llama-3.2-1b-gptq"] = dict(SHAPES["llama-3.2-1b"], quantization_config=dict(
    quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True))
# The demo model with 4-bit weights in groups of 32, as its Q4_1 GGUF file holds them.
SHAPES["smollm2-135m-gptq"] = dict(SHAPES["smollm2-135m"], quantization_config=dict(
    quant_method="gptq", bits=4, group_size=32, desc_act=False, sym=True))


def shape_checkpoint_dir(name: str, root: str | None = None) -> str:
    """A directory with `name`'s config.json and a tokenizer of its vocabulary (created once)."""
    if name not in SHAPES:
        raise ValueError(f"Unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}.")
    from nanovllm.demo_model import cache_root
    # v2: the tokenizer covers the whole vocabulary (v1's had 400 tokens).
    path = os.path.join(root or cache_root(), "shapes", "v2", name)
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        build_vocabulary_tokenizer(SHAPES[name]["vocab_size"]).save_pretrained(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(SHAPES[name], f, indent=2)
    return path


def build_vocabulary_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, each of which spells text (1-3
    printable ASCII characters). Random weights sample ids from the whole vocabulary; with a
    smaller tokenizer most of them would spell nothing, and a server streams no text for tokens
    that spell nothing (a benchmark would see every token arrive at the end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nanovllm.demo_model import CHAT_TEMPLATE, SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in pre_tokenizers.ByteLevel.alphabet():       # every byte, so any text encodes
        vocab.setdefault(char, len(vocab))
    printable = [chr(c) for c in range(33, 127)]            # bytes the byte-level alphabet keeps as they are
    merges, pieces = [], printable
    while len(vocab) < vocab_size:                          # pieces one character longer at each round
        longer = []
        for piece in pieces:
            for char in printable[:vocab_size - len(vocab)]:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
                longer.append(piece + char)
        pieces = longer
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)
