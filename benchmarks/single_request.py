"""Single-request decode latency: batch 1, a 1,024-token prompt, CUDA graphs (Qwen3-0.6B shape,
dummy weights). Per-token time = (time for 1 + N tokens - time for 1 token) / N."""
import random
import time

from nanovllm import LLM, SamplingParams
from nanovllm.models.shapes import shape_checkpoint_dir

start = time.perf_counter()
llm = LLM(shape_checkpoint_dir("qwen3-0.6b"), load_format="dummy", max_model_len=4096,
          enable_prefix_caching=False)
print(f"start-up (dummy weights, warm-up, KV cache, graph capture): {time.perf_counter() - start:.1f} s")
prompt = [random.Random(0).randint(0, 10000) for _ in range(1024)]
N = 256


def timed(max_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start


timed(N + 1)                                  # warm-up
prefill = min(timed(1) for _ in range(3))
total = min(timed(N + 1) for _ in range(3))
print(f"batch-1 decode at ~1,100-token context: {1000 * (total - prefill) / N:.3f} ms/token "
      f"(prefill of 1,024 tokens: {1000 * prefill:.1f} ms)")
