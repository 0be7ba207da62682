"""N-gram proposals (vLLM's method "ngram", also called prompt lookup decoding): no model.
The last n tokens of the sequence are looked up in its own earlier tokens (prompt and
output), n from prompt_lookup_max down to prompt_lookup_min; at the most recent earlier
occurrence of the longest n that matches, the tokens that followed it are proposed (up to k).
Text that copies from its prompt (code edits, quotes, summaries, extraction) gets long
accepted runs; elsewhere it costs only the search.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_proposal(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (the longest n in [min_n, max_n] that occurs); [] when none does."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows that start before the suffix itself (at length - n): starts 0 .. length - 1 - n,
        # so at least one token follows each.
        windows = sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int):
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, seqs: list, limits: list[int]) -> list[tuple[list[int], None]]:
        """For each sequence, (proposed tokens, None: no draft distribution), at most its limit."""
        return [(ngram_proposal(seq.token_ids, min(self.k, limit), self.min_n, self.max_n), None)
                for seq, limit in zip(seqs, limits)]
