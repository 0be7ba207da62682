"""`speculative_config`: vLLM's dict, checked in one place.

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    LLM(model, speculative_config={"model": "path/to/small-model", "num_speculative_tokens": 4})

A dict with "model" and no "method" means a draft model ("draft_model"); "model": "ngram"
means n-gram proposals, as in vLLM.
"""
import numbers
from dataclasses import dataclass

METHODS = ("ngram", "draft_model")
KNOWN_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
              "disable_by_batch_size")


@dataclass
class SpeculativeConfig:
    method: str                       # "ngram" | "draft_model"
    num_speculative_tokens: int       # k: tokens proposed per sequence per step
    model: str | None = None          # the draft model (method "draft_model")
    prompt_lookup_max: int | None = None   # n-gram lengths tried, longest first
    prompt_lookup_min: int | None = None
    draft_hf_config: object = None    # the draft's model config (filled in by `parse`)
    # Steps with more running requests than this run without proposals (vLLM's key): a
    # verifying step costs more than a plain one, which pays off at small batches only.
    disable_by_batch_size: int | None = None

    @classmethod
    def for_engine(cls, config) -> "SpeculativeConfig":
        """EngineConfig's speculative_config parsed, and checked against its other arguments."""
        from nanovllm.config import load_hf_config, model_max_len
        from nanovllm.models.model_dir import resolve_model_dir
        spec = cls.parse(config.speculative_config, config.hf_config, lambda model: load_hf_config(
            resolve_model_dir(model, None, None), config.trust_remote_code))
        if spec.method == "draft_model" and config.tensor_parallel_size > 1:
            raise ValueError("speculative_config with a draft model needs tensor_parallel_size=1 "
                             "(n-gram speculation works with any).")
        if spec.draft_hf_config is not None and model_max_len(spec.draft_hf_config) < config.max_model_len:
            raise ValueError(f"speculative_config['model'] {spec.model!r} reads at most "
                             f"{model_max_len(spec.draft_hf_config)} tokens, fewer than max_model_len="
                             f"{config.max_model_len}: lower max_model_len, or use a draft with a longer context.")
        return spec

    @classmethod
    def parse(cls, value, target_hf_config, load_draft_config) -> "SpeculativeConfig":
        """`value`: the user's dict (or an already parsed SpeculativeConfig). `load_draft_config(model)`
        -> the draft's hf config, to compare vocabularies."""
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or None), got {type(value).__name__}.")
        unknown = sorted(set(value) - set(KNOWN_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unsupported key(s) {unknown}; supported: {list(KNOWN_KEYS)}.")
        method, model = value.get("method"), value.get("model")
        if method is None:
            method = "ngram" if model == "ngram" else "draft_model" if model is not None else None
        if method not in METHODS:
            raise ValueError(f"speculative_config['method'] must be one of {list(METHODS)} (or give 'model' for "
                             f"a draft model), got {method!r}.")
        k = value.get("num_speculative_tokens")
        if not _is_int(k) or k < 1:
            raise ValueError(f"speculative_config['num_speculative_tokens'] must be an integer >= 1, got {k!r}.")
        config = cls(method, int(k))
        limit = value.get("disable_by_batch_size")
        if limit is not None and (not _is_int(limit) or limit < 2):
            raise ValueError(f"speculative_config['disable_by_batch_size'] must be an integer > 1 (or None), "
                             f"got {limit!r}.")
        config.disable_by_batch_size = limit
        if method == "ngram":
            config._check_ngram(value.get("prompt_lookup_max"), value.get("prompt_lookup_min"))
        else:
            for key in ("prompt_lookup_max", "prompt_lookup_min"):
                if value.get(key) is not None:
                    raise ValueError(f"speculative_config['{key}'] applies to method 'ngram' only, not {method!r}.")
            config._check_draft(model, target_hf_config, load_draft_config)
        return config

    def _check_ngram(self, longest, shortest) -> None:
        # vLLM's defaults: neither given -> 5 and 5; one given -> the other equals it.
        for key, n in (("prompt_lookup_max", longest), ("prompt_lookup_min", shortest)):
            if n is not None and (not _is_int(n) or n < 1):
                raise ValueError(f"speculative_config['{key}'] must be an integer >= 1, got {n!r}.")
        if longest is None and shortest is None:
            longest = shortest = 5
        longest = shortest if longest is None else longest
        shortest = longest if shortest is None else shortest
        if shortest > longest:
            raise ValueError(f"speculative_config['prompt_lookup_min'] ({shortest}) must be <= "
                             f"prompt_lookup_max ({longest}).")
        self.prompt_lookup_max, self.prompt_lookup_min = int(longest), int(shortest)

    def _check_draft(self, model, target_hf_config, load_draft_config) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"speculative_config['model'] must be the draft model's path or repo id (a string), "
                             f"got {model!r}.")
        self.model = model
        try:
            self.draft_hf_config = load_draft_config(model)
        except (OSError, ValueError) as e:      # (the error alone would read as the target's)
            raise ValueError(f"speculative_config['model'] {model!r}: {e}") from e
        draft_vocab, target_vocab = self.draft_hf_config.vocab_size, target_hf_config.vocab_size
        if draft_vocab != target_vocab:
            raise ValueError(f"speculative_config['model'] {model!r} has a vocabulary of {draft_vocab} tokens; "
                             f"the draft model must share the target's ({target_vocab}).")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
