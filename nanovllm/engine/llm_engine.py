"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine.add_request("0", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for output in engine.step(): ...

A step schedules a batch (Scheduler), runs it (ModelRunner), then for every sequence that
got a token: checks the stop conditions, detokenizes, and reports its request's output.
"""
import logging
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import Detokenizer, make_detokenizer
from nanovllm.engine.model_runner import ModelRunner, StepResult
from nanovllm.engine.overlap import fits_without_preemption
from nanovllm.engine.logprob_rows import StepLogprobs, TokenTexts
from nanovllm.engine.request_checks import check_request_args, fit_request, tokenize_prompt
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[Detokenizer]
    prompt_logprobs: list | None = None
    reported: bool = False                                      # an output was made

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    scheduler_class = Scheduler           # (speculative decoding's: spec_decode/scheduler.py)

    def __init__(self, config: EngineConfig):
        if config.speculative_config is not None and type(self) is LLMEngine:
            raise ValueError("an engine with a speculative_config is spec_decode's SpeculativeEngine: "
                             "build it with LLMEngine.from_kwargs(...) or LLM(...).")
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.runner = self._make_runner(config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = self.scheduler_class(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.vocab_size = config.hf_config.vocab_size
        self.token_texts = TokenTexts(self.tokenizer)   # for logprobs' decoded_token
        self.eos_token_id, self.extra_eos_ids = _eos_ids(self.tokenizer, config.hf_config)
        self.num_steps = 0
        self.last_step: ScheduledBatch | None = None    # the step launched last (progress bars, benchmarks)
        self.in_flight = None                # a step launched but not yet read back
        self.tokens_added = 0                # prompt tokens added since a step was last launched

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "LLMEngine":
        """The engine for these arguments: with a speculative_config, spec_decode's."""
        config = EngineConfig.from_kwargs(model, **kwargs)
        if config.speculative_config is not None and cls is LLMEngine:
            from nanovllm.spec_decode.engine import SpeculativeEngine
            return SpeculativeEngine(config)
        return cls(config)

    @staticmethod
    def _make_runner(config: EngineConfig):
        if config.tensor_parallel_size > 1:
            from nanovllm.engine.tensor_parallel import TensorParallelRunner
            return TensorParallelRunner(config)
        return ModelRunner(config)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> str:
        """Queue a request. `prompt` is a string, a list of token ids, or a dict with
        "prompt" or "prompt_token_ids" (vLLM's TextPrompt / TokensPrompt)."""
        params = check_request_args(request_id, request_id in self.requests, params)
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        params = fit_request(token_ids, params, self.vocab_size, self.config.max_model_len,
                             self.block_manager)         # a copy, max_tokens filled in
        seqs, detoks = [], []
        incremental = bool(params.stop) or params.output_kind != RequestOutputKind.FINAL_ONLY
        for i in range(params.n):
            seqs.append(Sequence(request_id, i, token_ids, params))
            detoks.append(make_detokenizer(self.tokenizer, params, token_ids, incremental))
        request = Request(request_id, text, token_ids, params, seqs, detoks,
                          prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.requests[request_id] = request
        self.tokens_added += len(token_ids)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(request_id, None)
            for seq in request.seqs if request else []:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests it advanced (per output_kind). A step
        that fails aborts the requests it was running (they are mid-step: tokens counted that
        were never recorded, so they could never finish) and raises; those waiting go on."""
        try:
            advanced = self.advance()
        except Exception:
            self.in_flight = None
            self.abort_request([seq.request_id for seq in self.scheduler.running])
            raise
        return [out for out in map(self.make_output, advanced) if out is not None]

    def advance(self) -> list[Request]:
        """Run one step; return the requests it advanced, whose outputs make_output makes (a
        server makes some of them later: entrypoints/hand_over.py).

        Host and device overlap: the step launched by the previous call is still on the
        device when this one schedules and launches the next, reading its sampled tokens on
        the device; only then are the previous step's tokens read back and processed.
        """
        pending, self.in_flight = self.in_flight, None
        if pending is not None:
            ahead = self.scheduler.schedule() if fits_without_preemption(self.scheduler) else None
            self.in_flight = self._launch(ahead, after=pending)
            advanced = self._finish(pending)
        else:
            advanced = []
        if self.in_flight is None:        # nothing could be launched ahead: schedule with every token known
            self.in_flight = self._launch(self.scheduler.schedule())
        return advanced

    def has_full_step(self) -> bool:
        """Do the prompts added since a step was last launched fill one? LLM.generate steps each
        time they do, so that the device runs while it adds more (admitting a hundred long
        prompts takes tens of ms, hundreds if they must be tokenized)."""
        return self.tokens_added >= self.config.max_num_batched_tokens

    def _launch(self, batch: ScheduledBatch | None, after=None):
        if batch is None:
            return None
        self.num_steps += 1
        self.last_step, self.tokens_added = batch, 0
        return self.runner.launch(batch, self.eos_ids, after)

    def _finish(self, launched) -> list[Request]:
        """Read a step's results back and process them; returns the requests with an output to make."""
        result = self.runner.resolve(launched)
        self.scheduler.update(launched.batch, result.sampled)
        return self._process(launched.batch, result)

    def _process(self, batch: ScheduledBatch, result: StepResult) -> list[Request]:
        """Each sequence's new token: stop checks, text, logprobs. Returns the requests that
        have an output to report (with FINAL_ONLY, only those that finished)."""
        touched = {}
        logprobs = StepLogprobs(batch, result, self.token_texts) if result.has_logprobs else None
        for i, (seq, token) in enumerate(zip(batch.seqs, result.sampled)):
            if seq.is_finished:           # stopped (or aborted) while this step was in flight
                continue
            request = self.requests[seq.request_id]
            if logprobs is not None:
                logprobs.record(i, seq, request)
            if token is None:             # mid-prompt
                continue
            reason, stop_reason = self._check_stop(seq)
            stop_str = request.detokenizers[seq.index].on_token(seq, reason)
            if stop_str is not None:
                reason, stop_reason = "stop", stop_str
            if reason is not None:
                self.scheduler.finish(seq, reason, stop_reason)
                touched[seq.request_id] = request
            elif request.params.output_kind != RequestOutputKind.FINAL_ONLY:
                touched[seq.request_id] = request
        return list(touched.values())

    @property
    def eos_ids(self) -> set[int]:
        """Every EOS id of the model (min_tokens bans them all)."""
        return self.extra_eos_ids if self.eos_token_id is None else {self.eos_token_id, *self.extra_eos_ids}

    def _check_stop(self, seq: Sequence) -> tuple[str | None, int | None]:
        """Token stop conditions, in vLLM's order."""
        p, token, produced = seq.params, seq.token_ids[-1], seq.num_output_tokens
        if produced >= p.min_tokens:
            if token == self.eos_token_id and not p.ignore_eos:
                return "stop", None
            if token in p.stop_token_ids or (token in self.extra_eos_ids and not p.ignore_eos):
                return "stop", token
        if produced >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length", None
        return None, None

    def make_output(self, request: Request) -> RequestOutput | None:
        """The request's output now (None for FINAL_ONLY until it finishes). A DELTA output
        covers what is new since the last one made."""
        kind, finished = request.params.output_kind, request.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = []
        for seq, detok in zip(request.seqs, request.detokenizers):
            tokens, text, logprobs = detok.report(seq)                # (incremental_detokenizer.py: DELTA)
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=tokens,          # a fresh slice
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if finished:
            del self.requests[request.request_id]
        request.reported = True
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             request.prompt_logprobs, outputs, finished,
                             num_cached_tokens=request.seqs[0].num_cached_tokens)

    def shutdown(self) -> None:
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()


def _eos_ids(tokenizer, hf_config) -> tuple[int | None, set[int]]:
    """The tokenizer's EOS (stop_reason None), plus any further EOS ids the model config
    lists (they stop too, reported by id, as vLLM merges generation_config's EOS ids)."""
    config_ids = getattr(hf_config, "eos_token_id", None)
    config_ids = set(config_ids if isinstance(config_ids, list) else [config_ids]) - {None}
    primary = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(config_ids, default=None)
    return primary, config_ids - {primary}
