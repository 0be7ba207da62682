"""The ModelRunner: owns the model, its KV cache and the sampler on one device.

Each step it turns the scheduled batch into tensors (`prepare`), runs the model
(`execute`: eagerly, or by replaying a captured CUDA graph for decode), and samples the
next tokens (`sample`). With tensor parallelism every rank runs `execute` on the inputs
rank 0 prepared; only rank 0 prepares and samples.
"""
import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanovllm.config import EngineConfig
from nanovllm.distributed import check_tp_size, tp_rank
from nanovllm.engine.cuda_graphs import StepGraphs, step_graphs
from nanovllm.engine.inputs import LogitsRows, ModelInputs, plan_logits_rows, prepare_inputs
from nanovllm.engine.kv_cache_memory import allocate_kv_cache, map_large_buffers
from nanovllm.engine.overlap import Launched, ReadyEvent, inputs_from_device, to_host
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sampling_inputs import SamplingInputs, row_seeds
from nanovllm.kernels import triton_available
from nanovllm.layers.attention import Attention
from nanovllm.layers.attention_backends import select_backend
from nanovllm.layers.logprobs import LogprobsTensors, gather_prompt_logprobs
from nanovllm.layers.sampler import Sampler, SamplerOutput
from nanovllm.models.checkpoint import load_weights
from nanovllm.models.dummy_weights import init_dummy_weights
from nanovllm.models.registry import model_class

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[int | None]                    # per sequence; None when its chunk was not its last
    sample_logprobs: LogprobsTensors | None      # rows follow the sequences that sampled
    prompt_logprobs: dict[int, LogprobsTensors]  # seq index in the batch -> logprobs of its chunk's next tokens

    @property
    def has_logprobs(self) -> bool:
        return self.sample_logprobs is not None or bool(self.prompt_logprobs)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        check_tp_size(config.tensor_parallel_size)
        hf = config.hf_config
        self.device = torch.device(config.device, torch.cuda.current_device() if config.device == "cuda" else None)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.vocab_size = hf.vocab_size
        torch.manual_seed(config.seed)
        if config.device == "cpu":
            map_large_buffers()

        cls = model_class(hf, config.max_model_len)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = cls(hf)
        torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed, config.quant_config)
        else:
            load_weights(self.model, config.model_dir, config.quantization)
        self.model.eval()
        self.sampler = Sampler(fused=config.device == "cuda" and triton_available())
        self.sampling_inputs = SamplingInputs(self.vocab_size, config.max_num_seqs, self.device,
                                              reserve_histograms=config.device == "cuda" and tp_rank() == 0)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = select_backend(config.attention_backend, config.device, config.block_size)
        for layer in self.attention_layers:
            layer.backend = self.backend

        self.graphs = None                   # the cache is sized by an eager profiling step
        self.num_blocks = allocate_kv_cache(self)
        self.graphs = step_graphs(self)      # None: every step runs eagerly

    # -- one step -------------------------------------------------------------------------
    # A step is launched (inputs prepared, forward and sampling queued on the device) and later
    # resolved (sampled tokens read back). Between the two the host is free: the engine uses
    # that time to launch the next decode step before it resolves this one (engine/overlap.py).
    def launch(self, batch: ScheduledBatch, eos_ids: Collection[int], after: Launched | None = None,
               ) -> Launched:
        """Queue batch's forward pass and sampling. `after`: the step still in flight before this
        one; sequences whose first input is its sampled token (`batch.from_device`) read it on
        the device. `eos_ids`: the model's EOS ids, which min_tokens bans (unless ignore_eos)."""
        rows = plan_logits_rows(batch)
        inputs = self.prepare(batch, rows.indices)
        if after is not None and any(batch.from_device):
            inputs_from_device(batch, inputs, after)
        with torch.inference_mode():
            logits = self.execute(inputs)
            return self.sample(batch, rows, logits, eos_ids)

    def resolve(self, launched: Launched) -> StepResult:
        """Wait for a launched step; the sampled token of each sequence (None mid-prompt)."""
        self.wait_ready(launched.ready)
        tokens = iter(launched.sampled.tolist())
        sampled = [next(tokens) if samples else None for samples in launched.batch.samples]
        return StepResult(sampled, launched.sample_logprobs, launched.prompt_logprobs)

    def wait_ready(self, ready: ReadyEvent) -> None:
        """Wait until a launched step's results are on the host."""
        ready.synchronize()

    def prepare(self, batch: ScheduledBatch, logits_indices: list[int]) -> ModelInputs:
        host = prepare_inputs(batch, self.block_size, logits_indices)
        staged = self.graphs.stage(host) if isinstance(self.graphs, StepGraphs) else None
        return staged or host.to(self.device)

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Forward pass -> logits [N, vocab] for `inputs.logits_indices` (None off rank 0)."""
        if self.graphs is not None and self.graphs.fits(inputs):
            hidden = self.graphs.replay(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @torch.inference_mode()
    def sample(self, batch: ScheduledBatch, rows: LogitsRows, logits: torch.Tensor, eos_ids: Collection[int],
               ) -> Launched:
        """Queue the choice of the next token of every sequence whose span ends at its newest
        token, and the logprobs that were asked for. Nothing is read back here."""
        seqs = [seq for seq, samples in zip(batch.seqs, batch.samples) if samples]
        sample_logits = logits if rows.sample_rows is None else logits[rows.sample_rows]
        meta = self.sampling_inputs.metadata(seqs, eos_ids)
        seeds = row_seeds(batch) if meta.seeded_rows else None
        out: SamplerOutput = self.sampler(sample_logits, meta, seeds)
        self.sampling_inputs.record(out.sampled_token_ids)     # (the penalties' token counts)
        prompt_logprobs = gather_prompt_logprobs(logits, rows.prompt_rows, batch, self.sampler.fused)
        # Start copying the results to the host now (engine/overlap.py).
        sampled, logprobs, prompt_logprobs = to_host((out.sampled_token_ids, out.logprobs, prompt_logprobs))
        return Launched(batch, out.sampled_token_ids, sampled, logprobs, prompt_logprobs, ReadyEvent(self.device))
