"""Qwen3-MoE: Qwen3 (Llama with q/k norms) whose MLPs are mixtures of experts.

    router:  logits = gate(x) [T, E] -> softmax (fp32) -> top-k experts per token
             (their probabilities renormalised to sum to one when norm_topk_prob)
    experts: out = sum over the k chosen e of weight_e * down_e(silu(gate_e(x)) * up_e(x))

Layer i is sparse when i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0;
the others keep a dense MLP. All experts of a layer run as one fused MoE (two grouped GEMMs,
kernels/fused_moe.py) on CUDA, and as a loop over experts (its reference) elsewhere. With
tensor parallelism every rank holds every expert, with a slice of each one's intermediate
dimension (as the dense MLP is split): gate/up split by rows, down by columns, the partial
outputs summed across ranks.
"""
import torch
from torch import nn

from nanovllm.distributed import all_reduce, tp_rank, tp_size
from nanovllm.kernels.moe_reference import fused_moe_reference
from nanovllm.kernels import triton_available
from nanovllm.layers.linear import ReplicatedLinear, copy_checked
from nanovllm.models.llama import LlamaMLP
from nanovllm.models.qwen3 import Qwen3ForCausalLM


def num_experts_of(config) -> int:
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0


class ExpertGateUp(nn.Module):
    """Every expert's gate and up projections, stacked: weight [E, 2 * I / tp, H], each expert's
    rows being this rank's gate slice then its up slice (the layout the fused kernel reads)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        if intermediate_size % tp_size():
            raise ValueError(f"moe_intermediate_size={intermediate_size} does not split over {tp_size()} ranks")
        self.local_size = intermediate_size // tp_size()
        self.weight = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int]):
        expert, which = shard_id          # which: 0 gate, 1 up
        rows = loaded.chunk(tp_size(), dim=0)[tp_rank()]
        copy_checked(param.data[expert].narrow(0, which * self.local_size, self.local_size), rows)


class ExpertDown(nn.Module):
    """Every expert's down projection, stacked: weight [E, H, I / tp] (this rank's columns)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size // tp_size()),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, None]):
        copy_checked(param.data[shard_id[0]], loaded.chunk(tp_size(), dim=1)[tp_rank()])


class FusedMoE(nn.Module):
    """The experts of one layer: x [T, H] and each token's top-k (weights, expert ids) -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = ExpertGateUp(num_experts, hidden_size, intermediate_size)
        self.down_proj = ExpertDown(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.gate_up_proj.weight, self.down_proj.weight
        # On CUDA always the kernel (also with NANOVLLM_FUSED_KERNELS=0): the loop over experts
        # reads the routing on the host, which a captured CUDA graph cannot do.
        if x.is_cuda and triton_available():
            from nanovllm.kernels.fused_moe import fused_moe
            out = fused_moe(x, w13, w2, topk_weights, topk_ids)
        else:
            out = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
        return all_reduce(out)        # each rank computed its slice of every expert's intermediate


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        num_experts = num_experts_of(config)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = getattr(config, "norm_topk_prob", False)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)     # the router
        self.experts = FusedMoE(num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return self.experts(x, topk_weights.to(x.dtype), topk_ids)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, max_model_len: int | None = None):
        super().__init__(config, max_model_len)
        # Checkpoint tensors experts.<e>.gate_proj / up_proj / down_proj load into expert e's
        # slice of the stacked weights. Listed first: ".gate_proj." alone (a dense layer's MLP)
        # would also match them.
        experts = {}
        for e in range(num_experts_of(config)):
            experts[f"experts.{e}.gate_proj"] = ("experts.gate_up_proj", (e, 0))
            experts[f"experts.{e}.up_proj"] = ("experts.gate_up_proj", (e, 1))
            experts[f"experts.{e}.down_proj"] = ("experts.down_proj", (e, None))
        self.packed_modules_mapping = {**experts, **Qwen3ForCausalLM.packed_modules_mapping}

    @staticmethod
    def check_supported(config) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: the MoE experts support silu only.")
        if num_experts_of(config) and config.num_experts_per_tok > num_experts_of(config):
            raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok} is more than the "
                             f"{num_experts_of(config)} experts.")

    @staticmethod
    def make_mlp(config, layer_index: int) -> nn.Module:
        sparse = (layer_index not in (getattr(config, "mlp_only_layers", None) or [])
                  and num_experts_of(config) > 0
                  and (layer_index + 1) % getattr(config, "decoder_sparse_step", 1) == 0)
        if sparse:
            return Qwen3MoeSparseMoeBlock(config)
        return LlamaMLP(config, intermediate_size=config.intermediate_size)
