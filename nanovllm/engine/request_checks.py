"""What LLM.generate and LLMEngine.add_request accept, with vLLM's messages: the prompts and
params lists, the request id and params, the prompt forms (a string, token ids, or vLLM's
{"prompt": ...} / {"prompt_token_ids": ...} dicts), and the checks that need the model
(vocabulary, context length)."""
from nanovllm.param_checks import ValidationError, normalize_and_check
from nanovllm.sampling_params import SamplingParams


def check_generate_args(prompts, params, lora_request, priority) -> tuple[list, list[SamplingParams]]:
    """LLM.generate's arguments: (a list of prompts, a SamplingParams for each)."""
    check_no_lora(lora_request)
    prompts = as_prompt_list(prompts)
    if priority is not None and not isinstance(priority, (list, tuple)):
        raise ValueError(f"priority must be a list with one entry per prompt, got {type(priority).__name__}")
    if priority is not None and len(priority) != len(prompts):
        raise ValueError(f"The lengths of prompts ({len(prompts)}) and priority ({len(priority)}) must be the same.")
    if isinstance(params, SamplingParams):
        return prompts, [params] * len(prompts)
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {params!r}")
    if len(params) != len(prompts):
        raise ValueError(f"The lengths of prompts ({len(prompts)}) and sampling_params ({len(params)}) must be the same.")
    return prompts, list(params)


def check_no_lora(lora_request) -> None:
    if lora_request is not None:
        raise ValueError("lora_request is not supported: nanovllm has no LoRA adapters.")


def as_prompt_list(prompts) -> list:
    """vLLM's rule: a string, a dict, or a non-empty list of ints is ONE prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a string, a list of token ids, a prompt dict, or a list of these; "
                         f"got {type(prompts).__name__}")
    return list(prompts)


def check_request_args(request_id, in_use: bool, params: SamplingParams | None) -> SamplingParams:
    """add_request's argument checks (shared with the data-parallel engine); the params to use."""
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a string, got {type(request_id)}")
    if in_use:
        raise ValueError(f"request_id {request_id!r} is already in use")
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    return params


def tokenize_prompt(tokenizer, prompt) -> tuple[str | None, list[int]]:
    """(the prompt's text if it has one, its token ids)."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("Prompt dictionary must contain 'prompt' or 'prompt_token_ids', "
                             f"got keys {sorted(prompt)}")
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)):
        return None, _token_ids(prompt)
    raise ValueError(f"Prompt should be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _token_ids(ids) -> list[int]:
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"Token prompt should be a list of integers, got {type(ids).__name__}")
    ids = list(ids)
    # The set of types is found at C speed; long prompts would spend ~1 ms each in a Python loop.
    if not set(map(type, ids)) <= {int}:
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"Token prompt should be a list of integers, got {t!r}")
    return ids


def fit_request(token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                block_manager) -> SamplingParams:
    """The checks that need the prompt's tokens and the engine; returns a copy of params with
    max_tokens filled in (None: as many as max_model_len leaves room for)."""
    check_prompt(token_ids, vocab_size, max_model_len)
    params = params.clone()
    # Checked again, as vLLM does when a request is added: a field set after the SamplingParams
    # was made (n = 0, top_k = 1.5) was never checked, and would hang or fail inside a step.
    normalize_and_check(params)
    check_stop_token_ids(params, vocab_size)
    if params.max_tokens is None:
        params.max_tokens = max_model_len - len(token_ids)
        if params.min_tokens > params.max_tokens:       # as for a max_tokens given (param_checks.py)
            raise ValidationError(f"min_tokens must be less than or equal to max_tokens={params.max_tokens}, got "
                                  f"{params.min_tokens}.", "min_tokens", params.min_tokens)
    check_fits_cache(min(len(token_ids) + params.max_tokens, max_model_len), block_manager)
    return params


def check_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    if not token_ids:
        raise ValueError("The decoder prompt cannot be empty")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise ValueError(f"Token id {bad} is out of vocabulary (the model has {vocab_size} tokens)")
    if len(token_ids) > max_model_len:
        raise ValueError(f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model "
                         f"length of {max_model_len}. Make sure that `max_model_len` is no "
                         f"smaller than the number of text tokens.")


def check_stop_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """A stop token id outside the vocabulary could never be sampled, so it would never stop
    anything: refused (as vLLM's request-time check)."""
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValidationError(f"stop_token_ids contains {bad}, which is out of vocabulary (the model "
                              f"has {vocab_size} tokens).", "stop_token_ids", params.stop_token_ids)


def check_fits_cache(longest: int, block_manager) -> None:
    """A request that may grow to `longest` tokens must fit the whole KV cache: otherwise it
    would wait for blocks forever."""
    if block_manager.blocks_needed(longest) > block_manager.num_blocks:
        raise ValueError(
            f"The request may grow to {longest} tokens but the whole KV cache holds "
            f"{block_manager.num_blocks * block_manager.block_size}; lower max_tokens or give the "
            f"cache more memory (gpu_memory_utilization, num_gpu_blocks_override).")
