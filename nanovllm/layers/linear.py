"""Linear layers that can be split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice of the
heads / intermediate features); row-parallel layers split the input features and sum
the ranks' partial results with an all-reduce. With one rank both are plain linears.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies
this rank's slice of a full checkpoint tensor into it, so checkpoints load straight into
the sharded, fused parameters.
"""
import torch
from torch import nn

from nanovllm.distributed import all_reduce, tp_rank, tp_size
from nanovllm.layers.cpu_linear import linear


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """target.copy_(loaded), refusing a tensor of another shape: copy_ would broadcast a [1, N]
    one into [4, N] (a checkpoint's wrong tensor would load without a word)."""
    if target.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} where this rank's parameter takes {tuple(target.shape)}")
    target.copy_(loaded)


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    # Set (by nanovllm/quantization) on a layer whose weight the checkpoint keeps quantized: it then
    # holds that format's tensors instead of `weight`, and quant_method.apply does its matmul.
    quant_method = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias)
        return linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(_Linear):
    """A linear every rank holds whole (e.g. the MoE router)."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        copy_checked(param.data, loaded)


class ColumnParallelLinear(_Linear):
    """y = x W^T + b with W's rows (output features) split evenly across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        if out_features % tp_size():
            raise ValueError(f"{out_features} output features do not split over {tp_size()} ranks")
        super().__init__(in_features, out_features // tp_size(), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        copy_checked(param.data, loaded.chunk(tp_size(), dim=0)[tp_rank()])


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel linears of the same input fused into one matmul
    (e.g. the MLP's gate and up projections). Checkpoint tensor `shard_id` (0, 1, ...)
    fills the `shard_id`-th slice of each rank's fused weight; shard_id None is a checkpoint
    tensor already fused the same way (Phi-3's gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        self.local_sizes = [size // tp_size() for size in output_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None):
        if shard_id is None:
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        offset = sum(self.local_sizes[:shard_id])
        target = param.data.narrow(0, offset, self.local_sizes[shard_id])
        copy_checked(target, loaded.chunk(tp_size(), dim=0)[tp_rank()])


class QKVParallelLinear(_Linear):
    """The fused query/key/value projection, split by heads.

    Each rank gets num_heads / tp query heads. Key/value heads are split the same way,
    or, when there are fewer KV heads than ranks, replicated: rank r then holds KV head
    r // (tp / num_kv_heads), which is the head its query heads attend with.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)    # ranks sharing one KV head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None):
        """shard_id "q", "k" or "v": that projection's full checkpoint tensor; None: the three
        already fused in that order (Phi-3's qkv_proj)."""
        if shard_id is None:
            sizes = [self.total_num_heads * self.head_dim] + [self.total_num_kv_heads * self.head_dim] * 2
            for part, sid in zip(loaded.split(sizes, dim=0), "qkv"):
                self.weight_loader(param, part, sid)
            return
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        if loaded.shape[0] != heads * self.head_dim:      # (narrow below would take part of a larger one)
            raise ValueError(f"{shard_id}: {loaded.shape[0]} rows where {heads} heads of {self.head_dim} take "
                             f"{heads * self.head_dim}")
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, index = 0, q_size, tp_rank()
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, index = kv_size, tp_rank() // self.kv_replicas
        copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, index * size, size))


class RowParallelLinear(_Linear):
    """y = x W^T + b with W's columns (input features) split across ranks; the partial
    products are summed by an all-reduce. The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        if in_features % tp_size():
            raise ValueError(f"{in_features} input features do not split over {tp_size()} ranks")
        super().__init__(in_features // tp_size(), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if param.dim() == 1:     # the bias is not split
            copy_checked(param.data, loaded)
        else:
            copy_checked(param.data, loaded.chunk(tp_size(), dim=1)[tp_rank()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x))
        return y + self.bias if self.bias is not None else y
