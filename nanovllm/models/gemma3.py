"""Gemma 3 (text): a pre- and post-norm decoder that interleaves local and global attention.

    embedding x sqrt(hidden)
    N x (norm -> attention -> norm -> add,  norm -> gelu-tanh gated MLP -> norm -> add)
    final norm, LM head (tied), logits soft-capped when the config says so

* Layers are local (sliding-window attention over the last `sliding_window` keys) or global
  (full attention), as `layer_types` lists them (older configs: every `sliding_window_pattern`-th
  layer is global). The two kinds rotate with different RoPE tables: local layers with base
  10,000 (`rope_local_base_freq`), global ones with base 1,000,000 and, in the larger models,
  a linear scaling.
* Every RMSNorm scales by (1 + weight), the q/k per-head norms too (GemmaRMSNorm, below).
* Scores are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
"""
import torch
from torch import nn

from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import copy_checked
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of

LOCAL, GLOBAL = "sliding_attention", "full_attention"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm scales by (1 + weight). The checkpoint's weight is stored plus one at
    load time, so the forward pass (and its fused kernel) is the plain RMSNorm's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        copy_checked(param.data, loaded.to(param.dtype).float() + 1.0)   # the weight in the model's dtype, plus one


def layer_types(config) -> list[str]:
    kinds = getattr(config, "layer_types", None)
    if kinds is None:      # transformers 4.x configs: every pattern-th layer is global
        pattern = getattr(config, "sliding_window_pattern", None) or 6
        kinds = [LOCAL if (i + 1) % pattern else GLOBAL for i in range(config.num_hidden_layers)]
    return list(kinds)


def rope_parameters(config, kind: str) -> dict:
    """The RoPE parameters of local or global layers: transformers 5 nests them per layer type
    in `rope_parameters`; 4.x configs have rope_local_base_freq, rope_theta and rope_scaling."""
    nested = getattr(config, "rope_parameters", None) or {}
    if kind in nested:
        params = dict(nested[kind])
    elif kind == LOCAL:
        params = {"rope_theta": getattr(config, "rope_local_base_freq", None) or 10_000.0}
    else:
        params = {**(getattr(config, "rope_scaling", None) or {}),
                  "rope_theta": getattr(config, "rope_theta", None) or 1_000_000.0}
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, attention: LlamaAttention, mlp: LlamaMLP):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = attention
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = mlp
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions, hidden, residual, meta):
        # As in Llama, the residual stream rides beside and each pre-norm adds it first.
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config, max_model_len: int | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # sqrt(hidden) in the model's dtype (the model is built under it), as the checkpoint was trained
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        head_dim = head_dim_of(config)
        rotary = {kind: RotaryEmbedding(head_dim, config.max_position_embeddings, config,
                                        params=rope_parameters(config, kind), max_model_len=max_model_len)
                  for kind in (LOCAL, GLOBAL)}
        attention_options = dict(qkv_bias=getattr(config, "attention_bias", False),
                                 o_bias=getattr(config, "attention_bias", False), qk_norm=True,
                                 scale=config.query_pre_attn_scalar ** -0.5, norm=GemmaRMSNorm)
        window = config.sliding_window
        if max_model_len is not None and window >= max_model_len:
            window = None        # it would hide nothing
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, LlamaAttention(config, rotary[kind], sliding_window=window if kind == LOCAL
                                                      else None, **attention_options), LlamaMLP(config))
            for kind in layer_types(config))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden, residual)[0]


class Gemma3ForCausalLM(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config, max_model_len: int | None = None):
        super().__init__()
        self.model = Gemma3Model(config, max_model_len)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def check_supported(config) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"attn_logit_softcapping={config.attn_logit_softcapping} (Gemma 2's soft-capped "
                             f"attention scores) is not supported; Gemma 3 checkpoints leave it unset.")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported: "
                             "nanovllm generates text with causal attention.")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        if logits is not None and self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping      # cap * tanh(logits / cap): every logit within +-cap
            logits = torch.tanh(logits / cap) * cap
        return logits
