"""`LLM`: the offline API, as in vLLM.

    llm = LLM("Qwen/Qwen3-0.6B")
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
    print(outputs[0].outputs[0].text)
"""
import gc
import itertools

import jinja2               # chat templates' language (a torch dependency)

from nanovllm.beam_search import beam_search
from nanovllm.chat_messages import as_conversations, check_chat_args, for_template, resolve_content_format
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.request_checks import check_generate_args, check_no_lora
from nanovllm.models.model_dir import generation_defaults
from nanovllm.outputs import RequestOutput
from nanovllm.progress import ProgressBar
from nanovllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs):
        """`model`: a local checkpoint directory, a .gguf file, or a Hugging Face repo id.
        Keyword arguments are vLLM's engine arguments (see `nanovllm.config.EngineConfig`).
        With data_parallel_size > 1, or distributed_executor_backend="ray", the engine is N
        replicas behind one engine's surface (nanovllm/data_parallel.py, docs/scale_out.md)."""
        if kwargs.get("data_parallel_size", 1) != 1 or kwargs.get("distributed_executor_backend") == "ray":
            from nanovllm.data_parallel import DataParallelEngine
            self.llm_engine = DataParallelEngine.from_kwargs(model, **kwargs)
        else:
            self.llm_engine = LLMEngine.from_kwargs(model, **kwargs)
        self.request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate(prompts)` uses when no SamplingParams are given: vLLM's defaults, with
        the sampling settings of the checkpoint's generation_config.json (temperature, top_k,
        top_p, min_p, repetition_penalty, max_new_tokens), as vLLM's generation_config="auto"."""
        return SamplingParams(**generation_defaults(self.llm_engine.config.model_dir))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None, priority: list[int] | None = None,
                 ) -> list[RequestOutput]:
        """Complete each prompt; returns one RequestOutput per prompt, in input order.

        `prompts`: a string, a list of token ids, a {"prompt": ...} / {"prompt_token_ids": [...]}
        dict, or a list of any of these. `lora_request` and `priority` are vLLM's; nanovllm has
        no LoRA and schedules first come, first served (vLLM's default policy ignores priority too).
        """
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        prompts, params = check_generate_args(prompts, sampling_params, lora_request, priority)
        ids = [str(next(self.request_counter)) for _ in prompts]
        added = []
        try:
            return self._run(ids, self._add_requests(ids, prompts, params, added), use_tqdm)
        except BaseException:
            self.llm_engine.abort_request(added)  # leave the engine clean for the next call
            raise

    def _add_requests(self, ids: list[str], prompts, params, added: list[str]):
        """Add the requests (recording each in `added`); pause (yield) whenever the prompts added
        fill a step, so that _run steps while the rest are still being tokenized and checked."""
        for request_id, prompt, p in zip(ids, prompts, params):
            final = p.clone()                           # the caller's params stay as they are
            final.output_kind = RequestOutputKind.FINAL_ONLY
            self.llm_engine.add_request(request_id, prompt, final)
            added.append(request_id)
            if self.llm_engine.has_full_step():
                yield

    def _run(self, ids: list[str], adding, use_tqdm: bool) -> list[RequestOutput]:
        engine, done, bar = self.llm_engine, {}, ProgressBar(len(ids), use_tqdm)
        # While it runs, what exists already (model, libraries, the caller's objects) is out of the
        # garbage collector's reach: a full collection mid-run would walk it all (230 ms once, in
        # a 5 s run of bench.py's workload on an H100: docs/benchmarks.md). unfreeze hands it back.
        gc.freeze()
        try:
            # a step each time the requests being added fill one, then until every request is done
            for _ in itertools.chain(adding, iter(engine.has_unfinished_requests, False)):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.finished(out)
        finally:
            gc.unfreeze()
        bar.close()
        return [done[i] for i in ids]

    beam_search = beam_search      # vLLM's LLM.beam_search(prompts, params, ...): nanovllm/beam_search.py

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request=None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, tokenization_kwargs: dict | None = None,
             mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them,
        through the tokenizer's chat template (vLLM's arguments, in its order; what a message may
        hold: chat_messages.py)."""
        check_no_lora(lora_request)
        template_kwargs = check_chat_args(chat_template_content_format, chat_template_kwargs, tokenization_kwargs,
                                          mm_processor_kwargs)
        tokenizer = self.get_tokenizer()
        content_format = resolve_content_format(chat_template_content_format, tokenizer, chat_template, tools)
        prompts = []
        for conversation in as_conversations(messages):
            conversation = [for_template(m, content_format) for m in conversation]
            try:
                text = tokenizer.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template, continue_final_message=continue_final_message, tools=tools,
                    **template_kwargs)
            except jinja2.TemplateError as e:
                raise ValueError(f"The chat template failed on these messages: {type(e).__name__}: {e}") from e
            # The template already holds BOS and friends: do not add special tokens again.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def __del__(self):
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()
