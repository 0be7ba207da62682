"""Draft-model proposals: a small model with the target's vocabulary proposes k tokens a step.

The draft runs in the same engine on its own ModelRunner (weights and paged KV cache) and its
own BlockManager. Each running sequence of the target has a shadow `Sequence` here holding
the draft's view: the target's tokens, then the tokens it proposed. Proposing k tokens takes
k draft forward passes over all sequences at once: the first computes what the draft has not
seen yet (the prompt, or the tokens the target emitted last step) and samples x_1; each
further one feeds x_i and samples x_{i+1}. The proposals are drawn from the draft's q (the
request's sampling settings on the draft's logits; the argmax for greedy requests), and q is
kept for the rejection sampler.

After the target's verdict the shadow keeps the keys/values of the tokens the target agreed
with: its computed count falls back to the common prefix of the old and new tokens.
"""
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sampling_inputs import draw_generator
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
from nanovllm.spec_decode.rejection_sampler import PROPOSAL_DRAWS, sampling_probs

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# On a GPU the draft is built before the target and profiles its own cache from this share of
# what the target may use (the target then sees the draft's memory as taken).
DRAFT_SHARE_OF_GPU_MEMORY = 0.2


class DraftModelProposer:
    def __init__(self, config: EngineConfig):
        from nanovllm.engine.model_runner import ModelRunner
        spec = config.speculative_config
        self.k = spec.num_speculative_tokens
        self.config = EngineConfig(
            model=spec.model, dtype=_DTYPE_NAMES.get(config.torch_dtype, "auto"), seed=config.seed,
            max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, block_size=config.block_size,
            enable_prefix_caching=False, enforce_eager=config.enforce_eager, load_format=config.load_format,
            device=config.device, attention_backend=config.attention_backend,
            gpu_memory_utilization=config.gpu_memory_utilization * DRAFT_SHARE_OF_GPU_MEMORY,
            trust_remote_code=config.trust_remote_code)
        self.runner = ModelRunner(self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, enable_prefix_caching=False)
        self.shadows: dict[int, Sequence] = {}       # target seq_id -> the draft's view of it
        self.synced: dict[int, int] = {}             # target seq_id -> its length when last synced
        self.eos_ids: set[int] = set()               # set by the engine (min_tokens bans them)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """For each sequence, (up to `limit` proposed tokens, their q [k, V])."""
        self._forget_all_but(seqs)
        counts = [min(self.k, limit) for limit in limits]
        active = [(seq, shadow, k) for seq, k in zip(seqs, counts) if (shadow := self._sync(seq, k)) is not None]
        proposals = {seq.seq_id: ([], []) for seq, _, _ in active}
        for r in range(max((k for _, _, k in active), default=0)):
            step = [(seq, shadow) for seq, shadow, k in active if k > r]
            shadows = [shadow for _, shadow in step]
            starts = [shadow.num_computed_tokens for shadow in shadows]
            batch = ScheduledBatch(shadows, starts, [s.num_tokens - start for s, start in zip(shadows, starts)],
                                   [True] * len(step), [False] * len(step))
            with torch.inference_mode():
                logits = self.runner.execute(self.runner.prepare(batch, _last_rows(batch.num_new_tokens))).float()
                meta = SamplingMetadata.build(
                    [SamplingRow.of(s.params, s.token_ids, s.num_prompt_tokens, self.eos_ids)
                     for s in shadows], self.runner.vocab_size, self.runner.device)
                q = sampling_probs(logits, meta)
            best = q.argmax(dim=-1).tolist()
            for (seq, shadow), q_row, greedy_token in zip(step, q, best):
                if seq.params.is_greedy:
                    token = greedy_token
                else:
                    generator = draw_generator(seq, shadow.num_tokens, q_row.device, PROPOSAL_DRAWS)
                    token = int(torch.multinomial(q_row, 1, generator=generator))
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.append_token(token)
                tokens, dists = proposals[seq.seq_id]
                tokens.append(token)
                dists.append(q_row)
        return [(proposals[seq.seq_id][0], torch.stack(proposals[seq.seq_id][1]))
                if seq.seq_id in proposals and proposals[seq.seq_id][0] else ([], None) for seq in seqs]

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The shadow of seq, caught up with its tokens and with blocks for k proposals; None
        when k is 0 or the draft's cache is full (seq then gets no proposals this step)."""
        if k <= 0:
            return None
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.index, seq.prompt_token_ids, seq.params)
            shadow.token_ids = list(seq.token_ids)      # its outputs count as outputs (penalties, min_tokens)
            if not self.block_manager.allocate(shadow):
                return None
            self.shadows[seq.seq_id] = shadow
        else:
            # Keys/values stay valid up to where the draft's tokens and the target's agree: the
            # first `synced` tokens are the target's of the last step, then proposals vs emitted.
            common = self.synced[seq.seq_id]
            for drafted, emitted in zip(shadow.token_ids[common:], seq.token_ids[common:]):
                if drafted != emitted:
                    break
                common += 1
            # At least the newest token is computed again: its logits give the first proposal
            # (a sequence the target did not advance last step has all its tokens computed here).
            shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, seq.num_tokens - 1)
            shadow.token_ids = list(seq.token_ids)
        self.synced[seq.seq_id] = seq.num_tokens
        # The draft computes up to the position before its last proposal.
        needed = seq.num_tokens + k - 1
        return shadow if self.block_manager.grow(shadow, needed) else None

    def _forget_all_but(self, seqs: list[Sequence]) -> None:
        """Free the draft blocks of sequences that are no longer running (finished, preempted)."""
        keep = {seq.seq_id for seq in seqs}
        for seq_id in [i for i in self.shadows if i not in keep]:
            self.block_manager.free_blocks(self.shadows.pop(seq_id))
            del self.synced[seq_id]


def _last_rows(counts: list[int]) -> list[int]:
    """The flat index of each span's last token."""
    rows, offset = [], 0
    for n in counts:
        offset += n
        rows.append(offset - 1)
    return rows
