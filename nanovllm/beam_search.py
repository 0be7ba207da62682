"""Beam search: vLLM's `LLM.beam_search`, built on the engine's ordinary requests.

    outputs = llm.beam_search(["The capital of France is"], BeamSearchParams(beam_width=4, max_tokens=16))
    best = outputs[0].sequences[0]      # .tokens, .text, .cum_logprob, .logprobs, .finish_reason

Each step, every live beam is one request: its tokens so far as a token-id prompt, max_tokens=1,
logprobs=2 x beam_width. Nothing is copied between beams: the prefix cache lets the beams of one
prompt share the KV blocks of the prompt and of their common prefix (reference counted), so a
step computes at most a block of tokens per beam, those after its last full block.

The rules (vLLM's):
- each live beam proposes the continuations of its logprobs entry: its best 2 x beam_width
  tokens (plus the sampled token, when a temperature above 0 drew another one);
- a proposal that ends in an EOS id is completed (finish_reason "stop", stop_reason the id), unless
  ignore_eos; of the others, the best beam_width by cumulative logprob live on;
- after max_tokens steps (or at max_model_len) the live beams are completed too (finish_reason
  "length"), and the best beam_width of all completed beams by `get_beam_search_score` are
  returned, best first. Completed beams are never pruned before that final ranking.

Where nanovllm differs from vLLM, and why:
- every EOS id of the model completes a beam (generate stops on them all); vLLM watches the
  tokenizer's EOS alone;
- the score leaves out a final EOS only for a beam it completed: with ignore_eos an EOS is an
  ordinary token (vLLM also shortens such a beam by one, and so ranks it a little differently);
- `text` is the decoded tokens, prompt included (as vLLM's `LLM.beam_search`), without the
  completing EOS's text unless include_stop_str_in_output (as vLLM's server, which honours that
  field; its offline call ignores it and keeps the EOS's text).
"""
from collections.abc import Collection
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from nanovllm.engine.request_checks import as_prompt_list, check_no_lora
from nanovllm.outputs import Logprob
from nanovllm.param_checks import ValidationError, at_least_one, finite, flag, max_logprobs
from nanovllm.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """How `LLM.beam_search` searches (vLLM's fields and defaults; importable from
    nanovllm.sampling_params, where vLLM has it).
    Each beam asks the engine for the logprobs of its best 2 x beam_width continuations, so
    beam_width is at most max_logprobs / 2 (vLLM refuses more through the same limit, later)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.beam_width = at_least_one(self.beam_width, "beam_width")
        self.max_tokens = at_least_one(self.max_tokens, "max_tokens")
        if self.beam_width > max_logprobs // 2:
            raise ValidationError(
                f"beam_width must be at most {max_logprobs // 2}, got {self.beam_width}: each beam asks for the "
                f"logprobs of its best 2 x beam_width continuations, and at most {max_logprobs} are served.",
                "beam_width", self.beam_width)
        self.ignore_eos = flag(self.ignore_eos, "ignore_eos")
        self.include_stop_str_in_output = flag(self.include_stop_str_in_output, "include_stop_str_in_output")
        self.temperature = finite(self.temperature, "temperature")
        self.length_penalty = finite(self.length_penalty, "length_penalty")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                  "temperature", self.temperature)


@dataclass
class BeamSearchSequence:
    tokens: list[int]                       # the prompt's, then the generated ones (a completing EOS too)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)   # per generated token: its step's proposals
    cum_logprob: float = 0.0                # of the generated tokens
    text: str | None = None                 # set on the returned sequences
    finish_reason: str | None = None        # "stop" (an EOS) or "length"
    stop_reason: int | None = None          # the EOS id that completed the beam


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]     # at most beam_width, best first


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_id: int | Collection[int] | None,
                          length_penalty: float = 1.0) -> float:
    """vLLM's ranking score: the cumulative logprob over the sequence's length (prompt included,
    a final EOS not) to the power length_penalty."""
    eos_ids = eos_token_id if isinstance(eos_token_id, Collection) else {eos_token_id}
    length = len(tokens) - (tokens[-1] in eos_ids)
    return cumulative_logprob / length ** length_penalty


class _Search:
    """One prompt's beams: the live ones and the completed ones."""

    def __init__(self, prompt_token_ids: list[int], num_steps: int, params: BeamSearchParams, eos_ids: set[int]):
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.steps_left = num_steps
        self.params, self.eos_ids = params, eos_ids     # eos_ids: empty with ignore_eos

    def advance(self, entries: list[dict[int, Logprob]]) -> None:
        """One step: `entries[i]` holds the logprobs of live beam i's proposals."""
        proposals = []                      # (cumulative logprob, parent beam, token, the parent's entry)
        for beam, entry in zip(self.beams, entries):
            for token, logprob in entry.items():
                cum_logprob = beam.cum_logprob + logprob.logprob
                if token in self.eos_ids:
                    self.completed.append(BeamSearchSequence(
                        beam.tokens + [token], beam.logprobs + [entry], cum_logprob, finish_reason="stop",
                        stop_reason=token))
                else:
                    proposals.append((cum_logprob, beam, token, entry))
        proposals.sort(key=lambda p: p[0], reverse=True)    # stable: ties keep beam, then rank, order
        self.beams = [BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], cum_logprob)
                      for cum_logprob, beam, token, entry in proposals[:self.params.beam_width]]
        self.steps_left -= 1
        if self.steps_left == 0:
            for beam in self.beams:
                beam.finish_reason = "length"
            self.completed += self.beams
            self.beams = []

    def best(self, tokenizer) -> BeamSearchOutput:
        p = self.params

        def score(beam: BeamSearchSequence) -> float:
            # The EOS ids are those that completed beams: with ignore_eos, none.
            return get_beam_search_score(beam.tokens, beam.cum_logprob,
                                         {beam.stop_reason} if beam.finish_reason == "stop" else set(),
                                         p.length_penalty)

        best = sorted(self.completed, key=score, reverse=True)[:p.beam_width]
        known = len(tokenizer)              # ids beyond the tokenizer's vocabulary decode to ""
        for beam in best:
            ids = beam.tokens[:-1] if beam.finish_reason == "stop" and not p.include_stop_str_in_output else beam.tokens
            beam.text = tokenizer.decode([t for t in ids if t < known])
        return BeamSearchOutput(best)


class BeamSearch:
    """A search over several prompts, driven by whoever runs the requests (`beam_search` below
    through `LLM.generate`; a server could through its async engine):

        search = BeamSearch(prompts, params, eos_ids, max_model_len)
        while not search.done:
            search.advance(run(search.next_prompts(), search.step_params))   # RequestOutputs, in order
        outputs = search.outputs(tokenizer)

    The first step runs the prompts as given (so they are tokenized and checked as generate
    does); each later step, every live beam's tokens as a token-id prompt."""

    def __init__(self, prompts: list, params: BeamSearchParams, eos_ids: set[int], max_model_len: int):
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        self.params, self.max_model_len = params, max_model_len
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        # The engine's logprobs are of the raw distribution; the temperature only decides which
        # token is sampled, which joins the proposals when it is not among the best 2 x beam_width.
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width,
                                          temperature=params.temperature, detokenize=False)
        self.prompts = list(prompts)
        self.searches: list[_Search] | None = None      # one per prompt, once the first step has run

    @property
    def done(self) -> bool:
        return not self.prompts if self.searches is None else not any(s.beams for s in self.searches)

    def next_prompts(self) -> list:
        if self.searches is None:
            return self.prompts
        return [{"prompt_token_ids": beam.tokens} for search in self.searches for beam in search.beams]

    def advance(self, results: list) -> None:
        """The RequestOutputs of next_prompts(), in the same order."""
        if self.searches is None:
            self.searches = [_Search(out.prompt_token_ids, self._num_steps(out.prompt_token_ids), self.params,
                                     self.eos_ids) for out in results]
        result = iter(results)
        for search in self.searches:
            if search.beams:
                search.advance([next(result).outputs[0].logprobs[0] for _ in search.beams])

    def _num_steps(self, prompt_token_ids: list[int]) -> int:
        # A beam stops at max_model_len tokens (a prompt of that length still gets one, as in generate).
        return min(self.params.max_tokens, max(1, self.max_model_len - len(prompt_token_ids)))

    def outputs(self, tokenizer) -> list[BeamSearchOutput]:
        return [search.best(tokenizer) for search in self.searches or []]


def beam_search(llm, prompts, params: BeamSearchParams, lora_request=None, use_tqdm: bool = False,
                concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
    """`LLM.beam_search`: `llm`'s beam search over `prompts` (in generate's forms); one
    BeamSearchOutput per prompt, in input order. `concurrency_limit`: how many prompts are
    searched at once (all by default)."""
    check_no_lora(lora_request)
    prompts = as_prompt_list(prompts)
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or not isinstance(concurrency_limit, int)
                                          or concurrency_limit < 1):
        raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
    chunk = concurrency_limit or max(1, len(prompts))
    eos_ids, max_model_len, tokenizer = _eos_ids(llm), llm.llm_engine.config.max_model_len, llm.get_tokenizer()
    bar = tqdm(total=params.max_tokens * -(-len(prompts) // chunk), desc="Beam search", unit="step",
               dynamic_ncols=True, disable=not use_tqdm)
    outputs = []
    for start in range(0, len(prompts), chunk):
        search = BeamSearch(prompts[start:start + chunk], params, eos_ids, max_model_len)
        while not search.done:
            search.advance(llm.generate(search.next_prompts(), search.step_params, use_tqdm=False))
            bar.update(1)
        outputs += search.outputs(tokenizer)
    bar.close()
    return outputs


async def beam_search_async(run, prompts: list, params: BeamSearchParams, eos_ids: set[int], max_model_len: int,
                            tokenizer) -> list[BeamSearchOutput]:
    """The same search driven by an async engine (the server's /v1/completions with
    use_beam_search): `await run(prompts, sampling_params)` gives each prompt's final RequestOutput."""
    search = BeamSearch(prompts, params, eos_ids, max_model_len)
    while not search.done:
        search.advance(await run(search.next_prompts(), search.step_params))
    return search.outputs(tokenizer)


def _eos_ids(llm) -> set[int]:
    """The ids that complete a beam: every EOS id of the model, as generate stops on them (an
    engine that does not list them, such as data-parallel replicas behind one front: the
    tokenizer's EOS, as vLLM)."""
    eos_ids = getattr(llm.llm_engine, "eos_ids", None)
    if eos_ids is not None:
        return set(eos_ids)
    eos = llm.get_tokenizer().eos_token_id
    return set() if eos is None else {eos}
