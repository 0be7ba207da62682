"""The detokenizer of a request whose text is read while it runs (streamed outputs) or searched
for stop strings: the text grows by the new tokens' text only, so it can be sent out piece by
piece. With stop strings each `update` decodes its tokens and searches the new text, so a
request stops as soon as a stop string appears; without, `update` only queues the tokens and
they are decoded together when the text is next read (a streamed request's output is built far
less often than every step).

A DELTA request's outputs each carry only what is new since the last one: `report` keeps count of
the tokens sent and `new_text` of the characters."""
from nanovllm.engine.detokenizer import Detokenizer
from nanovllm.sampling_params import RequestOutputKind, SamplingParams


class IncrementalDetokenizer(Detokenizer):
    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        super().__init__(tokenizer, params, prompt_token_ids)
        # The text is decoded from window ids[prefix_offset:], of which ids[prefix_offset:read_offset]
        # were already turned into text.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""                         # the text so far
        self._unread: list[int] = []            # without stop strings: ids not decoded yet
        self._stopped = False                   # a stop string matched: the text is final
        self._sent = 0                          # characters already returned by new_text()
        self._reported = 0                      # output tokens already in a DELTA output

    def update(self, new_token_ids: list[int], stopped_by_token: bool) -> str | None:
        self.token_ids.extend(new_token_ids)
        if not new_token_ids:
            return None
        text_ids = self._text_ids(new_token_ids, stopped_by_token)
        if not self.params.stop:                # nothing to search for: decode when read
            if self.enabled:
                self._unread.extend(t for t in text_ids if t < self._vocab_limit)
            return None
        num_before = len(self.token_ids) - len(new_token_ids)
        search_from = len(self._text)
        for i, token_id in enumerate(new_token_ids):
            if token_id < self._vocab_limit and i < len(text_ids):
                self._ids.append(token_id)
                self._text += self._decode_next()
            # Stop strings are not looked for while the output is within min_tokens: the
            # search starts after the text of the tokens in that span.
            if num_before + i + 1 <= self.params.min_tokens:
                search_from = len(self._text)
        return self._check_stop(search_from)

    def on_token(self, seq, reason: str | None) -> str | None:
        stop = self.update(seq.token_ids[-1:], reason == "stop")
        if stop is None and reason is not None:
            self.flush()
        return stop

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
        if self._stopped:
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
        self._catch_up()
        return self._text

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

    def report(self, seq) -> tuple[list[int], str, list | None]:
        """With DELTA outputs, only the token ids, text and logprobs new since the last report."""
        if self.params.output_kind != RequestOutputKind.DELTA:
            return super().report(seq)
        start, self._reported = self._reported, seq.num_output_tokens
        logprobs = seq.logprobs[start:] if seq.logprobs is not None else None
        return seq.output_token_ids[start:], self.new_text(seq.is_finished), logprobs
