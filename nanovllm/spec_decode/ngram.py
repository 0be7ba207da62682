"""N-gram proposals (vLLM's method "ngram", also called prompt lookup decoding): no model.
The last n tokens of the sequence are looked up in its own earlier tokens (prompt and
output), n from prompt_lookup_max down to prompt_lookup_min; at the most recent earlier
occurrence of the longest n that matches, the tokens that followed it are proposed (up to k).
Text that copies from its prompt (code edits, quotes, summaries, extraction) gets long
accepted runs; elsewhere it costs only the search.
"""
import numpy as np


def ngram_proposal(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (the longest n in [min_n, max_n] that occurs); [] when none does."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    if length < 2 or min_n > max_n:
        return []
    # One pass instead of one per n: every earlier position holding the last token ends a
    # candidate match (a token must follow it, so it ends before length - 1); extend each
    # candidate backwards while it keeps matching, up to max_n tokens.
    ends = np.flatnonzero(tokens[:length - 1] == tokens[-1])
    matched = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, min(max_n, length - 1)):
        alive &= ends >= j
        alive[alive] = tokens[ends[alive] - j] == tokens[length - 1 - j]
        matched += alive
    best = matched.max(initial=0)
    if best < min_n:
        return []
    start = int(ends[np.flatnonzero(matched == best)[-1]]) + 1
    return tokens[start:start + k].tolist()


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int):
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, seqs: list, limits: list[int]) -> list[tuple[list[int], None]]:
        """For each sequence, (proposed tokens, None: no draft distribution), at most its limit."""
        return [(ngram_proposal(seq.token_ids, min(self.k, limit), self.min_n, self.max_n), None)
                for seq, limit in zip(seqs, limits)]
