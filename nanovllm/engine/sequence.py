"""A Sequence: one stream of tokens being generated (one completion of a request).

A request with `n > 1` fans out into n sequences that share the prompt (and, through the
prefix cache, its KV blocks).
"""
import itertools
from enum import Enum, auto

import numpy as np

from nanovllm.engine.logprob_rows import FlatLogprobs
from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()     # prompt (or, after preemption, prompt + output) not fully computed yet
    RUNNING = auto()     # admitted: computing its prompt in chunks, then one new token per step
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index                      # which of the request's n completions
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        # Tokens whose keys/values are in the KV cache. Chunked prefill advances it chunk
        # by chunk; preemption resets it to 0 (the KV is recomputed later).
        self.num_computed_tokens = 0
        # Tokens sampled by steps still on the device, not yet appended to token_ids (0 or 1;
        # 2 for a moment while the engine overlaps two steps).
        self.num_in_flight = 0
        self.num_cached_tokens = 0              # prompt tokens found in the prefix cache
        # Speculative decoding (nanovllm/spec_decode/): tokens proposed for the next step to
        # verify, and the counts of proposed and accepted ones (a SpecDecodeMetrics).
        self.spec_token_ids: list[int] = []
        self.spec_metrics = None
        # The KV blocks, in order. The block manager replaces the list or extends it, never edits
        # an entry in place: block_table_row relies on that.
        self.block_table: list[int] = []
        self._table_row: tuple[list[int], np.ndarray] | None = None
        self.block_hashes: list[int] = []       # chained hashes of the full blocks so far
        self.num_blocks_seen = 0                # leading blocks already offered to the prefix cache
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: FlatLogprobs | None = FlatLogprobs() if params.logprobs is not None else None
        self.cumulative_logprob = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_table_row(self) -> np.ndarray:
        """block_table as int32, converted again only when it changed (a step's inputs need
        every running sequence's table: ~0.5 ms a step at 256 sequences, converted anew)."""
        row = self._table_row
        if row is None or row[0] is not self.block_table or len(row[1]) != len(self.block_table):
            row = self._table_row = (self.block_table, np.array(self.block_table, dtype=np.int32))
        return row[1]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
