"""GPT-NeoX (Pythia): LayerNorms with biases and a parallel residual.

    embedding
    N x (h + attention(LayerNorm(h)) + MLP(LayerNorm'(h)))     the two branches read the same h
    final LayerNorm, LM head (embed_out)

* With use_parallel_residual=False the branches run in sequence instead, as in GPT-2.
* RoPE turns only the first rotary_pct of each head's dimensions (Pythia: a quarter).
* The checkpoint's query_key_value interleaves the three per head (head 0's q, k, v, then
  head 1's, ...); it is regrouped into q, k, v at load time, so the attention is the usual one.
* The MLP is plain (not gated): dense_h_to_4h -> gelu -> dense_4h_to_h, all with biases.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.gelu import Gelu
from nanovllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary import RotaryEmbedding


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-NeoX): (x - mean) / std * weight + bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def activation(name: str) -> nn.Module:
    return nn.SiLU() if name in ("silu", "swish") else Gelu(name)


class InterleavedQKVLinear(QKVParallelLinear):
    """The q/k/v projection of a checkpoint that stores it as [heads, (q, k, v), head_dim] rows."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        per_head = loaded.view(self.total_num_heads, 3, self.head_dim, *loaded.shape[1:])
        for i, sid in enumerate("qkv"):
            super().weight_loader(param, per_head[:, i].reshape(-1, *loaded.shape[1:]), sid)


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        heads = config.num_attention_heads
        self.head_dim = config.hidden_size // heads
        bias = getattr(config, "attention_bias", True)
        self.query_key_value = InterleavedQKVLinear(config.hidden_size, self.head_dim, heads, heads, bias=bias)
        self.num_heads = self.query_key_value.num_heads
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim ** -0.5)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).view(-1, 3 * self.num_heads, self.head_dim).chunk(3, dim=1)
        q, k = self.rotary(positions, q, k)
        return self.dense(self.attn(q, k, v, meta))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = activation(config.hidden_act)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        self.use_parallel_residual = getattr(config, "use_parallel_residual", True)
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions, hidden, meta):
        attn = self.attention(positions, self.input_layernorm(hidden), meta)
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        hidden = attn + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPTNeoXModel(nn.Module):
    def __init__(self, config, max_model_len: int | None = None):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, config, max_model_len=max_model_len)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden = self.embed_in(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, meta)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config, max_model_len: int | None = None):
        super().__init__()
        self.gpt_neox = GPTNeoXModel(config, max_model_len)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.embed_out(hidden)
