"""Sampler cost at 256 sequences over Qwen3's vocabulary (151,936), per sampling setting,
to compare with a decode step's time (`benchmarks/profile_step.py 256`). GPU only.

    PYTHONPATH=. python benchmarks/bench_sampler.py            # the table
    PYTHONPATH=. python benchmarks/bench_sampler.py --sweep    # the kernels alone, per tuning knob
"""
import argparse
from types import SimpleNamespace

import torch
import triton.testing

from nanovllm import kernels
from nanovllm.engine.token_histograms import TokenHistograms
from nanovllm.kernels import logprobs as logprobs_kernel
from nanovllm.kernels import sampling_filters
from nanovllm.layers.sampler import Sampler
from nanovllm.layers.penalties import uses_penalties
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
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
    "logprobs 20": dict(temperature=0.8, logprobs=20),
    "greedy + logprobs 5": dict(temperature=0.0, logprobs=5),
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
        histograms = TokenHistograms(V, B, device) if uses_penalties(params) else None

        def build():
            """The metadata as SamplingInputs.metadata (engine/sampling_inputs.py) builds it when the batch changes
            (penalties: from the device histograms; the engine reuses it while the batch stays)."""
            counts = None
            if histograms is not None:
                counts = (histograms.output_counts, histograms.prompt_mask, histograms.gather(seqs))
            rows = [SamplingRow.of(params, s.token_ids, s.num_prompt_tokens, (2,), counts_kept=counts is not None)
                    for s in seqs]
            return SamplingMetadata.build(rows, V, device, counts)

        meta = build()
        # the engine gives each row its seed, on the host (engine/sampling_inputs.py row_seeds)
        seeds = torch.randint(0, 2**62, (B,)) if params.seed is not None else None
        plain = triton.testing.do_bench(lambda: torch_sampler(logits, meta, seeds), return_mode="median")
        forward = triton.testing.do_bench(lambda: sampler(logits, meta, seeds), return_mode="median")
        both = triton.testing.do_bench(lambda: sampler(logits, build(), seeds), return_mode="median")
        print(f"{name:<24} {plain:>10.3f} {forward:>11.3f} {both:>20.3f}")


def ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def sweep() -> None:
    """Each kernel alone on the same logits, per value of its tuning knobs (module constants)."""
    device = torch.device("cuda")
    logits = (torch.randn(B, V, device=device) * 3).bfloat16()
    temperature = torch.full((B,), 0.8, device=device)
    top_k, top_p = torch.full((B,), 50, device=device), torch.full((B,), 0.95, device=device)
    tokens = torch.randint(0, V, (B,), device=device)
    print(f"{'kernel':<52} {'ms':>7}")
    print(f"{'torch.argmax':<52} {ms(lambda: logits.argmax(dim=-1)):>7.3f}")
    print(f"{'greedy_sample':<52} {ms(lambda: kernels.greedy_sample(logits)):>7.3f}")
    print(f"{'gumbel_sample (no filter)':<52} "
          f"{ms(lambda: kernels.gumbel_sample(logits, temperature, temperature < 0, 1)):>7.3f}")
    print(f"{'torch.topk(5) / (20)':<52} {ms(lambda: logits.topk(5, dim=-1)):>7.3f} "
          f"{ms(lambda: logits.topk(20, dim=-1)):>7.3f}")
    for block in (1024, 2048):
        for warps in (4, 8):
            sampling_filters.BLOCK, sampling_filters.NUM_WARPS = block, warps
            for name, k, p, m in (("top_k 50", top_k, None, None), ("top_p 0.95", None, top_p, None),
                                  ("top_k 50 + top_p 0.95", top_k, top_p, None),
                                  ("min_p 0.05", None, None, torch.full((B,), 0.05, device=device))):
                t = ms(lambda: kernels.sampling_thresholds(logits, temperature, k, p, m))
                print(f"{f'thresholds {name} BLOCK={block} warps={warps}':<52} {t:>7.3f}")
    sampling_filters.BLOCK, sampling_filters.NUM_WARPS = 2048, 8
    defaults = {knob: getattr(logprobs_kernel, knob)
                for knob in ("CHUNK", "NUM_WARPS", "GROUP", "FLOOR_MIN_K")}
    for chunk in (2048, 4096, 8192):
        for warps in (4, 8):
            logprobs_kernel.CHUNK, logprobs_kernel.NUM_WARPS = chunk, warps
            times = [ms(lambda: kernels.logprobs_and_top_k(logits, tokens, k)) for k in (0, 5, 20)]
            print(f"{f'logprobs k=0/5/20 CHUNK={chunk} warps={warps}':<52} "
                  + " ".join(f"{t:>7.3f}" for t in times))
    # The top k's floor (k >= FLOOR_MIN_K): off, or from group maxima (per GROUP); each checked
    # against a stable sort of the row.
    expected = {k: logits.float().sort(dim=-1, descending=True, stable=True).indices[:, :k] for k in (1, 5, 10, 20)}
    variants = {"off": dict(FLOOR_MIN_K=10**9)}
    variants.update({f"group_max GROUP={g}": dict(FLOOR_MIN_K=1, GROUP=g) for g in (128, 256, 512)})
    for name, knobs in variants.items():
        for knob, value in dict(defaults, **knobs).items():
            setattr(logprobs_kernel, knob, value)
        for k, ids in expected.items():
            assert torch.equal(kernels.logprobs_and_top_k(logits, tokens, k)[2], ids), (name, k)
        times = [ms(lambda: kernels.logprobs_and_top_k(logits, tokens, k)) for k in expected]
        chunk, floor = logprobs_kernel.CHUNK, float("nan")
        if name != "off":
            floor = ms(lambda: logprobs_kernel._row_floors(logits, 20, chunk, triton.cdiv(V, chunk)))
        print(f"{f'logprobs k=1/5/10/20 floor {name}':<52} "
              + " ".join(f"{t:>7.3f}" for t in times) + f"   (its floor alone, k=20: {floor:.3f})")
    for knob, value in defaults.items():
        setattr(logprobs_kernel, knob, value)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time the kernels alone, per tuning knob")
    sweep() if parser.parse_args().sweep else main()
