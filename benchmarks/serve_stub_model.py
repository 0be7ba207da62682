"""`nanovllm serve` with the forward pass replaced by a stub: a step "samples" random token ids
after sleeping for as long as a GPU step takes. Everything else is real (the engine process's
scheduling, detokenizing and hand-over, the server's front, and the client you run against
it), so on any machine this shows whether they keep pace with a GPU.

    python benchmarks/serve_stub_model.py MODEL [--step-ms 2] [nanovllm serve's options]
    python benchmarks/bench_serve.py --concurrency 256 --workload chat --max-token-id 300

MODEL only gives the tokenizer and the config (its weights are never used: pass a small
checkpoint or `--load-format dummy`). Prompts must hold ids the tokenizer knows: hence
--max-token-id for a small vocabulary.
"""
import random
import sys
import time
from types import SimpleNamespace

from nanovllm.engine import model_runner


def launch(self, batch, eos_ids, after=None):
    return SimpleNamespace(batch=batch, launched_at=time.perf_counter())


def resolve(self, launched):
    left = STEP_SECONDS - (time.perf_counter() - launched.launched_at)
    if left > 0:
        time.sleep(left)
    sampled = [random.randrange(self.vocab_size) if samples else None for samples in launched.batch.samples]
    return model_runner.StepResult(sampled, None, {})


# At import, not under __main__: the engine process is spawned and imports this module again.
STEP_SECONDS = float(sys.argv[sys.argv.index("--step-ms") + 1]) / 1000 if "--step-ms" in sys.argv else 0.002
model_runner.ModelRunner.launch, model_runner.ModelRunner.resolve = launch, resolve

if __name__ == "__main__":
    from nanovllm.__main__ import main
    args = sys.argv[1:]
    if "--step-ms" in args:
        del args[args.index("--step-ms"):args.index("--step-ms") + 2]
    main(["serve", *args])
