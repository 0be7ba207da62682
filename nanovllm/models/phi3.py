"""Phi-3 (and Phi-3.5 / Phi-4-mini): the Llama architecture, with two differences.

* The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, already
  fused as our layers hold them: nothing to map, each loads whole (then split per rank).
* RoPE with LongRoPE ("su") scaling: a factor per frequency, from `short_factor` for contexts
  within `original_max_position_embeddings` and `long_factor` beyond, and cos/sin scaled by
  sqrt(1 + ln(s) / ln(original)). The engine picks one set for its whole KV cache: the long
  factors when max_model_len exceeds the original context (vLLM's choice), else the short
  ones. Some checkpoints (Phi-4-mini) rotate part of each head (`partial_rotary_factor`).
Phi-3-mini-4k's config sets `sliding_window` (2047): every layer gets it (sliding_window.sliding_windows).
"""
from nanovllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {}

    @staticmethod
    def attention_options(config) -> dict:
        return dict(qkv_bias=False, o_bias=False, qk_norm=False)
