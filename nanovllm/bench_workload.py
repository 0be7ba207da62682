"""nano-vllm's benchmark workload, shared by `bench.py` (offline) and `benchmarks/bench_serve.py`
(through the server): random token-id prompts and output lengths, drawn in nano-vllm's order."""
import argparse
import random
from dataclasses import dataclass


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-input", type=int, default=100)
    parser.add_argument("--max-input", type=int, default=1024)
    parser.add_argument("--min-output", type=int, default=100)
    parser.add_argument("--max-output", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-token-id", type=int, default=10000, help="prompt ids are drawn from [0, this]")


def make_workload(args: argparse.Namespace) -> Workload:
    """The same draws in the same order as nano-vllm's bench.py: all prompts, then all lengths
    (256 requests with seed 0 give 133,966 output tokens)."""
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, args.max_token_id) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_seqs)]
    return Workload(prompts, [rng.randint(args.min_output, args.max_output) for _ in range(args.num_seqs)])
