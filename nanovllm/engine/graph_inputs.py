"""The CUDA graphs' inputs (engine/cuda_graphs.py): where a step's inputs live on the device
for the graph that runs it, and how they get there in one copy.

Every graph reads its inputs from views of one device block. The block tables, the largest
part, come last and are shared by all graphs; each graph's other fields (token ids, positions,
cache slots, logits rows, sequence lengths, query offsets) sit just before them, so one step's
inputs, padded to its graph's size, are a single contiguous byte range. The host fills the same
range of a pinned mirror of the block (numpy writes) and copies it without waiting.
"""
import numpy as np
import torch

from nanovllm.engine.inputs import HostInputs, ModelInputs
from nanovllm.layers.attention import AttentionMetadata


def aligned(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


class GraphInputs:
    """One graph's input tensors: `tokens` rows of token inputs, `rows` of sequence inputs (a
    decode graph: one a token). Graphs' fields overlap in the block: a step writes all of its own."""
    FIELDS = (("input_ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
              ("logits_indices", torch.int64), ("seq_lens", torch.int32), ("cu_seqlens_q", torch.int32))

    @classmethod
    def header_bytes(cls, tokens: int, rows: int) -> int:
        return sum(aligned(dtype.itemsize * cls._length(name, tokens, rows)) for name, dtype in cls.FIELDS)

    @staticmethod
    def _length(name: str, tokens: int, rows: int) -> int:
        return {"seq_lens": rows, "cu_seqlens_q": rows + 1}.get(name, tokens)

    def __init__(self, tokens: int, rows: int, is_decode: bool, block: torch.Tensor, mirrors: list[torch.Tensor],
                 tables_offset: int, max_blocks: int, block_size: int):
        self.tokens, self.rows, self.max_blocks, self.is_decode = tokens, rows, max_blocks, is_decode
        self.start = tables_offset - self.header_bytes(tokens, rows)
        self.spans, offset = {}, self.start
        for name, dtype in self.FIELDS:
            length = self._length(name, tokens, rows)
            self.spans[name] = (offset, dtype.itemsize * length, dtype, (length,))
            offset += aligned(dtype.itemsize * length)
        self.spans["block_tables"] = (tables_offset, 4 * rows * max_blocks, torch.int32, (rows, max_blocks))
        t = self.tensors = {name: self.view(block, name) for name in self.spans}
        # numpy views of the same fields in each host mirror, made once (a step fills one)
        self.mirrored = [{name: self.view(mirror, name).numpy() for name in self.spans} for mirror in mirrors]
        self.meta = AttentionMetadata(slot_mapping=t["slot_mapping"], cu_seqlens_q=t["cu_seqlens_q"],
                                      seq_lens=t["seq_lens"], block_tables=t["block_tables"],
                                      max_seqlen_q=1 if is_decode else tokens,
                                      max_seqlen_k=max_blocks * block_size, is_decode=is_decode)

    def reset(self) -> None:
        """Inputs a forward pass can run on (for the capture): padding everywhere."""
        t = self.tensors
        for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 1)):
            t[name].fill_(value)
        t["cu_seqlens_q"].copy_(torch.arange(self.rows + 1) if self.is_decode else torch.zeros(self.rows + 1))

    def view(self, block: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` in a block of this layout (the device block, or its host mirror)."""
        offset, nbytes, dtype, shape = self.spans[name]
        return block[offset:offset + nbytes].view(dtype).view(shape)

    def write(self, mirror: int, host: HostInputs) -> tuple[int, int]:
        """Lay `host` out in host mirror number `mirror`, padded to the graph's size; -> the byte
        range to copy (up to the step's last block-table row)."""
        n, rows, f = len(host.input_ids), len(host.seq_lens), self.mirrored[mirror]
        for name, pad in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):   # padding stores nothing
            f[name][:n], f[name][n:] = getattr(host, name), pad
        f["logits_indices"][:len(host.logits_indices)] = host.logits_indices
        f["seq_lens"][:rows] = host.seq_lens
        f["cu_seqlens_q"][:rows + 1] = host.cu_seqlens_q
        if self.is_decode:        # padding rows attend over one token of block 0
            f["seq_lens"][rows:] = 1
            f["cu_seqlens_q"][rows + 1:] = np.arange(rows + 1, self.rows + 1)
        else:                     # padding sequences have no query tokens
            f["seq_lens"][rows:] = 0
            f["cu_seqlens_q"][rows + 1:] = n
        width = host.block_tables.shape[1]
        f["block_tables"][:rows, :width] = host.block_tables
        f["block_tables"][:rows, width:] = 0
        return self.start, self.spans["block_tables"][0] + 4 * rows * self.max_blocks

    def inputs(self, host: HostInputs) -> ModelInputs:
        """The step's ModelInputs as views of the device block (unpadded, as HostInputs.to gives)."""
        n, (rows, width), t = len(host.input_ids), host.block_tables.shape, self.tensors
        meta = AttentionMetadata(
            slot_mapping=t["slot_mapping"][:n], cu_seqlens_q=t["cu_seqlens_q"][:rows + 1],
            seq_lens=t["seq_lens"][:rows], block_tables=t["block_tables"][:rows, :width],
            max_seqlen_q=host.max_seqlen_q, max_seqlen_k=int(host.seq_lens.max(initial=0)), is_decode=host.is_decode)
        return ModelInputs(t["input_ids"][:n], t["positions"][:n], meta,
                           t["logits_indices"][:len(host.logits_indices)], staged=True)


class HostStaging:
    """Two host mirrors of the graphs' input block (pinned on a GPU), filled by steps in turn and
    copied to the device without waiting; a mirror is refilled only once its last copy is done."""

    def __init__(self, block: torch.Tensor):
        self.block = block
        pinned = block.device.type == "cuda"
        self.mirrors = [torch.zeros(block.numel(), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.copied = [None, None]          # CUDA events
        self.turn = 0

    def next(self) -> int:
        """The mirror to fill now."""
        self.turn ^= 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        return self.turn

    def copy(self, start: int, end: int) -> None:
        """Bytes [start, end) of the mirror just filled to the device block."""
        self.block[start:end].copy_(self.mirrors[self.turn][start:end], non_blocking=True)
        if self.block.device.type == "cuda":
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()
