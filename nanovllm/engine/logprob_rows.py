"""A step's logprobs: the logits rows a chunk reporting prompt logprobs adds, and the sampler's
tensors turned into vLLM's {token_id: Logprob} per token.

At 256 sequences asking for logprobs this is per-step host work on the engine's critical
path, so it is kept lean: the tensors are read back once per step (not once per sequence),
each sequence's entry is built with its own k, sampled tokens' entries go into
`FlatLogprobs` as plain numbers, and each token's text is decoded once (`TokenTexts`).
"""
import itertools
from collections.abc import Sequence

from nanovllm.layers.logprobs import LogprobsTensors
from nanovllm.outputs import Logprob


def wants_prompt_logprobs(seq, chunk_start: int) -> bool:
    """Does this chunk of seq need logits for its prompt tokens? (Only the first of n
    completions reports them: the prompt is the same.)"""
    return seq.params.prompt_logprobs is not None and seq.index == 0 and chunk_start < seq.num_prompt_tokens


def rows_with_prompt_logprobs(batch, sampled_per_seq: list[int] | None = None
                              ) -> tuple[list[int], dict[int, int], dict[int, tuple[int, int]]]:
    """The logits rows of a step in which a chunk may report prompt logprobs: that chunk's rows
    (the logits predicting each next prompt token), then, for every sequence that samples, the
    last `sampled_per_seq[i]` tokens of its span (1 each by default; a verifying step: its
    proposals and the token before them). Returns the rows' token offsets, each sampling
    sequence's first row ({index in the batch: row}) and the prompt rows ({index: (row, count)})."""
    indices, first_rows, prompt_rows, offset = [], {}, {}, 0
    for i, (seq, start, n, samples) in enumerate(zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples)):
        if wants_prompt_logprobs(seq, start):
            prompt_rows[i] = (len(indices), n - samples)
            indices += range(offset, offset + n - samples)
        if samples:
            first_rows[i] = len(indices)
            indices += range(offset + n - (1 if sampled_per_seq is None else sampled_per_seq[i]), offset + n)
        offset += n
    return indices, first_rows, prompt_rows


class FlatLogprobs(Sequence):
    """A list of {token_id: Logprob}, one per generated token, kept as flat lists of numbers.

    At 256 sequences asking for 20 logprobs, a dict and 21 Logprob objects per sequence per
    step are ~5,000 new objects a step, and Python's cyclic garbage collector, which walks
    every live object now and then, took more host time than building them. Here a token
    adds numbers to four lists; `flat[i]` builds the i-th dict when it is read. (vLLM
    later did the same, for the same reason.) Behaves as a read-only list of dicts: len,
    indexing, slicing, iteration, ==, and + with a list."""

    def __init__(self, entries=()):
        self.starts = [0]                   # entry i is items starts[i]:starts[i + 1]
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ranks: list[int | None] = []
        self.texts: list[str | None] = []
        for entry in entries:
            self.append(entry)

    def add(self, token_ids: list[int], logprobs: list[float], ranks: list, texts: list) -> None:
        """Append one token's entry from parallel lists."""
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.texts += texts
        self.starts.append(len(self.token_ids))

    def append(self, entry: dict[int, Logprob]) -> None:
        values = entry.values()
        self.add(list(entry), [v.logprob for v in values], [v.rank for v in values], [v.decoded_token for v in values])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FlatLogprobs(self[i] for i in range(len(self))[index]) if index.step not in (None, 1) \
                else self._span(*index.indices(len(self))[:2])
        i = range(len(self))[index]         # IndexError past the end, negative indices
        return {self.token_ids[j]: Logprob(self.logprobs[j], self.ranks[j], self.texts[j])
                for j in range(self.starts[i], self.starts[i + 1])}

    def _span(self, start: int, stop: int) -> "FlatLogprobs":
        out, stop = FlatLogprobs(), max(start, stop)
        a, b = self.starts[start], self.starts[stop]
        out.starts = [s - a for s in self.starts[start:stop + 1]]
        out.token_ids, out.logprobs = self.token_ids[a:b], self.logprobs[a:b]
        out.ranks, out.texts = self.ranks[a:b], self.texts[a:b]
        return out

    def __add__(self, other) -> "FlatLogprobs":
        out = self[:]
        for entry in other:
            out.append(entry)
        return out

    def __radd__(self, other) -> "FlatLogprobs":
        return FlatLogprobs(other) + self

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, FlatLogprobs)) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


class TokenTexts:
    """Token id -> its text alone (Logprob.decoded_token), cached: a decode call costs several
    microseconds, and logprobs ask for (k + 1) x batch of them every step. Ids the tokenizer
    does not know (models pad their vocabulary beyond it) have the text ""."""

    def __init__(self, tokenizer):
        self.tokenizer, self.size = tokenizer, len(tokenizer)
        self.texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if token_id < self.size else ""
            self.texts[token_id] = text
        return text


class LogprobRows:
    """A step's LogprobsTensors, read back once (not once per sequence); each row, when a
    sequence asks for it, as vLLM's {token_id: Logprob} with that sequence's k: its top k,
    then the chosen token if it is not among them."""

    def __init__(self, lp: LogprobsTensors, decode):
        self.ids, self.logprobs, self.ranks = lp.token_ids.tolist(), lp.token_logprobs.tolist(), lp.token_ranks.tolist()
        self.top_ids, self.top_logprobs = lp.top_ids.tolist(), lp.top_logprobs.tolist()
        self.decode = decode                  # token id -> its text

    def entry(self, row: int, k: int) -> dict[int, Logprob]:
        ids, logprobs, decode = self.top_ids[row][:k], self.top_logprobs[row], self.decode
        entry = {t: Logprob(logprobs[i], i + 1, decode(t)) for i, t in enumerate(ids)}
        chosen = self.ids[row]
        if chosen not in entry:
            entry[chosen] = Logprob(self.logprobs[row], self.ranks[row], decode(chosen))
        return entry

    def entries(self, k: int) -> list[dict[int, Logprob]]:
        return [self.entry(row, k) for row in range(len(self.ids))]

    def add_to(self, flat: FlatLogprobs, row: int, k: int) -> float:
        """Append the row's entry to `flat` (as numbers: no objects); returns the chosen token's logprob."""
        ids, logprobs = self.top_ids[row][:k], self.top_logprobs[row][:k]
        ranks = list(range(1, len(ids) + 1))
        chosen = self.ids[row]
        if chosen in ids:
            chosen_logprob = logprobs[ids.index(chosen)]
        else:
            chosen_logprob = self.logprobs[row]
            ids, logprobs, ranks = ids + [chosen], logprobs + [chosen_logprob], ranks + [self.ranks[row]]
        flat.add(ids, logprobs, ranks, [self.decode(t) for t in ids])
        return chosen_logprob


class StepLogprobs:
    """A step's logprobs, recorded sequence by sequence as the engine processes the step: the
    logprobs of a prompt chunk's next tokens (prompt_logprobs) and of the sampled token (logprobs,
    whose rows follow the sequences that sampled)."""

    def __init__(self, batch, result, decode):
        self.batch, self.decode, self.prompt = batch, decode, result.prompt_logprobs
        self.sampled = LogprobRows(result.sample_logprobs, decode) if result.sample_logprobs is not None else None
        self.has_token = [token is not None for token in result.sampled]
        self.sample_row = list(itertools.accumulate(self.has_token, initial=0))   # batch index -> row

    def record(self, i: int, seq, request) -> None:
        """Add batch row i's logprobs to its sequence (called before the stop checks)."""
        if i in self.prompt:
            # After a preemption the prompt is recomputed: keep the logprobs gathered the first time.
            if self.batch.starts[i] + 1 == len(request.prompt_logprobs):
                entries = LogprobRows(self.prompt[i], self.decode).entries(request.params.prompt_logprobs)
                request.prompt_logprobs += entries
        if self.has_token[i] and seq.logprobs is not None:
            row = self.sample_row[i]
            seq.cumulative_logprob += self.sampled.add_to(seq.logprobs, row, seq.params.logprobs)
