"""The host's share of a decode step, on any machine: the model is replaced by a stub that
returns zero logits, so a step's time is the engine's own Python work (scheduling, input
preparation, sampling set-up, stop checks, output handling) at a given batch size.

    PYTHONPATH=. python benchmarks/host_step.py [BATCH] [--delta [--hand-over-every N]] [--penalties]
                                                [--logprobs K] [--prompts MIN MAX] [--block-size B] [--profile]

Uses the built-in demo model (tiny vocabulary, greedy sampling), so sampling costs ~nothing.
--delta asks for an output every step, as the server's streams do (incremental
detokenization and a RequestOutput per request per step); by default only the final output,
as LLM.generate does; with --hand-over-every N, each request's output only every N steps
(a 1/N share of them at each step) and first and final ones in between, as `nanovllm
serve` asks for them (~14 steps = 0.1 s at 256 streams on an H100). --penalties adds repetition, frequency and presence penalties;
--logprobs K asks for the top K logprobs of every token (the stub's logits are then random,
so the top tokens change from step to step). --prompts sets the prompt lengths (default 100 400)
and --block-size the cache's (default 16): `--prompts 300 400 --block-size 4` gives block tables
as long as those of bench.py's contexts (~1,000-2,000 tokens in blocks of 16; the demo model
takes 1,024 tokens at most).
"""
import cProfile
import pstats
import random
import sys
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.demo_model import demo_checkpoint_dir
from nanovllm.entrypoints.hand_over import HandOver
from nanovllm.sampling_params import RequestOutputKind


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 256
    lengths = [int(v) for v in sys.argv[sys.argv.index("--prompts") + 1:][:2]] if "--prompts" in sys.argv else [100, 400]
    block_size = int(sys.argv[sys.argv.index("--block-size") + 1]) if "--block-size" in sys.argv else 16
    llm = LLM(demo_checkpoint_dir(), device="cpu", num_gpu_blocks_override=30000 * 16 // block_size,
              max_num_seqs=batch, block_size=block_size)
    engine = llm.llm_engine
    vocab = engine.runner.vocab_size
    logprobs = int(sys.argv[sys.argv.index("--logprobs") + 1]) if "--logprobs" in sys.argv else None
    make = torch.randn if logprobs is not None else torch.zeros
    engine.runner.execute = lambda inputs: make(inputs.logits_indices.shape[0], vocab)
    kind = RequestOutputKind.DELTA if "--delta" in sys.argv else RequestOutputKind.FINAL_ONLY
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randint(0, vocab - 1) for _ in range(rng.randint(*lengths))]
        penalties = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.2) \
            if "--penalties" in sys.argv else {}
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True,
                                                          output_kind=kind, logprobs=logprobs, **penalties))
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    every = int(sys.argv[sys.argv.index("--hand-over-every") + 1]) if "--hand-over-every" in sys.argv else 1
    hand_over = HandOver(interval_per_request=0.0)      # its schedule set here: each output every N steps
    start = time.perf_counter()
    for i in range(100):
        hand_over.wanted = lambda _, i=i: None if every == 1 else lambda request_id: hash(request_id) % every == i % every
        hand_over.step(engine)
    extras = (f", each output every {every} steps" if every > 1 else "") + (", penalties" if "--penalties" in sys.argv else "") + (f", logprobs {logprobs}" if logprobs else "")
    print(f"batch {batch}, {kind.name} outputs{extras}: {1000 * (time.perf_counter() - start) / 100:.2f} ms "
          f"of host work per decode step")
    if "--profile" in sys.argv:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(50):
            engine.step()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
