"""A step's logprobs, from the sampler's tensors to vLLM's {token_id: Logprob} per token.

At 256 sequences asking for logprobs this is per-step host work on the engine's critical
path, so it is kept lean: the tensors are read back once per step (not once per sequence),
each sequence's entry is built with its own k, sampled tokens' entries go into
`FlatLogprobs` as plain numbers, and each token's text is decoded once (`TokenTexts`).
"""
from nanovllm.layers.sampler import LogprobsTensors
from nanovllm.outputs import FlatLogprobs, Logprob


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
