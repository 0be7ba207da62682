"""Token ids -> output text, one detokenizer per output sequence.

The common offline case (`Detokenizer`): tokens are collected and the text is decoded once,
when it is read. A request whose text is read while it runs (streamed outputs) or searched for
stop strings gets an `IncrementalDetokenizer` instead (incremental_detokenizer.py), which also
reports DELTA outputs' new pieces.

The output is decoded after a few prompt tokens and the prompt's text dropped, so that the
first output token renders as it does inside the sentence (tokenizers such as SentencePiece
drop a leading space when a token starts the decoded sequence). Token ids the tokenizer does not
know (id >= len(tokenizer): models often pad their vocabulary beyond the tokenizer's) are kept
in the token ids but decode to "".
"""
from nanovllm.sampling_params import SamplingParams

# Prompt tokens decoded in front of the output for context (vLLM uses 5 as well).
_PROMPT_CONTEXT = 5


def make_detokenizer(tokenizer, params: SamplingParams, prompt_token_ids: list[int], incremental: bool):
    """`incremental`: the text is read while the sequence runs; stop strings need that too."""
    if incremental or params.stop:
        from nanovllm.engine.incremental_detokenizer import IncrementalDetokenizer
        return IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
    return Detokenizer(tokenizer, params, prompt_token_ids)


class Detokenizer:
    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.params = params
        self.token_ids: list[int] = []          # every output token, the stopping one included
        self.enabled = params.detokenize
        self._vocab_limit = len(tokenizer)
        self._decode = _decoder(tokenizer, params)
        # Ids that go into the text: a few prompt ids for context, then the decodable output ids.
        self._context = [t for t in prompt_token_ids[-_PROMPT_CONTEXT:] if t < self._vocab_limit]
        self._ids = list(self._context)
        self._cached_text: str | None = None    # the decoded text, until new tokens come

    def update(self, new_token_ids: list[int], stopped_by_token: bool) -> str | None:
        """Add the tokens of this step; returns the stop string that now ends the text (never,
        here). `stopped_by_token`: the last new token ended the sequence (EOS or a stop token
        id); it is kept in `token_ids` but left out of the text unless include_stop_str_in_output."""
        self.token_ids.extend(new_token_ids)
        if self.enabled and new_token_ids:
            self._ids.extend(t for t in self._text_ids(new_token_ids, stopped_by_token) if t < self._vocab_limit)
            self._cached_text = None
        return None

    def on_token(self, seq, reason: str | None) -> str | None:
        """The engine's call after each new token of `seq`, with the reason it stops now (None:
        it goes on); returns the stop string that ends it (never, here). The text is only read
        at the end, so it is decoded then, all at once."""
        if reason is not None:
            self.update(seq.output_token_ids, reason == "stop")
        return None

    def _text_ids(self, new_token_ids: list[int], stopped_by_token: bool) -> list[int]:
        skip_last = stopped_by_token and not self.params.include_stop_str_in_output
        return new_token_ids[:-1] if skip_last else new_token_ids

    @property
    def text(self) -> str:
        """The output text so far."""
        if not self.enabled:
            return ""
        if self._cached_text is None:
            self._cached_text = self._decode(self._ids)[len(self._decode(self._context)):]
        return self._cached_text

    def report(self, seq) -> tuple[list[int], str, list | None]:
        """The token ids, text and logprobs of `seq`'s output as reported now: all of them."""
        return seq.output_token_ids, self.text, seq.logprobs


def _decoder(tokenizer, params: SamplingParams):
    """ids -> text as tokenizer.decode gives it. For a fast tokenizer that does no clean-up of
    tokenization spaces, decode() adds only Python layers around the Rust decoder, which cost
    several times the decoding itself for the few ids of an incremental step: call it directly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    skip = params.skip_special_tokens
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip)
    spaces = params.spaces_between_special_tokens
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
