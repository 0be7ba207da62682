"""engine/cuda_graphs.py's bookkeeping without a GPU: StepGraphs with a stand-in for the CUDA graph
(it reruns the captured forward pass on the same buffers) on the Triton kernels' interpreter.
Decode and mixed steps copied into padded buffers must give transformers' greedy tokens."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import cuda_graphs
from nanovllm.engine.inputs import prepare_inputs
from nanovllm.kernels import triton_available
from tests.conftest import KERNEL_DEVICE, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not triton_available() or KERNEL_DEVICE != "cpu",
                                reason="the interpreter stand-in runs on a CPU machine with triton")


class ReplayedEagerly(cuda_graphs.StepGraphs):
    """Captures by remembering the forward pass; a replay reruns it into the captured output."""
    replays: list = []

    def _capture(self, inputs):
        ids, positions, meta = inputs.tensors["input_ids"], inputs.tensors["positions"], inputs.meta
        key = ("decode" if inputs.is_decode else "mixed", inputs.tokens)
        self.outputs[id(inputs)] = self.model(ids, positions, meta)
        graphs = self

        class Graph:
            def replay(self):
                graphs.replays.append(key)
                graphs.outputs[id(inputs)].copy_(graphs.model(ids, positions, meta))
        return Graph()


def test_padded_decode_and_mixed_steps_keep_greedy_tokens(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=40, max_num_seqs=3, enforce_eager=True)
    runner = llm.llm_engine.runner
    runner.graphs = ReplayedEagerly(runner)
    assert list(runner.graphs.mixed) == [16, 32, 40] and list(runner.graphs.decode) == [1, 2, 3]
    prompts = random_prompts(4, 5, 50, seed=11)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(tiny_qwen3, prompts, 6, ignore_eos=True)
    kinds = {key[0] for key in ReplayedEagerly.replays}
    assert kinds == {"decode", "mixed"}     # both families replayed, padding included (3 of 3 rows, 40 tokens)


def test_verifying_step_of_one_sequence_replays_a_graph_of_its_own_size(tiny_qwen3):
    """With k proposals, a sequence's verifying step is k + 1 one-token rows: a decode graph of
    exactly that many rows is captured, and replaying it keeps the greedy tokens."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=32, max_num_seqs=4, enforce_eager=True, speculative_config=spec)
    runner = llm.llm_engine.runner
    ReplayedEagerly.replays = []
    runner.graphs = ReplayedEagerly(runner)
    assert list(runner.graphs.decode) == [1, 2, 3, 4]
    prompt = random_prompts(1, 6, 6, seed=3)[0] * 3          # repeats: the n-gram search finds proposals
    outs = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, [prompt], 24, ignore_eos=True)[0]
    assert ("decode", 3) in ReplayedEagerly.replays


def test_inputs_already_on_the_device_are_copied_into_the_graphs_buffers(tiny_qwen3):
    """A tensor-parallel worker's inputs arrive on its device, not staged: replay copies them in.
    Staged and copied steps alternate here, so each must write every field of its graph (the
    graphs' fields overlap in one block)."""
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=40, max_num_seqs=3, enforce_eager=True)
    runner = llm.llm_engine.runner
    ReplayedEagerly.replays = []
    runner.graphs = ReplayedEagerly(runner)
    staged_prepare, steps = runner.prepare, []

    def alternate(batch, logits_indices):
        steps.append(len(steps) % 2 == 0)
        if steps[-1]:
            return staged_prepare(batch, logits_indices)
        return prepare_inputs(batch, runner.block_size, logits_indices).to(runner.device)
    runner.prepare = alternate
    prompts = random_prompts(4, 5, 50, seed=12)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(tiny_qwen3, prompts, 6, ignore_eos=True)
    assert {key[0] for key in ReplayedEagerly.replays} == {"decode", "mixed"} and False in steps
