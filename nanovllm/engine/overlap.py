"""Host/device overlap: a step is launched (its forward pass and sampling queued on the device)
and read back later, so that in between the host schedules and launches the next step.

What that takes on the device side: the launched step's results (`Launched`), copied to the
host without waiting (`to_host`) and marked by an event (`ReadyEvent`); and a step launched
before the previous one is read back takes the previous step's sampled tokens as inputs on the
device (`inputs_from_device`). The engine's side is LLMEngine.advance, which schedules a step
ahead only where that needs no preemption (`fits_without_preemption`): a preempted sequence's
blocks may be in use by the step in flight, so the engine reads that step back first instead.
"""
import dataclasses
import operator
from dataclasses import dataclass

import torch

from nanovllm.device_copy import to_device
from nanovllm.engine.inputs import ModelInputs
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.layers.logprobs import LogprobsTensors


class ReadyEvent:
    """Marks the point in the device's work where a step's results are on the host."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass
class Launched:
    """A step queued on the device, not yet read back."""
    batch: ScheduledBatch
    sampled_on_device: torch.Tensor              # [sequences that sample]: the next step's inputs
    sampled: torch.Tensor                        # the same, being copied to the host
    sample_logprobs: LogprobsTensors | None
    prompt_logprobs: dict[int, LogprobsTensors]
    ready: ReadyEvent                            # the copies above are complete


def to_host(obj):
    """Start device-to-host copies of every tensor in obj (tensors, dataclasses, tuples, dicts).
    Reading them later waits for this step only, not for a step launched after it (a plain
    .tolist() would wait for everything)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj
        host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
        return host.copy_(obj, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_host(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: to_host(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def inputs_from_device(batch: ScheduledBatch, inputs: ModelInputs, after: Launched) -> None:
    """Put `after`'s sampled tokens, still on the device, into `inputs` as the first input of
    each sequence that takes it from there (`batch.from_device`)."""
    num_tokens = inputs.input_ids.shape[0]
    if num_tokens == len(batch.seqs) <= len(after.batch.seqs) and all(batch.from_device) \
            and all(after.batch.samples) and all(map(operator.is_, batch.seqs, after.batch.seqs)):
        # a decode batch of the sequences before, in the same order (most steps): no index needed
        inputs.input_ids.copy_(after.sampled_on_device[:num_tokens])
        return
    sample_row = {id(seq): i for i, seq in enumerate(s for s, samples in zip(after.batch.seqs, after.batch.samples)
                                                     if samples)}
    offsets, rows, offset = [], [], 0
    for seq, n, from_device in zip(batch.seqs, batch.num_new_tokens, batch.from_device):
        if from_device:
            offsets.append(offset)
            rows.append(sample_row[id(seq)])
        offset += n
    index = to_device(torch.tensor(offsets + rows), inputs.input_ids.device)
    inputs.input_ids.index_copy_(0, index[:len(offsets)], after.sampled_on_device.index_select(0, index[len(offsets):]))


def fits_without_preemption(scheduler: Scheduler) -> bool:
    """Do the running sequences' next spans fit in the free blocks (so a step scheduled now,
    ahead of the one in flight, preempts nobody)?"""
    blocks = scheduler.block_manager
    # A step's spans hold at most the token budget, so no step needs more blocks than this
    # (each sequence may also start a block of its own): with as many free, skip the count.
    if blocks.num_free_blocks >= blocks.blocks_needed(scheduler.max_num_batched_tokens) + 2 * len(scheduler.running):
        return True
    needed, budget = 0, scheduler.max_num_batched_tokens
    for seq in scheduler.running:
        n = scheduler.next_span(seq, budget)
        needed += max(0, blocks.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table))
        budget -= n
    return needed <= blocks.num_free_blocks
