"""The benchmark workloads, shared by `bench.py` (offline), `benchmarks/bench_serve.py` (through the
server) and `benchmarks/step_timeline.py`: random token-id prompts and output lengths, seeded.

    nano    nano-vllm's bench.py: 256 requests, 100-1024 prompt and output tokens, all admitted at
            once (seed 0: 133,966 output tokens). The draws are nano-vllm's, in its order.
    chat    1,024 short requests (200-600 prompt tokens, 20-200 output tokens): more than
            max_num_seqs, so they finish at different times and waiting ones join as others end.
    prefix  256 requests that share one 2,000-token system prompt before their own 100-500 tokens
            (the prefix cache computes it once).
    long    16 requests with 16,000-20,000-token prompts: long contexts.

Each has a CPU preset (`--preset cpu`, the default where the engine runs on a CPU): the same kind
of traffic scaled down, with max_num_seqs 16 and the SmolLM2-135M shape, to finish within a minute
on a 2-core CPU.
"""
import argparse
import random
from dataclasses import dataclass, fields, replace


GPU_SHAPE, CPU_SHAPE = "qwen3-0.6b", "smollm2-135m"      # nanovllm.models.shapes
CPU_MAX_NUM_SEQS = 16


@dataclass(frozen=True)
class WorkloadSpec:
    num_seqs: int
    min_input: int            # each request's own prompt, in tokens (the shared prefix comes on top)
    max_input: int
    min_output: int
    max_output: int
    shared_prefix: int = 0    # tokens of one system prompt put before every request's own prompt
    max_model_len: int = 4096


WORKLOADS: dict[str, WorkloadSpec] = {
    "nano": WorkloadSpec(256, 100, 1024, 100, 1024),
    "chat": WorkloadSpec(1024, 200, 600, 20, 200, max_model_len=1024),
    "prefix": WorkloadSpec(256, 100, 500, 50, 250, shared_prefix=2000),
    "long": WorkloadSpec(16, 16000, 20000, 100, 500, max_model_len=21504),
}
# The same shapes of traffic, scaled down for a CPU (with max_num_seqs 16, so `chat` still has
# requests joining as others finish).
CPU_WORKLOADS: dict[str, WorkloadSpec] = {
    "nano": WorkloadSpec(16, 64, 256, 32, 128, max_model_len=1024),
    "chat": WorkloadSpec(48, 32, 96, 8, 40, max_model_len=256),
    "prefix": WorkloadSpec(16, 32, 128, 16, 64, shared_prefix=500, max_model_len=1024),
    "long": WorkloadSpec(2, 2000, 3000, 16, 32, max_model_len=3072),
}
DESCRIPTIONS = {
    "nano": "nano-vllm's workload, all requests admitted at once",
    "chat": "many short requests; more than max_num_seqs, so new ones join as others finish",
    "prefix": "one long system prompt shared by every request (prefix cache)",
    "long": "few requests with long contexts",
}
# The flags that override a field of the chosen WorkloadSpec.
_OVERRIDES = ("num_seqs", "min_input", "max_input", "min_output", "max_output", "shared_prefix")


@dataclass
class Workload:
    prompts: list[list[int]]          # whole prompts, the shared prefix included
    output_lens: list[int]
    shared_prefix: int = 0            # how many leading tokens every prompt shares
    max_model_len: int = 4096         # long enough for every request

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload", "a preset, then any of its numbers overridden")
    group.add_argument("--workload", default="nano", choices=list(WORKLOADS),
                       help="; ".join(f"{name}: {DESCRIPTIONS[name]} ({_describe(spec)})"
                                      for name, spec in WORKLOADS.items()) + " (default: nano)")
    group.add_argument("--preset", default="auto", choices=["auto", "full", "cpu"],
                       help="full: the sizes above; cpu: scaled down for a CPU (and max_num_seqs "
                            f"{CPU_MAX_NUM_SEQS}, shape {CPU_SHAPE}); auto (default): cpu where the engine "
                            "runs on a CPU")
    group.add_argument("--num-seqs", type=int, help="number of requests")
    group.add_argument("--min-input", type=int, help="shortest own prompt, in tokens")
    group.add_argument("--max-input", type=int, help="longest own prompt, in tokens")
    group.add_argument("--min-output", type=int, help="fewest output tokens")
    group.add_argument("--max-output", type=int, help="most output tokens")
    group.add_argument("--shared-prefix", type=int, help="tokens of a system prompt shared by every request")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-token-id", type=int, default=10000, help="prompt ids are drawn from [0, this]")


def use_cpu_preset(args: argparse.Namespace, engine_on_cpu: bool) -> bool:
    """Whether --preset (auto, full or cpu) picks the CPU preset for an engine on a CPU or a GPU."""
    preset = getattr(args, "preset", "full")
    return preset == "cpu" or (preset == "auto" and engine_on_cpu)


def workload_spec(args: argparse.Namespace, cpu: bool = False) -> WorkloadSpec:
    """The chosen preset (its CPU version when `cpu`), with the numbers given on the command line."""
    name = getattr(args, "workload", "nano")
    spec = (CPU_WORKLOADS if cpu else WORKLOADS)[name]
    given = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k, None) is not None}
    spec = replace(spec, **given)
    needed = spec.shared_prefix + spec.max_input + spec.max_output
    if needed > spec.max_model_len:     # the overrides made requests longer than the preset's
        spec = replace(spec, max_model_len=-(-needed // 1024) * 1024)
    for f in fields(WorkloadSpec):
        if getattr(spec, f.name) < 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must not be negative, got {getattr(spec, f.name)}.")
    for what in ("input", "output"):
        low, high = getattr(spec, f"min_{what}"), getattr(spec, f"max_{what}")
        if low > high:
            raise ValueError(f"--min-{what} ({low}) must not exceed --max-{what} ({high}); "
                             f"the {name!r} workload's are given by --help.")
    return spec


def make_workload(args: argparse.Namespace, cpu: bool = False) -> Workload:
    """Seeded draws: the shared prefix (if any), then all prompts, then all output lengths. For
    `nano` these are nano-vllm's draws in its order (256 requests with seed 0 give 133,966 output
    tokens)."""
    spec = workload_spec(args, cpu)
    rng = random.Random(args.seed)
    prefix = [rng.randint(0, args.max_token_id) for _ in range(spec.shared_prefix)]
    prompts = [prefix + [rng.randint(0, args.max_token_id) for _ in range(rng.randint(spec.min_input, spec.max_input))]
               for _ in range(spec.num_seqs)]
    output_lens = [rng.randint(spec.min_output, spec.max_output) for _ in range(spec.num_seqs)]
    return Workload(prompts, output_lens, spec.shared_prefix, spec.max_model_len)


def _describe(spec: WorkloadSpec) -> str:
    prefix = f"{spec.shared_prefix}-token shared prefix + " if spec.shared_prefix else ""
    return (f"{spec.num_seqs} requests, {prefix}{spec.min_input}-{spec.max_input} prompt tokens, "
            f"{spec.min_output}-{spec.max_output} output tokens")
