"""Logprobs in the OpenAI answers' forms: the legacy completions form (tokens, token_logprobs,
top_logprobs, text_offset), chat's content list, and vLLM's extra prompt_logprobs field."""
import dataclasses

from nanovllm.entrypoints.protocol import ChatCompletionRequest, CompletionRequest
from nanovllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput


def completion_logprobs(body: CompletionRequest, out: RequestOutput, c: CompletionOutput, offset: int,
                        first: bool, tokenizer) -> dict:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    pairs = list(zip(c.token_ids, c.logprobs or []))
    if body.echo and first:
        prompt_lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        pairs = list(zip(out.prompt_token_ids, prompt_lps)) + pairs
    result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in pairs:
        token = entry[token_id].decoded_token if entry else tokenizer.decode([token_id])
        result["tokens"].append(token)
        result["token_logprobs"].append(entry[token_id].logprob if entry else None)
        # Keyed by text: of tokens that decode alike, the likeliest is kept.
        result["top_logprobs"].append({lp.decoded_token: lp.logprob for lp in reversed(ranked(entry))}
                                      if entry else None)
        result["text_offset"].append(offset)
        offset += len(token)
    return result


def chat_logprobs(body: ChatCompletionRequest, c: CompletionOutput) -> dict | None:
    if not body.logprobs:
        return None

    def item(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode("utf-8"))}
    k = body.top_logprobs or 0
    return {"content": [{**item(entry[t]), "top_logprobs": [item(lp) for lp in ranked(entry)[:k]]}
                        for t, entry in zip(c.token_ids, c.logprobs or [])]}


def ranked(entry: dict[int, Logprob]) -> list[Logprob]:
    return sorted(entry.values(), key=lambda lp: -lp.logprob)


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list | None:
    """vLLM's extra `prompt_logprobs` field: per prompt token, None (the first) or
    {token id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else {str(t): dataclasses.asdict(lp) for t, lp in entry.items()}
            for entry in prompt_logprobs]
