"""Sampler cost at 256 sequences over Qwen3's vocabulary (151,936), per sampling setting,
to compare with a decode step's time (`benchmarks/profile_step.py 256`). GPU only.

    PYTHONPATH=. python benchmarks/bench_sampler.py
"""
from types import SimpleNamespace

import torch
import triton.testing

from nanovllm.engine.token_histograms import TokenHistograms
from nanovllm.layers.sampler import Sampler
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow, uses_penalties
from nanovllm.sampling_params import SamplingParams

B, V = 256, 151936
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.6": dict(temperature=0.6),
    "top_k 50": dict(temperature=0.8, top_k=50),
    "top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "top_k 50 + top_p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
    "penalties": dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    "logprobs 5": dict(temperature=0.8, logprobs=5),
    "seeded": dict(temperature=0.8, seed=1),
}


def main() -> None:
    device = torch.device("cuda")
    torch_sampler, sampler = Sampler(fused=False), Sampler(fused=True)    # the engine uses the fused one
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, V, (300,), generator=gen).tolist()
    output = torch.randint(0, V, (200,), generator=gen).tolist()
    logits = (torch.randn(B, V, device=device) * 3).bfloat16()     # as the model's lm_head gives them
    print(f"{'setting':<24} {'ms (torch)':>10} {'ms (engine)':>11} {'ms (build + engine)':>20}")
    for name, kwargs in SETTINGS.items():
        params = SamplingParams(**kwargs)
        seqs = [SimpleNamespace(seq_id=i, token_ids=prompt + output, num_prompt_tokens=len(prompt))
                for i in range(B)]
        generators = [torch.Generator(device=device).manual_seed(i) if params.seed is not None else None
                      for i in range(B)]
        histograms = TokenHistograms(V, B, device) if uses_penalties(params) else None

        def build():
            """The metadata as ModelRunner._sampling_metadata builds it when the batch changes
            (penalties: from the device histograms; the engine reuses it while the batch stays)."""
            counts = None
            if histograms is not None:
                counts = (histograms.output_counts, histograms.prompt_mask, histograms.gather(seqs))
            rows = [SamplingRow.of(params, s.token_ids, s.num_prompt_tokens, g, 2, counts_kept=counts is not None)
                    for s, g in zip(seqs, generators)]
            return SamplingMetadata.build(rows, V, device, counts)

        meta = build()
        plain = triton.testing.do_bench(lambda: torch_sampler(logits, meta), return_mode="median")
        # the engine gives seeded rows their own seeds (ModelRunner._row_seeds)
        seeds = torch.randint(0, 2**62, (B,), device=device) if params.seed is not None else None
        forward = triton.testing.do_bench(lambda: sampler(logits, meta, seeds), return_mode="median")
        both = triton.testing.do_bench(lambda: sampler(logits, build(), seeds), return_mode="median")
        print(f"{name:<24} {plain:>10.3f} {forward:>11.3f} {both:>20.3f}")


if __name__ == "__main__":
    main()
