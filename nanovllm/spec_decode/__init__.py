"""Speculative decoding (vLLM's `speculative_config`): a cheap proposer guesses each decoding
sequence's next k tokens, and the target model checks all guesses of all sequences in one
forward pass, emitting 1 to k+1 tokens per sequence per step with exactly the distribution it
would have sampled from alone (docs/speculative.md).

`SpeculativeEngine` (engine.py; `LLMEngine.from_kwargs` picks it for a speculative_config)
calls two hooks: `Speculator.propose` before scheduling (each running sequence's
`spec_token_ids`; the scheduler makes its span 1 + k long where the budget and blocks allow),
and `Speculator.run` instead of the runner's launch (`verify`: one forward pass, the
rejection sampler, the results laid out in rounds for the engine's stop checks).

    the engine: engine.py;  the hooks and counters: speculator.py;  config: config.py
    proposers: ngram.py (prompt lookup), draft_model.py (a small model)
    the verifying step: verify.py;  acceptance: rejection_sampler.py
"""
from nanovllm.spec_decode.config import SpeculativeConfig
from nanovllm.spec_decode.speculator import SpecDecodeMetrics, Speculator

__all__ = ["SpecDecodeMetrics", "SpeculativeConfig", "Speculator"]
