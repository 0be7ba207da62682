"""generate's progress bar: requests finished, and the input and output tokens per second so far
(as vLLM's)."""
import time

from tqdm.auto import tqdm

from nanovllm.outputs import RequestOutput


class ProgressBar:
    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not enabled)
        self.start, self.input_tokens, self.output_tokens = time.perf_counter(), 0, 0

    def finished(self, out: RequestOutput) -> None:
        self.input_tokens += len(out.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"est. speed input: {self.input_tokens / elapsed:.0f} toks/s, "
                                 f"output: {self.output_tokens / elapsed:.0f} toks/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
