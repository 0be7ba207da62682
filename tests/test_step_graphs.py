"""engine/cuda_graphs.py's bookkeeping without a GPU: StepGraphs with a stand-in for the CUDA graph
(it reruns the captured forward pass on the same buffers) on the Triton kernels' interpreter.
Decode and mixed steps copied into padded buffers must give transformers' greedy tokens."""
import pytest
import torch

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
    """Steps staged in one copy (StepGraphs.stage), then steps whose inputs are already on the
    device (a tensor-parallel worker's) copied in by replay, alternating with staged ones. The
    graphs' fields overlap in one block, so each step must write every field of its own graph,
    padding included: here every field is spoiled before every step."""
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=40, max_num_seqs=4, enforce_eager=True,
              enable_prefix_caching=False)         # (the second pass prefills again)
    runner = llm.llm_engine.runner
    ReplayedEagerly.replays = []
    runner.graphs = graphs = ReplayedEagerly(runner)
    assert list(graphs.mixed) == [16, 32, 40] and list(graphs.decode) == [1, 2, 4]
    # 7 + 13 + 20 of 30 tokens fill the first step; the second, 10 tokens and two decodes, pads to
    # 16 tokens; three decodes pad to 4 rows.
    prompts = [p[:n] for p, n in zip(random_prompts(3, 30, 30, seed=11), (7, 13, 30))]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = hf_greedy(tiny_qwen3, prompts, 4, ignore_eos=True)
    block, tables_start = graphs.staging.block, graphs.decode[1].spans["block_tables"][0]
    staged_prepare, steps = runner.prepare, []

    def prepare(batch, logits_indices, copied_parity, first_step):
        block[:tables_start].fill_(255)      # every field before the tables: -1, no token id (an IndexError)
        copied = copied_parity is not None and (len(steps) - first_step) % 2 == copied_parity
        inputs = prepare_inputs(batch, runner.block_size, logits_indices).to(runner.device) if copied \
            else staged_prepare(batch, logits_indices)
        steps.append((inputs.staged, inputs.input_ids.shape[0], len(batch.seqs)))
        return inputs
    for parity in (None, 0, 1):          # all staged; then every other step copied, both ways
        runner.prepare = lambda batch, rows, parity=parity, first=len(steps): prepare(batch, rows, parity, first)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    assert {key[0] for key in ReplayedEagerly.replays} == {"decode", "mixed"}
    # the padded steps (12 tokens in a graph of 16, 3 rows in one of 4), staged and copied
    assert {(True, 12, 3), (False, 12, 3), (True, 3, 3), (False, 3, 3)} <= set(steps)


@pytest.mark.slow      # ~15 s of interpreted kernels
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



def test_staged_inputs_read_as_the_host_inputs_do(tiny_qwen3):
    """StepGraphs.stage's ModelInputs (views of the graph's buffers, what a tensor-parallel
    worker is sent) hold the same values and shapes as HostInputs.to's."""
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", attention_backend="triton", block_size=16,
              max_num_batched_tokens=40, max_num_seqs=4, enforce_eager=True)
    runner = llm.llm_engine.runner
    runner.graphs = ReplayedEagerly(runner)
    checked, prepare = [], runner.prepare

    def compare(batch, logits_indices):
        inputs = prepare(batch, logits_indices)
        plain = prepare_inputs(batch, runner.block_size, logits_indices).to(runner.device)
        for a, b in ((inputs, plain), (inputs.meta, plain.meta)):
            for name, value in vars(b).items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(getattr(a, name), value), name
                elif name not in ("meta", "staged"):
                    assert getattr(a, name) == value, name
        checked.append(inputs.staged)
        return inputs
    runner.prepare = compare
    llm.generate(random_prompts(3, 5, 30, seed=4), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert any(checked)
