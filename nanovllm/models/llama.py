"""The Llama architecture, which Qwen2, Qwen3, Qwen3-MoE, Mistral and Phi-3 extend with small
changes (and whose attention and MLP Gemma 3 reuses).

A pre-norm decoder: token embedding, N x (RMSNorm -> attention -> add, RMSNorm -> gated
MLP -> add), a final RMSNorm and the LM head. The attention projects q, k and v in one
fused matmul, rotates q and k by position (RoPE), and attends over the paged KV cache,
through all of it or, in a sliding-window layer, through its last `sliding_window` keys.
"""
import torch
from torch import nn

from nanovllm.layers.activation import gated_activation
from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.models.sliding_window import sliding_windows


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    # What the families change: biases on q/k/v and on o, a per-head q/k norm (Qwen3, Gemma 3),
    # the score scale (Gemma 3) and, per layer, the sliding window and the RoPE table.
    def __init__(self, config, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 sliding_window: int | None = None, scale: float | None = None, norm: type[nn.Module] = RMSNorm):
        super().__init__()
        head_dim = head_dim_of(config)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = norm(head_dim, config.rms_norm_eps)
            self.k_norm = norm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim,
                              scale=head_dim ** -0.5 if scale is None else scale, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.rotary(positions, q, k, self.q_norm, self.k_norm)
        else:
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)); act is the config's hidden_act (silu; Gemma's gelu-tanh)."""

    def __init__(self, config, bias: bool = False, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"
        self.act = gated_activation(act)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attention: LlamaAttention, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions, hidden, residual, meta):
        # The residual stream is carried separately so each RMSNorm can add it in the same call.
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attention_options: dict, make_mlp, max_model_len: int | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table shared by every layer.
        rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, config,
                                 max_model_len=max_model_len)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, LlamaAttention(config, rotary, sliding_window=window, **attention_options),
                              make_mlp(config, i))
            for i, window in enumerate(sliding_windows(config, max_model_len)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensors that load into a slice of one of our fused parameters.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, max_model_len: int | None = None):
        super().__init__()
        self.model = LlamaModel(config, self.attention_options(config), self.make_mlp, max_model_len)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def attention_options(config) -> dict:
        bias = getattr(config, "attention_bias", False)
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=False)

    @staticmethod
    def make_mlp(config, layer_index: int) -> nn.Module:
        return LlamaMLP(config, bias=getattr(config, "mlp_bias", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Token ids and positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden states [N, hidden] -> logits [N, vocab] (on rank 0; None elsewhere)."""
        return self.lm_head(hidden)
