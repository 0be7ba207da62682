"""Count the code lines of nanovllm's core path and of each seam around it.

A code line holds code: blank lines, comments and docstrings do not count. The core path is
what one greedy request on one device runs through (generate -> schedule -> inputs -> model ->
attention -> sampler -> outputs); every other file is a seam (a feature at the edge) or is
listed as unclassified, so the count stays honest as files come and go.

    python tools/count_lines.py            # the table README's "How the code is organised" shows
"""
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nanovllm"

CORE = {
    "API and config": ["llm.py", "sampling_params.py", "outputs.py", "config.py"],
    "engine step": ["engine/llm_engine.py", "engine/scheduler.py", "engine/block_manager.py", "engine/sequence.py",
                    "engine/inputs.py", "device_copy.py", "engine/model_runner.py", "engine/detokenizer.py"],
    "model": ["models/llama.py", "models/qwen3.py", "models/registry.py", "models/checkpoint.py",
              "layers/attention.py", "kernels/reference.py", "layers/linear.py", "layers/layernorm.py",
              "layers/rotary.py", "layers/activation.py", "layers/embedding.py"],
    "sampling": ["layers/sampler.py", "layers/sampling_metadata.py"],
}
SEAMS = {
    "host/device overlap (a step launched before the last is read back)": ["engine/overlap.py"],
    "incremental text (streamed outputs, stop strings)": ["engine/incremental_detokenizer.py"],
    "generate's progress bar (tokens per second)": ["progress.py"],
    "CUDA graphs / CPU compile": ["engine/cuda_graphs.py", "engine/graph_inputs.py", "engine/cpu_compile.py"],
    "KV cache memory (sizing, profiling)": ["engine/kv_cache_memory.py"],
    "the auto dtype (CPU, float32 checkpoints); the CPU's float32 matmuls and batched attention": ["cpu_dtype.py", "layers/cpu_linear.py",
                                                               "layers/cpu_attention.py"],
    "Triton kernels": ["kernels/*.py", "layers/fusion.py", "layers/attention_backends.py", "layers/fused_sampling.py",
                       "!kernels/reference.py"],
    "tensor parallelism": ["engine/tensor_parallel.py", "engine/tp_workers.py", "engine/ctrl_c.py", "distributed.py"],
    "data parallelism (Ray, processes)": ["data_parallel.py", "replica_processes.py", "ray.py"],
    "validation of arguments and requests (vLLM's checks and messages)": ["param_checks.py", "engine/request_checks.py", "config_checks.py",
                                                                          "chat_messages.py"],
    "sampler inputs, penalties, logprobs": ["engine/sampling_inputs.py", "engine/token_histograms.py",
                                            "engine/logprob_rows.py", "layers/penalties.py", "layers/logprobs.py"],
    "beam search": ["beam_search.py"],
    "speculative decoding": ["spec_decode/*.py"],
    "quantization": ["layers/quantization/*.py", "quantization/*.py"],
    "other model families": ["layers/rope_scaling.py", "layers/gelu.py", "models/*.py", "!models/llama.py", "!models/qwen3.py",
                             "!models/registry.py", "!models/checkpoint.py", "!models/shapes.py",
                             "!models/model_dir.py", "!models/dummy_weights.py"],
    "GGUF": ["gguf.py"],
    "finding a checkpoint (local, GGUF, demo, Hub); dummy weights": ["models/model_dir.py", "models/dummy_weights.py"],
    "server and AsyncLLM": ["entrypoints/*.py", "__main__.py"],
    "nano-vllm's dict access to outputs": ["nano_vllm_compat.py"],
    "fixtures (demo model, benchmark workloads)": ["demo_model.py", "demo_assets.py", "bench_workload.py",
                                                  "models/shapes.py"],
}


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment, or part of a docstring."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines.difference_update(range(body[0].lineno, body[0].end_lineno + 1))
    return len(lines)


def expand(patterns: list[str]) -> list[Path]:
    chosen = []
    for pattern in patterns:
        if not pattern.startswith("!"):
            chosen += [p for p in sorted(ROOT.glob(pattern)) if p.name != "__init__.py" or "*" not in pattern]
    dropped = {ROOT / p[1:] for p in patterns if p.startswith("!")}
    return [p for p in dict.fromkeys(chosen) if p not in dropped]


def main() -> None:
    counts = {p: code_lines(p.read_text()) for p in ROOT.rglob("*.py")}
    seen, rows = set(), []
    for title, groups in (("core path", CORE), ("seams", SEAMS)):
        for name, patterns in groups.items():
            files = [p for p in expand(patterns) if p in counts and p not in seen]
            seen.update(files)
            rows.append((title, name, len(files), sum(counts[p] for p in files)))
    rest = [p for p in counts if p not in seen and counts[p]]
    rows.append(("other", "unclassified: " + ", ".join(str(p.relative_to(ROOT)) for p in rest) if rest else "-",
                 len(rest), sum(counts[p] for p in rest)))
    print(f"| part | what | files | code lines |\n|---|---|---|---|")
    for title, name, files, lines in rows:
        print(f"| {title} | {name} | {files} | {lines:,} |")
    core = [r for r in rows if r[0] == "core path"]
    print(f"| **core path** | all of the above | {sum(r[2] for r in core)} | **{sum(r[3] for r in core):,}** |")
    print(f"| **nanovllm/** | everything | {len(counts)} | {sum(counts.values()):,} |")


if __name__ == "__main__":
    sys.exit(main())
