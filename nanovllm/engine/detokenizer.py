"""Token ids -> output text, one `Detokenizer` per output sequence.

Two modes:
- incremental (the request has stop strings, or is streamed): the text grows by the new
  tokens' text only, so it can be sent out piece by piece. With stop strings, each `update`
  decodes its tokens and searches the new text, so a request stops as soon as a stop string
  appears; without, `update` only queues the tokens and they are decoded together when the
  text is next read (a streamed request's output is built far less often than every step);
- non-incremental (the common offline case): tokens are just collected and the text is
  decoded once, when `text` is read.

Both modes decode the output after a few prompt tokens and drop the prompt's text, so that
the first output token renders as it does inside the sentence (tokenizers such as
SentencePiece drop a leading space when a token starts the decoded sequence).

Token ids the tokenizer does not know (id >= len(tokenizer): models often pad their
vocabulary beyond the tokenizer's) are kept in the token ids but decode to "".
"""
from nanovllm.sampling_params import SamplingParams

# Prompt tokens decoded in front of the output for context (vLLM uses 5 as well).
_PROMPT_CONTEXT = 5


class Detokenizer:

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int], incremental: bool):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []          # every output token, the stopping one included
        self.enabled = params.detokenize
        self.incremental = self.enabled and (incremental or bool(params.stop))
        self._vocab_limit = len(tokenizer)
        self._decode = _decoder(tokenizer, params)
        # Ids that go into the text: a few prompt ids for context, then the decodable output ids.
        self._context = [t for t in prompt_token_ids[-_PROMPT_CONTEXT:] if t < self._vocab_limit]
        self._ids = list(self._context)
        # Incremental state: the text is decoded from window ids[prefix_offset:], of which
        # ids[prefix_offset:read_offset] were already turned into text.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""                         # incremental: the text so far
        self._unread: list[int] = []            # incremental, no stop strings: ids not decoded yet
        self._cached_text: str | None = None    # non-incremental: the decoded text, until new tokens come
        self._sent = 0                          # characters already returned by new_text()
        self._stopped = False                   # a stop string matched: the text is final

    def update(self, new_token_ids: list[int], stopped_by_token: bool) -> str | None:
        """Add the tokens of this step. Returns the stop string that now ends the text, if any.

        `stopped_by_token`: the last new token ended the sequence (EOS or a stop token id);
        it is kept in `token_ids` but left out of the text unless include_stop_str_in_output.
        """
        self.token_ids.extend(new_token_ids)
        if not self.enabled or not new_token_ids:
            return None
        skip_last = stopped_by_token and not self.params.include_stop_str_in_output
        if not self.incremental:
            text_ids = new_token_ids[:-1] if skip_last else new_token_ids
            self._ids.extend(t for t in text_ids if t < self._vocab_limit)
            self._cached_text = None
            return None
        if not self.params.stop:                # nothing to search for: decode when read
            text_ids = new_token_ids[:-1] if skip_last else new_token_ids
            self._unread.extend(t for t in text_ids if t < self._vocab_limit)
            return None

        num_before = len(self.token_ids) - len(new_token_ids)
        search_from = len(self._text)
        for i, token_id in enumerate(new_token_ids):
            if token_id < self._vocab_limit and not (skip_last and i == len(new_token_ids) - 1):
                self._ids.append(token_id)
                self._text += self._decode_next()
            # Stop strings are not looked for while the output is within min_tokens: the
            # search starts after the text of the tokens in that span.
            if num_before + i + 1 <= self.params.min_tokens:
                search_from = len(self._text)
        return self._check_stop(search_from)

    def _decode_next(self) -> str:
        """The text that the ids after read_offset add, or "" while it ends in an incomplete
        UTF-8 sequence (a byte-level token can hold part of a character)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""   # nothing new yet (a skipped special token, or half a character): wait
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _catch_up(self) -> None:
        """Decode the ids that `update` queued, all in one window."""
        if self._unread:
            self._ids += self._unread
            self._unread.clear()
            self._text += self._decode_next()

    def flush(self) -> None:
        """The sequence has ended: add the text an incomplete character was holding back (as
        U+FFFD, which is what decoding all the tokens at once gives), so that streamed and
        one-shot text agree."""
        if not (self.incremental and self.enabled) or self._stopped:
            return
        self._catch_up()
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text):
            self._text += full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)

    def _check_stop(self, search_from: int) -> str | None:
        """Find a stop string that ends in the new text (it may start before, in the tail)."""
        best = None
        for stop in self.params.stop:
            start = self._text.find(stop, max(0, search_from - len(stop) + 1))
            if start != -1 and (best is None or start < best[0]):
                best = (start, stop)
        if best is None:
            return None
        start, stop = best
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        self._text = self._text[:end]
        self._stopped = True
        return stop

    @property
    def text(self) -> str:
        """The output text so far (without streaming hold-back)."""
        if not self.enabled:
            return ""
        if self.incremental:
            self._catch_up()
            return self._text
        if self._cached_text is None:
            context_text = self._decode(self._context)
            full_text = self._decode(self._ids)
            self._cached_text = full_text[len(context_text):]
        return self._cached_text

    def new_text(self, finished: bool = False) -> str:
        """Text added since the last call (for DELTA streaming). Until the sequence is
        `finished`, the last len(longest stop string) - 1 characters are held back: they
        could be the start of a stop string, which must not be sent out."""
        text = self.text
        end = len(text)
        if not finished and not self._stopped:
            end -= self.params.output_text_buffer_length
        if end <= self._sent:
            return ""
        delta, self._sent = text[self._sent:end], end
        return delta


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
