"""What `generate` returns: vLLM's RequestOutput / CompletionOutput / Logprob.

Both output classes also answer `output["text"]` and `output["token_ids"]`, as nano-vllm's
plain dicts did, so scripts written for either project run unchanged.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None            # 1 = the most likely token
    decoded_token: str | None = None


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


SampleLogprobs = list[dict[int, Logprob]] | FlatLogprobs     # one dict per generated token
PromptLogprobs = list[dict[int, Logprob] | None]   # one per prompt token; the first is None


class _ItemAccess:
    """`obj["text"]` reads `obj.text` (nano-vllm returned dicts)."""

    def __getitem__(self, key: str):
        if not isinstance(key, str) or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class CompletionOutput(_ItemAccess):
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None     # None unless logprobs were asked for
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None            # "stop" | "length" | "abort"
    stop_reason: int | str | None = None        # None (EOS or length), a stop token id, or a stop string

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput(_ItemAccess):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: object = field(default=None, repr=False)

    # nano-vllm's dict had the first completion's text and ids at the top level.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def fold_outputs(older: RequestOutput, newer: RequestOutput, delta: bool) -> RequestOutput:
    """One output that says what `older` then `newer` said (a stream that fell behind gets
    this instead of both): for DELTA outputs their concatenation, built in `older` (which
    nobody has seen yet), else simply `newer`."""
    if not delta:
        return newer
    earlier = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        old = earlier.get(c.index)
        if old is None:
            older.outputs.append(c)
            continue
        old.text += c.text
        old.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            old.logprobs = (old.logprobs or []) + c.logprobs
        old.cumulative_logprob, old.finish_reason, old.stop_reason = (
            c.cumulative_logprob, c.finish_reason, c.stop_reason)
    older.finished = newer.finished
    return older
